package main

import (
	"crypto/ed25519"
	"encoding/base64"
	"net/http"
	"path/filepath"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
	"github.com/walhook/walhook/sender/sendertest"
)

// v1aVerifies reports how many of a request's v1a signatures verify under
// publicKey, checked as the Standard Webhooks spec says with crypto/ed25519
// alone: whpk_ + base64 of the 32-byte key, "v1a,<base64>" over "id.timestamp.body".
func v1aVerifies(t *testing.T, publicKey string, r sendertest.Request) int {
	t.Helper()
	raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(publicKey, "whpk_"))
	if err != nil || !strings.HasPrefix(publicKey, "whpk_") || len(raw) != ed25519.PublicKeySize {
		t.Fatalf("public key %q is not whpk_ and base64 of 32 bytes", publicKey)
	}
	msg := []byte(r.Header.Get("webhook-id") + "." + r.Header.Get("webhook-timestamp") + "." + string(r.Body))
	n := 0
	for _, sig := range strings.Fields(r.Header.Get("webhook-signature")) {
		if enc, ok := strings.CutPrefix(sig, "v1a,"); ok {
			if s, err := base64.StdEncoding.DecodeString(enc); err == nil && ed25519.Verify(raw, msg, s) {
				n++
			}
		}
	}
	return n
}

func TestV1aThroughTheAPI(t *testing.T) {
	t.Parallel()
	target := echoing(t)
	e, api := apiEnv(t, "rotation_overlap: 1h\n")

	status, sub := api.do("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": target.HooksURL(), "signature": "v1a"})
	if status != http.StatusCreated || !strings.HasPrefix(sub["secret"].(string), "whsk_") || !strings.HasPrefix(sub["public_key"].(string), "whpk_") {
		t.Fatalf("create: %d %v", status, sub)
	}
	id, pk := sub["id"].(string), sub["public_key"].(string)
	if _, got := api.do("GET", "/v1/subscriptions/"+id, nil); got["public_key"] != pk || got["secret"] != nil || got["signature"] != "v1a" {
		t.Fatalf("GET shows %v, want the public key, signature v1a and no secret", got)
	}
	deliveries := func(n int) []sendertest.Request {
		return target.Wait(t, 30*time.Second, "deliveries", func(r []sendertest.Request) bool { return len(hooksOnly(r)) >= n })
	}
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('a', 'r1', '{}')`)
	r := hooksOnly(deliveries(1))[0]
	if v1aVerifies(t, pk, r) != 1 || strings.Contains(r.Header.Get("webhook-signature"), "v1,") {
		t.Fatalf("the delivery is not signed v1a alone under the API's public key: %q", r.Header.Get("webhook-signature"))
	}

	// Rotation: both keys sign during rotation_overlap.
	status, rot := api.do("POST", "/v1/subscriptions/"+id+"/rotate-secret", nil)
	if status != http.StatusOK || !strings.HasPrefix(rot["secret"].(string), "whsk_") || rot["previous_public_key"] != pk {
		t.Fatalf("rotate: %d %v", status, rot)
	}
	newPK := rot["public_key"].(string)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('a', 'r1', '{}')`)
	r = hooksOnly(deliveries(2))[1]
	if v1aVerifies(t, pk, r) != 1 || v1aVerifies(t, newPK, r) != 1 {
		t.Fatalf("during the overlap both keys must sign: %q", r.Header.Get("webhook-signature"))
	}

	// Migration: signature [v1, v1a] adds a v1 secret, shown once.
	status, both := api.do("PATCH", "/v1/subscriptions/"+id, map[string]any{"signature": []string{"v1", "v1a"}})
	secret, _ := both["secret"].(string)
	if status != http.StatusOK || !strings.Contains(secret, "whsec_") || both["public_key"] != newPK {
		t.Fatalf("patch to [v1, v1a]: %d %v", status, both)
	}
	var v1 string
	for _, k := range strings.Fields(secret) {
		if strings.HasPrefix(k, "whsec_") {
			v1 = k
		}
	}
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('a', 'r1', '{}')`)
	r = hooksOnly(deliveries(3))[2]
	if v1aVerifies(t, newPK, r) != 1 {
		t.Fatalf("v1a does not verify after the migration: %q", r.Header.Get("webhook-signature"))
	}
	wh, err := standardwebhooks.NewWebhook(v1)
	if err != nil {
		t.Fatal(err)
	}
	if err := wh.Verify(r.Body, r.Header); err != nil {
		t.Fatalf("v1 does not verify with the reference library: %v", err)
	}
	if _, got := api.do("GET", "/v1/subscriptions/"+id, nil); got["secret"] != nil {
		t.Fatalf("GET shows the secret: %v", got)
	}

	// Bad input names the field.
	status, bad := api.do("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": target.HooksURL(), "signature": "v2"})
	if status != http.StatusBadRequest || !strings.Contains(bad["error"].(string), "signature") {
		t.Fatalf("signature v2: %d %v", status, bad)
	}
	status, bad = api.do("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": target.HooksURL(), "signature": "v1a", "secret": testSecret})
	if status != http.StatusBadRequest || !strings.Contains(bad["error"].(string), "secret") || strings.Contains(bad["error"].(string), testSecret) {
		t.Fatalf("a whsec_ secret for v1a: %d %v", status, bad)
	}
}

// validate parses a config file's text and validates it with subscriptions.
func validate(t *testing.T, text string) error {
	t.Helper()
	c, err := parseConfig("test.yaml", []byte("database_url: postgres://app@127.0.0.1:1/app\n"+text), noEnv)
	if err != nil {
		return err
	}
	return c.Validate(true)
}

func TestConfigSignatureSchemes(t *testing.T) {
	t.Parallel()
	const whsk = "whsk_nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A="
	if err := validate(t, "subscriptions:\n"+
		"  - {id: both, events: ['*'], target_url: 'https://x.example/h', secret: '"+testSecret+" "+whsk+"', signature: [v1, v1a]}\n"+
		"  - {id: asym, events: ['*'], target_url: 'https://x.example/h', secret: '"+whsk+"', signature: v1a}\n"); err != nil {
		t.Fatalf("valid signatures refused: %v", err)
	}
	err := validate(t, "defaults: {signature: v1a}\nsubscriptions:\n"+sub("old", "https://x.example/h", "['*']"))
	if err == nil || !strings.Contains(err.Error(), "subscriptions[old].secret: ") || strings.Contains(err.Error(), "MfKQ9r8") {
		t.Fatalf("a whsec_ secret under signature v1a: %v", err)
	}
	err = validate(t, "defaults: {signature: [v1, v2]}\n")
	if err == nil || !strings.Contains(err.Error(), `defaults.signature: "v2"`) {
		t.Fatalf("signature v2: %v", err)
	}
}

func TestCustomHeadersAreSentAndKeptSecret(t *testing.T) {
	t.Parallel()
	const apiKey, fileKey = "api-key-7f3a9c1e", "file-key-2b8d4e6f"
	target := echoing(t)
	e := newEnv(t, "admin_token: "+adminToken+"\nallow_targets: [127.0.0.1/32]\nsubscriptions:\n"+
		sub("file", target.HooksURL(), "[file.*]", "    headers: {X-Api-Key: "+fileKey+"}\n"))
	e.setup()
	r := e.start()
	api := client{t: t, base: e.addr(r), token: adminToken}

	status, created := api.do("POST", "/v1/subscriptions", map[string]any{"event": "api.*", "target_url": target.HooksURL(),
		"headers": map[string]string{"X-Api-Key": apiKey, "Authorization": "Bearer " + apiKey}})
	if status != http.StatusCreated {
		t.Fatalf("create: %d %v", status, created)
	}
	id := created["id"].(string)
	if hs := target.Requests()[0]; hs.Header.Get("X-Hook-Secret") == "" || hs.Header.Get("X-Api-Key") != apiKey {
		t.Fatalf("the handshake did not carry the custom headers: %v", hs.Header)
	}
	masked := map[string]any{"X-Api-Key": "********", "Authorization": "********"}
	if !reflectEqual(created["headers"], masked) {
		t.Fatalf("the create answer shows headers %v, want them masked", created["headers"])
	}
	if _, got := api.do("GET", "/v1/subscriptions/"+id, nil); !reflectEqual(got["headers"], masked) {
		t.Fatalf("GET shows headers %v", got["headers"])
	}
	if _, got := api.do("GET", "/v1/subscriptions/file", nil); !reflectEqual(got["headers"], map[string]any{"X-Api-Key": "********"}) {
		t.Fatalf("GET of the config subscription shows headers %v", got["headers"])
	}
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('api.a', 'r1', '{}'), ('file.a', 'r1', '{}')`)
	reqs := hooksOnly(target.Wait(t, 30*time.Second, "two deliveries", func(r []sendertest.Request) bool { return len(hooksOnly(r)) == 2 }))
	got := map[string]string{}
	for _, rq := range reqs {
		got[rq.Header.Get("X-Api-Key")] = rq.Header.Get("Authorization")
	}
	if got[apiKey] != "Bearer "+apiKey || len(got) != 2 || got[fileKey] != "" {
		t.Fatalf("deliveries carried X-Api-Key/Authorization %v", got)
	}

	// A PATCH that gives the mask back keeps the value; the set is replaced.
	status, patched := api.do("PATCH", "/v1/subscriptions/"+id, map[string]any{"headers": map[string]string{"X-Api-Key": "********"}})
	if status != http.StatusOK || !reflectEqual(patched["headers"], map[string]any{"X-Api-Key": "********"}) {
		t.Fatalf("patch: %d %v", status, patched)
	}
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('api.b', 'r1', '{}')`)
	reqs = hooksOnly(target.Wait(t, 30*time.Second, "the third delivery", func(r []sendertest.Request) bool { return len(hooksOnly(r)) == 3 }))
	if last := reqs[2]; last.Header.Get("X-Api-Key") != apiKey || last.Header.Get("Authorization") != "" {
		t.Fatalf("after the patch: X-Api-Key %q, Authorization %q", last.Header.Get("X-Api-Key"), last.Header.Get("Authorization"))
	}

	if status, bad := api.do("PATCH", "/v1/subscriptions/"+id, map[string]any{"headers": map[string]string{"X-New": "********"}}); status != http.StatusBadRequest || !strings.Contains(bad["error"].(string), "headers.X-New: ******** is how answers mask") {
		t.Errorf("a masked value for a new header: %d %v", status, bad)
	}
	for name, value := range map[string]string{"webhook-id": "x", "Host": "x", "Content-Type": "text/plain",
		"Transfer-Encoding": "chunked", "Connection": "close", "X-Evil": apiKey + "\r\nX-Injected: 1"} {
		status, bad := api.do("PATCH", "/v1/subscriptions/"+id, map[string]any{"headers": map[string]string{name: value}})
		msg, _ := bad["error"].(string)
		if status != http.StatusBadRequest || !strings.Contains(msg, "headers."+name) || strings.Contains(msg, apiKey) {
			t.Errorf("header %s: %d %v", name, status, bad)
		}
	}
	if log := r.log.String(); strings.Contains(log, apiKey) || strings.Contains(log, fileKey) {
		t.Fatalf("a header value is in the log:\n%s", log)
	}

	// In the config file: defaults.headers is refused, a bad name is named.
	err := validate(t, "defaults: {headers: {X-A: b}}\n")
	if err == nil || !strings.Contains(err.Error(), "defaults.headers: only per subscription") {
		t.Errorf("defaults.headers: %v", err)
	}
	err = validate(t, "subscriptions:\n"+sub("s", "https://x.example/h", "['*']", "    headers: {Content-Type: "+fileKey+"}\n"))
	if err == nil || !strings.Contains(err.Error(), "subscriptions[s].headers.Content-Type") || strings.Contains(err.Error(), fileKey) {
		t.Errorf("subscription headers: %v", err)
	}
}

func reflectEqual(a, b any) bool { return reflect.DeepEqual(a, b) }

func TestProxyAndTLSKeysAreChecked(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	missing := dir + "/missing.crt"
	for text, want := range map[string]string{
		"defaults: {proxy_url: 'socks5://proxy:1080'}\n":  "defaults.proxy_url: socks5:// is refused",
		"defaults: {proxy_url: 'ftp://proxy:21'}\n":       "defaults.proxy_url: must be a proxy's URL",
		"defaults: {tls: {client_cert_file: /x.crt}}\n":   "defaults.tls: client_cert_file and client_key_file go together",
		"defaults: {tls: {ca_file: '" + missing + "'}}\n": "defaults.tls.ca_file: open " + missing,
		"subscriptions:\n" + sub("s", "https://x.example/h", "['*']", "    tls: {client_cert_file: '"+missing+"', client_key_file: '"+missing+"'}\n"): "subscriptions[s].tls.client_cert_file: open",
		"subscriptions:\n" + sub("s", "https://x.example/h", "['*']", "    proxy_url: 'http://proxy:3128/path?x'\n"):                                  "subscriptions[s].proxy_url: must be a proxy's URL",
	} {
		if err := validate(t, text); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", text, err, want)
		}
	}
	// A static subscription may use a socks5 proxy: its target is trusted.
	if err := validate(t, "subscriptions:\n"+sub("s", "https://x.example/h", "['*']", "    proxy_url: 'socks5://proxy:1080'\n")); err != nil {
		t.Errorf("socks5 for a static subscription: %v", err)
	}
	// The proxy's password is redacted from logs.
	c, err := parseConfig("x", []byte("database_url: postgres://a@h/d\ndefaults: {proxy_url: 'http://u:pr0xy-s3cret@proxy:3128'}\n"), noEnv)
	if err != nil || !strings.Contains(strings.Join(c.secrets(), " "), "pr0xy-s3cret") {
		t.Errorf("the proxy password is not among the secrets: %v", err)
	}

	auth := tenantAuth(t)
	target := echoing(t)
	e := newEnv(t, "admin_token: "+adminToken+"\nallow_targets: [127.0.0.1/32]\nauth_url: "+auth.URL+"\n")
	e.setup()
	r := e.start()
	base := e.addr(r)
	admin, alice := client{t: t, base: base, token: adminToken}, client{t: t, base: base, token: "alice"}
	for _, body := range []map[string]any{{"proxy_url": "http://proxy:3128"}, {"tls": map[string]string{"server_name": "x"}}} {
		body["event"], body["target_url"] = "*", target.HooksURL()
		if status, got := alice.do("POST", "/v1/subscriptions", body); status != http.StatusForbidden || !strings.Contains(got["error"].(string), "only the admin") {
			t.Errorf("a tenant set %v: %d %v", body, status, got)
		}
	}
	status, got := admin.do("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": target.HooksURL(), "verify_intent": false,
		"proxy_url": "http://u:pr0xy-s3cret@proxy:3128", "tls": map[string]string{"server_name": "hooks.internal"}})
	if status != http.StatusCreated || got["proxy_url"] != "http://u:********@proxy:3128" || !reflectEqual(got["tls"], map[string]any{"server_name": "hooks.internal"}) {
		t.Fatalf("admin create: %d %v", status, got)
	}
	id := got["id"].(string)
	// The masked URL given back keeps the password.
	if status, got := admin.do("PATCH", "/v1/subscriptions/"+id, map[string]any{"proxy_url": "http://u:********@proxy:3128"}); status != http.StatusOK {
		t.Fatalf("patch: %d %v", status, got)
	}
	var stored string
	if err := e.db.Pool.QueryRow(t.Context(), `SELECT options->>'proxy_url' FROM walhook.subscriptions WHERE id = $1`, id).Scan(&stored); err != nil || stored != "http://u:pr0xy-s3cret@proxy:3128" {
		t.Fatalf("stored proxy_url %q (%v)", stored, err)
	}
	for body, want := range map[string]string{
		`socks5://proxy:1080`: "proxy_url: socks5://",
		`gopher://proxy:70`:   "proxy_url: must be",
	} {
		if status, got := admin.do("PATCH", "/v1/subscriptions/"+id, map[string]any{"proxy_url": body}); status != http.StatusBadRequest || !strings.Contains(got["error"].(string), want) {
			t.Errorf("proxy_url %s: %d %v", body, status, got)
		}
	}
	if status, got := admin.do("PATCH", "/v1/subscriptions/"+id, map[string]any{"tls": map[string]string{"ca_file": missing}}); status != http.StatusBadRequest || !strings.Contains(got["error"].(string), "tls.ca_file: open") {
		t.Errorf("tls.ca_file missing: %d %v", status, got)
	}
}

// TestRateLimitMeasured: 300 events to a rate_limit of 50/s arrive no faster
// than the limit (no second holds more than 51 requests) and the whole run
// takes at least 299/50 s; a 429 with Retry-After pauses every resource.
func TestRateLimitMeasured(t *testing.T) {
	t.Parallel()
	var paused atomic.Pointer[time.Time] // when the 429 went out
	target := sendertest.NewServer(t, func(n int, r *sendertest.Request) (int, http.Header) {
		if now := time.Now(); r.Header.Get("X-Stage") == "429" && paused.CompareAndSwap(nil, &now) {
			return http.StatusTooManyRequests, http.Header{"Retry-After": {"2"}}
		}
		return http.StatusNoContent, nil
	})
	// max_in_flight 1 for the paused subscription: its other resources'
	// events wait for the 429's attempt whenever they come, so none can go
	// out in the moment between the answer and walhook reading it, which
	// would be no fault of walhook's (CI saw two, 10 ms after the 429).
	e := newEnv(t, "subscriptions:\n"+sub("limited", target.HooksURL(), "[load]", "    rate_limit: 50/s\n    max_in_flight: 64\n")+
		sub("paused", target.HooksURL(), "[pause]", "    headers: {X-Stage: '429'}\n    retry_max_interval: 1m\n    max_in_flight: 1\n"))
	e.setup()
	e.start()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) SELECT 'load', 'r' || (i % 40), '{}' FROM generate_series(1, 300) i`)
	reqs := target.Wait(t, 60*time.Second, "300 deliveries", func(r []sendertest.Request) bool { return len(r) >= 300 })[:300]
	span := reqs[len(reqs)-1].At.Sub(reqs[0].At)
	most := 0
	for i := range reqs {
		j := i
		for j < len(reqs) && reqs[j].At.Sub(reqs[i].At) < time.Second {
			j++
		}
		most = max(most, j-i)
	}
	t.Logf("rate_limit 50/s: 300 requests in %s (%.1f/s), at most %d in any second", span, 299/span.Seconds(), most)
	if span < 5900*time.Millisecond || most > 51 {
		t.Fatalf("300 requests in %s, %d in one second: faster than 50/s", span, most)
	}

	// 429 with Retry-After: 2 on the first resource: the others wait too.
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('pause', 'p1', '{}'), ('pause', 'p2', '{}'), ('pause', 'p3', '{}')`)
	got := target.Wait(t, 30*time.Second, "the paused deliveries", func(r []sendertest.Request) bool { return len(r) >= 304 })
	at429 := *paused.Load()
	for _, r := range got[301:] {
		if r.At.Sub(at429) < 1500*time.Millisecond {
			t.Errorf("a request %s after the 429: Retry-After 2 pauses the whole subscription", r.At.Sub(at429))
		}
	}
	if err := validate(t, "defaults: {rate_limit: 50/h}\n"); err == nil || !strings.Contains(err.Error(), `defaults.rate_limit: "50/h" is not a rate`) {
		t.Errorf("rate_limit 50/h: %v", err)
	}
	if err := validate(t, "defaults: {rate_limit: 20000/s}\n"); err == nil || !strings.Contains(err.Error(), "defaults.rate_limit: 20000/s is more than 10000/s") {
		t.Errorf("rate_limit 20000/s: %v", err)
	}
}

func TestMaxInFlightPerHostOnlyInDefaults(t *testing.T) {
	t.Parallel()
	if err := validate(t, "defaults: {max_in_flight_per_host: 8}\n"); err != nil {
		t.Fatalf("defaults.max_in_flight_per_host: %v", err)
	}
	for text, want := range map[string]string{
		"defaults: {max_in_flight_per_host: -1}\n":                                                       "defaults.max_in_flight_per_host: -1 must be at least 0",
		"subscriptions:\n" + sub("s", "https://x.example/h", "['*']", "    max_in_flight_per_host: 2\n"): "subscriptions[s].max_in_flight_per_host: only in defaults",
	} {
		if err := validate(t, text); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", text, err, want)
		}
	}
}

// TestMTLSAndProxyFromTheConfigFile: a receiver that requires a client
// certificate gets walhook's, and the rotated one without a restart; a
// subscription with proxy_url goes through that proxy.
func TestMTLSAndProxyFromTheConfigFile(t *testing.T) {
	t.Parallel()
	serverCA, clientCA := sendertest.NewCA(t, "server-ca"), sendertest.NewCA(t, "client-ca")
	mtls := sendertest.NewMTLSServer(t, nil, serverCA, clientCA)
	plain := sendertest.NewServer(t, nil)
	proxy := sendertest.NewProxy(t, "")
	dir := t.TempDir()
	certFile, keyFile, caFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"), filepath.Join(dir, "ca.crt")
	sendertest.WritePEM(t, clientCA.Issue(t, "walhook-1"), certFile, keyFile)
	serverCA.WriteCA(t, caFile)
	e := newEnv(t, "subscriptions:\n"+
		sub("mtls", mtls.HooksURL(), "[m]", "    tls: {client_cert_file: '"+certFile+"', client_key_file: '"+keyFile+"', ca_file: '"+caFile+"'}\n")+
		sub("proxied", plain.HooksURL(), "[p]", "    proxy_url: '"+proxy.URL+"'\n"))
	e.setup()
	e.start()
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('m', 'r', '{}'), ('p', 'r', '{}')`)
	got := mtls.Wait(t, 30*time.Second, "the mTLS delivery", func(r []sendertest.Request) bool { return len(r) == 1 })
	if got[0].ClientCert != "walhook-1" {
		t.Fatalf("the receiver saw client certificate %q", got[0].ClientCert)
	}
	plain.Wait(t, 30*time.Second, "the proxied delivery", func(r []sendertest.Request) bool { return len(r) == 1 })
	if asked := proxy.Asked(); len(asked) != 1 || asked[0].Target != plain.HooksURL() {
		t.Fatalf("the proxy was asked %+v, want the delivery to %s", asked, plain.HooksURL())
	}

	sendertest.WritePEM(t, clientCA.Issue(t, "walhook-2"), certFile, keyFile)
	deadline := time.Now().Add(30 * time.Second)
	for n := 1; ; n++ {
		reqs := mtls.Requests()
		if reqs[len(reqs)-1].ClientCert == "walhook-2" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the rotated client certificate was not used within 30s")
		}
		e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('m', 'r', '{}')`)
		mtls.Wait(t, 30*time.Second, "a delivery", func(r []sendertest.Request) bool { return len(r) > n })
	}
}
