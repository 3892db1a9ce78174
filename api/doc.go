// Package api is walhook's admin and REST Hooks API: subscriptions that
// subscribers create, list, change, rotate and delete themselves.
//
// Invariants:
//   - Every request is authenticated: the admin token (constant-time compare)
//     sees everything; a forward-authenticated caller sees and touches only the
//     subscriptions its tenant owns and their dead letters, and others' are 404
//     to it. Ownership is the subscription's tenant, never an event's: the dead
//     letters of config-file and tenant-less subscriptions are the admin's.
//   - A subscription is stored only after its target passed the safe-target
//     check and, unless switched off, the X-Hook-Secret handshake.
//   - The API writes walhook.subscriptions and nothing else: the change reaches
//     the pipeline through the replication stream, in commit order.
//   - Errors are JSON {"error": "..."} with a 4xx status; secrets appear only in
//     the answers to create and rotate-secret.
package api
