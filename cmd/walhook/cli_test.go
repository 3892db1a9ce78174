package main

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/walhook/walhook/internal/pgtest"
	"time"
)

func TestBadConfigNamesTheKey(t *testing.T) {
	t.Parallel()
	const good = "database_url: postgres://app@127.0.0.1:1/app\n"
	const okSub = "    events: ['*']\n    secret: " + testSecret + "\n"
	tests := []struct {
		name, yaml string
		env        map[string]string
		want       string
	}{
		{name: "missing database_url", yaml: "listen: 127.0.0.1:0\n", want: "database_url: required"},
		{name: "subscription without target_url", yaml: good + "subscriptions:\n  - id: crm\n" + okSub, want: "subscriptions[crm].target_url: required"},
		{name: "malformed duration", yaml: good + "defaults: {timeout: soon}\n", want: `defaults.timeout: "soon" is not a positive duration`},
		{name: "unknown http_transport", yaml: good + "http_transport: fast\n", want: `http_transport: "fast" is not lean or stdlib`},
		{name: "unknown attempt_log", yaml: good + "attempt_log: some\n", want: `attempt_log: "some" is not one of all, failures, off`},
		{name: "short attempt_log_retention", yaml: good + "attempt_log_retention: 10s\n", want: `attempt_log_retention: 10s is less than 1m`},
		{name: "malformed subscription duration", yaml: good + "subscriptions:\n  - id: crm\n    target_url: http://x/\n    retry_initial: -1s\n" + okSub, want: "subscriptions[crm].retry_initial"},
		{name: "unknown key", yaml: good + "databse_url: x\n", want: "databse_url"},
		{name: "bad secret", yaml: good + "subscriptions:\n  - id: crm\n    target_url: http://x/\n    events: ['*']\n    secret: hunter2\n", want: "subscriptions[crm].secret"},
		{name: "bad pattern", yaml: good + "subscriptions:\n  - id: crm\n    target_url: http://x/\n    events: ['a*b']\n    secret: " + testSecret + "\n", want: "subscriptions[crm].events[0]"},
		{name: "duplicate id", yaml: good + "subscriptions:\n  - id: a\n    target_url: http://x/\n" + okSub + "  - id: a\n    target_url: http://x/\n" + okSub, want: `subscriptions[1].id: "a" is used twice`},
		{name: "bad slot", yaml: good + "slot: My-Slot\n", want: "slot:"},
		{name: "bad slot_failover", yaml: good + "slot_failover: always\n", want: `slot_failover: "always" must be auto, true or false`},
		{name: "bad outbox column key", yaml: good + "outbox_columns: {evnt: type}\n", want: "outbox_columns.evnt"},
		{name: "batch_max zero", yaml: good + "defaults: {batch_max: 0}\n", want: "defaults.batch_max: 0 must be at least 1"},
		{name: "bad payload mode", yaml: good + "defaults: {payload: thin}\n", want: `defaults.payload: "thin" must be full or skinny`},
		{name: "skinny without resource_url", yaml: good + "subscriptions:\n  - id: crm\n    target_url: http://x/\n    payload: skinny\n" + okSub, want: "subscriptions[crm].resource_url: required with payload: skinny"},
		{name: "resource_url without placeholder", yaml: good + "defaults: {resource_url: 'https://x/y'}\n", want: "defaults.resource_url"},
		{name: "negative debounce", yaml: good + "defaults: {debounce: -1s}\n", want: "defaults.debounce"},
		{name: "bad env slot", yaml: good, env: map[string]string{"WALHOOK_SLOT": "no way"}, want: "slot:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "c.yaml")
			os.WriteFile(path, []byte(tt.yaml), 0o600)
			var out, errb bytes.Buffer
			getenv := func(k string) string { return tt.env[k] }
			code := run(context.Background(), []string{"run", "--config", path}, getenv, &out, &errb)
			if code != exitConfig {
				t.Errorf("exit %d, want %d", code, exitConfig)
			}
			if !strings.Contains(errb.String(), tt.want) {
				t.Errorf("stderr %q does not contain %q", errb.String(), tt.want)
			}
		})
	}
}

func TestDatabaseURLFromEnv(t *testing.T) {
	t.Parallel()
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"setup", "--dry-run"}, func(k string) string {
		return map[string]string{"WALHOOK_DATABASE_URL": "postgres://a@127.0.0.1:1/b", "WALHOOK_SLOT": "from_env"}[k]
	}, &out, &errb)
	if code != 0 || !strings.Contains(out.String(), "'from_env'") {
		t.Fatalf("exit %d, stderr %s, stdout %s", code, errb.String(), out.String())
	}
}

func TestUnreachableDatabaseIsAClearErrorWithoutSecrets(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(path, []byte("database_url: postgres://app:sup3r-s3cret@127.0.0.1:1/app?connect_timeout=5\nlisten: 127.0.0.1:0\n"), 0o600)
	for _, cmd := range []string{"run", "setup", "teardown"} {
		var out, errb bytes.Buffer
		code := run(context.Background(), []string{cmd, "--config", path}, noEnv, &out, &errb)
		msg := errb.String()
		if code != exitFail || !strings.Contains(msg, "connect to database") {
			t.Errorf("%s: exit %d, stderr %q", cmd, code, msg)
		}
		if strings.Contains(msg, "sup3r-s3cret") || strings.Contains(msg, "goroutine") || strings.Contains(msg, "panic") {
			t.Errorf("%s: stderr leaks a secret or a stack: %q", cmd, msg)
		}
	}
}

func TestSetupIsIdempotentAndConcurrent(t *testing.T) {
	t.Parallel()
	e := newEnv(t, "")
	var wg sync.WaitGroup
	codes := make([]int, 3)
	errs := make([]string, 3)
	for i := range codes {
		wg.Go(func() { codes[i], _, errs[i] = e.walhook("setup") })
	}
	wg.Wait()
	for i, c := range codes {
		if c != 0 {
			t.Fatalf("concurrent setup %d: exit %d: %s", i, c, errs[i])
		}
	}
	e.setup() // and once more
	var slots, pubs, fns int
	e.db.Pool.QueryRow(context.Background(), `SELECT
		(SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND plugin = 'pgoutput'),
		(SELECT count(*) FROM pg_publication WHERE pubname = $1 AND pubinsert AND NOT pubupdate AND NOT pubdelete),
		(SELECT count(*) FROM pg_proc WHERE proname = 'emit' AND pronamespace = 'walhook'::regnamespace)`, e.db.Name).
		Scan(&slots, &pubs, &fns)
	if slots != 1 || pubs != 1 || fns != 1 {
		t.Fatalf("slots %d, publications %d, emit functions %d; want 1 each", slots, pubs, fns)
	}
	// walhook.emit refuses an empty event.
	if _, err := e.db.Pool.Exec(context.Background(), `SELECT walhook.emit('', 'r', '{}')`); err == nil {
		t.Error("walhook.emit accepted an empty event")
	}

	code, stdout, stderr := e.walhook("teardown")
	if code != 0 {
		t.Fatalf("teardown: exit %d: %s", code, stderr)
	}
	if !strings.Contains(stdout, "torn down") {
		t.Errorf("teardown said %q", stdout)
	}
	var schemas int
	e.db.Pool.QueryRow(context.Background(), `SELECT
		(SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1),
		(SELECT count(*) FROM pg_publication WHERE pubname = $1),
		(SELECT count(*) FROM pg_namespace WHERE nspname = 'walhook')`, e.db.Name).Scan(&slots, &pubs, &schemas)
	if slots != 0 || pubs != 0 || schemas != 1 {
		t.Fatalf("after teardown: slots %d, publications %d, schemas %d; want 0, 0, 1", slots, pubs, schemas)
	}
	if code, _, stderr := e.walhook("teardown", "--drop-schema"); code != 0 {
		t.Fatalf("teardown --drop-schema: exit %d: %s", code, stderr)
	}
	e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_namespace WHERE nspname = 'walhook'`).Scan(&schemas)
	if schemas != 0 {
		t.Error("teardown --drop-schema left the walhook schema")
	}
}

func TestSetupDryRunPrintsSQLAndChangesNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t, "")
	code, stdout, stderr := e.walhook("setup", "--dry-run")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{"CREATE SCHEMA IF NOT EXISTS walhook", "CREATE TABLE IF NOT EXISTS walhook.outbox",
		"walhook.emit", "CREATE PUBLICATION", "publish = 'insert'", "pg_create_logical_replication_slot('" + e.db.Name + "', 'pgoutput')"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("dry-run output lacks %q", want)
		}
	}
	var n int
	e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_namespace WHERE nspname = 'walhook'`).Scan(&n)
	if n != 0 {
		t.Error("dry-run created the schema")
	}
	// What a DBA would run works: feed the printed SQL to psql, twice.
	psql, err := pgtest.Psql()
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "setup.sql")
	os.WriteFile(file, []byte(stdout), 0o644)
	for range 2 {
		out, err := exec.Command(psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", file, e.db.URL).CombinedOutput()
		if err != nil {
			t.Fatalf("psql -f of the dry-run SQL: %v: %s", err, out)
		}
	}
	if !e.slotExists() {
		t.Error("the dry-run SQL did not create the slot")
	}
}

func (e *env) slotExists() bool {
	var n int
	e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1`, e.db.Name).Scan(&n)
	return n == 1
}

func TestSetupNamesAMissingOutboxColumn(t *testing.T) {
	t.Parallel()
	e := newEnv(t, "outbox_table: public.events\noutbox_columns: {event: kind}\n")
	e.exec(`CREATE TABLE events (id bigserial PRIMARY KEY, type text, resource_id text, tenant text, payload jsonb)`)
	code, _, stderr := e.walhook("setup")
	if code != exitFail || !strings.Contains(stderr, `outbox_columns.event: table public.events has no column "kind"`) {
		t.Fatalf("exit %d, stderr %s", code, stderr)
	}
}

func TestSecretsNeverReachLogs(t *testing.T) {
	t.Parallel()
	e := newEnv(t, "")
	e.exec(`CREATE ROLE ` + e.db.Name + ` LOGIN REPLICATION SUPERUSER PASSWORD 'pw-Z9xQ-secret'`)
	url := strings.Replace(e.db.URL, "postgres@", e.db.Name+":pw-Z9xQ-secret@", 1)
	os.WriteFile(e.path, []byte("database_url: "+url+"\nlisten: 127.0.0.1:0\nslot: "+e.db.Name+"\npublication: "+e.db.Name+
		"\nadmin_token: tok-Q7-admin\nauth_url: http://127.0.0.1:1/auth\nlog_level: debug\nsubscriptions:\n"+
		sub("s", "http://127.0.0.1:1/hooks?token=t", `["*"]`)), 0o600)
	e.setup()
	r := e.start()
	e.exec(`INSERT INTO walhook.outbox (event, payload) VALUES ('x', '{}')`)
	e.eventually(30*time.Second, "a failed attempt in the log", func() bool { return strings.Contains(r.log.String(), "attempt failed") })
	// Error paths of the API: a wrong token, forward auth failing.
	api := client{t: t, base: e.addr(r), token: "tok-Q7-admin-wrong"}
	api.do("GET", "/v1/subscriptions", nil)
	// And of the CLI: a bad subscription secret echoes nothing.
	_, _, stderr := e.walhook("subscriptions", "add", "--event", "x", "--target-url", "https://example.com/", "--secret", "whsec_!!bad-Q7")
	for _, secret := range []string{"pw-Z9xQ-secret", testSecret, strings.TrimPrefix(testSecret, "whsec_"), "tok-Q7-admin", "!!bad-Q7"} {
		if strings.Contains(stderr, secret) {
			t.Errorf("CLI error contains a secret %q: %s", secret, stderr)
		}
		if strings.Contains(r.log.String(), secret) {
			t.Errorf("log contains a secret %q", secret)
		}
	}
}

func TestExampleConfigIsValid(t *testing.T) {
	t.Parallel()
	cfg, err := loadConfig("../../deploy/walhook.example.yaml", noEnv)
	if err != nil {
		t.Fatal(err)
	}
	s, err := cfg.Resolve(true)
	if err != nil {
		t.Fatalf("deploy/walhook.example.yaml: %v", err)
	}
	if len(s.subs) != 1 || s.subs[0].Delivery.Timeout != 5*time.Second || s.subs[0].Delivery.RetryInitial != time.Second {
		t.Errorf("subscription options = %+v", s.subs[0].Delivery)
	}
}

func TestHealthz(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(routes())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("/healthz = %d", resp.StatusCode)
	}
}

func TestAPIOffLoopbackNeedsAToken(t *testing.T) {
	for listen, off := range map[string]bool{"127.0.0.1:8080": false, "[::1]:8080": false, "localhost:8080": false,
		"0.0.0.0:8080": true, ":8080": true, "10.1.2.3:8080": true} {
		c := &Config{Listen: listen}
		if got := c.apiDisabled() != ""; got != off {
			t.Errorf("listen %s without a token: API off = %v, want %v", listen, got, off)
		}
		c.AdminToken = "x"
		if c.apiDisabled() != "" {
			t.Errorf("listen %s with a token: API off", listen)
		}
	}
}
