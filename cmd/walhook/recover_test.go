package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/walhook/walhook/sender/sendertest"
)

// TestSlotLossIsNeverSilent: the slot is dropped while walhook is stopped;
// run and setup refuse with a clear error, and `walhook recover` brings back
// the events committed meanwhile, with their original ids.
func TestSlotLossIsNeverSilent(t *testing.T) {
	t.Parallel()
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, "subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	r := e.start()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) SELECT 'x', 'r' FROM generate_series(1, 5)`)
	srv.WaitN(t, 5, 30*time.Second)
	e.eventually(30*time.Second, "the high-water mark", func() bool {
		var high int
		e.db.Pool.QueryRow(context.Background(), `SELECT high_water_id FROM walhook.state`).Scan(&high)
		return high == 5
	})
	r.stop()
	firstIDs := map[string]string{}
	for _, q := range srv.Requests() {
		firstIDs[decode(t, q.Body).ID] = q.Header.Get("webhook-id")
	}

	e.exec(`INSERT INTO walhook.outbox (event, resource_id) SELECT 'x', 'r' FROM generate_series(6, 8)`)
	// The stopped walhook's walsender lets go of the slot a moment later.
	e.eventually(30*time.Second, "the slot to be released", func() bool { return !e.slotActive() })
	e.exec(`SELECT pg_drop_replication_slot($1)`, e.db.Name)
	code, _, stderr := e.walhook("run")
	if code != exitFail || !strings.Contains(stderr, "walhook recover") || !strings.Contains(stderr, "up to outbox id 5") {
		t.Fatalf("run after the slot loss: exit %d: %s", code, stderr)
	}
	if code, _, stderr := e.walhook("setup"); code != exitFail || !strings.Contains(stderr, "walhook recover") {
		t.Fatalf("setup after the slot loss: exit %d: %s", code, stderr)
	}
	code, out, stderr := e.walhook("recover")
	if code != 0 || !strings.Contains(out, "recovered") {
		t.Fatalf("recover: exit %d: %s %s", code, out, stderr)
	}
	e.start()
	reqs := srv.Wait(t, 30*time.Second, "events 6 to 8", func(q []sendertest.Request) bool {
		seen := map[string]bool{}
		for _, x := range q {
			seen[decode(t, x.Body).ID] = true
		}
		return seen["6"] && seen["7"] && seen["8"]
	})
	for _, q := range reqs {
		id := decode(t, q.Body).ID
		if first, ok := firstIDs[id]; ok && first != q.Header.Get("webhook-id") {
			t.Errorf("event %s came again with another webhook-id", id)
		}
	}
	if code, _, stderr := e.walhook("recover"); code != exitFail || !strings.Contains(stderr, "nothing to recover") {
		t.Errorf("recover with the slot back: %d %s", code, stderr)
	}
}
