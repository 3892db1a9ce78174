package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/walhook/walhook/internal/pgtest"
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

// TestInvalidatedSlotIsNeverSilent: the server invalidates the slot while
// walhook is stopped (max_slot_wal_keep_size; wal_status lost on every
// version, invalidation_reason from 17). run refuses with what to do, status
// says so, and `walhook recover` drops it and brings back the events committed
// meanwhile.
func TestInvalidatedSlotIsNeverSilent(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a server")
	}
	t.Parallel()
	cluster, pool := ownCluster(t, "max_slot_wal_keep_size=1MB")
	srv := sendertest.NewServer(t, nil)
	e := &env{t: t, db: &pgtest.DB{Name: "invalidated_test", URL: cluster.URL, Pool: pool}, dir: t.TempDir()}
	e.path = filepath.Join(e.dir, "walhook.yaml")
	e.writeConfig("subscriptions:\n" + sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	r := e.start()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) SELECT 'x', 'r' FROM generate_series(1, 3)`)
	srv.WaitN(t, 3, 30*time.Second)
	e.eventually(30*time.Second, "the high-water mark", func() bool {
		var high int
		e.db.Pool.QueryRow(context.Background(), `SELECT high_water_id FROM walhook.state`).Scan(&high)
		return high == 3
	})
	r.stop()
	e.eventually(30*time.Second, "the slot to be released", func() bool { return !e.slotActive() })
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) SELECT 'x', 'r' FROM generate_series(4, 6)`)
	e.exec(`CREATE TABLE filler (x text)`)
	e.eventually(60*time.Second, "the server to invalidate the slot", func() bool {
		var status string
		e.db.Pool.QueryRow(context.Background(), `SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1`, e.db.Name).Scan(&status)
		if status == "lost" {
			return true
		}
		// WAL past max_slot_wal_keep_size; the checkpoint invalidates.
		e.exec(`INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 2000)`)
		e.exec(`SELECT pg_switch_wal()`)
		e.exec(`CHECKPOINT`)
		return false
	})

	code, _, stderr := e.walhook("run")
	if code != exitFail || !strings.Contains(stderr, "was invalidated by the server") || !strings.Contains(stderr, "walhook recover") {
		t.Fatalf("run on an invalidated slot: exit %d: %s", code, stderr)
	}
	if code, _, stderr := e.walhook("setup"); code != exitFail || !strings.Contains(stderr, "was invalidated by the server") {
		t.Errorf("setup on an invalidated slot: exit %d: %s", code, stderr)
	}
	if _, text, _ := e.walhook("status"); !strings.Contains(text, "INVALIDATED") || !strings.Contains(text, "wal_removed") {
		t.Errorf("status on an invalidated slot:\n%s", text)
	}
	code, out, stderr := e.walhook("recover")
	if code != 0 || !strings.Contains(out, "dropped slot") || !strings.Contains(out, "recovered") {
		t.Fatalf("recover: exit %d: %s %s", code, out, stderr)
	}
	e.start()
	srv.Wait(t, 30*time.Second, "events 4 to 6", func(q []sendertest.Request) bool {
		seen := map[string]bool{}
		for _, x := range q {
			seen[decode(t, x.Body).ID] = true
		}
		return seen["4"] && seen["5"] && seen["6"]
	})
}
