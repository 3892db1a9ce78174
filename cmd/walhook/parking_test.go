package main

import (
	"bytes"
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/walhook/walhook/sender/sendertest"
)

// TestEndpointDownDoesNotPinWAL: with the endpoint down, events are parked
// after park_after and the slot moves on; a restart while parked changes
// nothing; when the endpoint returns, every event arrives in per-resource order.
func TestEndpointDownDoesNotPinWAL(t *testing.T) {
	t.Parallel()
	srv, down := downServer(t)
	e := newEnv(t, "defaults: {park_after: 1s, retry_initial: 100ms, retry_max_interval: 300ms}\nsubscriptions:\n"+
		sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	r := e.start()
	parked := func() int {
		var n int
		e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.deliveries`).Scan(&n)
		return n
	}
	insert := func(round int) {
		e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload)
			SELECT 'x', 'r' || g, jsonb_build_object('n', $1::int) FROM generate_series(1, 6) g`, round)
	}
	for round := 1; round <= 10; round++ {
		insert(round)
	}
	e.eventually(30*time.Second, "60 parked events", func() bool { return parked() == 60 })
	e.waitCaughtUp() // the slot passes everything written while the endpoint is down

	r.stop()
	e.start()
	insert(11)
	e.eventually(30*time.Second, "66 parked events", func() bool { return parked() == 66 })
	e.waitCaughtUp()
	if n := len(sendertest.Delivered(srv.Requests())); n != 0 {
		t.Fatalf("%d deliveries while the endpoint was down", n)
	}

	down.Store(false)
	reqs := srv.Wait(t, 60*time.Second, "every event delivered", func(rs []sendertest.Request) bool {
		seen := map[string]bool{}
		for _, r := range sendertest.Delivered(rs) {
			seen[decode(t, r.Body).ID] = true
		}
		return len(seen) == 66
	})
	last := map[string]int{}
	for _, r := range sendertest.Delivered(reqs) {
		h := hooks(t, r.Body)[0]
		res, n := deref(h.ResourceID), payloadN(t, h)
		if n < last[res] {
			t.Errorf("resource %s: event %d delivered after %d", res, n, last[res])
		}
		last[res] = n
	}
	e.eventually(30*time.Second, "the table to drain", func() bool { return parked() == 0 })
	// Drained resources are back in memory: healthy traffic does not touch the table.
	insert(12)
	e.waitCaughtUp()
	if n := parked(); n != 0 {
		t.Errorf("%d rows parked while the endpoint is up", n)
	}
}

// TestAStuckParkWriteDoesNotStopHealthyResources: while the write that parks
// a failing resource waits on a lock held on walhook.deliveries, the other
// resources of the same subscription are still delivered (the write runs off
// the scheduler's loop, docs/scheduler.md "The loop and the store"); once the
// lock goes, the failing resource is parked and, when its endpoint answers
// again, delivered in order.
func TestAStuckParkWriteDoesNotStopHealthyResources(t *testing.T) {
	t.Parallel()
	var poisonDown atomic.Bool
	poisonDown.Store(true)
	srv := sendertest.NewServer(t, func(_ int, r *sendertest.Request) (int, http.Header) {
		if poisonDown.Load() && bytes.Contains(r.Body, []byte(`"poison"`)) {
			return http.StatusServiceUnavailable, nil
		}
		return http.StatusNoContent, nil
	})
	e := newEnv(t, "defaults: {park_after: 1s, retry_initial: 100ms, retry_max_interval: 300ms}\nsubscriptions:\n"+
		sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	e.start()

	// A transaction that blocks every write to walhook.deliveries, with a
	// deadline on both sides: the test's context and the server's idle timeout.
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	conn, err := e.db.Pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(context.Background())
	for _, q := range []string{`SET LOCAL idle_in_transaction_session_timeout = '90s'`,
		`LOCK TABLE walhook.deliveries IN SHARE MODE`} {
		if _, err := tx.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}

	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) SELECT 'x', 'poison', jsonb_build_object('n', g) FROM generate_series(1, 3) g`)
	e.eventually(30*time.Second, "the park write to wait on the lock", func() bool {
		var n int
		e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_locks
			WHERE relation = 'walhook.deliveries'::regclass AND NOT granted`).Scan(&n)
		return n > 0
	})

	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) SELECT 'x', 'ok' || g, jsonb_build_object('n', g) FROM generate_series(1, 5) g`)
	srv.Wait(t, 30*time.Second, "the healthy resources delivered while the park write is stuck", func(rs []sendertest.Request) bool {
		seen := map[string]bool{}
		for _, r := range sendertest.Delivered(rs) {
			if res := deref(decode(t, r.Body).ResourceID); strings.HasPrefix(res, "ok") {
				seen[res] = true
			}
		}
		return len(seen) == 5
	})
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}

	parked := func() int {
		var n int
		e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.deliveries WHERE resource_id = 'poison'`).Scan(&n)
		return n
	}
	e.eventually(30*time.Second, "the failing resource parked", func() bool { return parked() == 3 })
	e.waitCaughtUp()
	poisonDown.Store(false)
	reqs := srv.Wait(t, 30*time.Second, "the failing resource delivered", func(rs []sendertest.Request) bool {
		n := 0
		for _, r := range sendertest.Delivered(rs) {
			if deref(decode(t, r.Body).ResourceID) == "poison" {
				n++
			}
		}
		return n >= 3
	})
	last := 0
	for _, r := range sendertest.Delivered(reqs) {
		if h := hooks(t, r.Body)[0]; deref(h.ResourceID) == "poison" {
			if n := payloadN(t, h); n < last {
				t.Errorf("poison: event %d delivered after %d", n, last)
			} else {
				last = n
			}
		}
	}
	e.eventually(30*time.Second, "the table to drain", func() bool { return parked() == 0 })
}
