package main

import (
	"context"
	"math/rand/v2"
	"net/http"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
	"github.com/walhook/walhook/sender/sendertest"
)

func verifier(t *testing.T) *standardwebhooks.Webhook {
	wh, err := standardwebhooks.NewWebhook(testSecret)
	if err != nil {
		t.Fatal(err)
	}
	return wh
}

func TestDeliversCommittedEventsOnceInCommitOrder(t *testing.T) {
	t.Parallel()
	crm := sendertest.NewServer(t, nil)
	acme := sendertest.NewServer(t, nil)
	e := newEnv(t, "subscriptions:\n"+
		sub("crm", crm.HooksURL(), `["contact.*", "sentinel"]`)+
		sub("acme", acme.HooksURL(), `["*"]`, "    tenant: acme\n"))
	e.setup()
	e.start()

	e.exec(`BEGIN;
		INSERT INTO walhook.outbox (event, resource_id, tenant, payload) VALUES ('contact.created', 'c1', 'acme', '{"name": "Ada"}');
		INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.created', 'c2', '{"name": "Bob"}');
		COMMIT`)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, tenant, payload) VALUES ('contact.updated', 'c1', 'acme', '{"name": "Ada L"}')`)
	e.exec(`BEGIN; INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.updated', 'c2', '{"rolled": "back"}'); ROLLBACK`)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('invoice.paid', 'i1', '{}')`) // matches no crm pattern
	e.exec(`SELECT walhook.emit('contact.deleted', 'c1', '{"gone": true}', 'acme')`)
	e.exec(`INSERT INTO walhook.outbox (event, payload) VALUES ('sentinel', '{}')`)

	// The slot catching up means every delivery is finished: nothing more will come.
	e.waitCaughtUp()
	reqs := crm.Requests()
	wh := verifier(t)
	perResource := map[string][]string{}
	byType := map[string]sendertest.Request{}
	for _, r := range reqs {
		if err := wh.Verify(r.Body, r.Header); err != nil {
			t.Errorf("signature: %v", err)
		}
		env := decode(t, r.Body)
		perResource[deref(env.ResourceID)] = append(perResource[deref(env.ResourceID)], env.Type)
		byType[env.Type+"/"+deref(env.ResourceID)] = r
		if _, err := time.Parse(time.RFC3339, env.Timestamp); err != nil || !strings.HasSuffix(env.Timestamp, "Z") {
			t.Errorf("timestamp %q is not RFC 3339 UTC", env.Timestamp)
		}
	}
	if len(reqs) != 5 {
		t.Errorf("crm got %d requests, want 5: %v", len(reqs), perResource)
	}
	for res, want := range map[string][]string{
		"c1": {"contact.created", "contact.updated", "contact.deleted"},
		"c2": {"contact.created"},
		"":   {"sentinel"},
	} {
		if !slices.Equal(perResource[res], want) {
			t.Errorf("crm resource %q got %v, want %v (commit order)", res, perResource[res], want)
		}
	}
	// The message event: id is its LSN, data its payload, tenant set.
	msg := decode(t, byType["contact.deleted/c1"].Body)
	if !strings.Contains(msg.ID, "/") || !jsonEqual(msg.Data, `{"gone":true}`) || deref(msg.Tenant) != "acme" {
		t.Errorf("message event = %+v", msg)
	}
	first := decode(t, byType["contact.created/c1"].Body)
	if first.ID != "1" || !jsonEqual(first.Data, `{"name":"Ada"}`) || deref(first.Tenant) != "acme" {
		t.Errorf("first event = %+v", first)
	}

	// acme sees only its tenant's events, in order.
	acmeReqs := acme.WaitN(t, 3, 30*time.Second)
	var acmeGot []string
	for _, r := range acmeReqs {
		env := decode(t, r.Body)
		acmeGot = append(acmeGot, env.Type)
		if deref(env.Tenant) != "acme" {
			t.Errorf("acme received another tenant's event: %+v", env)
		}
	}
	if !slices.Equal(acmeGot, []string{"contact.created", "contact.updated", "contact.deleted"}) {
		t.Errorf("acme got %v", acmeGot)
	}
	if n := len(acme.Requests()); n != 3 {
		t.Errorf("acme got %d requests, want 3", n)
	}
}

func TestRetriesServerErrorsWithOneWebhookID(t *testing.T) {
	t.Parallel()
	srv := sendertest.NewServer(t, func(n int, _ *sendertest.Request) (int, http.Header) {
		if n < 2 {
			return http.StatusInternalServerError, nil
		}
		return http.StatusOK, nil
	})
	e := newEnv(t, "defaults: {retry_initial: 1s}\nsubscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	e.start()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.updated', 'c1', '{}')`)
	reqs := srv.WaitN(t, 3, 30*time.Second)
	wh := verifier(t)
	var stamps []int64
	for _, r := range reqs {
		if r.Header.Get("webhook-id") != reqs[0].Header.Get("webhook-id") {
			t.Errorf("webhook-id changed across retries: %q, %q", reqs[0].Header.Get("webhook-id"), r.Header.Get("webhook-id"))
		}
		if string(r.Body) != string(reqs[0].Body) {
			t.Errorf("body changed across retries")
		}
		if err := wh.Verify(r.Body, r.Header); err != nil {
			t.Errorf("signature: %v", err)
		}
		ts, _ := strconv.ParseInt(r.Header.Get("webhook-timestamp"), 10, 64)
		stamps = append(stamps, ts)
	}
	// Retries are at least retry_initial/2 + retry_initial apart in total: 1.5s.
	if !slices.IsSorted(stamps) || stamps[2] <= stamps[0] {
		t.Errorf("webhook-timestamps %v are not fresh per attempt", stamps)
	}
	e.exec(`INSERT INTO walhook.outbox (event, payload) VALUES ('next', '{}')`)
	srv.WaitN(t, 4, 30*time.Second)
	if n := len(sendertest.Delivered(srv.Requests())); n != 2 {
		t.Errorf("%d deliveries, want 2 (no more attempts after the 200)", n)
	}
}

func TestDeadLettersClientErrorsAndGoesOn(t *testing.T) {
	t.Parallel()
	srv := sendertest.NewServer(t, func(_ int, r *sendertest.Request) (int, http.Header) {
		if strings.Contains(string(r.Body), `"bad"`) {
			return http.StatusBadRequest, nil
		}
		return http.StatusNoContent, nil
	})
	e := newEnv(t, "subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	e.start()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.updated', 'bad', '{}')`)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.updated', 'good', '{}')`)
	srv.Wait(t, 30*time.Second, "the good event", func(r []sendertest.Request) bool {
		return len(sendertest.Delivered(r)) == 1
	})
	e.waitCaughtUp() // so the bad event is dead-lettered
	var (
		subID, eventID, reason, webhookID string
		status, attempts                  int
	)
	err := e.db.Pool.QueryRow(context.Background(), `
		SELECT subscription, event_id, status, reason, attempts, webhook_id FROM walhook.dead_letters`).
		Scan(&subID, &eventID, &status, &reason, &attempts, &webhookID)
	if err != nil {
		t.Fatalf("dead letter: %v", err)
	}
	if subID != "s" || eventID != "1" || status != 400 || attempts != 1 || !strings.Contains(reason, "400") {
		t.Errorf("dead letter = %s %s %d %q %d", subID, eventID, status, reason, attempts)
	}
	if bad := slices.IndexFunc(srv.Requests(), func(r sendertest.Request) bool { return r.Status == 400 }); bad < 0 ||
		webhookID != srv.Requests()[bad].Header.Get("webhook-id") {
		t.Errorf("dead letter webhook_id %q differs from the attempt's", webhookID)
	}
	if n := len(srv.Requests()); n != 2 {
		t.Errorf("%d requests, want 2 (a 400 is not retried)", n)
	}
}

func TestMalformedRowIsDeadLetteredAndStreamGoesOn(t *testing.T) {
	t.Parallel()
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, "outbox_table: app.events\noutbox_columns: {tenant: ''}\nsubscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.exec(`CREATE SCHEMA app`)
	e.exec(`CREATE TABLE app.events (id bigserial PRIMARY KEY, event text, resource_id text, payload text)`)
	e.setup()
	e.start()
	e.exec(`INSERT INTO app.events (event, payload) VALUES ('a', '{not json')`)
	e.exec(`INSERT INTO app.events (event, payload) VALUES (NULL, '{}')`)
	e.exec(`INSERT INTO app.events (event, payload) VALUES ('b', '{"ok": 1}')`)
	reqs := srv.WaitN(t, 1, 30*time.Second)
	e.waitCaughtUp()
	if env := decode(t, reqs[0].Body); env.ID != "3" || !jsonEqual(env.Data, `{"ok":1}`) {
		t.Errorf("delivered %+v, want event 3", env)
	}
	rows, err := e.db.Pool.Query(context.Background(), `SELECT coalesce(subscription, ''), event_id, reason FROM walhook.dead_letters ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for rows.Next() {
		var s, id, reason string
		rows.Scan(&s, &id, &reason)
		got = append(got, s+"|"+id+"|"+reason)
	}
	want := []string{"|1|payload is not valid JSON", "|2|event is null or empty"}
	if !slices.Equal(got, want) {
		t.Errorf("dead letters %q, want %q", got, want)
	}
}

func TestExistingOutboxTableWithAggregateLayout(t *testing.T) {
	t.Parallel()
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, `outbox_table: public.outbox
outbox_columns: {id: id, event: type, resource_id: aggregateid, tenant: "", payload: payload}
subscriptions:
`+sub("s", srv.HooksURL(), `["Order*", "OrderCreated"]`))
	e.exec(`CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL,
		aggregateid text NOT NULL, type text NOT NULL, payload jsonb)`)
	// "Order*" is not a valid pattern: config must say so, naming the key.
	code, _, stderr := e.walhook("run")
	if code != exitConfig || !strings.Contains(stderr, "subscriptions[s].events[0]") {
		t.Fatalf("exit %d, stderr %s", code, stderr)
	}
	e.writeConfig(`outbox_table: public.outbox
outbox_columns: {id: id, event: type, resource_id: aggregateid, tenant: "", payload: payload}
subscriptions:
` + sub("s", srv.HooksURL(), `["OrderCreated"]`))
	e.setup()
	e.start()
	e.exec(`INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', 'o-1', 'OrderCreated', '{"total": 3}')`)
	env := decode(t, srv.WaitN(t, 1, 30*time.Second)[0].Body)
	if env.Type != "OrderCreated" || deref(env.ResourceID) != "o-1" || len(env.ID) != 36 || !jsonEqual(env.Data, `{"total":3}`) {
		t.Errorf("got %+v", env)
	}
}

func TestIdleOutboxDoesNotPinWAL(t *testing.T) {
	t.Parallel()
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, "subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	e.start()
	start := e.confirmedFlush()
	e.exec(`CREATE TABLE busy (x int, pad text)`)
	for range 100 {
		e.exec(`INSERT INTO busy SELECT g, repeat('x', 200) FROM generate_series(1, 100) g`)
	}
	e.waitCaughtUp()
	if len(srv.Requests()) != 0 {
		t.Error("writes to another table produced hooks")
	}
	if e.confirmedFlush() <= start {
		t.Error("slot did not advance")
	}
}

// TestKill9LosesNothing kills walhook (a child process) mid-stream and restarts
// it: every event arrives at least once, a redelivery carries the same
// webhook-id and body, and first deliveries keep per-resource order.
func TestKill9LosesNothing(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	srv := sendertest.NewServer(t, func(int, *sendertest.Request) (int, http.Header) {
		mu.Lock() // one at a time, a little slow: the kill lands mid-stream
		defer mu.Unlock()
		time.Sleep(2 * time.Millisecond) // the endpoint's work, not synchronisation
		return http.StatusNoContent, nil
	})
	e := newEnv(t, "subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.setup()

	const events, resources = 300, 7
	child := startChild(t, e, nil)
	for i := range events / 10 {
		e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload)
			SELECT 'contact.updated', 'r' || (g % $2), jsonb_build_object('n', g) FROM generate_series($1::int, $1::int + 9) g`,
			i*10, resources)
	}
	srv.WaitN(t, events/3, 60*time.Second)
	child.Process.Signal(syscall.SIGKILL)
	child.Wait()
	before := len(srv.Requests())
	startChild(t, e, nil)

	seen := func(r []sendertest.Request) map[string]bool {
		ids := map[string]bool{}
		for _, q := range r {
			ids[decode(t, q.Body).ID] = true
		}
		return ids
	}
	reqs := srv.Wait(t, 60*time.Second, "every event", func(r []sendertest.Request) bool { return len(seen(r)) == events })
	if before >= events {
		t.Fatalf("all %d events were delivered before the kill; the test proves nothing", before)
	}
	byID := map[string]sendertest.Request{}
	lastFirst := map[string]int{} // resource -> last first-delivered n
	for _, r := range reqs {
		env := decode(t, r.Body)
		if prev, ok := byID[env.ID]; ok {
			if prev.Header.Get("webhook-id") != r.Header.Get("webhook-id") || string(prev.Body) != string(r.Body) {
				t.Errorf("event %s redelivered with another webhook-id or body", env.ID)
			}
			continue
		}
		byID[env.ID] = r
		n, _ := strconv.Atoi(env.ID)
		res := deref(env.ResourceID)
		if last, ok := lastFirst[res]; ok && n < last {
			t.Errorf("resource %s: event %d first delivered after %d", res, n, last)
		}
		lastFirst[res] = n
	}
	t.Logf("%d requests for %d events (%d before the kill)", len(reqs), events, before)
}

func startChild(t *testing.T, e *env, log *syncBuffer) *exec.Cmd { return startReplica(t, e.path, log) }

// TestStandbyTakesOver: two replicas, one streams; SIGKILL it and the other
// delivers the next event within 10s.
func TestStandbyTakesOver(t *testing.T) {
	t.Parallel()
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, "subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	first := startChild(t, e, nil)
	e.eventually(30*time.Second, "a replica to stream", e.slotActive)
	var standbyLog syncBuffer
	startChild(t, e, &standbyLog)
	e.eventually(30*time.Second, "the second replica to wait", func() bool {
		return strings.Contains(standbyLog.String(), "slot in use by another process")
	})
	e.exec(`INSERT INTO walhook.outbox (event) VALUES ('before')`)
	srv.WaitN(t, 1, 30*time.Second)
	first.Process.Signal(syscall.SIGKILL)
	first.Wait()
	killed := time.Now()
	e.exec(`INSERT INTO walhook.outbox (event) VALUES ('after')`)
	srv.Wait(t, 30*time.Second, "the event after the kill", func(r []sendertest.Request) bool {
		return slices.ContainsFunc(r, func(q sendertest.Request) bool { return decode(t, q.Body).Type == "after" })
	})
	if d := time.Since(killed); d > 10*time.Second {
		t.Errorf("takeover took %s, want under 10s", d)
	}
}

// TestKill9AtRandomMoments: walhook is killed at 10 random moments while 5,000
// events on 50 resources are written; all arrive, duplicates are identical, and
// first deliveries keep per-resource order.
func TestKill9AtRandomMoments(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos test")
	}
	t.Parallel()
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, "subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`, "    max_in_flight: 8\n"))
	e.setup()
	const events, resources = 5000, 50
	done := make(chan struct{})
	go func() { // the application keeps writing
		defer close(done)
		for i := 0; i < events; i += 50 {
			if _, err := e.db.Pool.Exec(context.Background(), `INSERT INTO walhook.outbox (event, resource_id, payload)
				SELECT 'x', 'r' || (g % $2), jsonb_build_object('n', g) FROM generate_series($1::int + 1, $1::int + 50) g`, i, resources); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	r := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	for kill := 0; kill < 10; kill++ {
		child := startChild(t, e, nil)
		e.eventually(30*time.Second, "walhook to stream", e.slotActive)
		// Let it deliver a little, then kill it at a random moment.
		n := len(srv.Requests())
		srv.Wait(t, 30*time.Second, "some progress", func(q []sendertest.Request) bool { return len(q) > n+r.IntN(200) })
		child.Process.Signal(syscall.SIGKILL)
		child.Wait()
	}
	<-done
	startChild(t, e, nil)
	reqs := srv.Wait(t, 120*time.Second, "every event", func(q []sendertest.Request) bool {
		seen := map[string]bool{}
		for _, x := range q {
			seen[decode(t, x.Body).ID] = true
		}
		return len(seen) == events
	})
	byID := map[string]sendertest.Request{}
	last := map[string]int{}
	for _, q := range reqs {
		env := decode(t, q.Body)
		if prev, ok := byID[env.ID]; ok {
			if prev.Header.Get("webhook-id") != q.Header.Get("webhook-id") || string(prev.Body) != string(q.Body) {
				t.Errorf("event %s redelivered differently", env.ID)
			}
			continue
		}
		byID[env.ID] = q
		n, _ := strconv.Atoi(env.ID)
		res := deref(env.ResourceID)
		if n < last[res] {
			t.Errorf("resource %s: event %d first delivered after %d", res, n, last[res])
		}
		last[res] = n
	}
	t.Logf("%d requests for %d events across 10 kills", len(reqs), events)
}
