package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
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
	bin := filepath.Join(t.TempDir(), "walhook")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
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
