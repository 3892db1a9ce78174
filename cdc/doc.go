// Package cdc turns PostgreSQL's logical replication stream (pgoutput) into
// outbox changes, and confirms back to the server what walhook has finished.
//
// Invariants:
//   - One goroutine owns the replication connection (pgconn is not safe for
//     concurrent use): it reads, decodes, hands changes on in stream order and
//     sends standby status updates.
//   - The reader never blocks on delivery: when the pipeline is full it stops
//     reading but keeps sending status updates on time.
//   - The flush position sent is the one outbox.Acker gives (or the slot's
//     starting position): never what was merely received. walhook always fills
//     the flush field itself.
//   - Control changes (subscription changes, replays, recovered rows) come only
//     from inserts into walhook.control, which only walhook's role may write;
//     logical messages with control prefixes are forged: ignored and counted.
//   - Decoding is pure (decodeRow, decodeMessage, decodeControl) and fuzzed.
package cdc
