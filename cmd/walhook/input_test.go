package main

import (
	"encoding/json"
	"github.com/walhook/walhook/outbox"
	"io"
	"net/http"
	"strings"
	"testing"
)

// raw sends body as it is, with contentType (none when "").
func (c client) raw(method, path, contentType, body string) (int, string) {
	c.t.Helper()
	req, err := http.NewRequest(method, c.base+path, strings.NewReader(body))
	if err != nil {
		c.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var out struct {
		Error string `json:"error"`
	}
	if resp.StatusCode >= 400 && (json.Unmarshal(b, &out) != nil || out.Error == "" || resp.Header.Get("Content-Type") != "application/json") {
		c.t.Errorf("%s %s: %d without a JSON error body: %q", method, path, resp.StatusCode, b)
	}
	return resp.StatusCode, out.Error
}

// TestAPIRefusesHostileInput: NUL bytes, invalid UTF-8, trailing data,
// non-numbers, bad patterns and out-of-range options are 400s naming the
// field, not 500s nor quietly accepted; JSON needs its content type.
func TestAPIRefusesHostileInput(t *testing.T) {
	t.Parallel()
	target := echoing(t)
	_, api := apiEnv(t, "max_timeout: 30s\n")
	okBody := func(more string) string {
		return `{"event": "a", "target_url": "` + target.HooksURL() + `", "verify_intent": false` + more + `}`
	}
	if status, msg := api.raw("POST", "/v1/subscriptions", "application/json; charset=utf-8", okBody("")); status != http.StatusCreated {
		t.Fatalf("a good create: %d %s", status, msg)
	}
	many := `"events": [` + strings.TrimSuffix(strings.Repeat(`"a",`, 51), ",") + `]`
	bodies := []struct{ field, body string }{
		{"event", strings.Replace(okBody(""), `"a"`, `"a\u0000b"`, 1)},
		{"tenant", okBody(`, "tenant": "t\u0000"`)},
		{"event", strings.Replace(okBody(""), `"a"`, "\"a\xffb\"", 1)},
		{"tenant", okBody(", \"tenant\": \"\xc3\x28\"")},
		{"body", okBody("") + " GARBAGE"},
		{"body", okBody("") + ` {"event": "b"}`},
		{"event", strings.Replace(okBody(""), `"a"`, `"a..b"`, 1)},
		{"event", strings.Replace(okBody(""), `"a"`, `"a b"`, 1)},
		{"event", strings.Replace(okBody(""), `"a"`, `"a\nb"`, 1)},
		{"event", strings.Replace(okBody(""), `"a"`, `"a."`, 1)},
		{"event", strings.Replace(okBody(""), `"a"`, `".*"`, 1)},
		{"events", strings.Replace(okBody(""), `"event": "a"`, many, 1)},
		{"target_url", strings.Replace(okBody(""), target.HooksURL(), target.HooksURL()+"?"+strings.Repeat("x", 2048), 1)},
		{"max_in_flight", okBody(`, "max_in_flight": 1025`)},
		{"batch_max", okBody(`, "batch_max": 10001`)},
		{"batch_max", okBody(`, "batch_max": "5"`)},
		{"batch_max", okBody(`, "batch_max": 5.5`)},
		{"timeout", okBody(`, "timeout": "1000h"`)},
		{"park_after", okBody(`, "park_after": "100000h"`)},
		{"debounce", okBody(`, "debounce": "100000h"`)},
		{"max_wait", okBody(`, "max_wait": "16m"`)},
		{"batch_wait", okBody(`, "batch_wait": "100000h"`)},
		{"timeout", okBody(`, "timeout": "31s"`)},
		{"timeout", okBody(`, "timeout": 5`)},
		{"colour", okBody(`, "colour": "red"`)},
	}
	for _, b := range bodies {
		status, msg := api.raw("POST", "/v1/subscriptions", "application/json", b.body)
		if status != http.StatusBadRequest || !strings.HasPrefix(msg, b.field+":") {
			t.Errorf("%q: %d %q, want 400 naming %s", b.body, status, msg, b.field)
		}
	}
	// Query values, path ids and numbers.
	for _, q := range []struct{ method, path, field string }{
		{"GET", "/v1/subscriptions/a%00b", "id"},
		{"GET", "/v1/subscriptions/a%FFb", "id"},
		{"PATCH", "/v1/subscriptions/a%00b", "id"},
		{"GET", "/v1/subscriptions?tenant=%00", "tenant"},
		{"GET", "/v1/subscriptions?tenant=%FF", "tenant"},
		{"GET", "/v1/subscriptions?event=a%00", "event"},
		{"GET", "/v1/dead-letters?subscription=%00", "subscription"},
		{"GET", "/v1/dead-letters?limit=5abc", "limit"},
		{"GET", "/v1/dead-letters?limit=+5", "limit"},
		{"GET", "/v1/dead-letters?limit=0", "limit"},
		{"GET", "/v1/dead-letters?limt=5", "limt"},
		{"GET", "/v1/dead-letters?limit=5&limit=6", "limit"},
		{"GET", "/v1/dead-letters?since=yesterday", "since"},
		{"POST", "/v1/dead-letters/5abc/replay", "id"},
		{"POST", "/v1/dead-letters/0x5/replay", "id"},
		{"POST", "/v1/dead-letters/99999999999999999999/replay", "id"},
	} {
		body := ""
		if q.method == "PATCH" {
			body = `{"event": "b"}`
		}
		status, msg := api.raw(q.method, q.path, "application/json", body)
		if status != http.StatusBadRequest || !strings.HasPrefix(msg, q.field+":") {
			t.Errorf("%s %s: %d %q, want 400 naming %s", q.method, q.path, status, msg, q.field)
		}
	}
	if status, msg := api.raw("POST", "/v1/dead-letters/replay", "application/json", `{"subscription": "s\u0000"}`); status != http.StatusBadRequest || !strings.HasPrefix(msg, "subscription:") {
		t.Errorf("replay with a NUL: %d %q", status, msg)
	}
	// A JSON body needs its content type: a browser's simple request cannot send one.
	for _, ct := range []string{"", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json; charset=latin1"} {
		if status, msg := api.raw("POST", "/v1/subscriptions", ct, okBody("")); status != http.StatusUnsupportedMediaType {
			t.Errorf("Content-Type %q: %d %q, want 415", ct, status, msg)
		}
	}
	// Nothing of the above was stored.
	_, list := api.do("GET", "/v1/subscriptions", nil)
	if n := len(list["list"].([]any)); n != 1 {
		t.Errorf("%d subscriptions stored, want only the good one", n)
	}
}

// TestMaxTimeoutIsACeiling: no subscription in the config file may have a
// timeout above max_timeout (default 60s); the error names the key.
func TestMaxTimeoutIsACeiling(t *testing.T) {
	t.Parallel()
	const db = "database_url: postgres://app@127.0.0.1:1/app\n"
	subWith := func(opt string) string {
		return "subscriptions:\n  - id: crm\n    events: ['*']\n    target_url: http://x/\n    secret: " + testSecret + "\n    " + opt + "\n"
	}
	for _, tt := range []struct{ yaml, want string }{
		{db + subWith("timeout: 1000h"), "subscriptions[crm].timeout: 1000h is more than max_timeout (1m0s)"},
		{db + "defaults: {timeout: 61s}\n", "defaults.timeout: 61s is more than max_timeout"},
		{db + "max_timeout: 5s\n" + subWith("timeout: 6s"), "subscriptions[crm].timeout: 6s is more than max_timeout (5s)"},
		{db + "max_timeout: soon\n", `max_timeout: "soon" is not a positive duration`},
		{db + subWith("debounce: 100000h"), "subscriptions[crm].debounce: 100000h is more than max_hold (15m0s)"},
		{db + "defaults: {park_after: 16m}\n", "defaults.park_after: 16m is more than max_hold"},
		{db + "max_hold: 1m\n" + subWith("max_wait: 2m"), "subscriptions[crm].max_wait: 2m is more than max_hold (1m0s)"},
		{db + "max_hold: 0\n", `max_hold: "0" is not a positive duration`},
		{db + "max_pending_bytes_per_subscription: 1000\n", "max_pending_bytes_per_subscription: 1000 must be from 1048576"},
		{db + "max_pending_bytes: 2097152\nmax_pending_bytes_per_subscription: 4194304\n", "to max_pending_bytes (2097152)"},
		{db + subWith("max_in_flight: 2000"), "subscriptions[crm].max_in_flight: 2000 must be at most 1024"},
		{db + subWith("batch_max: 10001"), "subscriptions[crm].batch_max: 10001 must be at most 10000"},
		{db + "subscriptions:\n  - id: crm\n    events: ['a..b', 'ok', ' x']\n    target_url: http://x/\n    secret: " + testSecret + "\n", "subscriptions[crm].events[2]"},
	} {
		code, stderr := runConfig(t, tt.yaml)
		if code != exitConfig || !strings.Contains(stderr, tt.want) {
			t.Errorf("exit %d, stderr %q, want %q", code, stderr, tt.want)
		}
	}
	// A higher ceiling lets a longer timeout through; a lower one lowers the default.
	cfg := &Config{DatabaseURL: "postgres://app@127.0.0.1:1/app", MaxTimeout: mustDur("2m")}
	cfg.Subscriptions = []SubscriptionConfig{{ID: "crm", Events: []string{"*"}, TargetURL: "http://x/", Secret: testSecret}}
	cfg.Subscriptions[0].Timeout = mustDur("90s")
	cfg.withDefaults()
	if s, err := cfg.Resolve(true); err != nil || s.subs[0].Delivery.Timeout.String() != "1m30s" {
		t.Errorf("max_timeout: 2m with a 90s timeout: %v", err)
	}
	low := &Config{DatabaseURL: "postgres://app@127.0.0.1:1/app", MaxTimeout: mustDur("3s"), MaxHold: mustDur("10s")}
	low.withDefaults()
	s, err := low.Resolve(false)
	if err != nil {
		t.Fatalf("max_timeout: 3s: %v", err)
	}
	if s.defaults.Timeout.String() != "3s" {
		t.Errorf("max_timeout: 3s: default timeout %s", s.defaults.Timeout)
	}
	if s.defaults.ParkAfter.String() != "10s" || s.defaults.MaxWait.String() != "10s" {
		t.Errorf("max_hold: 10s: default park_after %s, max_wait %s", s.defaults.ParkAfter, s.defaults.MaxWait)
	}
}

func mustDur(s string) (d outbox.Duration) {
	d.UnmarshalText([]byte(s))
	return d
}
