package cdc

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// What `walhook setup` and `walhook recover` check and read on a connection
// of the database: the server, the outbox table's columns, the slot and its
// high-water mark. cmd runs them in order, under its setup lock.

// ServerVersion reads the server's server_version_num.
func ServerVersion(ctx context.Context, conn *pgx.Conn) (int, error) {
	var v string
	if err := conn.QueryRow(ctx, `SHOW server_version_num`).Scan(&v); err != nil {
		return 0, fmt.Errorf("read server_version_num: %w", err)
	}
	return ParseServerVersion(v)
}

// CheckServer refuses a server walhook cannot stream from, or one that cannot
// make the slot slot_failover asks for.
func CheckServer(version int, slotFailover string) error {
	if version < MinServerVersion {
		return fmt.Errorf("database_url: PostgreSQL %d.%d is too old: walhook needs 14 or newer", version/10000, version%10000)
	}
	return CheckFailover(slotFailover, version)
}

// CheckNotLost stops setup from quietly creating a new slot where one was lost
// (or from calling an invalidated one set up): the events between the loss and
// now would be skipped. It returns a *SlotMissingError when walhook delivered
// through slot before and the slot is gone or invalidated.
func CheckNotLost(ctx context.Context, conn *pgx.Conn, slot string) error {
	var known bool
	var high, at, invalid string
	err := conn.QueryRow(ctx, `SELECT to_regclass('walhook.state') IS NOT NULL`).Scan(&known)
	if err != nil || !known {
		return err
	}
	// invalid: "-" when the slot is missing, "" while it is usable.
	err = conn.QueryRow(ctx, `SELECT st.high_water_id::text, st.updated_at::text,
		coalesce((SELECT `+invalidationSQL+` FROM pg_replication_slots s WHERE s.slot_name = st.slot), '-')
		FROM walhook.state st WHERE st.slot = $1`, slot).Scan(&high, &at, &invalid)
	if errors.Is(err, pgx.ErrNoRows) || err == nil && invalid == "" {
		return nil
	}
	if err != nil {
		return err
	}
	e := &SlotMissingError{Slot: slot, HighWater: high, At: at}
	if invalid != "-" {
		e.Invalidated = invalid
	}
	return fmt.Errorf("slot: %w", e)
}

// CheckNoOlderStreaming stops setup from moving control changes to
// walhook.control under a running older walhook (this version refuses to run
// without the table, so an active slot without it is an older one streaming).
// The older one ignores the table's rows: subscription changes and replays
// made until this version takes the slot would be lost, the changes silently.
func CheckNoOlderStreaming(ctx context.Context, conn *pgx.Conn, slot string) error {
	var live bool
	err := conn.QueryRow(ctx, `SELECT to_regclass('walhook.control') IS NULL AND to_regclass('walhook.subscriptions') IS NOT NULL
		AND EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active)`, slot).Scan(&live)
	if err != nil || !live {
		return err
	}
	return fmt.Errorf("slot: %q is streamed by a walhook older than this version (walhook.control does not exist yet): "+
		"stop it, run setup, then start this version. Not while it runs: it would ignore the subscription changes and "+
		"replays made until this version takes over (docs/security.md)", slot)
}

// CheckColumns makes sure the outbox table has the configured columns, naming
// the config key of a missing one.
func CheckColumns(ctx context.Context, conn *pgx.Conn, cfg Config) error {
	rows, err := conn.Query(ctx, `SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2`,
		cfg.Table.Schema, cfg.Table.Name)
	if err != nil {
		return fmt.Errorf("read outbox columns: %w", err)
	}
	have, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("read outbox columns: %w", err)
	}
	if len(have) == 0 {
		return fmt.Errorf("outbox_table: %s does not exist", cfg.Table)
	}
	set := map[string]bool{}
	for _, c := range have {
		set[c] = true
	}
	c := cfg.Columns
	for key, name := range map[string]string{"id": c.ID, "event": c.Event, "resource_id": c.ResourceID, "tenant": c.Tenant, "payload": c.Payload} {
		if name != "" && !set[name] {
			return fmt.Errorf("outbox_columns.%s: table %s has no column %q", key, cfg.Table, name)
		}
	}
	return nil
}

// CheckSlot makes sure the slot (which may have existed before) is a pgoutput
// slot of this database (slot names are cluster-wide) and fits SlotFailover;
// it says whether the slot is a failover slot. pg_replication_slots has a
// failover column from PostgreSQL 17 on: it is read through to_jsonb, which
// has whatever columns the server's view has.
func CheckSlot(ctx context.Context, conn *pgx.Conn, cfg Config) (string, error) {
	var db, plugin string
	var here bool
	var failover *bool
	err := conn.QueryRow(ctx, `SELECT coalesce(database, ''), coalesce(plugin, ''), database = current_database(),
		(to_jsonb(s) ->> 'failover')::bool
		FROM pg_replication_slots s WHERE slot_name = $1`, cfg.Slot).Scan(&db, &plugin, &here, &failover)
	if err != nil {
		return "", fmt.Errorf("slot: read %q back: %w", cfg.Slot, err)
	}
	if !here {
		return "", fmt.Errorf("slot: %q already exists for database %q; choose another slot name", cfg.Slot, db)
	}
	if plugin != "pgoutput" {
		return "", fmt.Errorf("slot: %q uses plugin %q; walhook needs pgoutput", cfg.Slot, plugin)
	}
	switch {
	case failover == nil:
		return "no failover slots before PostgreSQL 17", nil
	case *failover:
		return "failover slot", nil
	case cfg.SlotFailover == FailoverOff:
		return "not a failover slot (slot_failover: false)", nil
	}
	// A slot made before failover slots were asked for (or before an upgrade
	// to 17): it becomes one where it is free.
	err = MakeFailoverSlot(ctx, cfg.DatabaseURL, cfg.Slot)
	switch {
	case err == nil:
		return "failover slot: made one now", nil
	case cfg.SlotFailover == FailoverOn:
		return "", fmt.Errorf("slot_failover: true, but slot %q exists and is not a failover slot, and it could not be "+
			"made one (is walhook streaming it? stop walhook and run setup again): %w", cfg.Slot, err)
	}
	return fmt.Sprintf("not a failover slot; it could not be made one (%v): stop walhook and run setup again", err), nil
}

// SlotHealth says whether slot exists and, when it does, why the server
// invalidated it ("" while it is usable).
func SlotHealth(ctx context.Context, conn *pgx.Conn, slot string) (exists bool, invalidated string, err error) {
	err = conn.QueryRow(ctx, `SELECT count(*) > 0, coalesce(max(`+invalidationSQL+`), '')
		FROM pg_replication_slots s WHERE slot_name = $1`, slot).Scan(&exists, &invalidated)
	if err != nil {
		return false, "", fmt.Errorf("read slot %q: %w", slot, err)
	}
	return exists, invalidated, nil
}

// HighWater is the highest outbox id walhook finished through slot, and when
// that mark was written; ErrNoHighWater when it never delivered through it.
func HighWater(ctx context.Context, conn *pgx.Conn, slot string) (id string, at time.Time, err error) {
	err = conn.QueryRow(ctx, `SELECT high_water_id::text, updated_at FROM walhook.state WHERE slot = $1`, slot).Scan(&id, &at)
	if err != nil {
		return "", time.Time{}, fmt.Errorf("%w: slot %q: %v", ErrNoHighWater, slot, err)
	}
	return id, at, nil
}

// ErrNoHighWater is HighWater's answer for a slot walhook never delivered through.
var ErrNoHighWater = errors.New("cdc: no high-water mark")

// Redeliver makes the outbox rows above the high-water mark high go out again
// with their original ids (a walhook.control row of kind recover), and, when
// the table has created_at, the rows created since from too (transactions that
// committed late). It says how many rows and whether created_at was used.
func Redeliver(ctx context.Context, conn *pgx.Conn, cfg Config, high string, from time.Time) (n int64, byCreatedAt bool, err error) {
	err = conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2
		AND column_name = 'created_at')`, cfg.Table.Schema, cfg.Table.Name).Scan(&byCreatedAt)
	if err != nil {
		return 0, false, fmt.Errorf("read outbox columns: %w", err)
	}
	args := []any{high}
	if byCreatedAt {
		args = append(args, from)
	}
	if err := conn.QueryRow(ctx, RecoverSQL(cfg, byCreatedAt), args...).Scan(&n); err != nil {
		return 0, false, fmt.Errorf("redeliver outbox rows: %w", err)
	}
	return n, byCreatedAt, nil
}
