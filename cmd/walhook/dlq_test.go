package main

import (
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/walhook/walhook/sender/sendertest"
)

// TestDeadLetterReplayKeepsTheWebhookID: an endpoint answers 400 once per
// webhook-id; the dead letters are replayed (CLI and API) and delivered with
// their original webhook-id, event id and sequence.
func TestDeadLetterReplayKeepsTheWebhookID(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	refused := map[string]bool{}
	srv := sendertest.NewServer(t, func(_ int, r *sendertest.Request) (int, http.Header) {
		mu.Lock()
		defer mu.Unlock()
		id := r.Header.Get("webhook-id")
		if !refused[id] {
			refused[id] = true
			return http.StatusBadRequest, nil
		}
		return http.StatusNoContent, nil
	})
	e := newEnv(t, "admin_token: "+adminToken+"\nsubscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	r := e.start()
	api := client{t: t, base: e.addr(r), token: adminToken}
	dead := func() int {
		var n int
		e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.dead_letters`).Scan(&n)
		return n
	}
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('a', 'r1', '{"n": 1}'), ('b', 'r2', '{"n": 2}')`)
	e.eventually(30*time.Second, "two dead letters", func() bool { return dead() == 2 })

	code, out, stderr := e.walhook("dlq", "list")
	if code != 0 || strings.Count(out, "status 400") != 2 {
		t.Fatalf("dlq list: %d\n%s%s", code, out, stderr)
	}
	if code, _, stderr := e.walhook("dlq", "replay"); code != exitConfig || !strings.Contains(stderr, "--all") {
		t.Errorf("dlq replay without a filter: %d %s", code, stderr)
	}
	// One through the API, by id.
	status, list := api.do("GET", "/v1/dead-letters?subscription=s", nil)
	rows := list["list"].([]any)
	if status != 200 || len(rows) != 2 {
		t.Fatalf("GET /v1/dead-letters: %d %v", status, list)
	}
	first := rows[0].(map[string]any)
	if status, got := api.do("POST", "/v1/dead-letters/"+jsonString(first["id"])+"/replay", nil); status != 200 || got["replayed"] != 1.0 {
		t.Fatalf("replay one: %d %v", status, got)
	}
	// The other through the CLI.
	if code, out, _ := e.walhook("dlq", "replay", "--subscription", "s"); code != 0 || !strings.Contains(out, "replayed 1") {
		t.Fatalf("dlq replay: %d %s", code, out)
	}
	reqs := srv.Wait(t, 30*time.Second, "both replays delivered", func(q []sendertest.Request) bool {
		return len(sendertest.Delivered(q)) == 2
	})
	firstID := map[string]string{}  // event id -> webhook-id of its first (refused) attempt
	firstSeq := map[string]uint64{} // event id -> sequence of its first attempt
	for _, q := range reqs {
		id := decode(t, q.Body).ID
		if q.Status == http.StatusBadRequest {
			firstID[id] = q.Header.Get("webhook-id")
			firstSeq[id] = hooks(t, q.Body)[0].Sequence
			continue
		}
		if q.Header.Get("webhook-id") != firstID[id] {
			t.Errorf("event %s replayed with webhook-id %s, first sent with %s", id, q.Header.Get("webhook-id"), firstID[id])
		}
		if env := hooks(t, q.Body)[0]; env.Sequence == 0 || env.Type == "" {
			t.Errorf("replayed envelope lost fields: %s", q.Body)
		} else if env.Sequence != firstSeq[id] {
			t.Errorf("event %s replayed with sequence %d, first sent with %d", id, env.Sequence, firstSeq[id])
		}
	}
	if n := dead(); n != 0 {
		t.Errorf("%d dead letters left after replay", n)
	}
	// Purge.
	e.exec(`INSERT INTO walhook.dead_letters (subscription, event_id, reason) VALUES ('s', 'x', 'old')`)
	if code, out, _ := e.walhook("dlq", "purge", "--all"); code != 0 || !strings.Contains(out, "purged 1") || dead() != 0 {
		t.Errorf("dlq purge: %d %s", code, out)
	}
}

// TestEndpointHealthDisablesAndEnables: an API subscription failing for
// disable_after is disabled, its events become dead letters; enable turns it
// back on and a replay delivers what was dead-lettered.
func TestEndpointHealthDisablesAndEnables(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	down := true
	srv := sendertest.NewServer(t, func(_ int, r *sendertest.Request) (int, http.Header) {
		if s := r.Header.Get("X-Hook-Secret"); s != "" {
			return 200, http.Header{"X-Hook-Secret": {s}}
		}
		mu.Lock()
		defer mu.Unlock()
		if down {
			return http.StatusServiceUnavailable, nil
		}
		return http.StatusNoContent, nil
	})
	e, api := apiEnv(t, "")
	_, sub := api.do("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": srv.HooksURL(),
		"disable_after": "2s", "park_after": "1s", "retry_initial": "100ms", "retry_max_interval": "200ms"})
	id := sub["id"].(string)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('x', 'a'), ('x', 'b')`)
	e.eventually(30*time.Second, "the subscription to be disabled", func() bool {
		_, got := api.do("GET", "/v1/subscriptions/"+id, nil)
		return got["disabled_at"] != nil
	})
	e.eventually(30*time.Second, "its events dead-lettered", func() bool {
		var n int
		e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.dead_letters WHERE subscription = $1`, id).Scan(&n)
		return n == 2
	})
	if code, out, _ := e.walhook("subscriptions", "list"); code != 0 || !strings.Contains(out, "disabled since") {
		t.Errorf("subscriptions list:\n%s", out)
	}
	mu.Lock()
	down = false
	mu.Unlock()
	if status, got := api.do("POST", "/v1/subscriptions/"+id+"/enable", nil); status != 200 || got["disabled_at"] != nil {
		t.Fatalf("enable: %d %v", status, got)
	}
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('after', 'c')`)
	srv.Wait(t, 30*time.Second, "a delivery after enable", func(q []sendertest.Request) bool {
		return len(sendertest.Delivered(hooksOnly(q))) == 1
	})
	if code, _, _ := e.walhook("dlq", "replay", "--subscription", id); code != 0 {
		t.Fatal("dlq replay failed")
	}
	srv.Wait(t, 30*time.Second, "the dead letters replayed", func(q []sendertest.Request) bool {
		return len(sendertest.Delivered(hooksOnly(q))) == 3
	})
}

// TestReplayIntoAParkedBatchedSubscription: a dead letter of a batched
// subscription is replayed while its resource is parked. It waits in the
// table in its sequence's place (before the newer parked events) and goes out
// alone, with its original webhook-id, event id and sequence, not batched
// with the others under a new id.
func TestReplayIntoAParkedBatchedSubscription(t *testing.T) {
	t.Parallel()
	var mode atomic.Int32 // 0 reject, 1 down, 2 up
	srv := sendertest.NewServer(t, func(int, *sendertest.Request) (int, http.Header) {
		return [...]int{http.StatusBadRequest, http.StatusServiceUnavailable, http.StatusNoContent}[mode.Load()], nil
	})
	e := newEnv(t, "subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`,
		"    batch_max: 10\n    park_after: 1s\n    retry_initial: 50ms\n    retry_max_interval: 200ms\n"))
	e.setup()
	e.start()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('a', 'r1', '{"n": 1}')`)
	e.eventually(30*time.Second, "the rejected event dead-lettered", func() bool {
		var n int
		e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.dead_letters`).Scan(&n)
		return n == 1
	})
	mode.Store(1)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('a', 'r1', '{"n": 2}'), ('a', 'r1', '{"n": 3}')`)
	e.eventually(30*time.Second, "the newer events parked", func() bool { return e.parked() == 2 })
	if code, out, stderr := e.walhook("dlq", "replay", "--subscription", "s"); code != 0 || !strings.Contains(out, "replayed 1") {
		t.Fatalf("dlq replay: %d %s%s", code, out, stderr)
	}
	e.eventually(30*time.Second, "the replay parked behind nothing newer", func() bool { return e.parked() == 3 })
	mode.Store(2)
	reqs := srv.Wait(t, 30*time.Second, "all three delivered", func(q []sendertest.Request) bool {
		n := 0
		for _, r := range sendertest.Delivered(q) {
			n += len(hooks(t, r.Body))
		}
		return n == 3
	})
	var rejected sendertest.Request
	var order []int
	for _, q := range reqs {
		if q.Status == http.StatusBadRequest && rejected.Body == nil {
			rejected = q
		}
		if q.Status != http.StatusNoContent {
			continue
		}
		hs := hooks(t, q.Body)
		for _, h := range hs {
			var d struct{ N int }
			json.Unmarshal(h.Data, &d)
			order = append(order, d.N)
			if d.N == 1 {
				first := hooks(t, rejected.Body)[0]
				if len(hs) != 1 || q.Header.Get("webhook-id") != rejected.Header.Get("webhook-id") || h.ID != first.ID || h.Sequence != first.Sequence {
					t.Errorf("the replay went out in a request of %d with webhook-id %s, id %s, sequence %d; first sent alone as %s, %s, %d",
						len(hs), q.Header.Get("webhook-id"), h.ID, h.Sequence, rejected.Header.Get("webhook-id"), first.ID, first.Sequence)
				}
			}
		}
	}
	if !slices.Equal(order, []int{1, 2, 3}) {
		t.Errorf("delivered in order %v, want 1 2 3 (the replay keeps its place)", order)
	}
}
