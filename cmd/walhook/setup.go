package main

import (
	"context"
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
func setupSQL(cfg *Settings, version int) []string {
	// The routing log is seeded once the slot exists (pgstore.SeedRoutingSQL).
	return append(append(pgstore.SchemaSQL(), cdc.SetupSQL(cfg.cdcConfig(), version)...), pgstore.SeedRoutingSQL(cfg.Slot))
}

// setup creates everything walhook needs. Every statement is idempotent and the
// whole runs under an advisory lock, so two replicas may run it at once.
func setup(ctx context.Context, cfg *Settings, dryRun bool, out io.Writer) error {
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
		if err := cdc.CheckNotLost(ctx, conn, cfg.Slot); err != nil {
			return err
		}
		if err := cdc.CheckNoOlderStreaming(ctx, conn, cfg.Slot); err != nil {
			return err
		}
		return createAll(ctx, conn, cfg, out)
	})
}

// createAll runs the setup statements and checks the result.
func createAll(ctx context.Context, conn *pgx.Conn, cfg *Settings, out io.Writer) error {
	version, err := cdc.ServerVersion(ctx, conn)
	if err != nil {
		return err
	}
	if err := cdc.CheckServer(version, cfg.SlotFailover); err != nil {
		return err
	}
	for _, s := range setupSQL(cfg, version) {
		if _, err := conn.Exec(ctx, s); err != nil {
			return fmt.Errorf("%s: %w", firstLine(s), err)
		}
	}
	if err := cdc.CheckColumns(ctx, conn, cfg.cdcConfig()); err != nil {
		return err
	}
	failover, err := cdc.CheckSlot(ctx, conn, cfg.cdcConfig())
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "walhook is set up: outbox %s, publication %s, slot %s (%s)\n", cfg.table, cfg.Publication, cfg.Slot, failover)
	return nil
}

// recoverSlot is `walhook recover`: after a slot loss, recreate the slot and
// send the outbox rows above the high-water mark again (with their ids, so
// receivers can drop the ones they had), plus rows created since shortly
// before the mark was written, for transactions that committed late.
func recoverSlot(ctx context.Context, cfg *Settings, since time.Duration, out io.Writer) error {
	return withLock(ctx, cfg, func(conn *pgx.Conn) error {
		exists, invalid, err := cdc.SlotHealth(ctx, conn, cfg.Slot)
		if err != nil {
			return err
		}
		if exists && invalid == "" {
			return fmt.Errorf("slot %q exists: nothing to recover", cfg.Slot)
		}
		high, updated, err := cdc.HighWater(ctx, conn, cfg.Slot)
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
		from := updated.Add(-10 * time.Minute)
		if since > 0 {
			from = time.Now().Add(-since)
		}
		n, byCreatedAt, err := cdc.Redeliver(ctx, conn, cfg.cdcConfig(), high, from)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "recovered: slot %s recreated; %d outbox rows above id %s", cfg.Slot, n, high)
		if byCreatedAt {
			fmt.Fprintf(out, " or created since %s", from.UTC().Format(time.RFC3339))
		}
		fmt.Fprintln(out, " go out again with their original ids")
		return nil
	})
}

// teardown drops the slot and publication, and with dropSchema the walhook schema.
func teardown(ctx context.Context, cfg *Settings, dropSchema bool, out io.Writer) error {
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

func withLock(ctx context.Context, cfg *Settings, f func(*pgx.Conn) error) error {
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

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return strings.TrimSpace(line)
}
