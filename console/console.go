// Package console is the operator console at /console: server-rendered pages
// over walhook's API (docs/console.md). Every action it offers is a call of
// the API's own handler, with the admin token, so the API's checks are its
// checks; it reads the slot's figures and the attempt log's summary from the
// store, and the last hour's lag from an in-process ring.
package console

import (
	"bytes"
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"embed"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io"
	"io/fs"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"github.com/walhook/walhook/api"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/outbox/pgstore"
)

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

// Source is what the console reads besides the API.
type Source interface {
	Stats(ctx context.Context) (pgstore.SlotStats, map[string]outbox.StoredStats, error)
	ReadReport(ctx context.Context) (*pgstore.Report, error)
	AttemptSummaries(ctx context.Context) (map[string]pgstore.AttemptSummary, error)
	RecentOutcomes(ctx context.Context, ids []string, n int) (map[string]pgstore.Outcomes, error)
}

// Config configures the console.
type Config struct {
	API        http.Handler // serves /v1/…: the console's actions go through it
	AdminToken string       // the token to log in with; "" with Open: no login
	Open       bool         // the API takes every caller as admin (no token, loopback): so does the console
	Slot       string
	Source     Source
	Lag        *Ring
	Logger     zerolog.Logger
}

// Console serves /console.
type Console struct {
	cfg   Config
	pages map[string]*template.Template
	key   []byte // signs sessions and form tokens; new at every start

	mu       sync.Mutex
	failures map[netip.Prefix][]time.Time // failed sign-ins in the last minute, per client address (IPv6: /64)
}

const (
	cookieName     = "walhook_console"
	sessionFor     = 12 * time.Hour
	maxLoginFails  = 10    // per minute and client address: then its sign-ins wait
	maxLoginAddrs  = 10000 // addresses remembered; past it the one that failed longest ago is forgotten
	maxFormBytes   = 4 << 10
	recentAttempts = 100 // the success rate is over this many attempts
)

// New returns the console.
func New(cfg Config) *Console {
	c := &Console{cfg: cfg, pages: map[string]*template.Template{}, key: make([]byte, 32), failures: map[netip.Prefix][]time.Time{}}
	rand.Read(c.key)
	funcs := template.FuncMap{
		"ago":   ago,
		"bytes": HumanBytes,
		"deref": func(p *string) string {
			if p == nil {
				return ""
			}
			return *p
		},
		"derefInt": func(p *int32) string {
			if p == nil {
				return "-"
			}
			return strconv.Itoa(int(*p))
		},
		"time": func(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05Z") },
		"timep": func(t *time.Time) string {
			if t == nil {
				return "-"
			}
			return t.UTC().Format("2006-01-02 15:04:05Z")
		},
		"int":  func(n int32) int { return int(n) },
		"join": strings.Join,
		"path": url.PathEscape,
	}
	for _, name := range []string{"login", "overview", "subscription", "deadletters", "confirm", "done"} {
		c.pages[name] = template.Must(template.New("layout.html").Funcs(funcs).ParseFS(templateFS,
			"templates/layout.html", "templates/"+name+".html"))
	}
	return c
}

// Register adds the console's routes to mux.
func (c *Console) Register(mux *http.ServeMux) {
	static, _ := fs.Sub(staticFS, "static")
	mux.Handle("GET /console/static/", c.headers(http.StripPrefix("/console/static/", http.FileServerFS(static))))
	mux.Handle("GET /console", c.page(c.overview))
	mux.Handle("GET /console/{$}", http.RedirectHandler("/console", http.StatusMovedPermanently))
	mux.Handle("POST /console/login", c.headers(http.HandlerFunc(c.login)))
	mux.Handle("POST /console/logout", c.headers(http.HandlerFunc(c.logout)))
	mux.Handle("GET /console/subscriptions/{id}", c.page(c.subscription))
	mux.Handle("POST /console/subscriptions/{id}/enable", c.action(c.enable))
	mux.Handle("GET /console/subscriptions/{id}/rotate", c.page(c.confirmRotate))
	mux.Handle("POST /console/subscriptions/{id}/rotate", c.action(c.rotate))
	mux.Handle("GET /console/dead-letters", c.page(c.deadLetters))
	mux.Handle("GET /console/dead-letters/{id}/replay", c.page(c.confirmReplay))
	mux.Handle("POST /console/dead-letters/{id}/replay", c.action(c.replay))
}

// view is what a page template gets.
type view struct {
	Title  string
	Slot   string
	CSRF   string
	Open   bool // no login: no logout button
	Error  string
	Status int
	Data   any
}

type pageFunc func(r *http.Request) (name string, v *view, err error)

// headers sets what every console answer carries.
func (c *Console) headers(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hd := w.Header()
		hd.Set("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
		hd.Set("X-Frame-Options", "DENY")
		hd.Set("X-Content-Type-Options", "nosniff")
		hd.Set("Referrer-Policy", "same-origin") // no-referrer would make a browser send "Origin: null" with forms
		hd.Set("Cache-Control", "no-store")
		h.ServeHTTP(w, r)
	})
}

// page serves a GET page, or the login page to a caller without a session.
func (c *Console) page(f pageFunc) http.Handler {
	return c.headers(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !c.signedIn(r) {
			c.render(w, "login", &view{Title: "Sign in", Status: http.StatusUnauthorized, Error: c.unavailable(r)})
			return
		}
		name, v, err := f(r)
		if err != nil {
			c.fail(w, r, err)
			return
		}
		c.render(w, name, c.withSession(r, v))
	}))
}

// action serves a POST: a session and its form token are required, and the
// form comes from this origin.
func (c *Console) action(f pageFunc) http.Handler {
	return c.headers(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !c.formOK(w, r) {
			return
		}
		name, v, err := f(r)
		if err != nil {
			c.fail(w, r, err)
			return
		}
		if name == "" { // a redirect
			http.Redirect(w, r, v.Data.(string), http.StatusSeeOther)
			return
		}
		c.render(w, name, c.withSession(r, v))
	}))
}

// formOK checks a POST: a session, this origin, and the session's form
// token; it answers the refusal itself.
func (c *Console) formOK(w http.ResponseWriter, r *http.Request) bool {
	r.Body = http.MaxBytesReader(w, r.Body, maxFormBytes)
	if !c.signedIn(r) || !sameOrigin(r) || r.ParseForm() != nil || !hmac.Equal([]byte(r.PostForm.Get("csrf")), []byte(c.csrf(r))) {
		c.render(w, "login", &view{Title: "Sign in", Status: http.StatusForbidden,
			Error: "This form has expired or did not come from this console: sign in and try again."})
		return false
	}
	return true
}

func (c *Console) withSession(r *http.Request, v *view) *view {
	v.Slot, v.CSRF, v.Open = c.cfg.Slot, c.csrf(r), c.cfg.Open
	return v
}

func (c *Console) render(w http.ResponseWriter, name string, v *view) {
	var b bytes.Buffer
	if err := c.pages[name].Execute(&b, v); err != nil {
		c.cfg.Logger.Error().Err(err).Str("page", name).Msg("console: render")
		http.Error(w, "console: cannot render this page", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	if v.Status != 0 {
		w.WriteHeader(v.Status)
	}
	w.Write(b.Bytes())
}

// fail shows err on the page it happened on: an API refusal with its status
// and message, anything else as a 500 (logged).
func (c *Console) fail(w http.ResponseWriter, r *http.Request, err error) {
	v := &view{Title: "Error", Status: http.StatusInternalServerError, Error: "Something went wrong; it is in walhook's log."}
	if ae, ok := errors.AsType[*apiError](err); ok {
		v.Status, v.Error = ae.status, ae.msg
	} else {
		c.cfg.Logger.Error().Err(err).Str("path", r.URL.Path).Msg("console")
	}
	c.render(w, "done", c.withSession(r, v))
}

// unavailable says why r cannot sign in, if so.
func (c *Console) unavailable(r *http.Request) string {
	switch {
	case c.cfg.Open && !api.LoopbackHost(r.Host):
		return "Without admin_token the console answers only at a loopback address (127.0.0.1, localhost)."
	case c.cfg.AdminToken == "" && !c.cfg.Open:
		return "The console needs admin_token in walhook's config."
	}
	return ""
}

// Sessions: a cookie "expiry.mac", where mac signs the expiry with the key of
// this process (a restart signs everyone out).
func (c *Console) mac(parts ...string) string {
	m := hmac.New(sha256.New, c.key)
	m.Write([]byte(strings.Join(parts, "\x00")))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

func (c *Console) signedIn(r *http.Request) bool {
	if c.cfg.Open {
		// No sign-in on loopback, but only under a loopback name: a page
		// elsewhere that rebinds its own name to 127.0.0.1 is not the console.
		return api.LoopbackHost(r.Host)
	}
	if c.cfg.AdminToken == "" {
		return false
	}
	ck, err := r.Cookie(cookieName)
	if err != nil {
		return false
	}
	exp, mac, ok := strings.Cut(ck.Value, ".")
	if !ok || !hmac.Equal([]byte(mac), []byte(c.mac("session", exp))) {
		return false
	}
	n, err := strconv.ParseInt(exp, 10, 64)
	return err == nil && time.Now().Unix() < n
}

// csrf is the form token of r's session.
func (c *Console) csrf(r *http.Request) string {
	session := "open"
	if ck, err := r.Cookie(cookieName); err == nil {
		session = ck.Value
	}
	return c.mac("csrf", session)
}

// sameOrigin: a browser's POST names its origin; it must be this host.
func sameOrigin(r *http.Request) bool {
	o := r.Header.Get("Origin")
	if o == "" || o == "null" {
		return o == "" // no Origin: not a browser's cross-site form
	}
	u, err := url.Parse(o)
	return err == nil && u.Host == r.Host
}

func (c *Console) login(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, maxFormBytes)
	if msg := c.unavailable(r); msg != "" || !sameOrigin(r) {
		c.render(w, "login", &view{Title: "Sign in", Status: http.StatusForbidden, Error: cmp.Or(msg, "Sign in from the console's own page.")})
		return
	}
	if c.cfg.Open {
		http.Redirect(w, r, "/console", http.StatusSeeOther)
		return
	}
	if !c.allowLogin(api.ClientPrefix(r)) {
		c.render(w, "login", &view{Title: "Sign in", Status: http.StatusTooManyRequests, Error: "Too many failed sign-ins: try again in a minute."})
		return
	}
	token := ""
	if r.ParseForm() == nil {
		token = r.PostForm.Get("token")
	}
	if subtle.ConstantTimeCompare([]byte(token), []byte(c.cfg.AdminToken)) != 1 {
		c.loginFailed(api.ClientPrefix(r))
		c.render(w, "login", &view{Title: "Sign in", Status: http.StatusUnauthorized, Error: "That is not the admin token."})
		return
	}
	exp := strconv.FormatInt(time.Now().Add(sessionFor).Unix(), 10)
	http.SetCookie(w, &http.Cookie{Name: cookieName, Value: exp + "." + c.mac("session", exp), Path: "/console",
		HttpOnly: true, Secure: overTLS(r), SameSite: http.SameSiteStrictMode, MaxAge: int(sessionFor.Seconds())})
	http.Redirect(w, r, "/console", http.StatusSeeOther)
}

func (c *Console) allowLogin(addr netip.Prefix) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	f := c.failures[addr]
	cut := 0
	for cut < len(f) && time.Since(f[cut]) > time.Minute {
		cut++
	}
	if f = f[cut:]; len(f) == 0 {
		delete(c.failures, addr)
	} else {
		c.failures[addr] = f
	}
	return len(f) < maxLoginFails
}

func (c *Console) loginFailed(addr netip.Prefix) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, known := c.failures[addr]; !known && len(c.failures) >= maxLoginAddrs {
		// Full: forget the address whose last failure is oldest.
		var oldest netip.Prefix
		var at time.Time
		for a, f := range c.failures {
			if last := f[len(f)-1]; at.IsZero() || last.Before(at) {
				oldest, at = a, last
			}
		}
		delete(c.failures, oldest)
	}
	c.failures[addr] = append(c.failures[addr], time.Now())
}

func (c *Console) logout(w http.ResponseWriter, r *http.Request) {
	if !c.formOK(w, r) {
		return
	}
	http.SetCookie(w, &http.Cookie{Name: cookieName, Value: "", Path: "/console", HttpOnly: true,
		Secure: overTLS(r), SameSite: http.SameSiteStrictMode, MaxAge: -1})
	http.Redirect(w, r, "/console", http.StatusSeeOther)
}

// overTLS reports whether the browser reached the console over TLS: walhook's
// own, or a proxy's that says so (X-Forwarded-Proto). Only the cookie's
// Secure flag depends on it.
func overTLS(r *http.Request) bool {
	return r.TLS != nil || strings.EqualFold(r.Header.Get("X-Forwarded-Proto"), "https")
}

// apiError is the API's refusal of a console call.
type apiError struct {
	status int
	msg    string
}

func (e *apiError) Error() string { return fmt.Sprintf("%d %s", e.status, e.msg) }

// call runs the API handler for method path as the admin, for the browser's
// request r, and decodes its JSON answer into out.
func (c *Console) call(r *http.Request, method, path string, out any) error {
	req, err := http.NewRequestWithContext(r.Context(), method, path, nil)
	if err != nil {
		return err
	}
	req.RemoteAddr, req.Host = r.RemoteAddr, r.Host
	if method == http.MethodPost {
		req.Body, req.ContentLength = io.NopCloser(strings.NewReader("{}")), 2
		req.Header.Set("Content-Type", "application/json")
	}
	if c.cfg.AdminToken != "" {
		req.Header.Set("Authorization", "Bearer "+c.cfg.AdminToken)
	}
	rec := &recorder{header: http.Header{}, status: http.StatusOK}
	c.cfg.API.ServeHTTP(rec, req)
	if rec.status >= 300 {
		var e struct {
			Error string `json:"error"`
		}
		json.Unmarshal(rec.body.Bytes(), &e)
		return &apiError{status: rec.status, msg: cmp.Or(e.Error, http.StatusText(rec.status))}
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(rec.body.Bytes(), out)
}

// recorder is the ResponseWriter of an in-process API call.
type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
	wrote  bool
}

func (r *recorder) Header() http.Header { return r.header }
func (r *recorder) WriteHeader(status int) {
	if !r.wrote {
		r.status, r.wrote = status, true
	}
}
func (r *recorder) Write(b []byte) (int, error) {
	r.wrote = true
	return r.body.Write(b)
}

func ago(t *time.Time) string {
	if t == nil || t.IsZero() {
		return "never"
	}
	d := time.Since(*t)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh ago", int(d.Hours()))
	}
	return fmt.Sprintf("%dd ago", int(d.Hours()/24))
}

// HumanBytes is n in B, KiB, MiB or GiB, as the console and walhook status show sizes.
func HumanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
