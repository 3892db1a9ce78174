package cdc

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// ErrSlotMissing means the replication slot does not exist on the server
// walhook is connected to: it was never created (`walhook setup`), or it was
// lost — dropped, or left behind by a failover to a server that had no
// synchronised copy of it. Errors that say so match it with errors.Is.
var ErrSlotMissing = errors.New("replication slot is missing")

// SlotMissingError says which slot is missing and, when walhook delivered
// through it before (walhook.state), up to where: the events committed since
// are in no slot, and only `walhook recover` brings them back.
//
// A slot the server invalidated (Invalidated says why) is as good as missing:
// PostgreSQL will not decode from it again.
type SlotMissingError struct {
	Slot        string
	HighWater   string // highest outbox id walhook finished through the slot; "" = it never delivered here
	At          string // when that mark was written
	Invalidated string // the slot exists but the server invalidated it: wal_status lost, invalidation_reason, conflicting
}

func (e *SlotMissingError) Error() string {
	if e.Invalidated != "" {
		mark := "walhook never delivered through it: drop it (SELECT pg_drop_replication_slot('" + e.Slot + "')) and run `walhook setup`"
		if e.HighWater != "" {
			mark = fmt.Sprintf("the events since outbox id %s (%s) are in no slot. Run `walhook recover`: it drops the "+
				"invalidated slot, recreates it and redelivers the outbox rows above that mark with their original ids", e.HighWater, e.At)
		}
		return fmt.Sprintf("replication slot %q was invalidated by the server (%s) and cannot be streamed any more "+
			"(max_slot_wal_keep_size, or a recovery conflict on a standby; docs/operations.md, \"Failover\"): %s", e.Slot, e.Invalidated, mark)
	}
	if e.HighWater == "" {
		return fmt.Sprintf("replication slot %q does not exist in this database: run `walhook setup`", e.Slot)
	}
	at := ""
	if e.At != "" {
		at = ", " + e.At
	}
	return fmt.Sprintf("replication slot %q is missing although walhook delivered through it (up to outbox id %s%s): "+
		"it was dropped, or lost in a failover to a server that had no synchronised copy of it (docs/operations.md, "+
		"\"Failover\"); the events committed since are in no slot. Run `walhook recover` against this server: it "+
		"recreates the slot and redelivers the outbox rows above that mark with their original ids. `walhook setup` "+
		"will not create a fresh slot that skips them", e.Slot, e.HighWater, at)
}

// invalidationSQL is a pg_replication_slots (as s) expression: why the server
// invalidated the slot, "" while it is usable. wal_status 'lost' (13+) is
// WAL removed; invalidation_reason (17+) and conflicting (16+) are read
// through to_jsonb(s), which has the columns this version's view has.
const invalidationSQL = `coalesce(to_jsonb(s) ->> 'invalidation_reason',
	CASE WHEN s.wal_status = 'lost' THEN 'wal_removed' END,
	CASE WHEN (to_jsonb(s) ->> 'conflicting')::bool THEN 'conflicting' END, '')`

// Unwrap makes errors.Is(err, ErrSlotMissing) hold.
func (e *SlotMissingError) Unwrap() error { return ErrSlotMissing }

// Failover modes of the slot_failover setting: whether `walhook setup` creates
// the slot as a failover slot, which PostgreSQL 17 and newer synchronise to
// standbys that have sync_replication_slots on.
const (
	FailoverAuto = "auto"  // a failover slot where the server supports one (17+)
	FailoverOn   = "true"  // a failover slot, or an error before 17
	FailoverOff  = "false" // a plain slot
)

// MinServerVersion is the oldest PostgreSQL walhook streams from: pgoutput's
// messages option (walhook.emit) arrived in 14.
const MinServerVersion = 140000

// FailoverSlotVersion is the first PostgreSQL with failover slots.
const FailoverSlotVersion = 170000

// ParseServerVersion reads server_version_num ("170010") into a number.
func ParseServerVersion(s string) (int, error) {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || n < 90000 {
		return 0, fmt.Errorf("unexpected server_version_num %q", s)
	}
	return n, nil
}

// pluginArgs are the pgoutput options for a server of version v
// (server_version_num). walhook asks for protocol version 1 on every version:
// 2 (14) adds streaming of transactions in progress, 3 (15) two-phase commit,
// 4 (16) parallel streaming — walhook delivers only what committed and
// confirms commit positions, so it enables none of them, and version 1 is
// what every supported server speaks. Logical messages need 14.
func pluginArgs(v int, publication string) ([]string, error) {
	if v < MinServerVersion {
		return nil, fmt.Errorf("PostgreSQL %s is too old: walhook needs 14 or newer (pgoutput's messages option)", versionString(v))
	}
	return []string{
		"proto_version '1'",
		"publication_names " + quoteLiteral(publication),
		"messages 'true'",
	}, nil
}

// versionString prints a server_version_num as PostgreSQL names it: 170010 → "17.10".
func versionString(v int) string {
	if v >= 100000 {
		return fmt.Sprintf("%d.%d", v/10000, v%10000)
	}
	return fmt.Sprintf("%d.%d.%d", v/10000, v/100%100, v%100)
}

// MakeFailoverSlot turns an existing slot into a failover slot
// (ALTER_REPLICATION_SLOT, PostgreSQL 17+, over a replication connection). It
// fails while a walhook streams the slot.
func MakeFailoverSlot(ctx context.Context, databaseURL, slot string) error {
	pc, err := pgconn.ParseConfig(databaseURL)
	if err != nil {
		return fmt.Errorf("parse database_url: %w", err)
	}
	pc.RuntimeParams["replication"] = "database"
	pc.RuntimeParams["application_name"] = "walhook setup"
	conn, err := pgconn.ConnectConfig(ctx, pc)
	if err != nil {
		return fmt.Errorf("connect for replication: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "ALTER_REPLICATION_SLOT "+pgx.Identifier{slot}.Sanitize()+" (FAILOVER true)").ReadAll(); err != nil {
		return fmt.Errorf("make slot %q a failover slot: %w", slot, err)
	}
	return nil
}
