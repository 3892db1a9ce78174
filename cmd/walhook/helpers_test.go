package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/walhook/walhook/internal/testwait"

	"github.com/jackc/pglogrepl"
	"github.com/walhook/walhook/internal/pgtest"
	"github.com/walhook/walhook/sender/sendertest"
)

func TestMain(m *testing.M) {
	// The kill -9 test runs walhook as a child process: this same binary.
	if os.Getenv("WALHOOK_TEST_MAIN") == "1" {
		main()
	}
	os.Exit(pgtest.Main(m))
}

const testSecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

// env is one test's database and config file.
type env struct {
	t    *testing.T
	db   *pgtest.DB
	dir  string
	path string // config file
}

// newEnv makes a database and a config with its own slot and publication. extra
// is YAML appended to the config (subscriptions, options).
func newEnv(t *testing.T, extra string) *env {
	t.Helper()
	e := &env{t: t, db: pgtest.New(t), dir: t.TempDir()}
	e.path = filepath.Join(e.dir, "walhook.yaml")
	e.writeConfig(extra)
	return e
}

func (e *env) writeConfig(extra string) { e.writeConfigAt(e.path, extra) }

func (e *env) writeConfigAt(path, extra string) {
	cfg := fmt.Sprintf("database_url: %s\nlisten: 127.0.0.1:0\nslot: %s\npublication: %s\nlog_level: debug\n%s",
		e.db.URL, e.db.Name, e.db.Name, extra)
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		e.t.Fatal(err)
	}
}

// walhook runs a walhook command in-process and returns its exit code and output.
func (e *env) walhook(args ...string) (code int, stdout, stderr string) {
	e.t.Helper()
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	code = run(ctx, append(args, "--config", e.path), noEnv, &out, &errb)
	return code, out.String(), errb.String()
}

func noEnv(string) string { return "" }

func (e *env) setup() {
	e.t.Helper()
	if code, _, stderr := e.walhook("setup"); code != 0 {
		e.t.Fatalf("setup: exit %d: %s", code, stderr)
	}
}

// start runs `walhook run` in-process until the test ends.
func (e *env) start() *runner {
	e.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &runner{done: make(chan int, 1)}
	go func() { r.done <- run(ctx, []string{"run", "--config", e.path}, noEnv, &bytes.Buffer{}, &r.log) }()
	var once sync.Once
	r.stop = func() {
		once.Do(func() {
			cancel()
			if code := <-r.done; code != 0 {
				e.t.Errorf("walhook run exited %d:\n%s", code, r.log.String())
			}
		})
	}
	e.t.Cleanup(func() {
		r.stop()
		if e.t.Failed() {
			e.t.Logf("walhook log:\n%s", r.log.String())
		}
	})
	e.eventually(30*time.Second, "walhook to start streaming", func() bool { return e.slotActive() || r.exited() })
	if r.exited() {
		e.t.Fatalf("walhook run exited early:\n%s", r.log.String())
	}
	return r
}

type runner struct {
	done chan int
	log  syncBuffer
	stop func() // cancels walhook and waits for it
}

func (r *runner) exited() bool { return len(r.done) > 0 }

type syncBuffer = testwait.Buffer

func (e *env) exec(sql string, args ...any) {
	e.t.Helper()
	if _, err := e.db.Pool.Exec(context.Background(), sql, args...); err != nil {
		e.t.Fatalf("%s: %v", sql, err)
	}
}

func (e *env) slotActive() bool {
	var active bool
	e.db.Pool.QueryRow(context.Background(), `SELECT active FROM pg_replication_slots WHERE slot_name = $1`, e.db.Name).Scan(&active)
	return active
}

func (e *env) confirmedFlush() pglogrepl.LSN {
	var lsn pglogrepl.LSN
	if err := e.db.Pool.QueryRow(context.Background(), `SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1`, e.db.Name).Scan(&lsn); err != nil {
		e.t.Fatal(err)
	}
	return lsn
}

// waitCaughtUp waits until the slot confirms everything committed so far: every
// delivery before now is finished. It uses the WAL insert position
// (pg_current_wal_lsn is the write position, which lags with asynchronous commit)
// and writes a tiny non-transactional message while waiting, so that the
// walsender always has something after the target to report.
func (e *env) waitCaughtUp() {
	e.t.Helper()
	var target pglogrepl.LSN
	if err := e.db.Pool.QueryRow(context.Background(), `SELECT pg_current_wal_insert_lsn()`).Scan(&target); err != nil {
		e.t.Fatal(err)
	}
	e.eventually(60*time.Second, "the slot to confirm everything committed", func() bool {
		if e.confirmedFlush() >= target {
			return true
		}
		e.exec(`SELECT pg_logical_emit_message(false, 'walhook-test-nudge', '')`)
		return false
	})
}

// eventually polls cond until it holds or fails the test after timeout.
func (e *env) eventually(timeout time.Duration, what string, cond func() bool) {
	e.t.Helper()
	testwait.For(e.t, timeout, what, cond)
}

// envelope is the delivered body.
type envelope struct {
	ID         string          `json:"id"`
	Type       string          `json:"type"`
	Timestamp  string          `json:"timestamp"`
	ResourceID *string         `json:"resource_id"`
	Tenant     *string         `json:"tenant"`
	Data       json.RawMessage `json:"data"`
}

func decode(t *testing.T, body []byte) envelope {
	t.Helper()
	var env envelope
	if err := json.Unmarshal(body, &env); err != nil {
		t.Fatalf("body is not an envelope: %v: %s", err, body)
	}
	return env
}

func sub(id, url string, events string, more ...string) string {
	return fmt.Sprintf("  - id: %s\n    events: %s\n    target_url: %s\n    secret: %s\n%s", id, events, url, testSecret,
		strings.Join(more, ""))
}

// jsonEqual compares JSON values, ignoring formatting.
func jsonEqual(got json.RawMessage, want string) bool {
	var a, b any
	if json.Unmarshal(got, &a) != nil || json.Unmarshal([]byte(want), &b) != nil {
		return false
	}
	return reflect.DeepEqual(a, b)
}

// downServer is an endpoint that answers 503 while down is set (it starts
// down), and 204 otherwise.
func downServer(t *testing.T) (*sendertest.Server, *atomic.Bool) {
	down := &atomic.Bool{}
	down.Store(true)
	srv := sendertest.NewServer(t, func(int, *sendertest.Request) (int, http.Header) {
		if down.Load() {
			return http.StatusServiceUnavailable, nil
		}
		return http.StatusNoContent, nil
	})
	return srv, down
}
