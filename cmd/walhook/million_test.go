package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/walhook/walhook/internal/procstat"
	"github.com/walhook/walhook/sender/sendertest"
)

// TestMillionRowTransaction: one transaction of 1,000,000 outbox rows streams
// through with walhook's peak RSS under 256 MiB, every event delivered. It
// runs a walhook built without the race detector (which multiplies memory),
// under `make test-chaos` (WALHOOK_CHAOS=1).
func TestMillionRowTransaction(t *testing.T) {
	if os.Getenv("WALHOOK_CHAOS") == "" {
		t.Skip("set WALHOOK_CHAOS=1 (make test-chaos)")
	}
	rows := 1_000_000
	if n, err := strconv.Atoi(os.Getenv("WALHOOK_MILLION_ROWS")); err == nil {
		rows = n
	}
	bin := buildWalhook(t)
	var events int64
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, "subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`, "    batch_max: 1000\n"))
	e.setup()
	start := time.Now()
	e.exec(fmt.Sprintf(`INSERT INTO walhook.outbox (event, resource_id, payload)
		SELECT 'contact.imported', 'c' || g, jsonb_build_object('n', g, 'name', 'Ada Lovelace', 'notes', repeat('x', 250))
		FROM generate_series(1, %d) g`, rows))
	t.Logf("inserted %d rows in one transaction in %s", rows, time.Since(start).Round(time.Millisecond))
	cmd := exec.Command(bin, "run", "--config", e.path)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	start = time.Now()
	peak := 0
	counted := 0
	e.eventually(10*time.Minute, "every event delivered", func() bool {
		peak = max(peak, procstat.PeakRSSMiB(cmd.Process.Pid))
		reqs := srv.Requests()
		for _, r := range reqs[counted:] {
			events += int64(strings.Count(string(r.Body), `"type":`))
		}
		counted = len(reqs)
		return events >= int64(rows)
	})
	peak = max(peak, procstat.PeakRSSMiB(cmd.Process.Pid))
	t.Logf("%d events in %s; walhook peak RSS %d MiB", events, time.Since(start).Round(time.Millisecond), peak)
	if peak >= 256 {
		t.Errorf("peak RSS %d MiB, want under 256", peak)
	}
}

// buildWalhook builds walhook without the race detector (which multiplies
// memory), for tests that measure a process.
func buildWalhook(t *testing.T) string {
	bin := filepath.Join(t.TempDir(), "walhook")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return bin
}

// TestBigPayloadsToADeadEndpoint: 400 events of 1 MiB for an endpoint that is
// down stay within max_pending_bytes: walhook's peak RSS stays under 256 MiB
// while they are parked, and every one is delivered once it is back.
func TestBigPayloadsToADeadEndpoint(t *testing.T) {
	if os.Getenv("WALHOOK_CHAOS") == "" {
		t.Skip("set WALHOOK_CHAOS=1 (make test-chaos)")
	}
	bin := buildWalhook(t)
	down := &atomic.Bool{}
	down.Store(true)
	srv := sendertest.NewServer(t, switchable(down))
	e := newEnv(t, "defaults: {retry_initial: 1s, retry_max_interval: 5s}\nsubscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	cmd := exec.Command(bin, "run", "--config", e.path)
	var log syncBuffer
	cmd.Stderr = &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("walhook log (tail):\n%s", tail(log.String(), 40))
		}
	})
	const events = 400
	for i := 0; i < events; i += 10 {
		e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload)
			SELECT 'blob', 'r' || g, jsonb_build_object('n', g, 'blob', repeat(md5(g::text), 32768)) FROM generate_series($1::int + 1, $1::int + 10) g`, i)
	}
	peak := 0
	sample := func() bool { peak = max(peak, procstat.PeakRSSMiB(cmd.Process.Pid)); return false }
	e.eventually(5*time.Minute, "every event parked", func() bool { sample(); return e.parked() == events })
	e.waitCaughtUp()
	down.Store(false)
	e.eventually(5*time.Minute, "every event delivered", func() bool {
		sample()
		return len(distinct(t, sendertest.Delivered(srv.Requests()))) == events
	})
	sample()
	t.Logf("%d events of 1 MiB parked and delivered; walhook peak RSS %d MiB", events, peak)
	if peak >= 256 {
		t.Errorf("peak RSS %d MiB, want under 256", peak)
	}
}

func tail(s string, lines int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(l[max(len(l)-lines, 0):], "\n")
}
