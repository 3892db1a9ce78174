// Package sender turns outbox batches into signed HTTP requests.
//
// Invariants:
//   - One shared, hardened http.Client: redirects are never followed, each attempt
//     has a deadline covering the whole exchange, and only a small prefix of a
//     response body is read.
//   - Requests follow Standard Webhooks: webhook-id (from the batch, stable across
//     retries), webhook-timestamp (fresh per attempt) and webhook-signature
//     (v1, HMAC-SHA256 over "id.timestamp.body").
//   - Results are classified by type (*DeliveryError), never by string.
package sender
