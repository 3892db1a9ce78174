package main

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/walhook/walhook/sender/sendertest"
)

// TestAttemptLog: every attempt of a request is in the log, newest first,
// with its status, and is found by subscription, by event, by outcome and
// page by page; a tenant sees its own subscriptions' attempts only; status
// shows the last success and failure; nothing secret is stored.
func TestAttemptLog(t *testing.T) {
	t.Parallel()
	auth := tenantAuth(t)
	// alice's endpoint fails twice, then accepts.
	var failures atomic.Int32
	flaky := sendertest.NewServer(t, func(_ int, r *sendertest.Request) (int, http.Header) {
		if s := r.Header.Get("X-Hook-Secret"); s != "" {
			return http.StatusOK, http.Header{"X-Hook-Secret": {s}}
		}
		if failures.Add(1) <= 2 {
			return http.StatusInternalServerError, nil
		}
		return http.StatusNoContent, nil
	})
	static := echoing(t)
	e := newEnv(t, "admin_token: "+adminToken+"\nallow_targets: [127.0.0.1/32]\nauth_url: "+auth.URL+"\n"+
		"defaults: {retry_initial: 50ms, retry_max_interval: 100ms}\n"+
		"subscriptions:\n"+sub("static", static.HooksURL(), `["*"]`))
	e.setup()
	r := e.start()
	admin := client{t: t, base: e.addr(r), token: adminToken}
	alice, bob := client{t: t, base: admin.base, token: "alice"}, client{t: t, base: admin.base, token: "bob"}
	status, got := alice.do("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": flaky.HooksURL()})
	if status != http.StatusCreated {
		t.Fatalf("create: %d %v", status, got)
	}
	id, secret := got["id"].(string), got["secret"].(string)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, tenant, payload) VALUES ('x', 'r1', 'a', '{}')`)
	var eventID string
	e.db.Pool.QueryRow(context.Background(), `SELECT id::text FROM walhook.outbox`).Scan(&eventID)
	hooks := flaky.Wait(t, 30*time.Second, "the third attempt", func(r []sendertest.Request) bool { return len(hooksOnly(r)) == 3 })
	webhookID := hooksOnly(hooks)[0].Header.Get("webhook-id")

	type attemptRow struct {
		ID         int64    `json:"id"`
		Attempt    int      `json:"attempt"`
		WebhookID  string   `json:"webhook_id"`
		EventIDs   []string `json:"event_ids"`
		EventCount int      `json:"event_count"`
		Outcome    string   `json:"outcome"`
		Status     *int     `json:"status"`
		Class      string   `json:"class"`
		Reason     *string  `json:"reason"`
	}
	type page struct {
		Attempts   []attemptRow `json:"attempts"`
		NextCursor *string      `json:"next_cursor"`
	}
	list := func(c client, path string) (int, page) {
		t.Helper()
		status, got := c.do("GET", path, nil)
		var p page
		b, _ := json.Marshal(got)
		json.Unmarshal(b, &p)
		return status, p
	}
	var p page
	e.eventually(10*time.Second, "three attempts in the log", func() bool {
		_, p = list(alice, "/v1/subscriptions/"+id+"/attempts")
		return len(p.Attempts) == 3
	})
	for i, a := range p.Attempts {
		want, code, class := "failed", 500, "5xx"
		if i == 0 {
			want, code, class = "delivered", 0, "2xx" // a delivered attempt's status is its class
		}
		if a.Attempt != 3-i || a.Outcome != want || (a.Status == nil) != (code == 0) || code != 0 && *a.Status != code || a.Class != class ||
			a.WebhookID != webhookID || a.EventCount != 1 || len(a.EventIDs) != 1 || a.EventIDs[0] != eventID {
			t.Errorf("attempt %d (newest first): %+v", i, a)
		}
		if want == "failed" && (a.Reason == nil || !strings.Contains(*a.Reason, "status 500")) {
			t.Errorf("attempt %d: reason %v", i, a.Reason)
		}
	}
	for query, n := range map[string]int{"?status=failed": 2, "?status=succeeded": 1, "?status=500": 2,
		"?event_id=" + eventID: 3, "?event_id=nope": 0, "?since=" + url.QueryEscape(time.Now().Add(time.Hour).Format(time.RFC3339)): 0} {
		if status, p := list(alice, "/v1/subscriptions/"+id+"/attempts"+query); status != 200 || len(p.Attempts) != n {
			t.Errorf("%s: %d, %d attempts, want %d", query, status, len(p.Attempts), n)
		}
	}
	// Page by page, one at a time.
	var numbers []int
	path := "/v1/subscriptions/" + id + "/attempts?limit=1"
	for range 5 {
		_, p := list(alice, path)
		for _, a := range p.Attempts {
			numbers = append(numbers, a.Attempt)
		}
		if p.NextCursor == nil {
			break
		}
		path = "/v1/subscriptions/" + id + "/attempts?limit=1&cursor=" + *p.NextCursor
	}
	if len(numbers) != 3 || numbers[0] != 3 || numbers[1] != 2 || numbers[2] != 1 {
		t.Errorf("pages gave attempts %v, want [3 2 1]", numbers)
	}
	// By event: alice sees her subscription's attempts, the admin also the
	// config-file subscription's, bob none.
	e.eventually(10*time.Second, "the static subscription's attempt", func() bool {
		_, p := list(admin, "/v1/events/"+eventID+"/attempts")
		return len(p.Attempts) == 4
	})
	if _, p := list(alice, "/v1/events/"+eventID+"/attempts"); len(p.Attempts) != 3 {
		t.Errorf("alice sees %d attempts of her event, want 3", len(p.Attempts))
	}
	if status, p := list(bob, "/v1/events/"+eventID+"/attempts"); status != 200 || len(p.Attempts) != 0 {
		t.Errorf("bob: %d, %d attempts of alice's subscription", status, len(p.Attempts))
	}
	if status, _ := bob.do("GET", "/v1/subscriptions/"+id+"/attempts", nil); status != http.StatusNotFound {
		t.Errorf("bob reads alice's subscription's attempts: %d", status)
	}
	if status, _ := alice.do("GET", "/v1/subscriptions/static/attempts", nil); status != http.StatusNotFound {
		t.Errorf("alice reads the config-file subscription's attempts: %d", status)
	}
	for query, field := range map[string]string{"?status=bogus": "status", "?cursor=abc": "cursor", "?limit=0": "limit",
		"?since=yesterday": "since", "?color=red": "color"} {
		status, got := alice.do("GET", "/v1/subscriptions/"+id+"/attempts"+query, nil)
		if msg, _ := got["error"].(string); status != http.StatusBadRequest || !strings.HasPrefix(msg, field) {
			t.Errorf("%s: %d %v, want 400 naming %s", query, status, got, field)
		}
	}

	// The CLI reads the same log.
	code, stdout, stderr := e.walhook("attempts", "--subscription", "static", "--json")
	var cli page
	if json.Unmarshal([]byte(stdout), &cli); code != 0 || len(cli.Attempts) != 1 || cli.Attempts[0].Outcome != "delivered" {
		t.Errorf("walhook attempts --subscription static --json: exit %d: %s %s", code, stdout, stderr)
	}
	if code, stdout, _ := e.walhook("attempts", "--event-id", eventID, "--status", "failed"); code != 0 ||
		strings.Count(stdout, webhookID) != 2 {
		t.Errorf("walhook attempts --event-id --status failed: exit %d:\n%s", code, stdout)
	}
	if code, _, stderr := e.walhook("attempts"); code != exitConfig || !strings.Contains(stderr, "--subscription or --event-id") {
		t.Errorf("walhook attempts without a filter: exit %d: %s", code, stderr)
	}
	// Status: the last success and the last failure.
	code, stdout, stderr = e.walhook("status", "--json")
	var st struct {
		Subscriptions []struct {
			ID                string     `json:"id"`
			LastSuccess       *time.Time `json:"last_success_at"`
			LastFailure       *time.Time `json:"last_failure_at"`
			LastFailureStatus *int       `json:"last_failure_status"`
		} `json:"subscriptions"`
	}
	if err := json.Unmarshal([]byte(stdout), &st); code != 0 || err != nil {
		t.Fatalf("status --json: exit %d, %v: %s", code, err, stderr)
	}
	for _, s := range st.Subscriptions {
		switch s.ID {
		case id:
			if s.LastSuccess == nil || s.LastFailure == nil || s.LastFailureStatus == nil || *s.LastFailureStatus != 500 {
				t.Errorf("status of %s: %+v", id, s)
			}
		case "static":
			if s.LastSuccess == nil || s.LastFailure != nil {
				t.Errorf("status of static: %+v", s)
			}
		}
	}
	// Nothing secret in the log.
	var all string
	e.db.Pool.QueryRow(context.Background(), `SELECT string_agg(a::text, ' ') FROM walhook.attempts a`).Scan(&all)
	for _, s := range []string{secret, testSecret, adminToken, flaky.URL} {
		if strings.Contains(all, s) {
			t.Errorf("the attempt log holds %q", s)
		}
	}
}
