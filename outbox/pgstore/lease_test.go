package pgstore

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/rs/zerolog"
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
	if err := old.Owns(ctx); err != nil {
		t.Fatalf("Owns of the holder: %v", err)
	}
	if err := cur.Owns(ctx); !errors.Is(err, outbox.ErrFenced) {
		t.Fatalf("Owns of a store that never acquired: %v, want ErrFenced", err)
	}
	if err := cur.Acquire(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if err := old.Owns(ctx); !errors.Is(err, outbox.ErrFenced) {
		t.Fatalf("Owns of the older epoch: %v, want ErrFenced", err)
	}
	if err := cur.Owns(ctx); err != nil {
		t.Fatalf("Owns of the newer epoch: %v", err)
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

// TestDebounceMarksOutliveAnEpochStart: loading the marks for an epoch that
// starts at a position does not delete the older ones (a crash can move the
// slot back before it); PruneMarks deletes those below a confirmed position.
func TestDebounceMarksOutliveAnEpochStart(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newSchemaDB(t)
	s := New(db.Pool, "slot3")
	lsn := func(l uint64) uint64 { return l << 16 }
	if err := s.MarkSent(ctx, "s", map[string]uint64{"old": lsn(0x100) + 2, "new": lsn(0x300)}); err != nil {
		t.Fatal(err)
	}
	got, err := s.SentMarks(ctx, "s", lsn(0x200))
	if err != nil || len(got) != 1 || got["new"] != lsn(0x300) {
		t.Fatalf("marks from 0/200: %v, %v; want only new", got, err)
	}
	got, _ = s.SentMarks(ctx, "s", lsn(0x80)) // an epoch after a crash, further back
	if got["old"] != lsn(0x100)+2 {
		t.Fatalf("marks from 0/80 after an epoch started at 0/200: %v; the old mark must still be there", got)
	}
	if n, err := s.PruneMarks(ctx, lsn(0x200)); err != nil || n != 1 {
		t.Fatalf("PruneMarks(0/200): %d, %v; want the old one deleted", n, err)
	}
	if got, _ = s.SentMarks(ctx, "s", 0); len(got) != 1 || got["new"] == 0 {
		t.Errorf("after pruning: %v", got)
	}
	if d, err := s.CheckpointTimeout(ctx); err != nil || d < 30*time.Second {
		t.Errorf("checkpoint_timeout %s, %v", d, err)
	}
}

// TestRelayKeepsMarksOfEventsStillInTheStream: in relay mode the slot is
// confirmed once JetStream has an event, long before a worker sends it, so
// the prober keeps every mark at or above the relay stream's oldest event
// even when the slot's rule would prune it: a worker taking the partition
// over may receive that older event again after the newer one was sent.
func TestRelayKeepsMarksOfEventsStillInTheStream(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := newSchemaDB(t)
	s := New(db.Pool, "slot4")
	lsn := func(l uint64) uint64 { return l << 16 }
	if err := s.MarkSent(ctx, "s", map[string]uint64{"gone": lsn(0x80), "waiting": lsn(0x150), "new": lsn(0x500)}); err != nil {
		t.Fatal(err)
	}
	floor := lsn(0x120)
	p := &Prober{store: s, log: zerolog.Nop(), MarksFloor: func(context.Context) (uint64, bool, error) { return floor, true, nil }}
	p.confirmed = []sample{{at: time.Now().Add(-24 * time.Hour), lsn: "0/400"}} // checkpointed long ago
	if err := p.pruneMarks(ctx, SlotStats{Exists: true, ConfirmedFlush: "0/450"}); err != nil {
		t.Fatal(err)
	}
	got, _ := s.SentMarks(ctx, "s", 0)
	if len(got) != 2 || got["waiting"] == 0 || got["new"] == 0 {
		t.Fatalf("marks after pruning below the slot's 0/400 with the relay's oldest event at 0/120: %v; want waiting and new", got)
	}
	// The stream emptied: the slot's rule alone.
	p.MarksFloor = func(context.Context) (uint64, bool, error) { return 0, false, nil }
	p.confirmed = []sample{{at: time.Now().Add(-24 * time.Hour), lsn: "0/400"}}
	if err := p.pruneMarks(ctx, SlotStats{Exists: true, ConfirmedFlush: "0/450"}); err != nil {
		t.Fatal(err)
	}
	if got, _ = s.SentMarks(ctx, "s", 0); len(got) != 1 || got["new"] == 0 {
		t.Fatalf("marks after pruning below 0/400 with the relay stream empty: %v; want only new", got)
	}
}
