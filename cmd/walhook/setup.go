package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/walhook/walhook/cdc"
	"github.com/walhook/walhook/outbox/pgstore"
)

// setupLockKey serialises concurrent setups and teardowns of one database.
const setupLockKey = "SELECT pg_advisory_lock(hashtext('walhook setup'))"

// setupSQL is every setup statement for a server of version
// (server_version_num; 0 = not known, for --dry-run).
func setupSQL(cfg *Config, version int) []string {
	// The routing log is seeded once the slot exists (pgstore.SeedRoutingSQL).
	return append(append(pgstore.SchemaSQL(), cdc.SetupSQL(cfg.cdcConfig(), version)...), pgstore.SeedRoutingSQL(cfg.Slot))
}

// serverVersion reads the server's server_version_num.
func serverVersion(ctx context.Context, conn *pgx.Conn) (int, error) {
	var v string
	if err := conn.QueryRow(ctx, `SHOW server_version_num`).Scan(&v); err != nil {
		return 0, fmt.Errorf("read server_version_num: %w", err)
	}
	return cdc.ParseServerVersion(v)
}

// setup creates everything walhook needs. Every statement is idempotent and the
// whole runs under an advisory lock, so two replicas may run it at once.
func setup(ctx context.Context, cfg *Config, dryRun bool, out io.Writer) error {
	if dryRun {
		stmts := setupSQL(cfg, 0)
		fmt.Fprintln(out, "-- walhook setup, for a DBA: run with `psql -v ON_ERROR_STOP=1 -f` (each statement in its own")
		fmt.Fprintln(out, "-- transaction: a slot cannot be created in a transaction that wrote), as a role that may")
		fmt.Fprintln(out, "-- create schemas, owns the outbox table and has REPLICATION. Best as the role walhook connects")
		fmt.Fprintln(out, "-- as: the role that runs this owns walhook.control, and only it may write there (otherwise")
		fmt.Fprintln(out, "-- GRANT INSERT ON walhook.control to walhook's role alone; docs/security.md). Safe to run again.")
		fmt.Fprintln(out, "-- Upgrading an install that has no walhook.control yet: stop walhook first.")
		fmt.Fprintln(out, "-- slot_failover: auto makes the slot a failover slot on PostgreSQL 17 and newer (psql decides, with \\if).")
		for _, s := range stmts {
			if strings.HasSuffix(s, `\endif`) { // psql meta-commands take no semicolon
				fmt.Fprintf(out, "%s\n\n", s)
				continue
			}
			fmt.Fprintf(out, "%s;\n\n", s)
		}
		return nil
	}
	return withLock(ctx, cfg, func(conn *pgx.Conn) error {
		if err := refuseLostSlot(ctx, conn, cfg); err != nil {
			return err
		}
		if err := refuseLiveUpgrade(ctx, conn, cfg); err != nil {
			return err
		}
		return createAll(ctx, conn, cfg, out)
	})
}

// refuseLostSlot stops setup from quietly creating a new slot where one was
// lost (or from calling an invalidated one set up): the events between the
// loss and now would be skipped.
func refuseLostSlot(ctx context.Context, conn *pgx.Conn, cfg *Config) error {
	var lost bool
	var high, at, invalid string
	err := conn.QueryRow(ctx, `SELECT to_regclass('walhook.state') IS NOT NULL`).Scan(&lost)
	if err != nil || !lost {
		return err
	}
	// invalid: "-" when the slot is missing, "" while it is usable.
	err = conn.QueryRow(ctx, `SELECT st.high_water_id::text, st.updated_at::text,
		coalesce((SELECT `+cdc.InvalidationSQL()+` FROM pg_replication_slots s WHERE s.slot_name = st.slot), '-')
		FROM walhook.state st WHERE st.slot = $1`, cfg.Slot).Scan(&high, &at, &invalid)
	if errors.Is(err, pgx.ErrNoRows) || err == nil && invalid == "" {
		return nil
	}
	if err != nil {
		return err
	}
	e := &cdc.SlotMissingError{Slot: cfg.Slot, HighWater: high, At: at}
	if invalid != "-" {
		e.Invalidated = invalid
	}
	return fmt.Errorf("slot: %w", e)
}

// refuseLiveUpgrade stops setup from moving control changes to walhook.control
// under a running older walhook (this version refuses to run without the
// table, so an active slot without it is an older one streaming). The older
// one ignores the table's rows: subscription changes and replays made until
// this version takes the slot would be lost, the changes silently.
func refuseLiveUpgrade(ctx context.Context, conn *pgx.Conn, cfg *Config) error {
	var live bool
	err := conn.QueryRow(ctx, `SELECT to_regclass('walhook.control') IS NULL AND to_regclass('walhook.subscriptions') IS NOT NULL
		AND EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active)`, cfg.Slot).Scan(&live)
	if err != nil || !live {
		return err
	}
	return fmt.Errorf("slot: %q is streamed by a walhook older than this version (walhook.control does not exist yet): "+
		"stop it, run setup, then start this version. Not while it runs: it would ignore the subscription changes and "+
		"replays made until this version takes over (docs/security.md)", cfg.Slot)
}

// createAll runs the setup statements and checks the result.
func createAll(ctx context.Context, conn *pgx.Conn, cfg *Config, out io.Writer) error {
	{
		version, err := serverVersion(ctx, conn)
		if err != nil {
			return err
		}
		if version < cdc.MinServerVersion {
			return fmt.Errorf("database_url: PostgreSQL %d.%d is too old: walhook needs 14 or newer", version/10000, version%10000)
		}
		if err := cdc.CheckFailover(cfg.SlotFailover, version); err != nil {
			return err
		}
		for _, s := range setupSQL(cfg, version) {
			if _, err := conn.Exec(ctx, s); err != nil {
				return fmt.Errorf("%s: %w", firstLine(s), err)
			}
		}
		if err := checkColumns(ctx, conn, cfg); err != nil {
			return err
		}
		failover, err := checkSlot(ctx, conn, cfg)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "walhook is set up: outbox %s, publication %s, slot %s (%s)\n", cfg.table, cfg.Publication, cfg.Slot, failover)
		return nil
	}
}

// recoverSlot is `walhook recover`: after a slot loss, recreate the slot and
// send the outbox rows above the high-water mark again (with their ids, so
// receivers can drop the ones they had), plus rows created since shortly
// before the mark was written, for transactions that committed late.
func recoverSlot(ctx context.Context, cfg *Config, since time.Duration, out io.Writer) error {
	return withLock(ctx, cfg, func(conn *pgx.Conn) error {
		var exists bool
		var invalid string
		err := conn.QueryRow(ctx, `SELECT count(*) > 0, coalesce(max(`+cdc.InvalidationSQL()+`), '')
			FROM pg_replication_slots s WHERE slot_name = $1`, cfg.Slot).Scan(&exists, &invalid)
		if err != nil {
			return fmt.Errorf("read slot %q: %w", cfg.Slot, err)
		}
		if exists && invalid == "" {
			return fmt.Errorf("slot %q exists: nothing to recover", cfg.Slot)
		}
		var high string
		var updated time.Time
		err = conn.QueryRow(ctx, `SELECT high_water_id::text, updated_at FROM walhook.state WHERE slot = $1`, cfg.Slot).Scan(&high, &updated)
		if err != nil {
			return fmt.Errorf("no high-water mark for slot %q (walhook never delivered through it): run `walhook setup`", cfg.Slot)
		}
		if exists { // invalidated: it will never stream again
			if _, err := conn.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, cfg.Slot); err != nil {
				return fmt.Errorf("drop the invalidated slot %q (%s): %w", cfg.Slot, invalid, err)
			}
			fmt.Fprintf(out, "dropped slot %s: the server had invalidated it (%s)\n", cfg.Slot, invalid)
		}
		if err := createAll(ctx, conn, cfg, out); err != nil {
			return err
		}
		var hasCreatedAt bool
		conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2
			AND column_name = 'created_at')`, cfg.table.Schema, cfg.table.Name).Scan(&hasCreatedAt)
		from := updated.Add(-10 * time.Minute)
		if since > 0 {
			from = time.Now().Add(-since)
		}
		args := []any{high}
		if hasCreatedAt {
			args = append(args, from)
		}
		var n int64
		if err := conn.QueryRow(ctx, cdc.RecoverSQL(cfg.cdcConfig(), hasCreatedAt), args...).Scan(&n); err != nil {
			return fmt.Errorf("redeliver outbox rows: %w", err)
		}
		fmt.Fprintf(out, "recovered: slot %s recreated; %d outbox rows above id %s", cfg.Slot, n, high)
		if hasCreatedAt {
			fmt.Fprintf(out, " or created since %s", from.UTC().Format(time.RFC3339))
		}
		fmt.Fprintln(out, " go out again with their original ids")
		return nil
	})
}

// teardown drops the slot and publication, and with dropSchema the walhook schema.
func teardown(ctx context.Context, cfg *Config, dropSchema bool, out io.Writer) error {
	stmts := append(cdc.TeardownSQL(cfg.cdcConfig()), pgstore.TeardownSQL(cfg.Slot)...)
	if dropSchema {
		stmts = append(stmts, "DROP SCHEMA IF EXISTS walhook CASCADE")
	}
	return withLock(ctx, cfg, func(conn *pgx.Conn) error {
		for _, s := range stmts {
			if _, err := conn.Exec(ctx, s); err != nil {
				return fmt.Errorf("%s: %w", firstLine(s), err)
			}
		}
		fmt.Fprintf(out, "walhook is torn down: slot %s and publication %s dropped\n", cfg.Slot, cfg.Publication)
		return nil
	})
}

func withLock(ctx context.Context, cfg *Config, f func(*pgx.Conn) error) error {
	conn, err := pgx.Connect(ctx, cfg.DatabaseURL)
	if err != nil {
		return fmt.Errorf("connect to database: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, setupLockKey); err != nil {
		return fmt.Errorf("take setup lock: %w", err)
	}
	return f(conn)
}

// checkColumns makes sure the outbox table has the configured columns, naming the
// config key of a missing one.
func checkColumns(ctx context.Context, conn *pgx.Conn, cfg *Config) error {
	rows, err := conn.Query(ctx, `SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2`,
		cfg.table.Schema, cfg.table.Name)
	if err != nil {
		return fmt.Errorf("read outbox columns: %w", err)
	}
	have, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("read outbox columns: %w", err)
	}
	if len(have) == 0 {
		return fmt.Errorf("outbox_table: %s does not exist", cfg.table)
	}
	set := map[string]bool{}
	for _, c := range have {
		set[c] = true
	}
	c := cfg.columns
	for key, name := range map[string]string{"id": c.ID, "event": c.Event, "resource_id": c.ResourceID, "tenant": c.Tenant, "payload": c.Payload} {
		if name != "" && !set[name] {
			return fmt.Errorf("outbox_columns.%s: table %s has no column %q", key, cfg.table, name)
		}
	}
	return nil
}

// checkSlot makes sure the slot (which may have existed before) is a pgoutput
// slot of this database (slot names are cluster-wide) and fits slot_failover;
// it says whether the slot is a failover slot. pg_replication_slots has a
// failover column from PostgreSQL 17 on: it is read through to_jsonb, which
// has whatever columns the server's view has.
func checkSlot(ctx context.Context, conn *pgx.Conn, cfg *Config) (string, error) {
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
	case cfg.SlotFailover == cdc.FailoverOff:
		return "not a failover slot (slot_failover: false)", nil
	}
	// A slot made before failover slots were asked for (or before an upgrade
	// to 17): it becomes one where it is free.
	err = cdc.MakeFailoverSlot(ctx, cfg.DatabaseURL, cfg.Slot)
	switch {
	case err == nil:
		return "failover slot: made one now", nil
	case cfg.SlotFailover == cdc.FailoverOn:
		return "", fmt.Errorf("slot_failover: true, but slot %q exists and is not a failover slot, and it could not be "+
			"made one (is walhook streaming it? stop walhook and run setup again): %w", cfg.Slot, err)
	}
	return fmt.Sprintf("not a failover slot; it could not be made one (%v): stop walhook and run setup again", err), nil
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return strings.TrimSpace(line)
}
