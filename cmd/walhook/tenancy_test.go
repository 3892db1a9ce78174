package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"sort"
	"testing"
	"time"

	"github.com/walhook/walhook/sender/sendertest"
)

// refusing answers the X-Hook-Secret handshake and refuses every hook with a
// 400, so that every event it gets becomes a dead letter at once.
func refusing(t *testing.T) *sendertest.Server {
	return sendertest.NewServer(t, func(_ int, r *sendertest.Request) (int, http.Header) {
		if s := r.Header.Get("X-Hook-Secret"); s != "" {
			return http.StatusOK, http.Header{"X-Hook-Secret": {s}}
		}
		return http.StatusBadRequest, nil
	})
}

// tenantAuth is an auth_url that knows alice (tenant a) and bob (tenant b).
func tenantAuth(t *testing.T) *httptest.Server {
	auth := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.Header.Get("Authorization") {
		case "Bearer alice":
			w.Write([]byte(`{"tenant": "a"}`))
		case "Bearer bob":
			w.Write([]byte(`{"tenant": "b"}`))
		default:
			w.WriteHeader(http.StatusUnauthorized)
		}
	}))
	t.Cleanup(auth.Close)
	return auth
}

// TestDeadLettersFollowTheSubscriptionsOwner: dead letters belong to the
// subscription's owner, not to the event's tenant. Tenant a's events reach an
// admin's tenant-less API subscription, a config-file subscription and tenant
// a's own; tenant a sees and replays only its own subscription's dead letters,
// never the admin's nor tenant b's.
func TestDeadLettersFollowTheSubscriptionsOwner(t *testing.T) {
	t.Parallel()
	auth := tenantAuth(t)
	static, adminSrv, aSrv, bSrv := refusing(t), refusing(t), refusing(t), refusing(t)
	e := newEnv(t, "admin_token: "+adminToken+"\nallow_targets: [127.0.0.1/32]\nauth_url: "+auth.URL+"\n"+
		"subscriptions:\n"+sub("static", static.HooksURL(), `["*"]`))
	e.setup()
	r := e.start()
	admin := client{t: t, base: e.addr(r), token: adminToken}
	alice, bob := client{t: t, base: admin.base, token: "alice"}, client{t: t, base: admin.base, token: "bob"}

	create := func(c client, target string) string {
		t.Helper()
		status, got := c.do("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": target})
		if status != http.StatusCreated {
			t.Fatalf("create: %d %v", status, got)
		}
		return got["id"].(string)
	}
	adminSub, aSub, bSub := create(admin, adminSrv.HooksURL()), create(alice, aSrv.HooksURL()), create(bob, bSrv.HooksURL())
	// Each tenant's event reaches the static, the admin's and its own subscription.
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, tenant) VALUES ('x', 'r1', 'a'), ('x', 'r2', 'b')`)
	e.eventually(30*time.Second, "six dead letters", func() bool {
		var n int
		e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.dead_letters`).Scan(&n)
		return n == 6
	})

	type dead struct{ id, sub string }
	list := func(c client, query string) []dead {
		t.Helper()
		status, got := c.do("GET", "/v1/dead-letters"+query, nil)
		if status != http.StatusOK {
			t.Fatalf("list dead letters: %d %v", status, got)
		}
		var out []dead
		for _, row := range got["list"].([]any) {
			m := row.(map[string]any)
			out = append(out, dead{jsonString(m["id"]), m["subscription"].(string)})
		}
		return out
	}
	subsOf := func(ds []dead) []string {
		var s []string
		for _, d := range ds {
			s = append(s, d.sub)
		}
		sort.Strings(s)
		return s
	}
	all := list(admin, "")
	if len(all) != 6 {
		t.Fatalf("admin sees %d dead letters, want 6", len(all))
	}
	for name, c := range map[string]struct {
		client
		own string
	}{"alice": {alice, aSub}, "bob": {bob, bSub}} {
		if got := subsOf(list(c.client, "")); len(got) != 1 || got[0] != c.own {
			t.Errorf("%s lists dead letters of %v, want only its own subscription %s", name, got, c.own)
		}
		for _, other := range []string{adminSub, "static", aSub, bSub} {
			if other == c.own {
				continue
			}
			if got := list(c.client, "?subscription="+other); len(got) != 0 {
				t.Errorf("%s lists %d dead letters of %s", name, len(got), other)
			}
		}
	}
	// Replays: alice cannot replay others' dead letters by id nor in bulk.
	for _, d := range all {
		if d.sub == aSub {
			continue
		}
		if status, got := alice.do("POST", "/v1/dead-letters/"+d.id+"/replay", nil); status != http.StatusNotFound {
			t.Errorf("alice replaying dead letter %s of %s: %d %v, want 404", d.id, d.sub, status, got)
		}
	}
	for _, body := range []map[string]any{{"all": true}, {"subscription": adminSub}, {"subscription": "static"}, {"subscription": bSub}} {
		status, got := alice.do("POST", "/v1/dead-letters/replay", body)
		want := 0.0
		if body["all"] == true {
			want = 1 // her own
		}
		if status != http.StatusOK || got["replayed"] != want {
			t.Errorf("alice replay %v: %d %v, want %v replayed", body, status, got, want)
		}
	}
	aSrv.Wait(t, 30*time.Second, "alice's dead letter replayed", func(q []sendertest.Request) bool {
		return len(hooksOnly(q)) == 2
	})
	for s, want := range map[*sendertest.Server]int{static: 2, adminSrv: 2, bSrv: 1} {
		if n := len(hooksOnly(s.Requests())); n != want {
			t.Errorf("another owner's endpoint got %d hooks, want %d (no replay)", n, want)
		}
	}
}
