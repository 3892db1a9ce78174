package main

import (
	"context"
	"strings"
	"testing"

	"github.com/walhook/walhook/cdc"
)

// TestSlotFailoverSetting: slot_failover true, false and auto on the
// server the tests use. true before 17 is a clear error that creates nothing;
// on 17+ auto and true make a failover slot, false a plain one, and a plain
// slot becomes a failover slot when setup runs again with auto.
func TestSlotFailoverSetting(t *testing.T) {
	t.Parallel()
	e := newEnv(t, "slot_failover: true\n")
	var v string
	if err := e.db.Pool.QueryRow(context.Background(), `SHOW server_version_num`).Scan(&v); err != nil {
		t.Fatal(err)
	}
	version, _ := cdc.ParseServerVersion(v)
	failover := func() *bool {
		var f *bool
		if err := e.db.Pool.QueryRow(context.Background(), `SELECT (to_jsonb(s) ->> 'failover')::bool FROM pg_replication_slots s
			WHERE slot_name = $1`, e.db.Name).Scan(&f); err != nil {
			t.Fatalf("read the slot: %v", err)
		}
		return f
	}

	code, out, stderr := e.walhook("setup")
	if version < cdc.FailoverSlotVersion {
		if code != exitFail || !strings.Contains(stderr, "slot_failover: true needs PostgreSQL 17 or newer") {
			t.Fatalf("slot_failover: true on %d: exit %d: %s", version, code, stderr)
		}
		if e.slotExists() {
			t.Error("a refused setup created the slot")
		}
		e.writeConfig("")
		if code, out, stderr := e.walhook("setup"); code != 0 || !strings.Contains(out, "no failover slots before PostgreSQL 17") {
			t.Fatalf("auto on %d: exit %d: %s %s", version, code, out, stderr)
		}
		if f := failover(); f != nil {
			t.Errorf("PostgreSQL %d has a failover column: %v", version, *f)
		}
		return
	}
	if code != 0 || !strings.Contains(out, "(failover slot)") {
		t.Fatalf("slot_failover: true: exit %d: %s %s", code, out, stderr)
	}
	if f := failover(); f == nil || !*f {
		t.Fatalf("slot_failover: true made failover = %v", f)
	}
	e.exec(`SELECT pg_drop_replication_slot($1)`, e.db.Name)
	e.writeConfig("slot_failover: false\n")
	if code, out, stderr := e.walhook("setup"); code != 0 || !strings.Contains(out, "not a failover slot (slot_failover: false)") {
		t.Fatalf("slot_failover: false: exit %d: %s %s", code, out, stderr)
	}
	if f := failover(); *f {
		t.Error("slot_failover: false made a failover slot")
	}
	e.writeConfig("")
	if code, out, stderr := e.walhook("setup"); code != 0 || !strings.Contains(out, "failover slot: made one now") {
		t.Fatalf("auto over a plain slot: exit %d: %s %s", code, out, stderr)
	}
	if f := failover(); !*f {
		t.Error("auto left the plain slot plain")
	}
}
