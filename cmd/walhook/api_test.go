package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
	"github.com/walhook/walhook/sender/sendertest"
)

const adminToken = "t0ken-for-tests-only"

// echoing answers the X-Hook-Secret handshake and accepts hooks.
func echoing(t *testing.T) *sendertest.Server {
	return sendertest.NewServer(t, func(_ int, r *sendertest.Request) (int, http.Header) {
		if s := r.Header.Get("X-Hook-Secret"); s != "" {
			return http.StatusOK, http.Header{"X-Hook-Secret": {s}}
		}
		return http.StatusNoContent, nil
	})
}

// hooksOnly keeps the deliveries, not the handshakes.
func hooksOnly(reqs []sendertest.Request) []sendertest.Request {
	var out []sendertest.Request
	for _, r := range reqs {
		if r.Header.Get("webhook-id") != "" {
			out = append(out, r)
		}
	}
	return out
}

var listenRE = regexp.MustCompile(`"listen":"([^"]+)"`)

// addr is the address a running walhook listens on.
func (e *env) addr(r *runner) string {
	e.t.Helper()
	var addr string
	e.eventually(10*time.Second, "walhook to listen", func() bool {
		if m := listenRE.FindStringSubmatch(r.log.String()); m != nil {
			addr = m[1]
		}
		return addr != ""
	})
	return "http://" + addr
}

type client struct {
	t     *testing.T
	base  string
	token string
}

func (c client) do(method, path string, body any) (int, map[string]any) {
	c.t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, c.base+path, rd)
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var out map[string]any
	if len(raw) > 0 && raw[0] == '{' {
		json.Unmarshal(raw, &out)
	}
	if len(raw) > 0 && raw[0] == '[' {
		var list []any
		json.Unmarshal(raw, &list)
		out = map[string]any{"list": list}
	}
	if resp.StatusCode >= 400 && (out == nil || out["error"] == nil) {
		c.t.Errorf("%s %s: %d without a JSON error body: %s", method, path, resp.StatusCode, raw)
	}
	return resp.StatusCode, out
}

func apiEnv(t *testing.T, extra string) (*env, client) {
	e := newEnv(t, "admin_token: "+adminToken+"\nallow_targets: [127.0.0.1/32]\n"+extra)
	e.setup()
	r := e.start()
	return e, client{t: t, base: e.addr(r), token: adminToken}
}

func TestSubscriptionLifecycle(t *testing.T) {
	t.Parallel()
	first, second := echoing(t), echoing(t)
	e, api := apiEnv(t, "")

	status, sub := api.do("POST", "/v1/subscriptions", map[string]any{"event": "contact.*", "target_url": first.HooksURL()})
	if status != http.StatusCreated || sub["id"] == nil || !strings.HasPrefix(sub["secret"].(string), "whsec_") {
		t.Fatalf("create: %d %v", status, sub)
	}
	id, secret := sub["id"].(string), sub["secret"].(string)
	if len(first.Requests()) != 1 || first.Requests()[0].Header.Get("X-Hook-Secret") == "" {
		t.Fatal("no X-Hook-Secret handshake before the subscription was stored")
	}
	// An event committed right after the create is delivered.
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.created', 'c1', '{}')`)
	reqs := first.Wait(t, 30*time.Second, "the first hook", func(r []sendertest.Request) bool { return len(hooksOnly(r)) == 1 })
	wh, _ := standardwebhooks.NewWebhook(secret)
	if err := wh.Verify(hooksOnly(reqs)[0].Body, hooksOnly(reqs)[0].Header); err != nil {
		t.Errorf("hook does not verify with the returned secret: %v", err)
	}
	if status, got := api.do("GET", "/v1/subscriptions/"+id, nil); status != 200 || got["secret"] != nil || got["target_url"] != first.HooksURL() {
		t.Errorf("get: %d %v (the secret must not be shown)", status, got)
	}
	// PATCH the target: the new target is verified, then receives the hooks.
	if status, got := api.do("PATCH", "/v1/subscriptions/"+id, map[string]any{"target_url": second.HooksURL(), "debounce": "0s"}); status != 200 {
		t.Fatalf("patch: %d %v", status, got)
	}
	if len(second.Requests()) != 1 || second.Requests()[0].Header.Get("X-Hook-Secret") == "" {
		t.Error("the new target was not verified")
	}
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.updated', 'c1', '{}')`)
	second.Wait(t, 30*time.Second, "a hook at the new target", func(r []sendertest.Request) bool { return len(hooksOnly(r)) == 1 })
	// Delete: a later event is not delivered.
	if status, _ := api.do("DELETE", "/v1/subscriptions/"+id, nil); status != http.StatusNoContent {
		t.Fatalf("delete: %d", status)
	}
	if status, _ := api.do("GET", "/v1/subscriptions/"+id, nil); status != http.StatusNotFound {
		t.Errorf("get after delete: %d", status)
	}
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.deleted', 'c1', '{}')`)
	e.waitCaughtUp()
	if n := len(hooksOnly(first.Requests())) + len(hooksOnly(second.Requests())); n != 2 {
		t.Errorf("%d hooks in all, want 2 (none after the delete)", n)
	}
}

func TestAPIRefusesBadRequests(t *testing.T) {
	t.Parallel()
	mute := sendertest.NewServer(t, nil) // never echoes the handshake
	_, api := apiEnv(t, "")
	noAuth := client{t: t, base: api.base}
	if status, _ := noAuth.do("GET", "/v1/subscriptions", nil); status != http.StatusUnauthorized {
		t.Errorf("no token: %d", status)
	}
	wrong := client{t: t, base: api.base, token: "wrong"}
	if status, _ := wrong.do("GET", "/v1/subscriptions", nil); status != http.StatusUnauthorized {
		t.Errorf("wrong token: %d", status)
	}
	reached := sendertest.NewServer(t, nil) // stands for what a forbidden target would reach
	cases := map[string]map[string]any{
		"echo":       {"event": "a", "target_url": mute.HooksURL()},
		"target_url": {"event": "a", "target_url": "not a url"},
		"event":      {"event": "a*b", "target_url": mute.HooksURL()},
		"unknown":    {"event": "a", "target_url": mute.HooksURL(), "colour": "red"},
		"timeout":    {"event": "a", "target_url": mute.HooksURL(), "timeout": "soon", "verify_intent": false},
	}
	for want, body := range cases {
		status, got := api.do("POST", "/v1/subscriptions", body)
		if status != http.StatusBadRequest || !strings.Contains(got["error"].(string), want) {
			t.Errorf("%v: %d %v, want 400 mentioning %q", body, status, got, want)
		}
	}
	_, port, _ := strings.Cut(strings.TrimPrefix(reached.URL, "http://"), ":")
	for _, target := range []string{
		"http://localhost:" + port + "/", "http://127.1:" + port + "/", "http://2130706433:" + port + "/",
		"http://0177.0.0.1:" + port + "/", "http://[::1]:" + port + "/", "http://[::ffff:127.0.0.2]:" + port + "/",
		"http://10.0.0.1/", "http://192.168.1.1/", "http://169.254.169.254/latest/meta-data/", "http://[fd00::1]/",
		"http://224.0.0.1/", "http://0.0.0.0:" + port + "/", "ftp://example.com/",
	} {
		status, got := api.do("POST", "/v1/subscriptions", map[string]any{"event": "a", "target_url": target})
		if status != http.StatusBadRequest || !strings.Contains(got["error"].(string), "target_url") {
			t.Errorf("%s: %d %v, want 400", target, status, got)
		}
	}
	if n := len(reached.Requests()) + len(mute.Requests()); n != 1 { // the one handshake to mute
		t.Errorf("%d requests reached endpoints, want only the handshake", n)
	}
}

func TestForwardAuthKeepsTenantsApart(t *testing.T) {
	t.Parallel()
	auth := tenantAuth(t)
	ha, hb := echoing(t), echoing(t)
	e, admin := apiEnv(t, "auth_url: "+auth.URL+"\n")
	alice, bob := client{t: t, base: admin.base, token: "alice"}, client{t: t, base: admin.base, token: "bob"}
	if status, _ := (client{t: t, base: admin.base, token: "mallory"}).do("GET", "/v1/subscriptions", nil); status != 401 {
		t.Errorf("unknown caller: %d", status)
	}
	status, a := alice.do("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": ha.HooksURL()})
	if status != 201 || a["tenant"] != "a" {
		t.Fatalf("alice create: %d %v", status, a)
	}
	if status, _ := bob.do("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": hb.HooksURL(), "tenant": "a"}); status != 403 {
		t.Errorf("bob creating for tenant a: %d", status)
	}
	status, b := bob.do("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": hb.HooksURL()})
	if status != 201 || b["tenant"] != "b" {
		t.Fatalf("bob create: %d %v", status, b)
	}
	aid := a["id"].(string)
	for _, call := range [][2]string{{"GET", ""}, {"PATCH", ""}, {"DELETE", ""}, {"POST", "/rotate-secret"}} {
		var body any
		if call[0] == "PATCH" {
			body = map[string]any{"event": "x"}
		}
		if status, _ := bob.do(call[0], "/v1/subscriptions/"+aid+call[1], body); status != 404 {
			t.Errorf("bob %s on alice's subscription: %d, want 404", call[0], status)
		}
	}
	if _, list := bob.do("GET", "/v1/subscriptions", nil); len(list["list"].([]any)) != 1 {
		t.Errorf("bob sees %v", list)
	}
	if _, list := admin.do("GET", "/v1/subscriptions", nil); len(list["list"].([]any)) != 2 {
		t.Errorf("admin sees %v", list)
	}
	e.exec(`INSERT INTO walhook.outbox (event, tenant) VALUES ('x', 'a'), ('x', 'b'), ('x', NULL)`)
	e.waitCaughtUp()
	for name, srv := range map[string]*sendertest.Server{"a": ha, "b": hb} {
		got := hooksOnly(srv.Requests())
		if len(got) != 1 || deref(decode(t, got[0].Body).Tenant) != name {
			t.Errorf("tenant %s's endpoint got %d hooks", name, len(got))
		}
	}
}

func TestGoneUnsubscribes(t *testing.T) {
	t.Parallel()
	gone := sendertest.NewServer(t, func(_ int, r *sendertest.Request) (int, http.Header) {
		if s := r.Header.Get("X-Hook-Secret"); s != "" {
			return 200, http.Header{"X-Hook-Secret": {s}}
		}
		return http.StatusGone, nil
	})
	e, api := apiEnv(t, "")
	_, sub := api.do("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": gone.HooksURL()})
	id := sub["id"].(string)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('x', 'r')`)
	e.eventually(30*time.Second, "the subscription to be deleted", func() bool {
		status, _ := api.do("GET", "/v1/subscriptions/"+id, nil)
		return status == http.StatusNotFound
	})
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('x', 'r'), ('x', 's')`)
	e.waitCaughtUp()
	if n := len(hooksOnly(gone.Requests())); n != 1 {
		t.Errorf("%d hooks to a target that answered 410, want 1", n)
	}
	var dead int
	e.db.Pool.QueryRow(t.Context(), `SELECT count(*) FROM walhook.dead_letters`).Scan(&dead)
	if dead != 0 {
		t.Errorf("%d dead letters: a 410 drops, it does not dead-letter", dead)
	}
}

func TestSecretRotationOverlap(t *testing.T) {
	t.Parallel()
	srv := echoing(t)
	e, api := apiEnv(t, "rotation_overlap: 2s\n")
	_, sub := api.do("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": srv.HooksURL()})
	id, old := sub["id"].(string), sub["secret"].(string)
	status, rot := api.do("POST", "/v1/subscriptions/"+id+"/rotate-secret", nil)
	if status != 200 || rot["secret"] == old {
		t.Fatalf("rotate: %d %v", status, rot)
	}
	newer := rot["secret"].(string)
	e.exec(`INSERT INTO walhook.outbox (event) VALUES ('during')`)
	during := srv.Wait(t, 30*time.Second, "a hook", func(r []sendertest.Request) bool { return len(hooksOnly(r)) == 1 })
	h := hooksOnly(during)[0]
	for _, s := range []string{old, newer} {
		wh, _ := standardwebhooks.NewWebhook(s)
		if err := wh.Verify(h.Body, h.Header); err != nil {
			t.Errorf("during the overlap a secret does not verify: %v", err)
		}
	}
	// After the overlap only the new secret signs.
	var last sendertest.Request
	e.eventually(30*time.Second, "a hook signed by the new secret alone", func() bool {
		e.exec(`INSERT INTO walhook.outbox (event) VALUES ('after')`)
		hs := hooksOnly(srv.Requests())
		last = hs[len(hs)-1]
		return len(strings.Fields(last.Header.Get("webhook-signature"))) == 1
	})
	oldWH, _ := standardwebhooks.NewWebhook(old)
	newWH, _ := standardwebhooks.NewWebhook(newer)
	if oldWH.Verify(last.Body, last.Header) == nil || newWH.Verify(last.Body, last.Header) != nil {
		t.Error("after the overlap: want the new secret only")
	}
}

// TestCreateThenCommitAlwaysDelivers: a subscription created through one
// replica's API and an event committed right after it, in that order, always
// deliver, whichever replica streams.
func TestCreateThenCommitAlwaysDelivers(t *testing.T) {
	t.Parallel()
	e := newEnv(t, "admin_token: "+adminToken+"\nallow_targets: [127.0.0.1/32]\n")
	e.setup()
	streaming := e.start()
	standby := e.start() // waits for the slot, serves the API
	var mu sync.Mutex
	var targets []*sendertest.Server
	for i, r := range []*runner{streaming, standby, streaming, standby, standby, streaming} {
		srv := echoing(t)
		mu.Lock()
		targets = append(targets, srv)
		mu.Unlock()
		api := client{t: t, base: e.addr(r), token: adminToken}
		if status, got := api.do("POST", "/v1/subscriptions", map[string]any{"event": "round", "target_url": srv.HooksURL(), "verify_intent": false}); status != 201 {
			t.Fatalf("create %d: %d %v", i, status, got)
		}
		e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('round', $1)`, strconv.Itoa(i))
	}
	e.waitCaughtUp()
	for i, srv := range targets {
		// Subscription i exists from event i on: it receives events i..5.
		if got := len(hooksOnly(srv.Requests())); got != len(targets)-i {
			t.Errorf("subscription %d got %d hooks, want %d", i, got, len(targets)-i)
		}
	}
}

// TestRestartRoutesByWhatWasInForce: events committed while walhook was down are
// routed, after the restart, by the subscriptions in force when they committed.
func TestRestartRoutesByWhatWasInForce(t *testing.T) {
	t.Parallel()
	kept, dropped := echoing(t), echoing(t)
	e := newEnv(t, "admin_token: "+adminToken+"\nallow_targets: [127.0.0.1/32]\n")
	e.setup()
	r := e.start()
	api := client{t: t, base: e.addr(r), token: adminToken}
	_, a := api.do("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": dropped.HooksURL()})
	e.waitCaughtUp()
	r.stop()

	e.exec(`INSERT INTO walhook.outbox (event) VALUES ('before_delete')`)
	if code, _, stderr := e.walhook("subscriptions", "rm", a["id"].(string)); code != 0 {
		t.Fatalf("subscriptions rm: %d %s", code, stderr)
	}
	code, out, stderr := e.walhook("subscriptions", "add", "--event", "*", "--target-url", kept.HooksURL())
	if code != 0 || !strings.Contains(out, "secret: whsec_") {
		t.Fatalf("subscriptions add: %d %s %s", code, out, stderr)
	}
	e.exec(`INSERT INTO walhook.outbox (event) VALUES ('after_add')`)
	if code, out, _ := e.walhook("subscriptions", "list"); code != 0 || !strings.Contains(out, kept.HooksURL()) || strings.Contains(out, dropped.HooksURL()) {
		t.Errorf("subscriptions list: %d\n%s", code, out)
	}

	e.start()
	e.waitCaughtUp()
	types := func(s *sendertest.Server) (got []string) {
		for _, r := range hooksOnly(s.Requests()) {
			got = append(got, decode(t, r.Body).Type)
		}
		return got
	}
	if got := types(dropped); len(got) != 1 || got[0] != "before_delete" {
		t.Errorf("the deleted subscription got %v, want [before_delete]", got)
	}
	if got := types(kept); len(got) != 1 || got[0] != "after_add" {
		t.Errorf("the added subscription got %v, want [after_add]", got)
	}
}

// TestFirstStartRoutesBySubscriptionsInForce: on a new slot, an event
// committed before a subscription existed does not reach it, even when the
// first start comes after both (the routing log is seeded by setup, when the
// slot is made, not at the first start).
func TestFirstStartRoutesBySubscriptionsInForce(t *testing.T) {
	t.Parallel()
	early, late := echoing(t), echoing(t)
	e := newEnv(t, "admin_token: "+adminToken+"\nallow_targets: [127.0.0.1/32]\n")
	if code, _, stderr := e.walhook("setup"); code != 0 {
		t.Fatalf("setup: %d %s", code, stderr)
	}
	add := func(target string) {
		t.Helper()
		if code, _, stderr := e.walhook("subscriptions", "add", "--event", "*", "--target-url", target); code != 0 {
			t.Fatalf("subscriptions add: %d %s", code, stderr)
		}
	}
	add(early.HooksURL())
	e.exec(`INSERT INTO walhook.outbox (event) VALUES ('before_late')`)
	add(late.HooksURL())
	e.exec(`INSERT INTO walhook.outbox (event) VALUES ('after_late')`)
	e.start()
	e.waitCaughtUp()
	early.WaitN(t, 2, 30*time.Second)
	if got := hooksOnly(late.Requests()); len(got) != 1 || !strings.Contains(string(got[0].Body), "after_late") {
		t.Errorf("the late subscription got %d hooks, want only after_late", len(got))
	}
}

// TestSubscriptionListPages: GET /v1/subscriptions answers at most limit API
// subscriptions (and the config file's on the first page), with a Link to the
// next page; following the links lists each once; bad limits and cursors are
// 400s naming the field.
func TestSubscriptionListPages(t *testing.T) {
	t.Parallel()
	srv := echoing(t)
	_, api := apiEnv(t, "subscriptions:\n"+sub("file", srv.HooksURL(), `["*"]`))
	created := map[string]bool{}
	for i := range 5 {
		status, got := api.do("POST", "/v1/subscriptions", map[string]any{"event": fmt.Sprint("e", i%2), "target_url": srv.HooksURL(), "verify_intent": false})
		if status != 201 {
			t.Fatalf("create: %d %v", status, got)
		}
		created[got["id"].(string)] = true
	}
	seen := map[string]int{}
	path, pages := "/v1/subscriptions?limit=2", 0
	for path != "" {
		req, _ := http.NewRequest("GET", api.base+path, nil)
		req.Header.Set("Authorization", "Bearer "+adminToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var list []map[string]any
		json.NewDecoder(resp.Body).Decode(&list)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("GET %s: %d", path, resp.StatusCode)
		}
		api := 0
		for _, v := range list {
			seen[v["id"].(string)]++
			if v["id"] != "file" {
				api++
			}
		}
		if api > 2 {
			t.Errorf("page %s holds %d API subscriptions, limit 2", path, api)
		}
		path = ""
		if link := resp.Header.Get("Link"); link != "" {
			path = strings.TrimPrefix(strings.TrimSuffix(link, `>; rel="next"`), "<")
		}
		if pages++; pages > 5 {
			t.Fatal("the links do not end")
		}
	}
	if seen["file"] != 1 {
		t.Errorf("the config file's subscription listed %d times, want once (first page)", seen["file"])
	}
	for id := range created {
		if seen[id] != 1 {
			t.Errorf("subscription %s listed %d times, want once", id, seen[id])
		}
	}
	// An event filter pages through what matches.
	status, got := api.do("GET", "/v1/subscriptions?event=e1&limit=1", nil)
	if list := got["list"].([]any); status != 200 || len(list) != 2 { // the file's ("*") and one e1
		t.Errorf("event=e1&limit=1: %d, %d subscriptions", status, len(list))
	}
	for _, bad := range []string{"limit=0", "limit=1001", "limit=x", "cursor=nope", "cursor=1.", "colour=red"} {
		status, got := api.do("GET", "/v1/subscriptions?"+bad, nil)
		field, _, _ := strings.Cut(bad, "=")
		if msg, _ := got["error"].(string); status != 400 || !strings.HasPrefix(msg, field) {
			t.Errorf("%s: %d %q, want 400 naming %s", bad, status, msg, field)
		}
	}
}
