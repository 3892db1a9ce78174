package main

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/walhook/walhook/cdc"
	"github.com/walhook/walhook/outbox/pgstore"
)

// setupLockKey serialises concurrent setups and teardowns of one database.
const setupLockKey = "SELECT pg_advisory_lock(hashtext('walhook setup'))"

func setupSQL(cfg *Config) []string {
	return append(pgstore.SchemaSQL(), cdc.SetupSQL(cfg.cdcConfig())...)
}

// setup creates everything walhook needs. Every statement is idempotent and the
// whole runs under an advisory lock, so two replicas may run it at once.
func setup(ctx context.Context, cfg *Config, dryRun bool, out io.Writer) error {
	stmts := setupSQL(cfg)
	if dryRun {
		fmt.Fprintln(out, "-- walhook setup, for a DBA: run with `psql -v ON_ERROR_STOP=1 -f` (each statement in its own")
		fmt.Fprintln(out, "-- transaction: a slot cannot be created in a transaction that wrote), as a role that may")
		fmt.Fprintln(out, "-- create schemas, owns the outbox table and has REPLICATION. Safe to run again.")
		for _, s := range stmts {
			fmt.Fprintf(out, "%s;\n\n", s)
		}
		return nil
	}
	return withLock(ctx, cfg, func(conn *pgx.Conn) error {
		for _, s := range stmts {
			if _, err := conn.Exec(ctx, s); err != nil {
				return fmt.Errorf("%s: %w", firstLine(s), err)
			}
		}
		if err := checkColumns(ctx, conn, cfg); err != nil {
			return err
		}
		if err := checkSlot(ctx, conn, cfg); err != nil {
			return err
		}
		fmt.Fprintf(out, "walhook is set up: outbox %s, publication %s, slot %s\n", cfg.table, cfg.Publication, cfg.Slot)
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
// slot of this database: slot names are cluster-wide.
func checkSlot(ctx context.Context, conn *pgx.Conn, cfg *Config) error {
	var db, plugin string
	var here bool
	err := conn.QueryRow(ctx, `SELECT coalesce(database, ''), coalesce(plugin, ''), database = current_database()
		FROM pg_replication_slots WHERE slot_name = $1`, cfg.Slot).Scan(&db, &plugin, &here)
	if err != nil {
		return fmt.Errorf("slot: read %q back: %w", cfg.Slot, err)
	}
	if !here {
		return fmt.Errorf("slot: %q already exists for database %q; choose another slot name", cfg.Slot, db)
	}
	if plugin != "pgoutput" {
		return fmt.Errorf("slot: %q uses plugin %q; walhook needs pgoutput", cfg.Slot, plugin)
	}
	return nil
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return strings.TrimSpace(line)
}
