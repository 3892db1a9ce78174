package pgstore

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/walhook/walhook/internal/pgtest"
	"github.com/walhook/walhook/outbox"
)

// newSchemaDB is a database with walhook's schema (no slot).
func newSchemaDB(t *testing.T) *pgtest.DB {
	t.Helper()
	db := pgtest.New(t)
	for _, q := range SchemaSQL() {
		if _, err := db.Pool.Exec(context.Background(), q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	return db
}

func parked(id string, seq uint64) outbox.ParkedEvent {
	now := time.Now()
	return outbox.ParkedEvent{Event: outbox.Event{ID: id, Type: "a", ResourceID: "r1", Payload: []byte(`{}`), Seq: seq},
		Attempts: 1, Since: now, NextAttempt: now}
}

// TestAnOlderEpochCannotWriteParkedRows: once another store (another replica)
// took the delivery lease, every fenced write of the older epoch fails with
// ErrFenced and changes nothing, while the newer epoch's writes go through.
func TestAnOlderEpochCannotWriteParkedRows(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newSchemaDB(t)
	old, cur := New(db.Pool, "slot1"), New(db.Pool, "slot1")
	if err := old.Acquire(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if err := old.Park(ctx, "s", []outbox.ParkedEvent{parked("e1", 1)}); err != nil {
		t.Fatalf("the holder parks: %v", err)
	}
	if err := cur.Acquire(ctx, 0); err != nil {
		t.Fatal(err)
	}
	rows := func() int { return count(t, db, `SELECT count(*) FROM walhook.deliveries`) }
	keys, err := cur.ParkedKeys(ctx, "s")
	if err != nil || len(keys) != 1 {
		t.Fatalf("parked keys %v, %v", keys, err)
	}
	evs, err := cur.NextParked(ctx, "s", "r1", 10, 1<<20)
	if err != nil || len(evs) != 1 {
		t.Fatalf("next parked %v, %v", evs, err)
	}
	row := []int64{evs[0].Row}
	for name, write := range map[string]func() error{
		"Park":             func() error { return old.Park(ctx, "s", []outbox.ParkedEvent{parked("e2", 2)}) },
		"Unpark":           func() error { return old.Unpark(ctx, row) },
		"Reschedule":       func() error { return old.Reschedule(ctx, row, 5, time.Now(), "x") },
		"DropParked":       func() error { return old.DropParked(ctx, "s") },
		"DeadLetterParked": func() error { return old.DeadLetterParked(ctx, "s", "x") },
		"DeadLetterRows":   func() error { return old.DeadLetterRows(ctx, row, nil) },
	} {
		if err := write(); !errors.Is(err, outbox.ErrFenced) {
			t.Errorf("%s from the older epoch: %v, want ErrFenced", name, err)
		}
	}
	if n := rows(); n != 1 {
		t.Fatalf("the older epoch's writes changed walhook.deliveries: %d rows, want 1", n)
	}
	if n := count(t, db, `SELECT count(*) FROM walhook.dead_letters`); n != 0 {
		t.Fatalf("the older epoch dead-lettered %d rows", n)
	}
	if err := cur.Unpark(ctx, row); err != nil {
		t.Fatalf("the newer epoch unparks: %v", err)
	}
	if n := rows(); n != 0 {
		t.Errorf("%d rows left after the holder's Unpark", n)
	}
}

// TestTheLeaseNeedsTheSlotsSession: Acquire with a replication session that
// does not hold the slot (a replica that lost it before it got here) fails
// with ErrFenced and leaves the current holder's epoch in force.
func TestTheLeaseNeedsTheSlotsSession(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newSchemaDB(t)
	cur, late := New(db.Pool, "slot2"), New(db.Pool, "slot2")
	if err := cur.Acquire(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if err := late.Acquire(ctx, 4242); !errors.Is(err, outbox.ErrFenced) {
		t.Fatalf("Acquire without holding the slot: %v, want ErrFenced", err)
	}
	if err := cur.Park(ctx, "s", []outbox.ParkedEvent{parked("e1", 1)}); err != nil {
		t.Errorf("the holder's epoch is still in force: %v", err)
	}
}
