// Package relay is walhook's relay mode on NATS JetStream
// (docs/scale-out.md): the sidecar that holds the slot routes events as in
// direct mode and publishes each (subscription, event) to a partition of one
// stream; workers (`walhook deliver`) own partitions and deliver them with the
// direct mode's schedulers.
//
// Invariants:
//   - Stream order is kept per partition: one goroutine publishes, every
//     message expects the previous one as the stream's last
//     (Nats-Expected-Last-Sequence), and after a failure publishing goes on one
//     message at a time from the first unacknowledged one, so a lost message
//     is never overtaken by a later one.
//   - The sidecar confirms an LSN only when JetStream acknowledged every
//     delivery before it (the Acker's contiguous prefix).
//   - Message ids are derived from the subscription and the event (like
//     webhook-ids): a republish after a crash is a duplicate JetStream drops
//     within the stream's duplicate window.
//   - A partition has at most one owner: a lease in a JetStream key-value
//     bucket, renewed every second; an owner that could not renew stops
//     before the lease can expire, and a new owner resets the partition's
//     consumer to what is unacknowledged before it delivers anything.
//   - A worker acknowledges a message when its event is finished (delivered,
//     dead-lettered, dropped, or parked: after the park stream acknowledged
//     it), each message on its own.
//   - Park writes of a partition are fenced by its owner's marker (expected
//     last subject sequence); a new owner marks, loads the parked resources,
//     then consumes, so newer events of a parked resource go behind it.
package relay
