package main

import (
	"context"
	"encoding/json"
	"flag"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// metric reads one sample from a Prometheus text exposition; -1 when absent.
func metric(body, name, labels string) float64 {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `(\{` + regexp.QuoteMeta(labels) + `\})? ([0-9.e+-]+)$`)
	if labels == "" {
		re = regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` ([0-9.e+-]+)$`)
		m := re.FindStringSubmatch(body)
		if m == nil {
			return -1
		}
		v, _ := strconv.ParseFloat(m[1], 64)
		return v
	}
	m := re.FindStringSubmatch(body)
	if m == nil {
		return -1
	}
	v, _ := strconv.ParseFloat(m[2], 64)
	return v
}

func TestMetricsFollowAnOutage(t *testing.T) {
	t.Parallel()
	srv, down := downServer(t)
	e := newEnv(t, "max_hold: 2h\ndefaults: {retry_initial: 100ms, retry_max_interval: 200ms, park_after: 1h}\nsubscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	r := e.start()
	base := e.addr(r)
	// Before anything happened, the labelled counters are there at zero
	// (rate() and absence alerts need them).
	e.eventually(10*time.Second, "the counters at zero", func() bool {
		_, body := get(t, base+"/metrics")
		return metric(body, "walhook_deliveries_total", `outcome="delivered",subscription="s"`) == 0 &&
			metric(body, "walhook_delivery_attempts_total", `status_class="2xx",subscription="s"`) == 0
	})
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) SELECT 'x', 'r' || g FROM generate_series(1, 5) g`)
	var first float64
	e.eventually(30*time.Second, "oldest pending to grow", func() bool {
		_, body := get(t, base+"/metrics")
		v := metric(body, "walhook_oldest_pending_seconds", `subscription="s"`)
		if first == 0 && v > 0 {
			first = v
		}
		return first > 0 && v > first+1 && metric(body, "walhook_replication_lag_seconds", "") > 1 &&
			metric(body, "walhook_pending_events", `subscription="s"`) == 5
	})
	_, body := get(t, base+"/metrics")
	if metric(body, "walhook_delivery_attempts_total", `status_class="5xx",subscription="s"`) < 5 {
		t.Errorf("5xx attempts not counted:\n%s", grepMetrics(body, "attempts"))
	}
	if metric(body, "walhook_active", "") != 1 || metric(body, "walhook_events_total", "") != 5 {
		t.Errorf("active/events:\n%s", grepMetrics(body, "walhook_active|walhook_events_total"))
	}
	down.Store(false)
	e.eventually(30*time.Second, "pending to drain", func() bool {
		_, body := get(t, base+"/metrics")
		return metric(body, "walhook_pending_events", `subscription="s"`) == 0 &&
			metric(body, "walhook_replication_lag_seconds", "") == 0 &&
			metric(body, "walhook_deliveries_total", `outcome="delivered",subscription="s"`) == 5
	})
	_, body = get(t, base+"/metrics")
	if metric(body, "walhook_delivery_latency_seconds_count", "") != 5 {
		t.Errorf("latency histogram:\n%s", grepMetrics(body, "latency_seconds_count"))
	}
	for _, leak := range []string{"r1", srv.URL} {
		if strings.Contains(body, leak) {
			t.Errorf("metrics carry %q: labels must stay bounded", leak)
		}
	}
}

func grepMetrics(body, pattern string) string {
	var out []string
	re := regexp.MustCompile(pattern)
	for _, l := range strings.Split(body, "\n") {
		if re.MatchString(l) && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestReadyzSeesAFrozenWalsender freezes the walsender with SIGSTOP: /readyz
// turns red within stall_timeout, and green again after SIGCONT, on a new
// session.
func TestReadyzSeesAFrozenWalsender(t *testing.T) {
	t.Parallel()
	e := newEnv(t, "stall_timeout: 2s\n")
	e.setup()
	r := e.start()
	base := e.addr(r)
	e.eventually(10*time.Second, "/readyz while streaming", func() bool { code, _ := get(t, base+"/readyz"); return code == 200 })
	var pid int
	e.db.Pool.QueryRow(context.Background(), `SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1`, e.db.Name).Scan(&pid)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Skipf("cannot stop the walsender (%v): needs the same user as PostgreSQL, or root", err)
	}
	stopped := time.Now()
	defer syscall.Kill(pid, syscall.SIGCONT)
	e.eventually(10*time.Second, "/readyz to turn red", func() bool { code, _ := get(t, base+"/readyz"); return code == 503 })
	if d := time.Since(stopped); d > 2*time.Second+3*time.Second {
		t.Errorf("stall seen after %s with stall_timeout 2s", d)
	}
	if code, _ := get(t, base+"/healthz"); code != 200 {
		t.Error("/healthz failed: the process still works")
	}
	syscall.Kill(pid, syscall.SIGCONT)
	e.eventually(10*time.Second, "/readyz to turn green", func() bool { code, _ := get(t, base+"/readyz"); return code == 200 })
	// A stall ends the session (and its epoch: docs/design.md, "Ownership");
	// the stream comes back on a new connection.
	e.eventually(10*time.Second, "the stream to reconnect", func() bool { return strings.Contains(r.log.String(), "stream reconnected") })
	if !strings.Contains(r.log.String(), "stream stalled") {
		t.Error("the stall was not logged")
	}
}

// TestStatusJSON: `walhook status --json` from the database alone (golden).
func TestStatusJSON(t *testing.T) {
	t.Parallel()
	e := newEnv(t, "subscriptions:\n"+sub("static", "http://127.0.0.1:1/", `["*"]`))
	e.setup()
	e.exec(`INSERT INTO walhook.subscriptions (id, events, target_url, secret) VALUES ('sub_api', '{contact.*}', 'https://x.example/h', 'whsec_x')`)
	e.exec(`INSERT INTO walhook.dead_letters (subscription, event_id, reason) VALUES ('static', '1', 'status 400'), ('static', '2', 'status 400')`)
	e.exec(`INSERT INTO walhook.deliveries (subscription, resource_id, event_id, event, since, next_attempt_at)
		VALUES ('sub_api', 'r', '3', '{"CommitTime": "2026-01-01T00:00:00Z"}', now(), now())`)
	e.exec(`INSERT INTO walhook.status (slot, reported_at, host, report) VALUES ($1, '2026-01-01T00:00:00Z', 'pod-a',
		'{"reported_at": "2026-01-01T00:00:00Z", "host": "pod-a", "lag_seconds": 1.5,
		  "subscriptions": {"static": {"pending": 4, "oldest_pending_seconds": 2.5}}}')`, e.db.Name)
	code, out, stderr := e.walhook("status", "--json")
	if code != 0 {
		t.Fatalf("status: %d %s", code, stderr)
	}
	checkVersionedSlotColumns(t, e, out)
	// Normalise what differs between runs, and between PostgreSQL versions.
	out = strings.ReplaceAll(out, e.db.Name, "SLOT")
	out = regexp.MustCompile(`"(failover|synced|conflicting|invalidation_reason|inactive_since|synchronized_standby_slots)": [^,\n]+`).
		ReplaceAllString(out, `"$1": null`) // checked above
	out = regexp.MustCompile(`"confirmed_flush_lsn": "[0-9A-F/]+"`).ReplaceAllString(out, `"confirmed_flush_lsn": "LSN"`)
	out = regexp.MustCompile(`"(lag|retained)_bytes": \d+`).ReplaceAllString(out, `"${1}_bytes": 0`)
	path := filepath.Join("testdata", "status.golden")
	if *update {
		os.MkdirAll("testdata", 0o755)
		os.WriteFile(path, []byte(out), 0o644)
	}
	want, _ := os.ReadFile(path)
	if out != string(want) {
		t.Errorf("status --json:\n%s\nwant:\n%s", out, want)
	}
	var parsed statusOutput
	if err := json.Unmarshal([]byte(out), &parsed); err != nil {
		t.Fatal(err)
	}
	code, table, _ := e.walhook("status")
	if code != 0 || !strings.Contains(table, "sub_api") || !strings.Contains(table, "retained WAL") {
		t.Errorf("status table:\n%s", table)
	}
}

// checkVersionedSlotColumns: the slot columns a version has are shown, the
// ones it lacks are null: conflicting from 16, failover, synced,
// invalidation_reason, inactive_since and synchronized_standby_slots from 17.
// setup's default (slot_failover: auto) made a failover slot on 17+.
func checkVersionedSlotColumns(t *testing.T, e *env, out string) {
	t.Helper()
	var o statusOutput
	if err := json.Unmarshal([]byte(out), &o); err != nil {
		t.Fatal(err)
	}
	var v string
	if err := e.db.Pool.QueryRow(context.Background(), `SHOW server_version_num`).Scan(&v); err != nil {
		t.Fatal(err)
	}
	version, _ := strconv.Atoi(v)
	st := o.SlotStats
	if (st.Conflicting != nil) != (version >= 160000) {
		t.Errorf("PostgreSQL %d: conflicting = %v", version, st.Conflicting)
	}
	v17 := version >= 170000
	if (st.Failover != nil) != v17 || (st.Synced != nil) != v17 || (st.InactiveSince != nil) != v17 || (st.SynchronizedStandbySlots != nil) != v17 {
		t.Errorf("PostgreSQL %d: failover %v, synced %v, inactive_since %v, synchronized_standby_slots %v", version,
			st.Failover, st.Synced, st.InactiveSince, st.SynchronizedStandbySlots)
	}
	if v17 && (!*st.Failover || *st.Synced) {
		t.Errorf("PostgreSQL %d: setup made failover = %v, synced = %v; want a failover slot of the primary", version, *st.Failover, *st.Synced)
	}
	if st.InvalidationReason != nil {
		t.Errorf("invalidation_reason = %q", *st.InvalidationReason)
	}
	_, text, _ := e.walhook("status")
	want := `failover\s+no \(failover slots need PostgreSQL 17\)`
	if v17 {
		want = `failover\s+yes;`
	}
	if !regexp.MustCompile(want).MatchString(text) {
		t.Errorf("PostgreSQL %d: status table lacks %q:\n%s", version, want, text)
	}
}
