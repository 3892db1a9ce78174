package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/walhook/walhook/sender/sendertest"
)

// hook is a delivered envelope with the fields issue #4 adds.
type hook struct {
	envelope
	Sequence    uint64  `json:"sequence"`
	Coalesced   int     `json:"coalesced"`
	ResourceURL *string `json:"resource_url"`
	Truncated   bool    `json:"truncated"`
	HasData     bool    `json:"-"`
}

func hooks(t *testing.T, body []byte) []hook {
	t.Helper()
	var raw []json.RawMessage
	if strings.HasPrefix(string(body), "[") {
		if err := json.Unmarshal(body, &raw); err != nil {
			t.Fatalf("bad batch: %v", err)
		}
	} else {
		raw = []json.RawMessage{body}
	}
	var out []hook
	for _, r := range raw {
		var h hook
		if err := json.Unmarshal(r, &h); err != nil {
			t.Fatalf("bad envelope: %v: %s", err, r)
		}
		var fields map[string]json.RawMessage
		json.Unmarshal(r, &fields)
		_, h.HasData = fields["data"]
		out = append(out, h)
	}
	return out
}

func payloadN(t *testing.T, h hook) int {
	var p struct{ N int }
	if err := json.Unmarshal(h.Data, &p); err != nil {
		t.Fatalf("payload %s: %v", h.Data, err)
	}
	return p.N
}

func TestDebounceCollapsesRapidUpdates(t *testing.T) {
	t.Parallel()
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, "subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`, "    debounce: 1s\n"))
	e.setup()
	e.start()
	start := time.Now()
	for i := 1; i <= 12; i++ {
		e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.updated', 'c1', jsonb_build_object('n', $1::int))`, i)
	}
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Logf("the 12 updates took %s (slow machine)", d)
	}
	e.waitCaughtUp()
	reqs := srv.Requests()
	if len(reqs) != 1 {
		t.Fatalf("%d deliveries, want 1", len(reqs))
	}
	h := hooks(t, reqs[0].Body)[0]
	if payloadN(t, h) != 12 || h.Coalesced != 12 || h.ID != "12" {
		t.Errorf("delivered event %s n=%d coalesced=%d, want the 12th with coalesced 12", h.ID, payloadN(t, h), h.Coalesced)
	}
}

func TestDebounceMaxWaitKeepsHooksFlowing(t *testing.T) {
	t.Parallel()
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, "subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`, "    debounce: 1s\n    max_wait: 1s\n"))
	e.setup()
	e.start()
	tick := time.NewTicker(200 * time.Millisecond) // the workload's pace, not synchronisation
	defer tick.Stop()
	start := time.Now()
	for i := 1; time.Since(start) < 5*time.Second; i++ {
		e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.updated', 'c1', jsonb_build_object('n', $1::int))`, i)
		<-tick.C
	}
	e.waitCaughtUp()
	reqs := srv.Requests()
	prev := start
	for _, r := range reqs {
		// max_wait 1s; the margin absorbs a loaded CI machine. Without max_wait
		// the 200ms updates would keep the debounce open: one delivery after 5s.
		if gap := r.At.Sub(prev); gap > 2200*time.Millisecond {
			t.Errorf("%s without a delivery while updates kept coming (max_wait 1s)", gap.Round(time.Millisecond))
		}
		prev = r.At
	}
	if len(reqs) < 3 {
		t.Errorf("%d deliveries in 5s of updates, want about 5", len(reqs))
	}
}

func TestDebounceKeepsTypesApartInOrder(t *testing.T) {
	t.Parallel()
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, "subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`, "    debounce: 500ms\n"))
	e.setup()
	e.start()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('contact.created', 'c1')`)
	for range 5 {
		e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('contact.updated', 'c1')`)
	}
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('contact.deleted', 'c1')`)
	e.waitCaughtUp()
	var got []string
	for _, r := range srv.Requests() {
		h := hooks(t, r.Body)[0]
		got = append(got, fmt.Sprintf("%s×%d", h.Type, h.Coalesced))
	}
	if fmt.Sprint(got) != "[contact.created×1 contact.updated×5 contact.deleted×1]" {
		t.Errorf("got %v", got)
	}
}

func TestBatchingAMassInsert(t *testing.T) {
	t.Parallel()
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, "subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`, "    batch_max: 500\n"))
	e.setup()
	e.start()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload)
		SELECT 'contact.imported', 'c' || g, jsonb_build_object('n', g) FROM generate_series(1, 20000) g`)
	e.waitCaughtUp()
	reqs := srv.Requests()
	if len(reqs) > 40 {
		t.Errorf("%d requests for 20,000 events with batch_max 500, want at most 40", len(reqs))
	}
	seen := map[string]int{}
	lastSeq := map[string]uint64{}
	for _, r := range reqs {
		if r.Body[0] != '[' {
			t.Fatalf("batch body is not an array: %.40s", r.Body)
		}
		for _, h := range hooks(t, r.Body) {
			seen[h.ID]++
			res := deref(h.ResourceID)
			if h.Sequence <= lastSeq[res] {
				t.Errorf("resource %s: sequence %d after %d", res, h.Sequence, lastSeq[res])
			}
			lastSeq[res] = h.Sequence
		}
	}
	if len(seen) != 20000 {
		t.Errorf("%d distinct events, want 20000", len(seen))
	}
	for id, n := range seen {
		if n != 1 {
			t.Errorf("event %s delivered %d times", id, n)
		}
	}
	var sizes []int
	for _, r := range reqs {
		sizes = append(sizes, len(hooks(t, r.Body)))
	}
	t.Logf("20,000 events in %d requests: %v", len(reqs), sizes)
}

// TestOrderingAcrossRetries: 40 resources × 10 ordered events against an
// endpoint that fails every webhook-id once. At the receiver, no attempt for
// event n+1 of a resource arrives before event n of it succeeded.
func TestOrderingAcrossRetries(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	failed := map[string]bool{}
	srv := sendertest.NewServer(t, func(_ int, r *sendertest.Request) (int, http.Header) {
		mu.Lock()
		defer mu.Unlock()
		id := r.Header.Get("webhook-id")
		if !failed[id] {
			failed[id] = true
			return http.StatusServiceUnavailable, nil
		}
		return http.StatusOK, nil
	})
	e := newEnv(t, "defaults: {retry_initial: 50ms, retry_max_interval: 200ms}\nsubscriptions:\n"+
		sub("s", srv.HooksURL(), `["*"]`, "    max_in_flight: 16\n"))
	e.setup()
	e.start()
	for round := 1; round <= 10; round++ {
		e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload)
			SELECT 'x', 'r' || g, jsonb_build_object('n', $1::int) FROM generate_series(1, 40) g`, round)
	}
	reqs := srv.Wait(t, 60*time.Second, "400 deliveries", func(r []sendertest.Request) bool {
		return len(sendertest.Delivered(r)) >= 400
	})
	done := map[string]int{} // resource -> last n delivered
	for _, r := range reqs {
		h := hooks(t, r.Body)[0]
		res, n := deref(h.ResourceID), payloadN(t, h)
		if n > done[res]+1 {
			t.Errorf("resource %s: attempt for event %d before event %d succeeded", res, n, done[res]+1)
		}
		if r.Status == http.StatusOK {
			done[res] = n
		}
	}
	for i := 1; i <= 40; i++ {
		if done["r"+strconv.Itoa(i)] != 10 {
			t.Errorf("resource r%d: last delivered %d, want 10", i, done["r"+strconv.Itoa(i)])
		}
	}
}

func TestHangingResourceDoesNotDelayOthers(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	srv := sendertest.NewServer(t, func(_ int, r *sendertest.Request) (int, http.Header) {
		if strings.Contains(string(r.Body), `"resource_id":"slow"`) {
			<-release
		}
		return http.StatusNoContent, nil
	})
	t.Cleanup(func() { close(release) })
	e := newEnv(t, "subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`, "    timeout: 60s\n"))
	e.setup()
	e.start()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('x', 'slow')`)
	start := time.Now()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) SELECT 'x', 'fast' || g FROM generate_series(1, 50) g`)
	srv.Wait(t, 30*time.Second, "the fast resources", func(r []sendertest.Request) bool { return len(r) >= 50 })
	took := time.Since(start)
	t.Logf("50 other resources delivered in %s while one hangs", took.Round(time.Millisecond))
	if took > 5*time.Second {
		t.Errorf("other resources took %s behind a hanging one", took)
	}
	for _, r := range srv.Requests() {
		if strings.Contains(string(r.Body), `"resource_id":"slow"`) {
			t.Error("the hanging request completed: the test proves nothing")
		}
	}
}

func TestSkinnyPayloads(t *testing.T) {
	t.Parallel()
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, "subscriptions:\n"+sub("skinny", srv.HooksURL(), `["*"]`,
		"    payload: skinny\n    resource_url: https://api.example.com/contacts/{resource_id}\n")+
		sub("small", srv.HooksURL()+"?small", `["big"]`,
			"    max_payload_bytes: 16\n    resource_url: https://api.example.com/c/{resource_id}\n"))
	e.setup()
	e.start()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.updated', 'c/1', '{"name": "Ada"}')`)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('big', 'b1', jsonb_build_object('blob', repeat('x', 100)))`)
	e.waitCaughtUp()
	for _, r := range srv.Requests() {
		h := hooks(t, r.Body)[0]
		if h.HasData {
			t.Errorf("%s: skinny envelope has data: %s", h.Type, r.Body)
		}
		switch {
		case h.Type == "contact.updated":
			if deref(h.ResourceURL) != "https://api.example.com/contacts/c%2F1" || h.Truncated {
				t.Errorf("skinny envelope %s", r.Body)
			}
		case h.Type == "big" && h.Truncated:
			if deref(h.ResourceURL) != "https://api.example.com/c/b1" {
				t.Errorf("truncated envelope %s", r.Body)
			}
		}
	}
	var truncated int
	for _, r := range srv.Requests() {
		if hooks(t, r.Body)[0].Truncated {
			truncated++
		}
	}
	if len(srv.Requests()) != 3 || truncated != 1 {
		t.Errorf("%d requests, %d truncated; want 3 and 1", len(srv.Requests()), truncated)
	}
}
