// Package sender turns outbox batches into signed HTTP requests.
//
// Invariants:
//   - Shared, hardened transports (one set per proxy_url and tls settings,
//     route.go; TLS 1.2 at least): redirects are never followed, each attempt
//     has a deadline covering the whole exchange, response headers over 64 KiB
//     fail it, and at most 64 KiB of a body is read (a longer one's connection
//     is closed, not drained).
//   - Dynamic subscriptions reach only addresses the ssrf.Guard allows, checked
//     on the address dialed, or through a proxy on the address the tunnel is
//     asked for (proxy.go); a refusal is a permanent failure.
//   - Requests follow Standard Webhooks: webhook-id (from the batch, stable across
//     retries), webhook-timestamp (fresh per attempt) and webhook-signature
//     (v1, HMAC-SHA256, and/or v1a, ed25519, over "id.timestamp.body"; one
//     signature per key, the previous secret's too during a rotation).
//   - Results are classified by type (*DeliveryError), never by string.
package sender
