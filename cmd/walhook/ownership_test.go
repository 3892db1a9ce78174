package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/walhook/walhook/sender/sendertest"
)

// Regression tests for issue 12 (slot ownership, order by sequence, payloads
// the database cannot hold). Each failed on the code before the epochs.

// configFile writes another config for the same database and slot: replicas
// of one deployment that differ only in where they send (so a test can tell
// which replica sent a request).
func (e *env) configFile(name, extra string) string {
	e.t.Helper()
	path := filepath.Join(e.dir, name)
	e.writeConfigAt(path, extra)
	return path
}

// startReplica runs `walhook run --config path` as a child process.
func startReplica(t *testing.T, path string, log *syncBuffer) *exec.Cmd {
	return runChild(t, log, "run", "--config", path)
}

// runChild runs this test binary as walhook with args, killed when t ends.
func runChild(t *testing.T, log *syncBuffer, args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "WALHOOK_TEST_MAIN=1")
	if log != nil {
		cmd.Stderr = log
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

func (e *env) parked() int {
	var n int
	e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.deliveries`).Scan(&n)
	return n
}

// switchable answers 503 while down is set, 204 otherwise.
func switchable(down *atomic.Bool) sendertest.Responder {
	return func(int, *sendertest.Request) (int, http.Header) {
		if down.Load() {
			return http.StatusServiceUnavailable, nil
		}
		return http.StatusNoContent, nil
	}
}

// TestOnlyTheSlotHolderSends: replica A streams and parks for a dead endpoint;
// replica B waits as a standby and sends nothing, not even the parked rows.
// When A is killed, B takes over A's parked rows: a newer event of a parked
// resource goes out after them, never before.
func TestOnlyTheSlotHolderSends(t *testing.T) {
	t.Parallel()
	down := &atomic.Bool{}
	down.Store(true)
	srvA, srvB := sendertest.NewServer(t, switchable(down)), sendertest.NewServer(t, switchable(down))
	opts := "defaults: {park_after: 1s, retry_initial: 50ms, retry_max_interval: 100ms}\nsubscriptions:\n"
	e := newEnv(t, opts+sub("s", srvA.HooksURL(), `["*"]`))
	pathB := e.configFile("b.yaml", opts+sub("s", srvB.HooksURL(), `["*"]`))
	e.setup()
	var logB syncBuffer
	a := startReplica(t, e.path, nil)
	e.eventually(30*time.Second, "replica A to stream", e.slotActive)
	for n := 1; n <= 4; n++ {
		e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) SELECT 'x', 'r' || g, jsonb_build_object('n', $1::int)
			FROM generate_series(1, 5) g`, n)
	}
	e.eventually(30*time.Second, "20 parked rows", func() bool { return e.parked() == 20 })

	startReplica(t, pathB, &logB)
	e.eventually(30*time.Second, "replica B to wait", func() bool { return strings.Contains(logB.String(), "slot in use by another process") })
	// Rows A parks after B started: B must find them when it takes over.
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('x', 'r6', '{"n": 1}')`)
	e.eventually(30*time.Second, "21 parked rows", func() bool { return e.parked() == 21 })
	n := len(srvA.Requests())
	srvA.WaitN(t, n+20, 30*time.Second) // A keeps feeding the parked rows
	if got := len(srvB.Requests()); got != 0 {
		t.Fatalf("the standby sent %d requests", got)
	}

	a.Process.Signal(syscall.SIGKILL)
	a.Wait()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('x', 'r1', '{"n": 5}'), ('x', 'r6', '{"n": 2}')`)
	down.Store(false)
	reqs := srvB.Wait(t, 60*time.Second, "every event from B", func(q []sendertest.Request) bool {
		return len(distinct(t, sendertest.Delivered(q))) == 23
	})
	checkOrder(t, sendertest.Delivered(reqs))
	e.eventually(30*time.Second, "the table to drain", func() bool { return e.parked() == 0 })
}

// distinct is the set of event ids in reqs.
func distinct(t *testing.T, reqs []sendertest.Request) map[string]bool {
	seen := map[string]bool{}
	for _, r := range reqs {
		for _, h := range hooks(t, r.Body) {
			seen[h.ID] = true
		}
	}
	return seen
}

// checkOrder fails t unless, per resource, first deliveries come in payload n
// order and the last delivery is the newest.
func checkOrder(t *testing.T, delivered []sendertest.Request) {
	t.Helper()
	last, newest, seen := map[string]int{}, map[string]int{}, map[string]bool{}
	for _, r := range delivered {
		for _, h := range hooks(t, r.Body) {
			res, n := deref(h.ResourceID), payloadN(t, h)
			if !seen[h.ID] && n < newest[res] {
				t.Errorf("resource %s: event n=%d first delivered after n=%d", res, n, newest[res])
			}
			seen[h.ID] = true
			newest[res] = max(newest[res], n)
			last[res] = n
		}
	}
	for res, n := range last {
		if n != newest[res] {
			t.Errorf("resource %s ends on n=%d, its newest is n=%d", res, n, newest[res])
		}
	}
}

// TestRestartDoesNotReplayBehindParkedRows: subscription hold always fails, so
// the slot stays behind n=1; s delivers n=1 of k1, then parks n=2 and n=3.
// After kill -9, n=1..3 are streamed again: the parked rows go out in order,
// and the stale n=1 is not sent after them.
func TestRestartDoesNotReplayBehindParkedRows(t *testing.T) {
	t.Parallel()
	hold := sendertest.NewServer(t, func(int, *sendertest.Request) (int, http.Header) { return http.StatusServiceUnavailable, nil })
	down := &atomic.Bool{}
	srv := sendertest.NewServer(t, switchable(down))
	e := newEnv(t, "max_hold: 2h\ndefaults: {retry_initial: 50ms, retry_max_interval: 100ms}\nsubscriptions:\n"+
		sub("hold", hold.HooksURL(), `["*"]`, "    park_after: 1h\n")+
		sub("s", srv.HooksURL(), `["*"]`, "    park_after: 1s\n"))
	e.setup()
	child := startChild(t, e, nil)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('x', 'k1', '{"n": 1}')`)
	srv.WaitN(t, 1, 30*time.Second)
	down.Store(true)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('x', 'k1', '{"n": 2}')`)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('x', 'k1', '{"n": 3}')`)
	e.eventually(30*time.Second, "n=2 and n=3 parked", func() bool { return e.parked() == 2 })
	child.Process.Signal(syscall.SIGKILL)
	child.Wait()

	down.Store(false)
	startChild(t, e, nil)
	srv.Wait(t, 30*time.Second, "n=3 delivered", func(q []sendertest.Request) bool { return len(distinct(t, sendertest.Delivered(q))) == 3 })
	e.eventually(30*time.Second, "the table to drain", func() bool { return e.parked() == 0 })
	// Anything else the restart would still send has come by the time the
	// slot confirms what s finished: hold still holds it, so wait on s alone.
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('x', 'k2', '{"n": 1}')`)
	reqs := srv.Wait(t, 30*time.Second, "a later event", func(q []sendertest.Request) bool { return len(distinct(t, sendertest.Delivered(q))) == 4 })
	var order []int
	for _, r := range sendertest.Delivered(reqs) {
		if h := hooks(t, r.Body)[0]; deref(h.ResourceID) == "k1" {
			order = append(order, payloadN(t, h))
		}
	}
	if len(order) != 3 || order[0] != 1 || order[1] != 2 || order[2] != 3 {
		t.Errorf("k1 delivered in order %v, want [1 2 3]", order)
	}
}

// TestPayloadThatJsonbCannotHold: a custom outbox table with a json payload
// column carries "\u0000". Parked for a dead endpoint, it is kept as text and
// delivered once the endpoint is back; rejected by another endpoint, it is
// dead-lettered with its payload as text. The slot moves on meanwhile.
func TestPayloadThatJsonbCannotHold(t *testing.T) {
	t.Parallel()
	down := &atomic.Bool{}
	down.Store(true)
	srv := sendertest.NewServer(t, switchable(down))
	reject := sendertest.NewServer(t, func(int, *sendertest.Request) (int, http.Header) { return http.StatusBadRequest, nil })
	e := newEnv(t, `outbox_table: public.events
defaults: {park_after: 1s, retry_initial: 50ms, retry_max_interval: 100ms}
subscriptions:
`+sub("p", srv.HooksURL(), `["*"]`)+sub("r", reject.HooksURL(), `["*"]`))
	e.exec(`CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, event text NOT NULL,
		resource_id text, tenant text, payload json)`)
	e.setup()
	e.start()
	e.exec(`INSERT INTO events (event, resource_id, payload) VALUES ('x', 'a', '{"s": "nul\u0000 and \ud800"}'), ('x', 'b', '{"n": 1}')`)
	e.eventually(30*time.Second, "both parked", func() bool { return e.parked() == 2 })
	e.waitCaughtUp()
	var text string
	e.eventually(30*time.Second, "the rejected event dead-lettered as text", func() bool {
		e.db.Pool.QueryRow(context.Background(), `SELECT coalesce(payload_text, '') FROM walhook.dead_letters
			WHERE subscription = 'r' AND resource_id = 'a'`).Scan(&text)
		return text != ""
	})
	if !strings.Contains(text, `\u0000`) {
		t.Errorf("dead letter payload_text = %q", text)
	}
	down.Store(false)
	reqs := srv.Wait(t, 30*time.Second, "both delivered", func(q []sendertest.Request) bool { return len(sendertest.Delivered(q)) >= 2 })
	found := false
	for _, r := range sendertest.Delivered(reqs) {
		found = found || strings.Contains(string(r.Body), `nul\u0000 and \ud800`)
	}
	if !found {
		t.Error("the payload did not arrive as written")
	}
}

// TestDisabledStaysDisabledAfterRestart: an API subscription that endpoint
// health disabled dead-letters without an attempt after a restart too.
func TestDisabledStaysDisabledAfterRestart(t *testing.T) {
	t.Parallel()
	down := &atomic.Bool{}
	down.Store(true)
	srv := sendertest.NewServer(t, func(n int, r *sendertest.Request) (int, http.Header) {
		if s := r.Header.Get("X-Hook-Secret"); s != "" {
			return 200, http.Header{"X-Hook-Secret": {s}}
		}
		return switchable(down)(n, r)
	})
	e := newEnv(t, "admin_token: "+adminToken+"\nallow_targets: [127.0.0.1/32]\n")
	e.setup()
	r := e.start()
	api := client{t: t, base: e.addr(r), token: adminToken}
	_, created := api.do("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": srv.HooksURL(),
		"disable_after": "1s", "park_after": "500ms", "retry_initial": "50ms", "retry_max_interval": "100ms"})
	id := created["id"].(string)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('x', 'a')`)
	e.eventually(30*time.Second, "the subscription to be disabled", func() bool {
		_, got := api.do("GET", "/v1/subscriptions/"+id, nil)
		return got["disabled_at"] != nil
	})
	e.waitCaughtUp()
	r.stop()
	down.Store(false)
	e.start()
	attempts := len(hooksOnly(srv.Requests()))
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('after', 'b')`)
	e.eventually(30*time.Second, "the event after the restart dead-lettered", func() bool {
		var n int
		e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.dead_letters WHERE subscription = $1 AND event = 'after'`, id).Scan(&n)
		return n == 1
	})
	if got := len(hooksOnly(srv.Requests())); got != attempts {
		t.Errorf("%d attempts after the restart, want none: the subscription is disabled", got-attempts)
	}
}

// TestLosingTheSlotStopsDelivery: the walsender freezes while walhook feeds
// parked rows to a failing endpoint. Once the stream declares the stall, the
// epoch is over: nothing more is sent until the stream holds the slot again.
func TestLosingTheSlotStopsDelivery(t *testing.T) {
	t.Parallel()
	down := &atomic.Bool{}
	down.Store(true)
	srv := sendertest.NewServer(t, switchable(down))
	e := newEnv(t, "stall_timeout: 2s\ndefaults: {park_after: 500ms, retry_initial: 50ms, retry_max_interval: 100ms}\nsubscriptions:\n"+
		sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	r := e.start()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) SELECT 'x', 'r' || g FROM generate_series(1, 5) g`)
	e.eventually(30*time.Second, "5 parked rows", func() bool { return e.parked() == 5 })
	srv.WaitN(t, len(srv.Requests())+10, 30*time.Second)
	var pid int
	e.db.Pool.QueryRow(context.Background(), `SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1`, e.db.Name).Scan(&pid)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Skipf("cannot stop the walsender (%v): needs the same user as PostgreSQL, or root", err)
	}
	defer syscall.Kill(pid, syscall.SIGCONT)
	// The frozen walsender still holds the slot: the reconnect waits for it.
	e.eventually(30*time.Second, "the stall to end the session", func() bool {
		return strings.Contains(r.log.String(), "slot in use by another process")
	})
	n := len(srv.Requests())
	// An observation window of ten retry intervals: a process without the
	// slot must stay silent through it.
	window := time.NewTimer(time.Second)
	<-window.C
	if got := len(srv.Requests()); got != n {
		t.Errorf("%d requests after the slot was lost", got-n)
	}
	syscall.Kill(pid, syscall.SIGCONT)
	down.Store(false)
	srv.Wait(t, 60*time.Second, "the parked rows after the slot is back", func(q []sendertest.Request) bool {
		return len(sendertest.Delivered(q)) == 5
	})
}

// TestAThawedHolderSendsNothing: replica A retries an event for a failing
// endpoint, once a second. Frozen (SIGSTOP) right after an attempt, past
// wal_sender_timeout, it loses the slot to replica B, which delivers the
// event; the application goes on committing meanwhile, so the walsender
// writes those transactions into A's socket before it gives up. When A
// thaws, its retry is overdue and its stream reads that backlog before it
// finds the connection closed: nothing may go out. A's epoch went stale
// (the last message from the server plus stall_timeout) while it was
// frozen, messages read late do not make it fresh again, and a stale epoch
// starts no attempt (Epoch.Live). Found by review: without the second rule
// the backlog made A fresh again and it sent its retries.
func TestAThawedHolderSendsNothing(t *testing.T) {
	t.Parallel()
	srvA := sendertest.NewServer(t, func(int, *sendertest.Request) (int, http.Header) { return http.StatusServiceUnavailable, nil })
	srvB := sendertest.NewServer(t, nil)
	opts := "stall_timeout: 2s\ndefaults: {park_after: 10m, retry_initial: 1s, retry_max_interval: 1s}\nsubscriptions:\n"
	e := newEnv(t, opts+sub("s", srvA.HooksURL(), `["*"]`))
	pathB := e.configFile("b.yaml", opts+sub("s", srvB.HooksURL(), `["*"]`))
	e.setup()
	// The server drops a silent walsender after 5 s (new sessions of this database).
	e.exec(fmt.Sprintf(`ALTER DATABASE %q SET wal_sender_timeout = '5s'`, e.db.Name))
	var logA, logB syncBuffer
	a := startReplica(t, e.path, &logA)
	e.eventually(30*time.Second, "replica A to stream", e.slotActive)
	startReplica(t, pathB, &logB)
	e.eventually(30*time.Second, "replica B to wait", func() bool { return strings.Contains(logB.String(), "slot in use by another process") })
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('x', 'a')`)
	srvA.WaitN(t, 2, 30*time.Second) // retrying
	// Right after an attempt: the next is a second away, none is on its way.
	srvA.WaitN(t, len(srvA.Requests())+1, 30*time.Second)
	if err := a.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	frozen := len(srvA.Requests())
	e.insertEvents(0, 2000, 10)
	srvB.Wait(t, 60*time.Second, "replica B to deliver every event", func(q []sendertest.Request) bool {
		return len(distinct(t, sendertest.Delivered(q))) == 2001
	})
	a.Process.Signal(syscall.SIGCONT)
	e.eventually(30*time.Second, "replica A to give its epoch up", func() bool {
		return strings.Contains(logA.String(), "slot in use by another process")
	})
	// An observation window of two retry intervals after that.
	window := time.NewTimer(2 * time.Second)
	<-window.C
	if got := len(srvA.Requests()); got != frozen {
		t.Errorf("replica A sent %d requests after it thawed, with the slot held by B", got-frozen)
	}
}

// TestParkAfterCutsAHangingAttempt: a failing target that then accepts and
// never answers would hold the slot for a whole timeout per attempt;
// park_after runs during the attempt and parks it, and the slot moves on.
func TestParkAfterCutsAHangingAttempt(t *testing.T) {
	t.Parallel()
	hang := make(chan struct{})
	srv := sendertest.NewServer(t, func(n int, _ *sendertest.Request) (int, http.Header) {
		if n == 0 {
			return http.StatusServiceUnavailable, nil // failing now: from here on attempts are cut at park_after
		}
		<-hang
		return http.StatusNoContent, nil
	})
	defer close(hang)
	e := newEnv(t, "subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`, "    timeout: 60s\n    park_after: 1s\n    retry_initial: 50ms\n"))
	e.setup()
	e.start()
	start := time.Now()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('x', 'a')`)
	e.eventually(30*time.Second, "the event parked", func() bool { return e.parked() == 1 })
	e.waitCaughtUp()
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("parked after %s with park_after 1s and timeout 60s", d)
	}
}

// TestMalformedRowStreamedAgainIsDeadLetteredOnce: subscription hold keeps the
// slot behind a malformed row; after a restart the row is streamed again,
// and it stays one dead letter.
func TestMalformedRowStreamedAgainIsDeadLetteredOnce(t *testing.T) {
	t.Parallel()
	hold := sendertest.NewServer(t, func(int, *sendertest.Request) (int, http.Header) { return http.StatusServiceUnavailable, nil })
	e := newEnv(t, "max_hold: 2h\noutbox_table: public.events\ndefaults: {park_after: 1h, retry_initial: 50ms, retry_max_interval: 100ms}\nsubscriptions:\n"+
		sub("hold", hold.HooksURL(), `["*"]`))
	e.exec(`CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, event text, resource_id text, tenant text, payload text)`)
	e.setup()
	r := e.start()
	e.exec(`INSERT INTO events (event, resource_id, payload) VALUES ('x', 'a', '{}')`) // hold fails on it: the slot stays here
	e.exec(`INSERT INTO events (event, resource_id, payload) VALUES ('x', 'b', 'not json')`)
	deadLetters := func() int {
		var n int
		e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.dead_letters WHERE subscription IS NULL`).Scan(&n)
		return n
	}
	e.eventually(30*time.Second, "the malformed row dead-lettered", func() bool { return deadLetters() == 1 })
	r.stop()
	r = e.start()
	e.eventually(30*time.Second, "the rows streamed again", func() bool { return strings.Count(r.log.String(), "malformed outbox row dead-lettered") == 1 })
	// The dispatcher dead-letters in stream order: once c's is there, b's
	// second one would be too.
	e.exec(`INSERT INTO events (event, resource_id, payload) VALUES ('x', 'c', 'not json either')`)
	e.eventually(30*time.Second, "the next malformed row dead-lettered", func() bool {
		var n int
		e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.dead_letters WHERE resource_id = 'c'`).Scan(&n)
		return n == 1
	})
	if n := deadLetters(); n != 2 {
		t.Errorf("%d dead letters for two malformed rows", n)
	}
}

// TestNULInAMessageIsDeadLettered: a walhook message whose event name holds a
// NUL (any role can emit one) is dead-lettered as malformed, storably, and
// the stream goes on.
func TestNULInAMessageIsDeadLettered(t *testing.T) {
	t.Parallel()
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, "subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	e.start()
	e.exec(`SELECT pg_logical_emit_message(true, 'walhook', '{"event": "a\u0000b", "resource_id": "r"}')`)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('after', 'r')`)
	srv.WaitN(t, 1, 30*time.Second)
	var reason string
	e.db.Pool.QueryRow(context.Background(), `SELECT reason FROM walhook.dead_letters WHERE subscription IS NULL`).Scan(&reason)
	if !strings.Contains(reason, "NUL") {
		t.Errorf("dead letter reason %q, want the NUL named", reason)
	}
}

// TestOversizedKeysAreDeadLettered: a resource_id or an id too long for the
// indexes of walhook.deliveries and walhook.dead_letters (incompressible, so
// TOAST does not save it) is a malformed event, dead-lettered with its reason
// (its id cut), while the stream goes on; not a park retried forever.
func TestOversizedKeysAreDeadLettered(t *testing.T) {
	t.Parallel()
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, "outbox_table: public.events\nsubscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.exec(`CREATE TABLE events (pk bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id text NOT NULL DEFAULT gen_random_uuid()::text, event text NOT NULL,
		resource_id text, tenant text, payload jsonb)`)
	e.setup()
	e.start()
	const long = `(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 100))` // 3,200 bytes
	e.exec(`INSERT INTO events (event, resource_id) VALUES ('a', ` + long + `)`)
	e.exec(`INSERT INTO events (id, event, resource_id) VALUES (` + long + `, 'a', 'r')`)
	e.exec(`SELECT pg_logical_emit_message(true, 'walhook', json_build_object('event', ` + long + `)::text)`)
	e.exec(`INSERT INTO events (event, resource_id) VALUES ('after', 'r')`)
	srv.WaitN(t, 1, 30*time.Second)
	e.waitCaughtUp()
	rows, err := e.db.Pool.Query(context.Background(), `SELECT reason, length(event_id) FROM walhook.dead_letters ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for rows.Next() {
		var reason string
		var idLen int
		rows.Scan(&reason, &idLen)
		got = append(got, fmt.Sprintf("%d %s", idLen, reason))
		if !strings.Contains(reason, "longer than 1024 bytes") || idLen > 1025 {
			t.Errorf("dead letter (id of %d characters): %q, want the length named and the id cut", idLen, reason)
		}
	}
	if len(got) != 3 {
		t.Errorf("dead letters %q, want 3", got)
	}
	if n := len(srv.Requests()); n != 1 {
		t.Errorf("%d requests, want the one event after", n)
	}
}

// TestReconnectSendsHeldEventsOnce: events held in memory for a failing
// endpoint when the replication connection drops are streamed again by the
// next session; the old session's copies are dropped with its epoch, so once
// the endpoint is back each event is delivered once, not once per session.
func TestReconnectSendsHeldEventsOnce(t *testing.T) {
	t.Parallel()
	down := &atomic.Bool{}
	down.Store(true)
	srv := sendertest.NewServer(t, switchable(down))
	e := newEnv(t, "subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`,
		"    park_after: 10m\n    retry_initial: 50ms\n    retry_max_interval: 200ms\n"))
	e.setup()
	r := e.start()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) SELECT 'a', 'r' || (g % 5) FROM generate_series(1, 20) g`)
	srv.Wait(t, 30*time.Second, "attempts while down", func(q []sendertest.Request) bool { return len(q) >= 20 })
	for session := 1; session <= 2; session++ {
		var killed bool
		e.eventually(10*time.Second, "the walsender terminated", func() bool {
			e.db.Pool.QueryRow(context.Background(), `SELECT coalesce(bool_or(pg_terminate_backend(active_pid)), false)
				FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL`, e.db.Name).Scan(&killed)
			return killed
		})
		e.eventually(30*time.Second, "a new session", func() bool {
			return strings.Count(r.log.String(), `"message":"delivering: subscriptions loaded"`) > session && e.slotActive()
		})
	}
	down.Store(false)
	reqs := srv.Wait(t, 30*time.Second, "every event delivered", func(q []sendertest.Request) bool {
		return len(sendertest.Delivered(q)) >= 20
	})
	e.waitCaughtUp()
	seen := map[string]int{}
	for _, q := range sendertest.Delivered(srv.Requests()) {
		seen[decode(t, q.Body).ID]++
	}
	for id, n := range seen {
		if n != 1 {
			t.Errorf("event %s delivered %d times after two reconnects", id, n)
		}
	}
	if len(seen) != 20 {
		t.Errorf("%d events delivered, want 20 (%d requests)", len(seen), len(reqs))
	}
}
