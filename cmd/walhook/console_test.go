package main

import (
	"cmp"
	"context"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/walhook/walhook/sender/sendertest"
)

// chromium is the browser the console's tests drive: Debian's chromium,
// which `make test` installs when it is missing (Makefile, browser).
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Fatal("no chromium to drive the console with: apt-get install chromium (make test does)")
	return ""
}

// refusingUntil answers the handshake, refuses hooks with a 400 until accept
// is set, then takes them.
func refusingUntil(t *testing.T) (*sendertest.Server, *atomic.Bool) {
	accept := &atomic.Bool{}
	return sendertest.NewServer(t, func(_ int, r *sendertest.Request) (int, http.Header) {
		if s := r.Header.Get("X-Hook-Secret"); s != "" {
			return http.StatusOK, http.Header{"X-Hook-Secret": {s}}
		}
		if accept.Load() {
			return http.StatusNoContent, nil
		}
		return http.StatusBadRequest, nil
	}), accept
}

func (e *env) deadLetters() int {
	var n int
	e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.dead_letters`).Scan(&n)
	return n
}

// TestConsoleInABrowser: an operator signs in, sees the failing subscription,
// reads its failed attempt, replays its dead letter after a confirmation, and
// the event is delivered; on a phone's screen nothing overflows sideways.
// WALHOOK_SCREENSHOTS=dir writes the pages there (docs/img).
func TestConsoleInABrowser(t *testing.T) {
	t.Parallel()
	browser := chromium(t)
	srv, accept := refusingUntil(t)
	e := newEnv(t, "admin_token: "+adminToken+"\nsubscriptions:\n"+sub("orders", srv.HooksURL(), `["order.*"]`)+
		sub("crm", echoing(t).HooksURL(), `["contact.*"]`))
	e.setup()
	r := e.start()
	base := e.addr(r)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('order.paid', 'o-17', '{"total": 42}'),
		('contact.created', 'c-1', '{}')`)
	e.eventually(30*time.Second, "the refused event's dead letter", func() bool { return e.deadLetters() == 1 })
	first := hooksOnly(srv.Requests())[0].Header.Get("webhook-id")
	accept.Store(true)

	ctx, cancel := chromedp.NewExecAllocator(context.Background(), append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(browser), chromedp.NoSandbox, chromedp.WindowSize(1280, 860))...)
	defer cancel()
	ctx, cancelBrowser := chromedp.NewContext(ctx)
	defer cancelBrowser()
	ctx, cancelTimeout := context.WithTimeout(ctx, 90*time.Second)
	defer cancelTimeout()
	if err := chromedp.Do(ctx); err != nil { // starts the browser: its tab lives as long as ctx
		t.Fatalf("start %s: %v", browser, err)
	}
	shots := os.Getenv("WALHOOK_SCREENSHOTS")
	shot := func(name string) {
		t.Helper()
		if shots == "" {
			return
		}
		png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
		if err != nil {
			t.Fatalf("screenshot %s: %v", name, err)
		}
		if err := os.WriteFile(filepath.Join(shots, name), png, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	do := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		for i, step := range steps {
			sctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			err := chromedp.Do(sctx, step)
			cancel()
			if err != nil {
				page, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.body ? document.body.innerText : ""`))
				page += "\n" + r.log.String()
				t.Fatalf("browser: %s, step %d: %v; the page says:\n%s", what, i+1, err, page)
			}
		}
	}
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			t.Fatalf("browser: text of %s: %v", sel, err)
		}
		return s
	}
	do("sign in", chromedp.Navigate(base+"/console"),
		chromedp.WaitVisible(chromedp.CSS("#token")),
		chromedp.SendKeys(chromedp.CSS("#token"), adminToken),
		chromedp.Submit(chromedp.CSS("#token")),
		chromedp.WaitVisible(chromedp.CSS("#subs-h")))
	overview := text("main")
	shot("console-overview.png")
	do("open the failing subscription", chromedp.Click(chromedp.CSS(`a[href="/console/subscriptions/orders"]`)),
		chromedp.WaitVisible(chromedp.CSS("#attempts")))
	attempts := text("#attempts")
	shot("console-subscription.png")
	do("open its dead letters", chromedp.Click(chromedp.CSS(`a[href="/console/dead-letters?subscription=orders"]`)),
		chromedp.WaitVisible(chromedp.CSS("#dead-letters")))
	shot("console-dead-letters.png")
	do("replay, and confirm", chromedp.Click(chromedp.CSS(`a[aria-label^="Replay dead letter"]`)),
		chromedp.WaitVisible(chromedp.CSS(`form.actions button[type="submit"]`)),
		chromedp.Click(chromedp.CSS(`form.actions button[type="submit"]`)),
		chromedp.WaitVisible(chromedp.CSS(`[role="status"]`)))
	done := text(`[role="status"]`)
	if !regexp.MustCompile(`orders[\s\S]*order\.\*[\s\S]*active\s+0\s+0\s+1`).MatchString(overview) || !strings.Contains(overview, "crm") {
		t.Errorf("the overview does not show orders with one dead letter, and crm:\n%s", overview)
	}
	if !strings.Contains(attempts, "failed") || !strings.Contains(attempts, "400") {
		t.Errorf("the attempts table does not show the failed attempt:\n%s", attempts)
	}
	if !strings.Contains(done, "on its way") {
		t.Errorf("after the replay: %q", done)
	}
	srv.Wait(t, 30*time.Second, "the replayed event", func(reqs []sendertest.Request) bool {
		for _, r := range hooksOnly(reqs) {
			if r.Status == http.StatusNoContent && r.Header.Get("webhook-id") == first {
				return true
			}
		}
		return false
	})
	// A phone: 390 px wide, nothing wider than the screen but the scrolling tables.
	do("a phone's screen", chromedp.EmulateViewport(390, 844), chromedp.Navigate(base+"/console"),
		chromedp.WaitVisible(chromedp.CSS("#subs-h")))
	overflow, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`document.documentElement.scrollWidth > window.innerWidth`))
	if err != nil {
		t.Fatalf("browser: %v", err)
	}
	shot("console-phone.png")
	if overflow {
		t.Error("on a 390 px screen the page is wider than the screen")
	}
}

// TestConsoleRefusesWhatDidNotComeFromIt: without a session, with a wrong
// token, without the form token or from another origin, nothing is done; the
// pages carry a CSP that allows nothing from elsewhere; console: false turns
// it off.
func TestConsoleRefusesWhatDidNotComeFromIt(t *testing.T) {
	t.Parallel()
	srv, _ := refusingUntil(t)
	e := newEnv(t, "admin_token: "+adminToken+"\nsubscriptions:\n"+sub("orders", srv.HooksURL(), `["*"]`))
	e.setup()
	r := e.start()
	base := e.addr(r)
	e.exec(`INSERT INTO walhook.outbox (event, resource_id) VALUES ('order.paid', 'o-1')`)
	e.eventually(30*time.Second, "a dead letter", func() bool { return e.deadLetters() == 1 })
	var id int64
	e.db.Pool.QueryRow(context.Background(), `SELECT id FROM walhook.dead_letters`).Scan(&id)
	replay := base + "/console/dead-letters/" + strconv.FormatInt(id, 10) + "/replay"

	jar, _ := cookiejar.New(nil)
	browser := &http.Client{Jar: jar, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	post := func(u string, form url.Values, origin string) int {
		t.Helper()
		req, _ := http.NewRequest("POST", u, strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		if origin != "" {
			req.Header.Set("Origin", origin)
		}
		resp, err := browser.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	resp, err := browser.Get(base + "/console")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("Content-Security-Policy"), "default-src 'self'") {
		t.Errorf("GET /console without a session: %d, CSP %q", resp.StatusCode, resp.Header.Get("Content-Security-Policy"))
	}
	if got := post(replay, nil, ""); got != http.StatusForbidden {
		t.Errorf("replay without a session: %d", got)
	}
	if got := post(base+"/console/login", url.Values{"token": {"guess"}}, ""); got != http.StatusUnauthorized {
		t.Errorf("sign-in with a wrong token: %d", got)
	}
	if got := post(base+"/console/login", url.Values{"token": {adminToken}}, "http://evil.example"); got != http.StatusForbidden {
		t.Errorf("sign-in from another origin: %d", got)
	}
	if got := post(base+"/console/login", url.Values{"token": {adminToken}}, ""); got != http.StatusSeeOther {
		t.Fatalf("sign-in: %d", got)
	}
	if got := post(replay, nil, ""); got != http.StatusForbidden {
		t.Errorf("replay with a session but without its form token: %d", got)
	}
	if got := post(replay, url.Values{"csrf": {"forged"}}, ""); got != http.StatusForbidden {
		t.Errorf("replay with a forged form token: %d", got)
	}
	if e.deadLetters() != 1 {
		t.Fatal("a refused form replayed the dead letter")
	}
	// The form token of the session, from the confirmation page: now it works,
	// but not from another origin.
	resp, err = browser.Get(replay)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	page := string(body)
	m := regexp.MustCompile(`name="csrf" value="([^"]+)"`).FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no form token on the confirmation page:\n%s", page)
	}
	if got := post(replay, url.Values{"csrf": {m[1]}}, "http://evil.example"); got != http.StatusForbidden || e.deadLetters() != 1 {
		t.Errorf("replay from another origin: %d", got)
	}
	if got := post(replay, url.Values{"csrf": {m[1]}}, base); got != http.StatusOK || e.deadLetters() != 0 {
		t.Errorf("replay from the console: %d, %d dead letters left", got, e.deadLetters())
	}

	// Without admin_token on loopback the console needs no sign-in, but only
	// under a loopback name: not for a page that rebinds its own name here.
	open := newEnv(t, "")
	open.setup()
	openBase := open.addr(open.start())
	for host, want := range map[string]int{"": http.StatusOK, "evil.example": http.StatusUnauthorized} {
		// The API likewise.
		req, _ := http.NewRequest("GET", openBase+"/v1/subscriptions", nil)
		req.Host = cmp.Or(host, req.Host)
		if resp, err := http.DefaultClient.Do(req); err != nil {
			t.Fatal(err)
		} else if resp.Body.Close(); (resp.StatusCode == http.StatusOK) != (want == http.StatusOK) {
			t.Errorf("open API, Host %q: %d", host, resp.StatusCode)
		}
		req, _ = http.NewRequest("GET", openBase+"/console", nil)
		req.Host = cmp.Or(host, req.Host)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want || (want == http.StatusOK) != strings.Contains(string(body), "Replication slot") {
			t.Errorf("open console, Host %q: %d, want %d", host, resp.StatusCode, want)
		}
	}

	// Nor does a web page's form posted to the open API change anything.
	for h, v := range map[string]string{"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"} {
		req, _ := http.NewRequest("POST", openBase+"/v1/dead-letters/1/replay", strings.NewReader("x=1"))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set(h, v)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("open API, a form with %s: %s: %d, want 403", h, v, resp.StatusCode)
		}
	}
	if status, _ := (client{t: t, base: openBase}).do("POST", "/v1/dead-letters/1/replay", nil); status != http.StatusNotFound {
		t.Errorf("open API, a replay from curl: %d, want 404 (no such dead letter)", status)
	}

	off := newEnv(t, "admin_token: "+adminToken+"\nconsole: false\n")
	off.setup()
	resp, err = http.Get(off.addr(off.start()) + "/console")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("console: false: GET /console %d", resp.StatusCode)
	}
}
