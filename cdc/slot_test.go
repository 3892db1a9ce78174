package cdc

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/walhook/walhook/internal/pgtest"
)

func TestSlotMissingError(t *testing.T) {
	never := &SlotMissingError{Slot: "walhook"}
	lost := &SlotMissingError{Slot: "walhook", HighWater: "42", At: "2026-01-02 03:04:05+00"}
	for _, err := range []error{never, lost, fmt.Errorf("slot: %w", lost)} {
		if !errors.Is(err, ErrSlotMissing) {
			t.Errorf("errors.Is(%v, ErrSlotMissing) = false", err)
		}
	}
	if !strings.Contains(never.Error(), "run `walhook setup`") {
		t.Errorf("never created: %v", never)
	}
	for _, want := range []string{"up to outbox id 42", "lost in a failover", "`walhook recover`", "will not create a fresh slot"} {
		if !strings.Contains(lost.Error(), want) {
			t.Errorf("lost: %q lacks %q", lost, want)
		}
	}
}

func TestPluginArgsByVersion(t *testing.T) {
	for _, tc := range []struct {
		version int
		ok      bool
	}{{130012, false}, {140023, true}, {150018, true}, {160014, true}, {170010, true}, {180004, true}} {
		args, err := pluginArgs(tc.version, "pub")
		if (err == nil) != tc.ok {
			t.Errorf("%d: err = %v", tc.version, err)
			continue
		}
		if !tc.ok {
			if !strings.Contains(err.Error(), "PostgreSQL 13.12 is too old") {
				t.Errorf("%d: %v", tc.version, err)
			}
			continue
		}
		if strings.Join(args, ", ") != "proto_version '1', publication_names 'pub', messages 'true'" {
			t.Errorf("%d: args %q", tc.version, args)
		}
	}
	for s, want := range map[string]int{"170010": 170010, " 140000\n": 140000} {
		if got, err := ParseServerVersion(s); err != nil || got != want {
			t.Errorf("ParseServerVersion(%q) = %d, %v", s, got, err)
		}
	}
	for _, s := range []string{"", "17.1", "900"} {
		if _, err := ParseServerVersion(s); err == nil {
			t.Errorf("ParseServerVersion(%q) accepted", s)
		}
	}
}

func TestSlotSQLForPsql(t *testing.T) {
	// Not knowing the version (setup --dry-run), auto leaves the choice to psql.
	sql := slotSQL("s", FailoverAuto, 0)
	for _, want := range []string{`>= 170000 AS walhook_failover_slots \gset`, `\if :walhook_failover_slots`,
		"pg_create_logical_replication_slot('s', 'pgoutput', false, false, true)", `\else`,
		"pg_create_logical_replication_slot('s', 'pgoutput')\n", `\endif`} {
		if !strings.Contains(sql, want) {
			t.Errorf("dry-run slot SQL lacks %q:\n%s", want, sql)
		}
	}
	if got := slotSQL("s", FailoverOff, 0); strings.Contains(got, "true)") || strings.Contains(got, `\if`) {
		t.Errorf("slot_failover: false: %s", got)
	}
	if got := slotSQL("s", FailoverAuto, 160000); strings.Contains(got, "true)") {
		t.Errorf("auto on 16: %s", got)
	}
	if got := slotSQL("s", FailoverAuto, 170000); !strings.Contains(got, "false, false, true)") {
		t.Errorf("auto on 17: %s", got)
	}
}

// TestSlotSQLOnThisVersion runs setup's slot statement in each failover mode
// on the server the tests use: a failover slot on 17+ for auto and true, a
// clear error for true before 17, a plain slot for false; the slot's view
// has the columns this version has.
func TestSlotSQLOnThisVersion(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	ctx := context.Background()
	var version int
	var v string
	if err := db.Pool.QueryRow(ctx, `SHOW server_version_num`).Scan(&v); err != nil {
		t.Fatal(err)
	}
	version, _ = ParseServerVersion(v)
	for _, mode := range []string{FailoverAuto, FailoverOn, FailoverOff} {
		slot := db.Name + "_" + map[string]string{FailoverAuto: "auto", FailoverOn: "on", FailoverOff: "off"}[mode]
		if err := CheckFailover(mode, version); mode == FailoverOn && version < FailoverSlotVersion {
			if err == nil || !strings.Contains(err.Error(), "slot_failover: true needs PostgreSQL 17 or newer") {
				t.Errorf("%s on %d: err = %v", mode, version, err)
			}
			continue
		} else if err != nil {
			t.Fatalf("%s on %d: %v", mode, version, err)
		}
		if _, err := db.Pool.Exec(ctx, slotSQL(slot, mode, version)); err != nil {
			t.Fatalf("%s: %v", mode, err)
		}
		if _, err := db.Pool.Exec(ctx, slotSQL(slot, mode, version)); err != nil { // idempotent
			t.Fatalf("%s again: %v", mode, err)
		}
		var row map[string]any
		if err := db.Pool.QueryRow(ctx, `SELECT to_jsonb(s) FROM pg_replication_slots s WHERE slot_name = $1`, slot).Scan(&row); err != nil {
			t.Fatal(err)
		}
		failover, has := row["failover"]
		switch {
		case version < FailoverSlotVersion && has:
			t.Errorf("%d has a failover column: %v", version, row)
		case version >= FailoverSlotVersion && failover != (mode != FailoverOff):
			t.Errorf("%s on %d: failover = %v", mode, version, failover)
		}
		for col, since := range map[string]int{"wal_status": 130000, "conflicting": 160000, "invalidation_reason": 170000,
			"inactive_since": 170000, "synced": 170000} {
			if _, has := row[col]; has != (version >= since) {
				t.Errorf("PostgreSQL %d: pg_replication_slots.%s present = %v", version, col, has)
			}
		}
	}
	if version >= FailoverSlotVersion {
		// A slot made before failover was asked for becomes one.
		slot := db.Name + "_later"
		if _, err := db.Pool.Exec(ctx, slotSQL(slot, FailoverOff, version)); err != nil {
			t.Fatal(err)
		}
		if err := MakeFailoverSlot(ctx, db.URL, slot); err != nil {
			t.Fatal(err)
		}
		var failover bool
		if err := db.Pool.QueryRow(ctx, `SELECT failover FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&failover); err != nil || !failover {
			t.Errorf("after MakeFailoverSlot: failover = %v, %v", failover, err)
		}
	}
}

// TestSlotCopiesAsksEveryHost: each host of a multi-host URL is asked on its
// own; one that does not answer is reported, not fatal.
func TestSlotCopiesAsksEveryHost(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	ctx := context.Background()
	if _, err := db.Pool.Exec(ctx, slotSQL(db.Name, FailoverOff, 0)); err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(db.URL)
	if err != nil {
		t.Fatal(err)
	}
	u.Host += ",127.0.0.1:1"
	q := u.Query()
	q.Set("target_session_attrs", "read-write")
	q.Set("sslmode", "prefer")
	u.RawQuery = q.Encode()
	copies, err := SlotCopies(ctx, u.String(), db.Name, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(copies) != 2 {
		t.Fatalf("copies = %+v, want one per host", copies)
	}
	if c := copies[0]; c.Role != "primary" || !c.Exists || c.ConfirmedFlush == "" || c.Error != "" {
		t.Errorf("the primary: %+v", c)
	}
	if c := copies[1]; c.Host != "127.0.0.1:1" || c.Error == "" || c.Exists {
		t.Errorf("the unreachable host: %+v", c)
	}
}
