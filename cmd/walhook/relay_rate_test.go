package main

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
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
