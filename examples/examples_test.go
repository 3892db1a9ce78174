// Package examples_test builds and runs the examples against a throwaway
// PostgreSQL, so none of them rots: the app writes outbox rows, walhook
// delivers them, the receiver verifies and prints them, the subscribe script
// manages subscriptions, and the SQL files run through psql.
package examples_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/walhook/walhook/internal/pgtest"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

const secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

func TestExamplesEndToEnd(t *testing.T) {
	db := pgtest.New(t)
	bin := t.TempDir()
	for _, pkg := range []string{"cmd/walhook", "examples/app", "examples/receiver"} {
		out, err := exec.Command("go", "build", "-o", filepath.Join(bin, filepath.Base(pkg)), "../"+pkg).CombinedOutput()
		if err != nil {
			t.Fatalf("build %s: %v\n%s", pkg, err, out)
		}
	}
	addrs := freeAddrs(t, 3)
	walhookAddr, appAddr, recvAddr := addrs[0], addrs[1], addrs[2]
	cfg := filepath.Join(t.TempDir(), "walhook.yaml")
	os.WriteFile(cfg, fmt.Appendf(nil, `database_url: %s
listen: %s
slot: %s
publication: %s
admin_token: example-token
allow_targets: [127.0.0.1/32]
`, db.URL, walhookAddr, db.Name, db.Name), 0o600)
	if out, err := exec.Command(filepath.Join(bin, "walhook"), "setup", "--config", cfg).CombinedOutput(); err != nil {
		t.Fatalf("walhook setup: %v\n%s", err, out)
	}
	start(t, "walhook", nil, filepath.Join(bin, "walhook"), "run", "--config", cfg)
	start(t, "app", nil, filepath.Join(bin, "app"), "-db", db.URL, "-listen", appAddr)
	received := &lines{}
	start(t, "receiver", received, filepath.Join(bin, "receiver"), "-listen", recvAddr, "-secret", secret)
	for _, url := range []string{"http://" + walhookAddr + "/healthz", "http://" + appAddr + "/contacts/0", "http://" + recvAddr + "/control/none"} {
		waitUp(t, url)
	}
	target := "http://" + recvAddr + "/hooks"

	// Subscribe with the script: everything, with our secret.
	script := func(args ...string) string {
		cmd := exec.Command("bash", append([]string{"subscribe/subscribe.sh"}, args...)...)
		cmd.Env = append(os.Environ(), "WALHOOK_URL=http://"+walhookAddr, "WALHOOK_TOKEN=example-token")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("subscribe.sh %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	var all struct{ ID, Secret string }
	json.Unmarshal([]byte(script("subscribe", "*", target, secret)), &all)
	if all.ID == "" || all.Secret != secret {
		t.Fatalf("subscribe gave %+v", all)
	}
	// A skinny subscription: the receiver fetches the contact from the app.
	apiPost(t, walhookAddr, map[string]any{"event": "contact.updated", "target_url": target, "secret": secret,
		"payload": "skinny", "resource_url": "http://" + appAddr + "/contacts/{resource_id}"})
	// Subscribe and unsubscribe again with the script.
	var tmp struct{ ID string }
	json.Unmarshal([]byte(script("subscribe", "nothing.matches", target)), &tmp)
	script("unsubscribe", tmp.ID)
	if list := script("list"); strings.Contains(list, tmp.ID) || !strings.Contains(list, all.ID) {
		t.Errorf("after unsubscribe, list:\n%s", list)
	}

	// Drive the app.
	var c struct{ ID int64 }
	appCall(t, "POST", appAddr, "/contacts", `{"tenant":"acme","name":"Ada","email":"ada@example.com"}`, 201, &c)
	appCall(t, "POST", appAddr, "/contacts", `{"tenant":"acme","name":"Nobody","email":""}`, 422, nil) // rolled back
	appCall(t, "PATCH", appAddr, fmt.Sprintf("/contacts/%d", c.ID), `{"name":"Ada Lovelace"}`, 200, nil)
	received.wait(t, "the skinny update, fetched", func(ls []line) bool {
		return slices.ContainsFunc(ls, func(l line) bool { return l.Fetched != nil })
	})
	appCall(t, "DELETE", appAddr, fmt.Sprintf("/contacts/%d", c.ID), "", 200, nil)
	// And plain SQL, and the trigger variant.
	psql(t, db.URL, "sql/outbox.sql")
	psql(t, db.URL, "sql/trigger.sql")

	want := []string{"contact.created", "contact.updated", "contact.updated", "contact.deleted",
		"invoice.created", "invoice.paid", "customer.created", "customer.updated", "customer.deleted"}
	got := received.wait(t, "every hook", func(ls []line) bool { return len(ls) >= len(want) })
	var types []string
	for _, l := range got {
		types = append(types, l.Event.Type)
		if l.Event.Type == "contact.updated" && l.Fetched != nil {
			if !strings.Contains(string(l.Fetched), "Ada Lovelace") || l.Event.Data != nil {
				t.Errorf("skinny hook: data %s, fetched %s", l.Event.Data, l.Fetched)
			}
		}
		if strings.Contains(string(l.Event.Data), "Nobody") {
			t.Error("the rolled-back contact was delivered")
		}
	}
	slices.Sort(types)
	slices.Sort(want)
	if !slices.Equal(types, want) {
		t.Errorf("received %v\nwant %v", types, want)
	}

	// Rotation: both signatures go out; the receiver, still on the old secret, accepts.
	var rot struct{ Secret string }
	json.Unmarshal([]byte(script("rotate", all.ID)), &rot)
	if !strings.HasPrefix(rot.Secret, "whsec_") || rot.Secret == secret {
		t.Fatalf("rotate gave %q", rot.Secret)
	}
	appCall(t, "POST", appAddr, "/contacts", `{"tenant":"acme","name":"Grace","email":"grace@example.com"}`, 201, nil)
	received.wait(t, "a hook after the rotation", func(ls []line) bool { return len(ls) > len(want) })

	// The receiver unsubscribes by answering 410.
	http.Post("http://"+recvAddr+"/control/unsubscribe", "", nil)
	appCall(t, "POST", appAddr, "/contacts", `{"tenant":"acme","name":"Linus","email":"linus@example.com"}`, 201, nil)
	deadline := time.Now().Add(30 * time.Second)
	for strings.Contains(script("list"), all.ID) {
		if time.Now().After(deadline) {
			t.Fatal("the 410 did not unsubscribe")
		}
		time.Sleep(100 * time.Millisecond) // poll interval
	}
}

type line struct {
	WebhookID string `json:"webhook_id"`
	Event     struct {
		Type string          `json:"type"`
		Data json.RawMessage `json:"data"`
	} `json:"event"`
	Fetched json.RawMessage `json:"fetched"`
}

// lines collects the receiver's output.
type lines struct {
	mu      sync.Mutex
	got     []line
	changed chan struct{}
}

func (l *lines) add(s string) {
	var x line
	if json.Unmarshal([]byte(s), &x) != nil {
		return
	}
	l.mu.Lock()
	l.got = append(l.got, x)
	if l.changed != nil {
		close(l.changed)
		l.changed = nil
	}
	l.mu.Unlock()
}

func (l *lines) wait(t *testing.T, what string, cond func([]line) bool) []line {
	t.Helper()
	timeout := time.After(60 * time.Second)
	for {
		l.mu.Lock()
		got := append([]line(nil), l.got...)
		if l.changed == nil {
			l.changed = make(chan struct{})
		}
		ch := l.changed
		l.mu.Unlock()
		if cond(got) {
			return got
		}
		select {
		case <-ch:
		case <-timeout:
			t.Fatalf("timed out waiting for %s; received %d lines", what, len(got))
		}
	}
}

// start runs a program until the test ends; its stdout goes to out (line by
// line) when given, and everything to the test log on failure.
func start(t *testing.T, name string, out *lines, path string, args ...string) {
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, path, args...)
	var logs bytes.Buffer
	var mu sync.Mutex
	cmd.Stderr = writerFunc(func(p []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return logs.Write(p) })
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if out != nil {
				out.add(sc.Text())
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		cmd.Wait()
		if t.Failed() {
			mu.Lock()
			t.Logf("%s log:\n%s", name, logs.String())
			mu.Unlock()
		}
	})
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// freeAddrs returns n distinct free addresses: every listener stays open
// until all are chosen (one closed a moment ago may be handed out again).
func freeAddrs(t *testing.T, n int) []string {
	var addrs []string
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		addrs = append(addrs, l.Addr().String())
	}
	return addrs
}

func waitUp(t *testing.T, url string) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not up: %v", url, err)
		}
		time.Sleep(50 * time.Millisecond) // poll interval
	}
}

func apiPost(t *testing.T, addr string, body map[string]any) map[string]any {
	b, _ := json.Marshal(body)
	req, _ := http.NewRequest("POST", "http://"+addr+"/v1/subscriptions", bytes.NewReader(b))
	req.Header.Set("Authorization", "Bearer example-token")
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	json.NewDecoder(resp.Body).Decode(&out)
	if resp.StatusCode != 201 {
		t.Fatalf("create subscription: %d %v", resp.StatusCode, out)
	}
	return out
}

func appCall(t *testing.T, method, addr, path, body string, want int, into any) {
	req, _ := http.NewRequest(method, "http://"+addr+path, strings.NewReader(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != want {
		t.Fatalf("%s %s: %d, want %d", method, path, resp.StatusCode, want)
	}
	if into != nil {
		json.NewDecoder(resp.Body).Decode(into)
	}
}

func psql(t *testing.T, url, file string) {
	bin, err := pgtest.Psql()
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", file, url).CombinedOutput()
	if err != nil {
		t.Fatalf("psql -f %s: %v\n%s", file, err, out)
	}
}
