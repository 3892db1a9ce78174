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
//   - A missing or invalidated slot ends Run with an error that matches
//     ErrSlotMissing; nothing here creates a slot that would stream from "now"
//     where one was lost. After a failover the next session simply finds the
//     slot (a failover slot's synchronised copy, PostgreSQL 17+) or not.
//   - What differs between server versions is asked, not assumed: the
//     version (14+, pgoutput protocol 1) and the pg_replication_slots columns
//     it has (read through to_jsonb).
package cdc
