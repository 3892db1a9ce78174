package main

import (
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/walhook/walhook/internal/natstest"
	"github.com/walhook/walhook/sender/sendertest"
)

// TestRelayDrainRate measures a backlog drained through JetStream by
// walhook built without the race detector: WALHOOK_RELAY_RATE_EVENTS events
// committed at once, one sidecar, WALHOOK_RELAY_RATE_WORKERS workers (2).
// It logs the publish rate (until the slot confirms everything) and the end
// to end rate. Skipped unless WALHOOK_RELAY_RATE_EVENTS is set.
func TestRelayDrainRate(t *testing.T) {
	events, _ := strconv.Atoi(os.Getenv("WALHOOK_RELAY_RATE_EVENTS"))
	if events <= 0 {
		t.Skip("set WALHOOK_RELAY_RATE_EVENTS to measure")
	}
	workers := 2
	if n, err := strconv.Atoi(os.Getenv("WALHOOK_RELAY_RATE_WORKERS")); err == nil && n > 0 {
		workers = n
	}
	bin := buildWalhook(t)
	nats := natstest.Start(t)
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, relayYAML(t, nats.URL())+"subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`, "    max_in_flight: 64\n"))
	b, _ := os.ReadFile(e.path)
	os.WriteFile(e.path, []byte(strings.Replace(string(b), "log_level: debug", "log_level: info", 1)), 0o600)
	e.setup()
	for range workers {
		cmd := exec.Command(bin, "deliver", "--config", e.path)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	}
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload)
		SELECT 'contact.updated', 'r' || (g % 1000), jsonb_build_object('n', g) FROM generate_series(1, $1::int) g`, events)
	start := time.Now()
	cmd := exec.Command(bin, "run", "--config", e.path)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	e.waitCaughtUp()
	published := time.Since(start)
	srv.Wait(t, 10*time.Minute, "every event", func(r []sendertest.Request) bool { return len(r) >= events })
	total := time.Since(start)
	t.Logf("%d events, %d workers: published and confirmed in %s (%.0f/s); delivered in %s (%.0f/s)",
		events, workers, published.Round(time.Millisecond), float64(events)/published.Seconds(),
		total.Round(time.Millisecond), float64(events)/total.Seconds())
}

// TestRelayParkRate measures parking in relay mode with walhook built
// without the race detector: WALHOOK_RELAY_PARK_EVENTS events over 1,000
// resources of one partition, whose endpoint is down; one worker parks
// them all (the relay stream empties) while a healthy resource of the same
// partition keeps flowing; then the endpoint comes back and the parked
// events drain. It logs both rates. Skipped unless the variable is set.
func TestRelayParkRate(t *testing.T) {
	events, _ := strconv.Atoi(os.Getenv("WALHOOK_RELAY_PARK_EVENTS"))
	if events <= 0 {
		t.Skip("set WALHOOK_RELAY_PARK_EVENTS to measure")
	}
	bin := buildWalhook(t)
	nc := natstest.Start(t)
	// Counted in the handler: waiting on srv's copies of every request
	// would cost the test more CPU than walhook.
	var down atomic.Bool
	var accepted, healthyOK atomic.Int64
	down.Store(true)
	srv := sendertest.NewServer(t, func(_ int, r *sendertest.Request) (int, http.Header) {
		healthy := strings.Contains(string(r.Body), `"resource_id":"healthy"`)
		if down.Load() && !healthy {
			return http.StatusServiceUnavailable, nil
		}
		if healthy {
			healthyOK.Add(1)
		}
		accepted.Add(1)
		return http.StatusNoContent, nil
	})
	relay := strings.Replace(relayYAML(t, nc.URL()), "partitions: 8", "partitions: 1", 1)
	stream := strings.Fields(relay[strings.Index(relay, "stream:"):])[1]
	e := newEnv(t, relay+"max_pending_bytes: 8388608\ndefaults: {park_after: 1s, retry_initial: 200ms, retry_max_interval: 1s}\n"+
		"subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`, "    max_in_flight: 64\n"))
	b, _ := os.ReadFile(e.path)
	os.WriteFile(e.path, []byte(strings.Replace(string(b), "log_level: debug", "log_level: info", 1)), 0o600)
	e.setup()
	for _, args := range [][]string{{"run"}, {"deliver"}} {
		cmd := exec.Command(bin, append(args, "--config", e.path)...)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	}
	start := time.Now()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload)
		SELECT 'contact.updated', 'r' || (g % 1000), jsonb_build_object('n', g) FROM generate_series(1, $1::int) g`, events)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.updated', 'healthy', '{"n": 0}')`)
	e.eventually(5*time.Minute, "the healthy resource", func() bool { return healthyOK.Load() > 0 })
	healthy := time.Since(start)
	e.eventually(10*time.Minute, "everything parked", func() bool { return streamMessages(t, nc.URL(), stream) == 0 })
	parked := time.Since(start)
	down.Store(false)
	back := time.Now()
	e.eventually(10*time.Minute, "every event", func() bool { return accepted.Load() >= int64(events)+1 })
	drained := time.Since(back)
	t.Logf("%d events over 1000 failing resources of one partition: the healthy resource delivered after %s; all parked (relay stream empty) after %s (%.0f/s incl. park_after); drained in %s (%.0f/s)",
		events, healthy.Round(time.Millisecond), parked.Round(time.Millisecond), float64(events)/parked.Seconds(),
		drained.Round(time.Millisecond), float64(events)/drained.Seconds())
}
