package cdc

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/walhook/walhook/internal/testwait"

	"github.com/jackc/pglogrepl"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/walhook/walhook/internal/pgtest"
	"github.com/walhook/walhook/outbox"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// setupDB creates a database with walhook's source objects.
func setupDB(t *testing.T) *pgtest.DB {
	t.Helper()
	db := pgtest.New(t)
	stmts := append([]string{"CREATE SCHEMA walhook"}, SetupSQL(Config{Slot: db.Name}, serverVersion(t, db))...)
	for _, s := range stmts {
		if _, err := db.Pool.Exec(t.Context(), s); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
	}
	return db
}

func startStream(t *testing.T, cfg Config, acker *outbox.Acker) (chan outbox.Change, <-chan error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	out := make(chan outbox.Change, 64)
	done := make(chan error, 1)
	s := NewStream(cfg, acker, zerolog.Nop())
	go func() { done <- s.Run(ctx, out) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("stream: %v", err)
		}
	})
	return out, done
}

func exec(t *testing.T, db *pgtest.DB, sql string) {
	t.Helper()
	if _, err := db.Pool.Exec(t.Context(), sql); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// next returns the next change that is not Idle or Start.
func next(t *testing.T, out <-chan outbox.Change, done <-chan error) outbox.Change {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case c := <-out:
			if c.Kind != outbox.ChangeIdle && c.Kind != outbox.ChangeStart {
				return c
			}
		case err := <-done:
			t.Fatalf("stream ended: %v", err)
		case <-deadline:
			t.Fatal("no change within 30s")
		}
	}
}

func TestStreamDecodesCommittedTransactions(t *testing.T) {
	t.Parallel()
	db := setupDB(t)
	out, done := startStream(t, Config{DatabaseURL: db.URL, Slot: db.Name, StatusInterval: 100 * time.Millisecond}, outbox.NewAcker(0))

	exec(t, db, "CREATE TABLE other (x int)")
	exec(t, db, `BEGIN;
		INSERT INTO walhook.outbox (event, resource_id, tenant, payload) VALUES ('contact.created', 'c1', 'acme', '{"n": 1}');
		INSERT INTO other VALUES (1);
		INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.updated', 'c1', '{"n": 2}');
		COMMIT`)
	exec(t, db, `BEGIN; INSERT INTO walhook.outbox (event, payload) VALUES ('never', '{}'); ROLLBACK`)
	exec(t, db, `INSERT INTO other VALUES (2)`)
	exec(t, db, `SELECT walhook.emit('contact.deleted', 'c1', '{"gone": true}')`)
	exec(t, db, `SELECT pg_logical_emit_message(true, 'someone-else', 'ignored')`)
	exec(t, db, `INSERT INTO walhook.outbox (event, payload) VALUES ('last', '{}')`)

	type want struct {
		kind outbox.ChangeKind
		id   string
		typ  string
	}
	wants := []want{
		{outbox.ChangeBegin, "", ""},
		{outbox.ChangeEvent, "1", "contact.created"},
		{outbox.ChangeEvent, "2", "contact.updated"},
		{outbox.ChangeCommit, "", ""},
		{outbox.ChangeBegin, "", ""},
		{outbox.ChangeEvent, "", "contact.deleted"},
		{outbox.ChangeCommit, "", ""},
		{outbox.ChangeBegin, "", ""},
		{outbox.ChangeEvent, "4", "last"}, // id 3 was rolled back
		{outbox.ChangeCommit, "", ""},
	}
	var lastCommit outbox.LSN
	for i, w := range wants {
		c := next(t, out, done)
		if c.Kind != w.kind {
			t.Fatalf("change %d: kind %v, want %v (%+v)", i, c.Kind, w.kind, c)
		}
		switch c.Kind {
		case outbox.ChangeEvent:
			if (w.id != "" && c.Event.ID != w.id) || c.Event.Type != w.typ {
				t.Errorf("change %d: event %s %s, want %s %s", i, c.Event.ID, c.Event.Type, w.id, w.typ)
			}
			if c.Event.CommitTime.IsZero() || time.Since(c.Event.CommitTime) > time.Minute {
				t.Errorf("change %d: commit time %v", i, c.Event.CommitTime)
			}
		case outbox.ChangeCommit:
			if c.LSN <= lastCommit {
				t.Errorf("commit LSN %v not after %v", c.LSN, lastCommit)
			}
			lastCommit = c.LSN
		}
		if i == 1 && (c.Event.Tenant != "acme" || c.Event.ResourceID != "c1" || string(c.Event.Payload) != `{"n": 1}`) {
			t.Errorf("first event = %+v", c.Event)
		}
		if i == 5 {
			if _, err := pglogrepl.ParseLSN(c.Event.ID); err != nil {
				t.Errorf("message event id %q is not an LSN", c.Event.ID)
			}
		}
	}
}

// confirmedFlush reads the slot's confirmed_flush_lsn.
func confirmedFlush(t *testing.T, db *pgtest.DB) outbox.LSN {
	t.Helper()
	var lsn pglogrepl.LSN
	err := db.Pool.QueryRow(t.Context(), `SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1`, db.Name).Scan(&lsn)
	if err != nil {
		t.Fatal(err)
	}
	return outbox.LSN(lsn)
}

func currentLSN(t *testing.T, db *pgtest.DB) outbox.LSN {
	t.Helper()
	var lsn pglogrepl.LSN
	if err := db.Pool.QueryRow(t.Context(), `SELECT pg_current_wal_insert_lsn()`).Scan(&lsn); err != nil {
		t.Fatal(err)
	}
	return outbox.LSN(lsn)
}

func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	testwait.For(t, timeout, what, cond)
}

func TestStreamConfirmsOnlyFinishedWork(t *testing.T) {
	t.Parallel()
	db := setupDB(t)
	acker := outbox.NewAcker(0)
	cfg := Config{DatabaseURL: db.URL, Slot: db.Name, StatusInterval: 50 * time.Millisecond, StatusMaxAge: 100 * time.Millisecond}
	out, done := startStream(t, cfg, acker)
	start := confirmedFlush(t, db)

	exec(t, db, `INSERT INTO walhook.outbox (event, payload) VALUES ('a', '{}')`)
	// Play the dispatcher: register the delivery but do not finish it.
	var tx *outbox.Txn
	for c := next(t, out, done); ; c = next(t, out, done) {
		if c.Kind == outbox.ChangeBegin {
			tx = acker.Begin(c.Event.CommitTime)
		}
		if c.Kind == outbox.ChangeEvent {
			acker.Add(tx, 1)
		}
		if c.Kind == outbox.ChangeCommit {
			acker.Commit(tx, c.LSN)
			break
		}
	}
	statusUpdates(t, db, 3)
	if got := confirmedFlush(t, db); got != start {
		t.Fatalf("confirmed_flush_lsn moved from %v to %v with the delivery unfinished", start, got)
	}
	acker.Done(tx)
	eventually(t, 10*time.Second, "confirmed_flush_lsn to advance", func() bool { return confirmedFlush(t, db) > start })
}

// statusUpdates waits until the walsender has seen n more replies from walhook.
func statusUpdates(t *testing.T, db *pgtest.DB, n int) int {
	t.Helper()
	replyTime := func() time.Time {
		var rt *time.Time
		err := db.Pool.QueryRow(t.Context(), `
			SELECT r.reply_time FROM pg_stat_replication r
			  JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1`, db.Name).Scan(&rt)
		if err != nil || rt == nil {
			return time.Time{}
		}
		return *rt
	}
	seen, last := 0, replyTime()
	eventually(t, 20*time.Second, "status updates", func() bool {
		if rt := replyTime(); rt.After(last) {
			seen, last = seen+1, rt
		}
		return seen >= n
	})
	return seen
}

func TestStreamIdleOutboxDoesNotPinWAL(t *testing.T) {
	t.Parallel()
	db := setupDB(t)
	acker := outbox.NewAcker(0)
	out, _ := startStream(t, Config{DatabaseURL: db.URL, Slot: db.Name, StatusInterval: 50 * time.Millisecond}, acker)
	stop := make(chan struct{})
	stopped := make(chan struct{})
	t.Cleanup(func() { close(stop); <-stopped })
	go func() { // the dispatcher's part for an idle outbox
		defer close(stopped)
		for {
			select {
			case c := <-out:
				if c.Kind == outbox.ChangeIdle {
					acker.Idle(c.LSN)
				}
			case <-stop:
				return
			}
		}
	}()
	exec(t, db, "CREATE TABLE busy (x int)")
	for range 50 {
		exec(t, db, "INSERT INTO busy SELECT generate_series(1, 100)")
	}
	target := currentLSN(t, db)
	eventually(t, 30*time.Second, "confirmed_flush_lsn to pass the busy table's writes", func() bool {
		if confirmedFlush(t, db) >= target {
			return true
		}
		exec(t, db, `SELECT pg_logical_emit_message(false, 'walhook-test-nudge', '')`) // WAL after the target
		return false
	})
}

func TestStreamKeepsAnsweringWhileDeliveryIsBlocked(t *testing.T) {
	t.Parallel()
	db := setupDB(t)
	// A short wal_sender_timeout for this connection only: the server drops a
	// client that stays silent longer than this.
	url := db.URL + "&options=-c%20wal_sender_timeout%3D1s"
	ctx, cancel := context.WithCancel(context.Background())
	out := make(chan outbox.Change) // never read: the pipeline is stuck
	done := make(chan error, 1)
	go func() {
		done <- NewStream(Config{DatabaseURL: url, Slot: db.Name, StatusInterval: 200 * time.Millisecond}, outbox.NewAcker(0), zerolog.Nop()).Run(ctx, out)
	}()
	t.Cleanup(func() { cancel(); <-done })
	exec(t, db, `INSERT INTO walhook.outbox (event, payload) SELECT 'bulk', '{}' FROM generate_series(1, 1000)`)
	eventually(t, 10*time.Second, "walsender to start", func() bool {
		var n int
		db.Pool.QueryRow(t.Context(), `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active`, db.Name).Scan(&n)
		return n == 1
	})
	// Several wal_sender_timeouts pass while the stream cannot hand anything on.
	statusUpdates(t, db, 10)
	select {
	case err := <-done:
		t.Fatalf("stream ended while blocked: %v", err)
	default:
	}
}

func TestStreamMissingSlotIsAClearError(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	err := NewStream(Config{DatabaseURL: db.URL}, outbox.NewAcker(0), zerolog.Nop()).Run(t.Context(), make(chan outbox.Change))
	if !errors.Is(err, ErrSlotMissing) || !strings.Contains(err.Error(), "walhook setup") {
		t.Fatalf("err = %v, want ErrSlotMissing with a hint to run walhook setup", err)
	}
	if errors.Is(err, context.Canceled) {
		t.Fatal("unexpected cancel")
	}
}

// TestStreamTrustsControlRowsNotMessages: walhook.control rows become control
// changes in their place in the stream; logical messages with the control
// prefixes (which any role may emit) are ignored, counted and logged.
func TestStreamTrustsControlRowsNotMessages(t *testing.T) {
	t.Parallel()
	db := setupDB(t)
	reg := prometheus.NewRegistry()
	var log syncBuffer
	cfg := Config{DatabaseURL: db.URL, Slot: db.Name, StatusInterval: 100 * time.Millisecond, Registerer: reg}
	ctx, cancel := context.WithCancel(context.Background())
	out := make(chan outbox.Change, 64)
	done := make(chan error, 1)
	go func() { done <- NewStream(cfg, outbox.NewAcker(0), zerolog.New(&log)).Run(ctx, out) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("stream: %v", err)
		}
	})

	exec(t, db, `SELECT pg_logical_emit_message(true, 'walhook.subscription', '{"op":"upsert","row":{"id":"evil","events":["*"]}}')`)
	exec(t, db, `SELECT pg_logical_emit_message(true, 'walhook.replay', '{"subscription":"s","event":{"ID":"x","Type":"pay.succeeded"}}')`)
	exec(t, db, `SELECT pg_logical_emit_message(true, 'walhook.recover', '{"ID":"x","Type":"pay.succeeded"}')`)
	exec(t, db, `SELECT pg_logical_emit_message(false, 'walhook.subscription', '{"op":"delete","id":"s"}')`)
	exec(t, db, `BEGIN;
		INSERT INTO walhook.outbox (event) VALUES ('before');
		INSERT INTO walhook.control (kind, body) VALUES ('subscription', '{"op": "upsert", "row": {"id": "s", "events": ["*"]}}');
		INSERT INTO walhook.control (kind, body) VALUES ('replay', '{"subscription": "s", "webhook_id": "msg_1", "event": {"ID": "7", "Type": "a", "Seq": 42}}');
		INSERT INTO walhook.control (kind, body) VALUES ('recover', '{"ID": "3", "Type": "b"}');
		COMMIT`)
	var seqs []uint64
	for i, want := range []outbox.ChangeKind{outbox.ChangeBegin, outbox.ChangeEvent, outbox.ChangeSubscription,
		outbox.ChangeReplay, outbox.ChangeEvent, outbox.ChangeCommit} {
		c := next(t, out, done)
		if c.Kind != want {
			t.Fatalf("change %d: %+v, want kind %v", i, c, want)
		}
		seqs = append(seqs, c.Event.Seq)
		switch i {
		case 2:
			if c.SubscriptionID != "s" || c.Event.Seq == 0 {
				t.Errorf("subscription change: %+v", c)
			}
		case 3:
			if c.SubscriptionID != "s" || c.Event.ID != "7" || c.Event.WebhookID != "msg_1" || c.Event.Seq != 42 {
				t.Errorf("replay: %+v (want the dead letter's own sequence 42)", c)
			}
		case 4:
			if c.Event.ID != "3" || c.Event.Type != "b" {
				t.Errorf("recovered row: %+v", c)
			}
		}
	}
	if !(seqs[1] < seqs[2] && seqs[2] < seqs[4]) {
		t.Errorf("sequences %v: the subscription change and the recovered row must follow the stream", seqs)
	}
	for _, p := range []string{SubscriptionPrefix, RecoverPrefix} {
		if n := forgedCount(t, reg, p); p == SubscriptionPrefix && n != 2 || p == RecoverPrefix && n != 1 {
			t.Errorf("walhook_forged_messages_total{prefix=%q} = %v", p, n)
		}
	}
	if n := forgedCount(t, reg, ReplayPrefix); n != 1 {
		t.Errorf("walhook_forged_messages_total{prefix=%q} = %v", ReplayPrefix, n)
	}
	// One line for the first; the next three fall within the minute.
	if got := strings.Count(log.String(), "forged logical messages ignored"); got != 1 {
		t.Errorf("%d forged-message log lines, want 1 (rate-limited):\n%s", got, log.String())
	}
}

// TestStreamRejectEmit: with RejectEmit, walhook.emit and raw messages with the
// walhook prefix are forged; outbox rows still flow.
func TestStreamRejectEmit(t *testing.T) {
	t.Parallel()
	db := setupDB(t)
	reg := prometheus.NewRegistry()
	out, done := startStream(t, Config{DatabaseURL: db.URL, Slot: db.Name, StatusInterval: 100 * time.Millisecond,
		Registerer: reg, RejectEmit: true}, outbox.NewAcker(0))
	exec(t, db, `SELECT walhook.emit('emitted', 'r', '{}')`)
	exec(t, db, `SELECT pg_logical_emit_message(true, 'walhook', '{"event": "raw"}')`)
	exec(t, db, `INSERT INTO walhook.outbox (event) VALUES ('row')`)
	for _, want := range []outbox.ChangeKind{outbox.ChangeBegin, outbox.ChangeEvent, outbox.ChangeCommit} {
		c := next(t, out, done)
		if c.Kind != want || c.Kind == outbox.ChangeEvent && c.Event.Type != "row" {
			t.Fatalf("got %+v, want kind %v (the row, not the messages)", c, want)
		}
	}
	if n := forgedCount(t, reg, MessagePrefix); n != 2 {
		t.Errorf("walhook_forged_messages_total{prefix=walhook} = %v, want 2", n)
	}
}

// forgedCount reads walhook_forged_messages_total{prefix} from reg.
func forgedCount(t *testing.T, reg *prometheus.Registry, prefix string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "walhook_forged_messages_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if m.GetLabel()[0].GetValue() == prefix {
				return m.GetCounter().GetValue()
			}
		}
	}
	t.Fatalf("no walhook_forged_messages_total{prefix=%q}", prefix)
	return 0
}

type syncBuffer = testwait.Buffer

func serverVersion(t *testing.T, db *pgtest.DB) int {
	t.Helper()
	var v string
	if err := db.Pool.QueryRow(context.Background(), `SHOW server_version_num`).Scan(&v); err != nil {
		t.Fatal(err)
	}
	n, err := ParseServerVersion(v)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
