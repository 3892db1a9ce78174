package pgstore

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/walhook/walhook/internal/testwait"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/rs/zerolog"
	"github.com/walhook/walhook/internal/pgtest"
	"github.com/walhook/walhook/outbox"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

func newAttemptDB(t *testing.T) *pgtest.DB {
	t.Helper()
	db := pgtest.New(t)
	for _, q := range attemptsSQL {
		if _, err := db.Pool.Exec(context.Background(), `CREATE SCHEMA IF NOT EXISTS walhook`); err != nil {
			t.Fatal(err)
		}
		if _, err := db.Pool.Exec(context.Background(), q); err != nil {
			t.Fatal(err)
		}
	}
	return db
}

func count(t *testing.T, db *pgtest.DB, query string) int {
	t.Helper()
	var n int
	if err := db.Pool.QueryRow(context.Background(), query).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testwait.For(t, 20*time.Second, what, cond)
}

func attempt(i int, failed bool) *outbox.Attempt {
	a := &outbox.Attempt{Subscription: "s", WebhookID: fmt.Sprintf("msg_%d", i), Number: 1, At: time.Now(),
		Duration: time.Millisecond, Events: 1, EventIDs: []string{fmt.Sprint(i)}, Class: "2xx"}
	if failed {
		a.Class, a.Status, a.Reason = "5xx", 500, "status 500: nope \x00 \xff"
	}
	return a
}

// stalledPool is a pool of one connection to db, and a function that holds
// that connection until the returned release is called: the attempt log's
// writes wait for it as for a database that cannot keep up. (Not a lock on
// the table: an open transaction would hold up every other test's slot
// creation on the shared server.)
func stalledPool(t *testing.T, db *pgtest.DB) (*pgxpool.Pool, func()) {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(db.URL)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 1
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pool.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	release := func() { once.Do(conn.Release) }
	t.Cleanup(func() { release(); pool.Close() })
	return pool, release
}

// TestAttemptLogDropsWhenTheDatabaseCannotKeepUp: while the database takes
// nothing, Record keeps returning at once; what does not fit in the queue's
// bytes is dropped and counted, and the rest is written once it can be.
// Nothing is lost silently: written + dropped = recorded.
func TestAttemptLogDropsWhenTheDatabaseCannotKeepUp(t *testing.T) {
	t.Parallel()
	db := newAttemptDB(t)
	pool, release := stalledPool(t, db)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	l := NewAttemptLog(pool, AttemptLogConfig{Mode: AttemptLogAll, Logger: zerolog.Nop(), QueueBytes: 8 << 10})
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	// The writer holds at most one batch (1,000) beside the queue (8 KiB):
	// most of 5,000 cannot fit.
	const n = 5000
	for i := range n {
		l.Record(attempt(i, i%2 == 0)) // the test would hang here if Record blocked
	}
	if dropped := int(testutil.ToFloat64(l.dropped)); dropped < n-2000 {
		t.Fatalf("%d of %d dropped: the queue and one batch hold far fewer", dropped, n)
	}
	release()
	waitFor(t, "the queued attempts to be written", func() bool {
		return count(t, db, `SELECT count(*) FROM walhook.attempts`)+int(testutil.ToFloat64(l.dropped)) == n
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// The text a receiver sent (NUL, invalid UTF-8) is stored, not refused.
	if got := count(t, db, `SELECT count(*) FROM walhook.attempts WHERE reason LIKE 'status 500: nope%'`); got == 0 {
		t.Fatal("no failed attempt was written")
	}
	sums, err := New(db.Pool, "x").AttemptSummaries(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if s := sums["s"]; s.LastSuccess == nil || s.LastFailure == nil || s.LastFailureStatus == nil || *s.LastFailureStatus != 500 {
		t.Fatalf("summary of s: %+v", s)
	}
}

// TestAttemptLogModes: failures keeps failed attempts only.
func TestAttemptLogModes(t *testing.T) {
	all := NewAttemptLog(nil, AttemptLogConfig{Mode: AttemptLogAll})
	failures := NewAttemptLog(nil, AttemptLogConfig{Mode: AttemptLogFailures})
	if !all.Wants(true) || !all.Wants(false) || failures.Wants(true) || !failures.Wants(false) {
		t.Fatal("all keeps both outcomes; failures only failed attempts")
	}
}

// TestAttemptLogPrunes: rows older than the retention go, newer ones stay,
// and with them the summaries of subscriptions that have none left.
func TestAttemptLogPrunes(t *testing.T) {
	t.Parallel()
	db := newAttemptDB(t)
	ctx := context.Background()
	for _, q := range []string{
		`INSERT INTO walhook.attempts (at, subscription, webhook_id, attempt, event_count, event_ids, outcome, class, duration_ms)
		 SELECT now() - make_interval(hours => g), 's', 'msg', 1, 1, ARRAY[g::text], 'delivered', '2xx', 1 FROM generate_series(1, 100) g`,
		`INSERT INTO walhook.attempt_summary VALUES ('s', now() - interval '1 hour', NULL, NULL, NULL), ('old', now() - interval '9 days', NULL, NULL, NULL)`,
	} {
		if _, err := db.Pool.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	l := NewAttemptLog(db.Pool, AttemptLogConfig{Mode: AttemptLogAll, Retention: 72*time.Hour - time.Minute, Logger: zerolog.Nop()})
	l.prune(ctx)
	if got := count(t, db, `SELECT count(*) FROM walhook.attempts`); got != 71 {
		t.Fatalf("%d rows left, want the 71 of the last 72 hours", got)
	}
	if got := count(t, db, `SELECT count(*) FROM walhook.attempt_summary`); got != 1 {
		t.Fatalf("%d summaries left, want s's", got)
	}
}

// TestAttemptLogCountsWhatShutdownLeaves: a shutdown while the database
// takes nothing writes for a while, then counts what is left:
// written + dropped = recorded, still.
func TestAttemptLogCountsWhatShutdownLeaves(t *testing.T) {
	t.Parallel()
	db := newAttemptDB(t)
	pool, release := stalledPool(t, db)
	l := NewAttemptLog(pool, AttemptLogConfig{Mode: AttemptLogAll, Logger: zerolog.Nop()})
	const n = 3000
	for i := range n {
		l.Record(attempt(i, false))
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // Run drains at once, into a database that takes nothing
	if err := l.Run(ctx); err != nil {
		t.Fatal(err)
	}
	release()
	if written, dropped := count(t, db, `SELECT count(*) FROM walhook.attempts`), int(testutil.ToFloat64(l.dropped)); written+dropped != n {
		t.Fatalf("written %d + dropped %d != recorded %d", written, dropped, n)
	}
}
