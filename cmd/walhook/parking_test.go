package main

import (
	"context"
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
