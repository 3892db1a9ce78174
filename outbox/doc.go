// Package outbox is walhook's pure core: events, subscriptions and routing, the
// per-subscription delivery workers, and ack tracking. It imports neither pgx nor
// net/http; the database and HTTP reach it through small interfaces (Deliverer,
// Store) that other packages implement.
//
// Invariants:
//   - At least once: an event is finished only when every matching subscription
//     has delivered it or durably dead-lettered it.
//   - Per-subscription order: a subscription receives events in commit order, and
//     event N+1 is not sent before event N is finished.
//   - The ack is the contiguous finished prefix: the flush LSN reported to
//     PostgreSQL is the commit end LSN of the newest transaction below which every
//     transaction is finished, or the server's WAL end when nothing is open.
//   - Identity comes from the row: a batch's webhook-id is derived from the
//     subscription and its events' ids, so a redelivery carries the same id.
//   - Only the slot's holder delivers: everything runs inside an Epoch, which
//     starts from the database and ends, cancelling all it started, before
//     the slot is free; parked-row writes are fenced by the store's lease.
//   - Order is by sequence, never arrival: in a resource's queue and in the
//     table; an event streamed again below a parked resource's mark is
//     finished without a request.
//   - Memory is bounded in bytes (Budget); the stream pauses when it is full.
package outbox
