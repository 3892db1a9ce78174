package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/walhook/walhook/api"
	"github.com/walhook/walhook/cdc"
	"github.com/walhook/walhook/outbox/pgstore"
	"github.com/walhook/walhook/sender"
)

// runConfig runs `walhook run` on yaml and returns its exit code and stderr.
func runConfig(t *testing.T, yaml string) (int, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"run", "--config", path}, noEnv, &out, &errb)
	return code, errb.String()
}

// TestConfigReportsEveryMistakeAtOnce: every bad allow_targets entry is named,
// with the other bad keys, in one run.
func TestConfigReportsEveryMistakeAtOnce(t *testing.T) {
	t.Parallel()
	code, stderr := runConfig(t, "database_url: postgres://app@127.0.0.1:1/app\nslot: Bad-Slot\n"+
		"allow_targets: [10.0.0.0/8, 'not a/cidr', 'host:with:colons', receiver.internal, '']\n")
	if code != exitConfig {
		t.Errorf("exit %d, want %d", code, exitConfig)
	}
	for _, want := range []string{`allow_targets: "not a/cidr"`, `allow_targets: "host:with:colons"`, `allow_targets: ""`, "slot:"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr does not name %q:\n%s", want, stderr)
		}
	}
}

// TestConfigRefusesSeveralDocuments: a second YAML document is not silently
// ignored (it might hold the subscriptions or the admin token).
func TestConfigRefusesSeveralDocuments(t *testing.T) {
	t.Parallel()
	code, stderr := runConfig(t, "database_url: postgres://app@127.0.0.1:1/app\n---\nadmin_token: secret-in-doc-2\n")
	if code != exitConfig || !strings.Contains(stderr, "more than one YAML document") {
		t.Errorf("exit %d, stderr %q: want a config error about the second document", code, stderr)
	}
	if strings.Contains(stderr, "secret-in-doc-2") {
		t.Errorf("stderr shows the token: %q", stderr)
	}
	// A lone leading --- is one document.
	if code, stderr := runConfig(t, "---\ndatabase_url: postgres://app@127.0.0.1:1/app\nlisten: nowhere\n"); code != exitConfig || !strings.Contains(stderr, "listen:") {
		t.Errorf("a leading ---: exit %d, %q", code, stderr)
	}
}

// TestBadListenIsAConfigError: a malformed listen address is a config error
// naming the key, found before connecting to the database (which here is
// refused: a late check would report that instead).
func TestBadListenIsAConfigError(t *testing.T) {
	t.Parallel()
	for _, listen := range []string{"8080", "127.0.0.1:http", "127.0.0.1:99999", "127.0.0.1:-1", "bad host:80", "127.0.0.1:"} {
		code, stderr := runConfig(t, "database_url: postgres://app@127.0.0.1:1/app\nlisten: '"+listen+"'\n")
		if code != exitConfig || !strings.Contains(stderr, "listen:") || strings.Contains(stderr, "connect to database") {
			t.Errorf("listen %q: exit %d, stderr %q: want a config error naming listen", listen, code, stderr)
		}
	}
}

// TestCLIChecksPatternsLikeTheAPI: `walhook subscriptions add` refuses the
// patterns the API and the config file refuse, with the same check.
func TestCLIChecksPatternsLikeTheAPI(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(path, []byte("database_url: postgres://app@127.0.0.1:1/app\n"), 0o600)
	for _, p := range []string{"a..b", "a b", "a\nb", "a.", "a*b"} {
		var out, errb bytes.Buffer
		code := run(context.Background(), []string{"subscriptions", "add", "--event", "ok", "--event", p,
			"--target-url", "https://example.com/", "--config", path}, noEnv, &out, &errb)
		if code != exitConfig || !strings.Contains(errb.String(), "--event[1]") {
			t.Errorf("--event %q: exit %d, %q", p, code, errb.String())
		}
	}
}

// TestRelayConfigReportsEveryMistake: every bad key of the relay section is
// named at once, and its password is not shown.
func TestRelayConfigReportsEveryMistake(t *testing.T) {
	t.Parallel()
	code, stderr := runConfig(t, "database_url: postgres://app@127.0.0.1:1/app\nrelay:\n"+
		"  url: http://u:natspass1@host\n  stream: 'bad.name'\n  partitions: 0\n  replicas: 2\n"+
		"  duplicate_window: soon\n  credentials_file: /nonexistent/x.creds\n  nkey_seed_file: /nonexistent/seed\n  tls_cert_file: /nonexistent/c.pem\n")
	if code != exitConfig {
		t.Errorf("exit %d, want %d", code, exitConfig)
	}
	for _, want := range []string{"relay.url:", "relay.stream:", "relay.partitions:", "relay.replicas:", "relay.duplicate_window:",
		"relay.credentials_file:", "relay.nkey_seed_file:", "relay.tls_cert_file:"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr does not name %q:\n%s", want, stderr)
		}
	}
	if strings.Contains(stderr, "natspass1") {
		t.Errorf("stderr shows the NATS password: %s", stderr)
	}
}

// TestRelayConfigDefaults: url alone is relay mode with the defaults;
// no section is direct mode.
func TestRelayConfigDefaults(t *testing.T) {
	t.Parallel()
	c, err := parseConfig("", []byte("database_url: postgres://app@127.0.0.1:1/app\nrelay:\n  url: nats://127.0.0.1:4222\n"), noEnv)
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.Resolve(true)
	if err != nil {
		t.Fatal(err)
	}
	if r := s.relay; r == nil || r.Stream != "WALHOOK" || r.Partitions != 64 || r.Replicas != 3 || r.Duplicates != 10*time.Minute {
		t.Errorf("relay = %+v, want stream WALHOOK, 64 partitions, 3 replicas, 10m window", r)
	}
	c, _ = parseConfig("", []byte("database_url: postgres://app@127.0.0.1:1/app\n"), noEnv)
	if s, err = c.Resolve(true); err != nil || s.relay != nil {
		t.Errorf("without a relay section: err %v, relay mode %v", err, err == nil && s.relay != nil)
	}
}

// TestResolveChangesNothing: Validate and Resolve only read the config; the
// defaults are withDefaults' alone, and the typed settings carry them.
func TestResolveChangesNothing(t *testing.T) {
	t.Parallel()
	for _, yaml := range []string{
		"database_url: postgres://app@127.0.0.1:1/app\n",
		"database_url: postgres://app@127.0.0.1:1/app\nrelay:\n  url: nats://127.0.0.1:4222\n  ack_wait: 5s\n" +
			"subscriptions:\n  - id: crm\n    events: ['*']\n    target_url: http://x/\n    secret: " + testSecret + "\n",
		"slot: Bad-Slot\nshutdown_timeout: -1s\nmax_connections: 0\nrelay: {url: 'x'}\n", // bad: nothing is derived into c either
	} {
		c, err := parseConfig("t.yaml", []byte(yaml), noEnv)
		if err != nil {
			t.Fatal(err)
		}
		before := *c
		_ = c.Validate(true)
		_, _ = c.Resolve(true)
		if !reflect.DeepEqual(before, *c) {
			t.Errorf("%q: Validate or Resolve changed the config", yaml)
		}
	}
	c, _ := parseConfig("t.yaml", []byte("database_url: postgres://app@127.0.0.1:1/app\n"), noEnv)
	s, err := c.Resolve(false)
	if err != nil {
		t.Fatal(err)
	}
	if s.Listen != listenDefault || s.shutdown != shutdownTimeoutDefault || s.retention != outboxRetentionDefault ||
		s.readTimeout != readTimeoutDefault || s.writeTimeout != writeTimeoutDefault || s.idleTimeout != idleTimeoutDefault ||
		s.authCacheTTL != authCacheTTLDefault || s.authTimeout != authTimeoutDefault || s.attemptKeep != attemptLogRetentionDefault ||
		s.maxConnections != maxConnectionsDefault || s.unauthRate != unauthenticatedRateDefault || !s.subscriptionLabels ||
		s.overlap != api.RotationOverlapDefault || s.stall != cdc.StallTimeoutDefault || s.attemptLog != pgstore.AttemptLogAll ||
		s.HTTPTransport != sender.TransportLean || s.relay != nil {
		t.Errorf("defaults not carried into the settings: shutdown %s, retention %s, read %s, max_connections %d, transport %q",
			s.shutdown, s.retention, s.readTimeout, s.maxConnections, s.HTTPTransport)
	}
}
