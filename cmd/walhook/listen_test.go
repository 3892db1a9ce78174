package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/walhook/walhook/sender/sendertest"
)

// hostOf is the host:port of a base URL.
func hostOf(base string) string { return strings.TrimPrefix(base, "http://") }

// closedWithin reads from c until the server closes it; it reports how long
// that took, or false when c is still open after limit.
func closedWithin(c net.Conn, limit time.Duration) (time.Duration, bool) {
	start := time.Now()
	c.SetReadDeadline(start.Add(limit))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return 0, false
	}
	return time.Since(start), true
}

// TestSlowClientsAreCutOff: connections that trickle a request body (with and
// without a token) or a header are closed at read_timeout, and an idle
// keep-alive connection at idle_timeout (slowloris).
func TestSlowClientsAreCutOff(t *testing.T) {
	t.Parallel()
	_, api := apiEnv(t, "read_timeout: 1s\nidle_timeout: 1s\n")
	addr := hostOf(api.base)
	const n = 40
	var wg sync.WaitGroup
	stop := make(chan struct{})
	defer func() { close(stop); wg.Wait() }()
	conns := make([]net.Conn, n)
	for i := range conns {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		auth := ""
		if i%2 == 0 {
			auth = "Authorization: Bearer " + adminToken + "\r\n"
		}
		if i%4 == 3 { // the classic: a header that never ends
			fmt.Fprint(c, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
		} else {
			fmt.Fprintf(c, "POST /v1/subscriptions HTTP/1.1\r\nHost: x\r\n%sContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{", auth)
		}
		conns[i] = c
		wg.Add(1)
		go func() { // the attacker: one byte every 100 ms, for as long as the server reads
			defer wg.Done()
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					if _, err := c.Write([]byte("a")); err != nil {
						return
					}
				}
			}
		}()
	}
	for i, c := range conns {
		if took, ok := closedWithin(c, 15*time.Second); !ok {
			t.Fatalf("trickling connection %d still open after 15s (read_timeout 1s)", i)
		} else if took > 10*time.Second {
			t.Errorf("trickling connection %d closed after %s (read_timeout 1s)", i, took)
		}
	}
	// An idle keep-alive connection is closed at idle_timeout.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprint(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET /healthz on a keep-alive connection: %v %v", resp, err)
	}
	resp.Body.Close()
	if _, ok := closedWithin(c, 15*time.Second); !ok {
		t.Error("idle keep-alive connection still open after 15s (idle_timeout 1s)")
	}
}

// TestConnectionLimit: with max_connections open, another connection is closed
// at once; when one closes, requests are served again. The gauge is read on
// metrics_listen, which has its own limit.
func TestConnectionLimit(t *testing.T) {
	t.Parallel()
	e, r, api := apiRun(t, "max_connections: 5\nmetrics_listen: 127.0.0.1:0\n")
	metricsBase := "http://" + findLog(t, e, r, `"metrics_listen":"([^"]+)"`)
	addr := hostOf(api.base)
	open := func() float64 {
		_, body := get(t, metricsBase+"/metrics")
		return metric(body, "walhook_http_connections", `port="listen"`)
	}
	e.eventually(10*time.Second, "no connection open", func() bool { return open() == 0 })
	var held []net.Conn
	for range 5 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		held = append(held, c)
	}
	e.eventually(10*time.Second, "five connections open", func() bool { return open() == 5 })
	extra, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	fmt.Fprint(extra, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
	if _, ok := closedWithin(extra, 10*time.Second); !ok {
		t.Fatal("a connection over max_connections was kept open")
	}
	if _, body := get(t, metricsBase+"/metrics"); metric(body, "walhook_http_connections_refused_total", `port="listen"`) < 1 {
		t.Error("the refused connection is not counted")
	}
	held[0].Close()
	e.eventually(10*time.Second, "a request served after a connection closed", func() bool {
		resp, err := http.Get(api.base + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
}

// TestRequestLimits: oversized headers and bodies, unknown routes and methods
// get JSON errors.
func TestRequestLimits(t *testing.T) {
	t.Parallel()
	_, api := apiEnv(t, "")
	req, _ := http.NewRequest("GET", api.base+"/v1/subscriptions", nil)
	req.Header.Set("Authorization", "Bearer "+adminToken)
	req.Header.Set("X-Padding", strings.Repeat("a", 100<<10))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("100 KiB header: %d, want 431", resp.StatusCode)
	}
	if status, got := api.do("POST", "/v1/subscriptions", map[string]any{"event": "a", "target_url": "http://127.0.0.1:1/",
		"secret": strings.Repeat("x", 100<<10)}); status != http.StatusRequestEntityTooLarge {
		t.Errorf("100 KiB body: %d %v, want 413", status, got)
	}
	if status, got := api.do("GET", "/v1/nothing", nil); status != http.StatusNotFound || !strings.Contains(fmt.Sprint(got["error"]), "/v1/nothing") {
		t.Errorf("unknown route: %d %v", status, got)
	}
	if status, got := api.do("PUT", "/v1/subscriptions", nil); status != http.StatusMethodNotAllowed || !strings.Contains(fmt.Sprint(got["error"]), "PUT") {
		t.Errorf("unknown method: %d %v", status, got)
	}
}

// countingAuth is an auth_url that knows alice (tenant a), hangs for "slow"
// until the caller gives up, and counts its calls.
func countingAuth(t *testing.T) (*httptest.Server, *atomic.Int64) {
	var calls atomic.Int64
	auth := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		switch r.Header.Get("Authorization") {
		case "Bearer alice":
			w.Write([]byte(`{"tenant": "a"}`))
		case "Bearer slow":
			<-r.Context().Done()
		case "Bearer nul":
			w.Write([]byte(`{"tenant": "a\u0000"}`))
		default:
			w.WriteHeader(http.StatusUnauthorized)
		}
	}))
	t.Cleanup(auth.Close)
	return auth, &calls
}

// TestForwardAuthIsCachedAndBounded: a tenant's answer is reused for
// auth_cache_ttl; an auth_url that hangs costs a caller auth_timeout, then 503.
func TestForwardAuthIsCachedAndBounded(t *testing.T) {
	t.Parallel()
	auth, calls := countingAuth(t)
	_, admin := apiEnv(t, "auth_url: "+auth.URL+"\nauth_cache_ttl: 30s\nauth_timeout: 300ms\n")
	alice := client{t: t, base: admin.base, token: "alice"}
	for range 10 {
		if status, got := alice.do("GET", "/v1/subscriptions", nil); status != 200 {
			t.Fatalf("alice: %d %v", status, got)
		}
	}
	if n := calls.Load(); n != 1 {
		t.Errorf("auth_url called %d times for 10 requests with one token, want 1", n)
	}
	if status, got := (client{t: t, base: admin.base, token: "nul"}).do("GET", "/v1/subscriptions", nil); status != http.StatusUnauthorized {
		t.Errorf("auth_url naming a tenant with a NUL: %d %v, want 401", status, got)
	}
	start := time.Now()
	status, got := (client{t: t, base: admin.base, token: "slow"}).do("GET", "/v1/subscriptions", nil)
	if status != http.StatusServiceUnavailable || time.Since(start) > 5*time.Second {
		t.Errorf("hanging auth_url: %d %v after %s, want 503 after about auth_timeout", status, got, time.Since(start))
	}
}

// TestUnauthenticatedRequestsAreRateLimited: a client that keeps failing
// authentication gets 429 before auth_url is asked again; the admin is not
// limited.
func TestUnauthenticatedRequestsAreRateLimited(t *testing.T) {
	t.Parallel()
	auth, calls := countingAuth(t)
	_, admin := apiEnv(t, "auth_url: "+auth.URL+"\nunauthenticated_rate: 1\n")
	limited := false
	for i := range 20 {
		status, got := (client{t: t, base: admin.base, token: fmt.Sprintf("guess-%d", i)}).do("GET", "/v1/subscriptions", nil)
		if status == http.StatusTooManyRequests {
			limited = true
			break
		}
		if status != http.StatusUnauthorized {
			t.Fatalf("guess %d: %d %v", i, status, got)
		}
	}
	if !limited {
		t.Fatal("20 failed authentications in a row, none answered 429")
	}
	before := calls.Load()
	if status, _ := (client{t: t, base: admin.base}).do("GET", "/v1/subscriptions", nil); status != http.StatusTooManyRequests {
		t.Errorf("no token while limited: %d, want 429", status)
	}
	if status, _ := (client{t: t, base: admin.base, token: "guess-again"}).do("GET", "/v1/subscriptions", nil); status != http.StatusTooManyRequests || calls.Load() != before {
		t.Errorf("a new guess while limited: %d, auth_url calls %d → %d; want 429 without a call", status, before, calls.Load())
	}
	if status, _ := admin.do("GET", "/v1/subscriptions", nil); status != http.StatusOK {
		t.Errorf("admin while others are limited: %d", status)
	}
}

// TestMetricsOnTheirOwnAddressWithoutSubscriptionLabels: metrics_listen takes
// /metrics off listen, and metrics_subscription_labels: false keeps
// subscription ids out of it.
func TestMetricsOnTheirOwnAddressWithoutSubscriptionLabels(t *testing.T) {
	t.Parallel()
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, "metrics_listen: 127.0.0.1:0\nmetrics_subscription_labels: false\nsubscriptions:\n"+
		sub("secret-customer-id", srv.HooksURL(), `["*"]`)+sub("other", srv.HooksURL(), `["*"]`))
	e.setup()
	r := e.start()
	base := e.addr(r)
	metricsBase := "http://" + findLog(t, e, r, `"metrics_listen":"([^"]+)"`)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('x', 'r')`)
	e.waitCaughtUp()
	if status, body := get(t, base+"/metrics"); status != http.StatusNotFound {
		t.Errorf("/metrics on listen: %d %s, want 404 with metrics_listen set", status, body)
	}
	status, body := get(t, metricsBase+"/metrics")
	if status != 200 || strings.Contains(body, "subscription=") || strings.Contains(body, "secret-customer-id") {
		t.Errorf("/metrics on metrics_listen: %d, shows subscriptions:\n%s", status, body)
	}
	if got := metric(body, "walhook_deliveries_total", `outcome="delivered"`); got != 2 {
		t.Errorf("walhook_deliveries_total{outcome=delivered} = %v, want 2 (both subscriptions summed)", got)
	}
}

// apiRun is apiEnv that also returns the runner.
func apiRun(t *testing.T, extra string) (*env, *runner, client) {
	e := newEnv(t, "admin_token: "+adminToken+"\nallow_targets: [127.0.0.1/32]\n"+extra)
	e.setup()
	r := e.start()
	return e, r, client{t: t, base: e.addr(r), token: adminToken}
}

// findLog waits for re's first group in r's log.
func findLog(t *testing.T, e *env, r *runner, re string) string {
	t.Helper()
	rx := regexp.MustCompile(re)
	var v string
	e.eventually(10*time.Second, "log line "+re, func() bool {
		if m := rx.FindStringSubmatch(r.log.String()); m != nil {
			v = m[1]
		}
		return v != ""
	})
	return v
}

// TestWithoutLabelMergesSeries: series that differ only in the dropped label
// become one; counters and gauges add up, a gauge named in maxOf takes the
// largest value, and the other labels stay apart.
func TestWithoutLabelMergesSeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	done := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "done_total", Help: "x"}, []string{"subscription", "outcome"})
	pending := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "pending", Help: "x"}, []string{"subscription"})
	oldest := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "oldest_seconds", Help: "x"}, []string{"subscription"})
	reg.MustRegister(done, pending, oldest)
	done.WithLabelValues("a", "ok").Add(1)
	done.WithLabelValues("b", "ok").Add(2)
	done.WithLabelValues("b", "dead").Add(4)
	pending.WithLabelValues("a").Set(3)
	pending.WithLabelValues("b").Set(5)
	oldest.WithLabelValues("a").Set(7)
	oldest.WithLabelValues("b").Set(2)
	mfs, err := withoutLabel{g: reg, label: "subscription", maxOf: map[string]bool{"oldest_seconds": true}}.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.Metric {
			key := mf.GetName()
			for _, lp := range m.Label {
				if lp.GetName() == "subscription" {
					t.Errorf("%s still has a subscription label", key)
				}
				key += "," + lp.GetName() + "=" + lp.GetValue()
			}
			switch {
			case m.Counter != nil:
				got[key] = m.Counter.GetValue()
			case m.Gauge != nil:
				got[key] = m.Gauge.GetValue()
			}
		}
	}
	want := map[string]float64{"done_total,outcome=ok": 3, "done_total,outcome=dead": 4, "pending": 8, "oldest_seconds": 7}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v (all: %v)", k, got[k], v, got)
		}
	}
	if len(got) != len(want) {
		t.Errorf("series %v, want %v", got, want)
	}
}
