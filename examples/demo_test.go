package examples_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/walhook/walhook/internal/pgtest"
)

// TestDemoRelay runs `make demo-relay`'s script once (DEMO_ONCE=1) on a
// database of its own, so it stays working: an embedded NATS, the sidecar in
// relay mode, two workers and the receiver, every hook verified.
func TestDemoRelay(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	bin := t.TempDir()
	for _, pkg := range []string{"cmd/walhook", "examples/receiver", "examples/demo/natsd"} {
		out, err := exec.Command("go", "build", "-o", filepath.Join(bin, filepath.Base(pkg)), "../"+pkg).CombinedOutput()
		if err != nil {
			t.Fatalf("build %s: %v\n%s", pkg, err, out)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "demo/demo-relay.sh")
	cmd.Env = append(os.Environ(), "BIN="+bin, "WALHOOK_TEST_DATABASE_URL="+db.URL, "DEMO_SLOT="+db.Name, "DEMO_ONCE=1")
	cmd.WaitDelay = 10 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("demo-relay.sh: %v\n%s", err, out.String())
	}
	for _, want := range []string{"demo-relay: ok", `"type":"contact.deleted"`, "relay stream  WALHOOK", "workers       2 "} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("the demo's output lacks %q:\n%s", want, out.String())
		}
	}
}
