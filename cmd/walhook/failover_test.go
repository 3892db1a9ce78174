package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/walhook/walhook/cdc"
	"github.com/walhook/walhook/internal/pgtest"
	"github.com/walhook/walhook/sender/sendertest"
)

// failover is a primary with a synchronous physical standby, walhook's
// database_url listing both (target_session_attrs=read-write), and an
// application committing through that same URL.
type failover struct {
	e                *env
	primary, standby *pgtest.Cluster
	version          int
	srv              *sendertest.Server

	mu        sync.Mutex
	committed []int64 // outbox ids whose commit returned
	failures  int     // inserts that failed
	stop      chan struct{}
	done      chan struct{}
}

func newFailover(t *testing.T) *failover {
	ctx := context.Background()
	primary, standby, err := pgtest.StartPair(ctx, "synchronous_commit=on")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { standby.Stop(); primary.Stop() })
	version, err := primary.Version(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dsn := fmt.Sprintf("postgres://postgres@127.0.0.1:%d,127.0.0.1:%d/postgres?sslmode=disable&target_session_attrs=read-write",
		primary.Port(), standby.Port())
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	f := &failover{primary: primary, standby: standby, version: version,
		srv: sendertest.NewServer(t, func(int, *sendertest.Request) (int, http.Header) { return http.StatusNoContent, nil })}
	f.e = &env{t: t, db: &pgtest.DB{Name: "failover_test", URL: dsn, Pool: pool}, dir: t.TempDir()}
	f.e.path = filepath.Join(f.e.dir, "walhook.yaml")
	f.e.writeConfig("subscriptions:\n" + sub("s", f.srv.HooksURL(), `["*"]`))
	return f
}

// produce commits outbox rows until stopped, retrying while no server takes
// writes; an id counts as committed once its commit returned.
func (f *failover) produce() {
	f.stop, f.done = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(f.done)
		// At most 250 commits a second: enough traffic through the failover,
		// without starving the tests that run beside this one.
		pace := time.NewTicker(4 * time.Millisecond)
		defer pace.Stop()
		for i := 0; ; i++ {
			select {
			case <-f.stop:
				return
			case <-pace.C:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			var id int64
			err := f.e.db.Pool.QueryRow(ctx, `INSERT INTO walhook.outbox (event, resource_id, payload)
				VALUES ('x', 'r' || ($1::int % 7), jsonb_build_object('i', $1::int)) RETURNING id`, i).Scan(&id)
			cancel()
			if err != nil {
				f.mu.Lock()
				f.failures++
				f.mu.Unlock()
				time.Sleep(20 * time.Millisecond) // the failover: the application retries
				continue
			}
			f.mu.Lock()
			f.committed = append(f.committed, id)
			f.mu.Unlock()
		}
	}()
	f.e.t.Cleanup(f.stopProducing)
}

func (f *failover) stopProducing() {
	select {
	case <-f.stop:
	default:
		close(f.stop)
	}
	<-f.done
}

func (f *failover) count() int { f.mu.Lock(); defer f.mu.Unlock(); return len(f.committed) }

func (f *failover) maxCommitted() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	var m int64
	for _, id := range f.committed {
		m = max(m, id)
	}
	return m
}

// waitCommits waits until n more commits returned.
func (f *failover) waitCommits(n int, what string) {
	f.e.t.Helper()
	from := f.count()
	f.e.eventually(60*time.Second, what, func() bool { return f.count() >= from+n })
}

// fail stops the old primary (immediate: a crash) and promotes the standby.
// It returns when the promotion was asked for, and the highest id committed
// on the old primary: once an insert failed after the crash, the producer
// (one insert at a time) has recorded every commit before it.
func (f *failover) fail() (promoted time.Time, lastOld int64) {
	f.e.t.Helper()
	if err := f.primary.Stop(); err != nil {
		f.e.t.Fatal(err)
	}
	f.mu.Lock()
	failed := f.failures
	f.mu.Unlock()
	f.e.eventually(30*time.Second, "the application to notice the crash", func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.failures > failed
	})
	lastOld = f.maxCommitted()
	promoted = time.Now()
	if err := f.standby.Promote(context.Background()); err != nil {
		f.e.t.Fatal(err)
	}
	return promoted, lastOld
}

// checkDelivered: every committed event delivered; per resource, first
// deliveries in commit (id) order; a duplicate has the first one's webhook-id
// and data, and with identical its whole body. (A recovered event is sent
// again from the outbox row: its timestamp and sequence are the recovery's.)
func (f *failover) checkDelivered(identical bool) []sendertest.Request {
	t := f.e.t
	f.mu.Lock()
	committed := append([]int64(nil), f.committed...)
	f.mu.Unlock()
	reqs := f.srv.Wait(t, 120*time.Second, "every committed event", func(reqs []sendertest.Request) bool {
		seen := map[string]bool{}
		for _, q := range reqs {
			seen[decode(t, q.Body).ID] = true
		}
		for _, id := range committed {
			if !seen[strconv.FormatInt(id, 10)] {
				return false
			}
		}
		return true
	})
	type first struct {
		webhookID string
		body      string
		data      string
	}
	seen := map[string]first{}
	newest := map[string]int64{}
	dups := 0
	for _, q := range reqs {
		env := decode(t, q.Body)
		if prev, dup := seen[env.ID]; dup {
			dups++
			if prev.webhookID != q.Header.Get("webhook-id") || prev.data != string(env.Data) || identical && prev.body != string(q.Body) {
				t.Errorf("event %s delivered again differently:\n%s %s\n%s %s", env.ID, prev.webhookID, prev.body, q.Header.Get("webhook-id"), q.Body)
			}
			continue
		}
		seen[env.ID] = first{q.Header.Get("webhook-id"), string(q.Body), string(env.Data)}
		id, _ := strconv.ParseInt(env.ID, 10, 64)
		res := *env.ResourceID
		if id < newest[res] {
			t.Errorf("resource %s: event %d first delivered after %d", res, id, newest[res])
		}
		newest[res] = max(newest[res], id)
	}
	t.Logf("%d committed events delivered in %d requests (%d duplicates)", len(committed), len(reqs), dups)
	return reqs
}

// firstAfter returns when the first event above id arrived.
func (f *failover) firstAfter(id int64, timeout time.Duration) time.Time {
	reqs := f.srv.Wait(f.e.t, timeout, fmt.Sprintf("an event above %d", id), func(reqs []sendertest.Request) bool {
		for _, q := range reqs {
			if n, _ := strconv.ParseInt(decode(f.e.t, q.Body).ID, 10, 64); n > id {
				return true
			}
		}
		return false
	})
	for _, q := range reqs {
		if n, _ := strconv.ParseInt(decode(f.e.t, q.Body).ID, 10, 64); n > id {
			return q.At
		}
	}
	return time.Time{}
}

// statusJSON runs `walhook status --json`.
func (f *failover) statusJSON() statusOutput {
	f.e.t.Helper()
	code, out, stderr := f.e.walhook("status", "--json")
	if code != 0 {
		f.e.t.Fatalf("status: exit %d: %s", code, stderr)
	}
	var o statusOutput
	if err := json.Unmarshal([]byte(out), &o); err != nil {
		f.e.t.Fatalf("status --json: %v: %s", err, out)
	}
	return o
}

// TestFailoverContinuesOnTheSyncedSlot (PostgreSQL 17+): walhook streams
// through a two-host database_url while an application commits; the primary
// crashes and its synchronous standby, which keeps a synchronised copy of the
// failover slot, is promoted. walhook reconnects to the new primary and goes
// on from the copy: every committed event is delivered, per-resource order
// holds, duplicates are identical.
func TestFailoverContinuesOnTheSyncedSlot(t *testing.T) {
	if testing.Short() {
		t.Skip("starts two servers")
	}
	t.Parallel()
	if v := pgtest.ServerVersion(t); v < cdc.FailoverSlotVersion {
		t.Skipf("PostgreSQL %d has no failover slots (TestFailoverWithoutSyncedSlot covers it)", v/10000)
	}
	f := newFailover(t)
	f.e.setup()
	r := f.e.start()
	f.produce()
	f.waitCommits(300, "commits on the primary")

	// The standby's copy becomes usable (persistent) once the primary's slot
	// moved past where the copy started; a running-transactions record lets
	// walhook's confirmations move restart_lsn.
	sconn, err := pgxpool.New(context.Background(), f.standby.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer sconn.Close()
	f.e.eventually(90*time.Second, "the standby's synchronised copy of the slot", func() bool {
		var ok bool
		sconn.QueryRow(context.Background(), `SELECT synced AND NOT temporary FROM pg_replication_slots WHERE slot_name = $1`,
			f.e.db.Name).Scan(&ok)
		if !ok {
			f.e.exec(`SELECT pg_log_standby_snapshot()`)
		}
		return ok
	})
	st := f.statusJSON()
	if st.SlotStats.Failover == nil || !*st.SlotStats.Failover {
		t.Errorf("status: the slot is not a failover slot: %+v", st.SlotStats)
	}
	if len(st.Hosts) != 2 || st.Hosts[1].Role != "standby" || st.Hosts[1].Synced == nil || !*st.Hosts[1].Synced {
		t.Errorf("status: the standby's synchronised copy not shown: %+v", st.Hosts)
	}
	code, text, _ := f.e.walhook("status")
	if code != 0 || !strings.Contains(text, "synchronised copy at") || !strings.Contains(text, "yes;") {
		t.Errorf("status text does not show the failover slot and its copy:\n%s", text)
	}

	promoted, lastOld := f.fail()
	first := f.firstAfter(lastOld, 90*time.Second)
	f.waitCommits(300, "commits on the promoted standby")
	f.stopProducing()
	f.checkDelivered(true)
	if r.exited() {
		t.Fatalf("walhook exited instead of following the primary:\n%s", r.log.String())
	}
	took := first.Sub(promoted)
	t.Logf("PostgreSQL %d: promotion to the first delivery from the new primary: %s (goal 15s)", f.version/10000, took.Round(10*time.Millisecond))
	if took > 60*time.Second {
		t.Errorf("the first delivery from the new primary came %s after the promotion", took)
	}
}

// TestFailoverWithoutSyncedSlot (before PostgreSQL 17, or with slot_failover:
// false): the promoted standby has no copy of the slot. walhook refuses to
// stream from "now", says to run `walhook recover`, status shows the slot
// missing, and recover on the promoted server redelivers the events from the
// outbox with their original ids.
func TestFailoverWithoutSyncedSlot(t *testing.T) {
	if testing.Short() {
		t.Skip("starts two servers")
	}
	t.Parallel()
	f := newFailover(t)
	if f.version >= cdc.FailoverSlotVersion {
		// The same path on 17+: a slot that is not a failover slot is not synchronised.
		f.e.writeConfig("slot_failover: false\nsubscriptions:\n" + sub("s", f.srv.HooksURL(), `["*"]`))
	}
	f.e.setup()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var log syncBuffer
	done := make(chan int, 1)
	go func() { done <- run(ctx, []string{"run", "--config", f.e.path}, noEnv, &bytes.Buffer{}, &log) }()
	f.e.eventually(30*time.Second, "walhook to stream", f.e.slotActive)
	f.produce()
	f.waitCommits(300, "commits on the primary")
	f.e.eventually(60*time.Second, "the high-water mark", func() bool {
		var high int64
		f.e.db.Pool.QueryRow(context.Background(), `SELECT high_water_id FROM walhook.state`).Scan(&high)
		return high > 0
	})

	f.fail()
	var code int
	select {
	case code = <-done:
	case <-time.After(120 * time.Second):
		t.Fatalf("walhook did not stop on the promoted server without the slot:\n%s", log.String())
	}
	if code != exitFail || !strings.Contains(log.String(), "walhook recover") || !strings.Contains(log.String(), "lost in a failover") {
		t.Fatalf("walhook on the promoted server without the slot: exit %d:\n%s", code, log.String())
	}
	if st := f.statusJSON(); st.SlotStats.Exists {
		t.Errorf("status: the slot exists on the promoted server: %+v", st.SlotStats)
	}
	if _, text, _ := f.e.walhook("status"); !strings.Contains(text, "SLOT MISSING although walhook delivered through it") ||
		!strings.Contains(text, "run walhook recover") {
		t.Errorf("status on the promoted server:\n%s", text)
	}
	if code, _, stderr := f.e.walhook("run"); code != exitFail || !strings.Contains(stderr, "walhook recover") {
		t.Errorf("run again: exit %d: %s", code, stderr)
	}
	if code, _, stderr := f.e.walhook("setup"); code != exitFail || !strings.Contains(stderr, "walhook recover") {
		t.Errorf("setup after the failover: exit %d: %s", code, stderr)
	}
	// The application went on on the promoted server while walhook was
	// stopped: those events are in no slot either.
	f.waitCommits(100, "commits on the promoted standby")
	f.stopProducing()
	code, out, stderr := f.e.walhook("recover")
	if code != 0 || !strings.Contains(out, "recovered") {
		t.Fatalf("recover: exit %d: %s %s", code, out, stderr)
	}
	f.e.start()
	f.checkDelivered(false)
}
