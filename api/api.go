package api

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/sender"
	"github.com/walhook/walhook/sender/ssrf"
)

// Store is what the API needs of a store (pgstore.Store in walhook).
type Store interface {
	InsertSubscription(ctx context.Context, r *outbox.SubscriptionRow) error
	GetSubscription(ctx context.Context, id string) (*outbox.SubscriptionRow, error)
	ListSubscriptionsAfter(ctx context.Context, tenant *string, after string, limit int) ([]outbox.SubscriptionRow, error)
	UpdateSubscription(ctx context.Context, r *outbox.SubscriptionRow) error
	RotateSecret(ctx context.Context, id, secret string, until time.Time) error
	DeleteSubscriptionStrict(ctx context.Context, id string) error
	ListDeadLetters(ctx context.Context, f outbox.DeadLetterFilter, limit int) ([]outbox.DeadLetterRow, error)
	ReplayDeadLetters(ctx context.Context, f outbox.DeadLetterFilter) (int64, error)
	EnableSubscription(ctx context.Context, id string) error
	ListAttempts(ctx context.Context, f outbox.AttemptFilter, limit int) ([]outbox.AttemptRow, int64, error)
}

// Verifier runs the X-Hook-Secret handshake (sender.Sender).
type Verifier interface {
	VerifyTarget(ctx context.Context, sub *outbox.Subscription, timeout time.Duration) error
}

// Config configures the API.
type Config struct {
	AdminToken      string // "" (loopback only): every caller is admin, unless AuthURL is set
	AuthURL         string // forward auth for callers without the admin token
	Disabled        string // when set, the API answers 403 with this reason
	Store           Store
	Static          []*outbox.Subscription // from the config file: read-only
	Defaults        outbox.DeliveryOptions
	Guard           *ssrf.Guard
	Verifier        Verifier
	RotationOverlap time.Duration // default 24h
	Logger          zerolog.Logger

	// Against unauthenticated callers and a slow auth_url.
	AuthTimeout         time.Duration // one auth_url call, connect to last byte; default 5s
	AuthCacheTTL        time.Duration // how long an auth_url answer is reused; 0 = not at all; at most 30s
	UnauthenticatedRate float64       // failed or token-less requests per second per client address (burst 4×); 0 = no limit
}

// API serves /v1/subscriptions.
type API struct {
	cfg          Config
	auth         *http.Client
	authSem      chan struct{} // bounds the auth_url calls in flight
	attemptReads chan struct{} // bounds the attempt-log queries in flight
	cache        *authCache
	limit        *limiter    // nil: no limit
	authDown     atomic.Bool // auth_url failing: logged once until it answers again
}

// RotationOverlapDefault is how long a rotated-out secret keeps signing
// (rotation_overlap) unless configured.
const RotationOverlapDefault = 24 * time.Hour

// New returns the API.
func New(cfg Config) *API {
	if cfg.RotationOverlap == 0 {
		cfg.RotationOverlap = RotationOverlapDefault
	}
	if cfg.AuthTimeout == 0 {
		cfg.AuthTimeout = 5 * time.Second
	}
	a := &API{cfg: cfg, authSem: make(chan struct{}, maxAuthCalls), attemptReads: make(chan struct{}, attemptReads),
		auth: &http.Client{Timeout: cfg.AuthTimeout,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
		cache: newAuthCache(min(cfg.AuthCacheTTL, maxAuthCacheTTL), time.Now)}
	if cfg.UnauthenticatedRate > 0 {
		a.limit = newLimiter(cfg.UnauthenticatedRate, time.Now)
	}
	return a
}

// Register adds the API's routes to mux.
func (a *API) Register(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/subscriptions", a.handle(a.create))
	mux.HandleFunc("GET /v1/subscriptions", a.handle(a.list))
	mux.HandleFunc("GET /v1/subscriptions/{id}", a.handle(a.get))
	mux.HandleFunc("PATCH /v1/subscriptions/{id}", a.handle(a.patch))
	mux.HandleFunc("DELETE /v1/subscriptions/{id}", a.handle(a.delete))
	mux.HandleFunc("POST /v1/subscriptions/{id}/rotate-secret", a.handle(a.rotate))
	mux.HandleFunc("POST /v1/subscriptions/{id}/enable", a.handle(a.enable))
	mux.HandleFunc("GET /v1/dead-letters", a.handle(a.listDead))
	mux.HandleFunc("POST /v1/dead-letters/{id}/replay", a.handle(a.replayOne))
	mux.HandleFunc("POST /v1/dead-letters/replay", a.handle(a.replayMany))
	mux.HandleFunc("GET /v1/subscriptions/{id}/attempts", a.handle(a.subscriptionAttempts))
	mux.HandleFunc("GET /v1/events/{event_id}/attempts", a.handle(a.eventAttempts))
}

// caller is who is asking.
type caller struct {
	admin  bool
	tenant string // for a forward-authenticated caller
}

// Error is an API error: a status and a message for the caller.
type Error struct {
	Status  int
	Message string
}

func (e *Error) Error() string { return e.Message }

func fail(status int, format string, args ...any) *Error {
	return &Error{Status: status, Message: fmt.Sprintf(format, args...)}
}

type handler func(w http.ResponseWriter, r *http.Request, c caller) (status int, body any, err error)

func (a *API) handle(h handler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if a.cfg.Disabled != "" {
			writeJSON(w, http.StatusForbidden, map[string]string{"error": a.cfg.Disabled})
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, MaxBodyBytes)
		c, err := a.authenticate(r)
		if err == nil {
			var status int
			var body any
			status, body, err = h(w, r, c)
			if err == nil {
				writeJSON(w, status, body)
				return
			}
		}
		var e *Error
		if !errors.As(err, &e) {
			a.cfg.Logger.Error().Err(err).Str("path", r.URL.Path).Msg("api request failed")
			e = fail(http.StatusInternalServerError, "internal error")
		}
		if e.Status == http.StatusTooManyRequests || e.Status == http.StatusServiceUnavailable {
			w.Header().Set("Retry-After", "1")
		}
		writeJSON(w, e.Status, map[string]string{"error": e.Message})
	}
}

func writeJSON(w http.ResponseWriter, status int, body any) {
	if status == http.StatusNoContent {
		w.WriteHeader(status)
		return
	}
	w.Header().Set("content-type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(body)
}

// Request is the body of create and patch: a subscription's settable fields.
type Request struct {
	Event        string   `json:"event,omitempty"`
	Events       []string `json:"events,omitempty"`
	TargetURL    string   `json:"target_url,omitempty"`
	Tenant       *string  `json:"tenant,omitempty"`
	Secret       string   `json:"secret,omitempty"`
	VerifyIntent *bool    `json:"verify_intent,omitempty"`
	outbox.Options
}

// View is a subscription as the API shows it; options are the effective ones.
type View struct {
	ID        string   `json:"id"`
	Events    []string `json:"events"`
	TargetURL string   `json:"target_url"`
	Tenant    *string  `json:"tenant"`
	Secret    string   `json:"secret,omitempty"`
	// PublicKey verifies v1a signatures (whpk_); PreviousPublicKey those of
	// the rotated-out key during rotation_overlap. Not secrets: always shown.
	PublicKey         string     `json:"public_key,omitempty"`
	PreviousPublicKey string     `json:"previous_public_key,omitempty"`
	VerifyIntent      bool       `json:"verify_intent"`
	ReadOnly          bool       `json:"read_only"`
	DisabledAt        *time.Time `json:"disabled_at"` // set while endpoint health has it off (POST .../enable)
	CreatedAt         *time.Time `json:"created_at,omitempty"`
	UpdatedAt         *time.Time `json:"updated_at,omitempty"`
	outbox.Options
}

func (a *API) view(r *outbox.SubscriptionRow) View {
	opts, _ := r.Options.Resolve("", a.cfg.Defaults)
	v := View{ID: r.ID, Events: r.Events, TargetURL: r.TargetURL, Tenant: r.Tenant, VerifyIntent: r.VerifyIntent,
		CreatedAt: &r.CreatedAt, UpdatedAt: &r.UpdatedAt, DisabledAt: r.DisabledAt, Options: outbox.OptionsOf(opts),
		PublicKey: sender.PublicKey(r.Secret)}
	if r.PreviousSecret != nil && r.PreviousSecretUntil != nil && time.Now().Before(*r.PreviousSecretUntil) {
		v.PreviousPublicKey = sender.PublicKey(*r.PreviousSecret)
	}
	return v
}

func staticView(s *outbox.Subscription) View {
	v := View{ID: s.ID, Events: s.Events, TargetURL: s.TargetURL, ReadOnly: true, Options: outbox.OptionsOf(s.Delivery),
		PublicKey: sender.PublicKey(s.Secret)}
	if s.Tenant != "" {
		v.Tenant = &s.Tenant
	}
	return v
}

func (a *API) create(_ http.ResponseWriter, r *http.Request, c caller) (int, any, error) {
	var req Request
	if err := decode(r, &req); err != nil {
		return 0, nil, err
	}
	if req.Tenant != nil && *req.Tenant == "" {
		req.Tenant = nil // "" is no tenant, as in PATCH
	}
	row := &outbox.SubscriptionRow{ID: NewID(), VerifyIntent: true, Secret: req.Secret, Tenant: req.Tenant}
	if req.VerifyIntent != nil {
		row.VerifyIntent = *req.VerifyIntent
	}
	if err := scopeTenant(c, row); err != nil {
		return 0, nil, err
	}
	if err := a.apply(r.Context(), c, row, &req, true); err != nil {
		return 0, nil, err
	}
	schemes := a.schemes(row)
	if row.Secret == "" {
		row.Secret = sender.NewSecret(schemes)
	} else if err := sender.CheckSecret(row.Secret, schemes); err != nil {
		return 0, nil, fail(http.StatusBadRequest, "secret: %v", err)
	}
	if err := a.cfg.Store.InsertSubscription(r.Context(), row); err != nil {
		return 0, nil, err
	}
	a.cfg.Logger.Info().Str("subscription", row.ID).Strs("events", row.Events).Msg("subscription created")
	v := a.view(row)
	v.Secret = row.Secret
	return http.StatusCreated, v, nil
}

// scopeTenant forces a tenant caller's subscriptions into its tenant.
func scopeTenant(c caller, row *outbox.SubscriptionRow) error {
	if c.admin {
		return nil
	}
	if row.Tenant != nil && *row.Tenant != c.tenant {
		return fail(http.StatusForbidden, "tenant: you may only manage tenant %q's subscriptions", c.tenant)
	}
	t := c.tenant
	row.Tenant = &t
	return nil
}

// apply sets req's fields on row, validating them: events, target (safe, and
// verified when it is new or changed), options.
func (a *API) apply(ctx context.Context, c caller, row *outbox.SubscriptionRow, req *Request, create bool) error {
	if err := checkRequest(req); err != nil {
		return err
	}
	// A proxy is dialed without the SSRF guard and TLS files are read from
	// walhook's disk: the operator's to choose, not a tenant's.
	if !c.admin && req.ProxyURL != nil {
		return fail(http.StatusForbidden, "proxy_url: only the admin may set it")
	}
	if !c.admin && req.TLS != nil {
		return fail(http.StatusForbidden, "tls: only the admin may set it")
	}
	if req.MaxInFlightPerHost != nil {
		return fail(http.StatusBadRequest, "max_in_flight_per_host: only in the config file's defaults (it bounds all subscriptions' requests to a host)")
	}
	switch {
	case req.Event != "" && len(req.Events) > 0:
		return fail(http.StatusBadRequest, "event: give event or events, not both")
	case req.Event != "":
		if err := outbox.CheckPattern(req.Event); err != nil {
			return fail(http.StatusBadRequest, "event: %q: %v", req.Event, err)
		}
		row.Events = []string{req.Event}
	case create && len(req.Events) == 0:
		return fail(http.StatusBadRequest, "event: required (an event name, a pattern like contact.*, or *)")
	case req.Events != nil:
		if err := outbox.CheckPatterns("events", req.Events); err != nil {
			return fail(http.StatusBadRequest, "%v", err)
		}
		row.Events = req.Events
	}
	row.Options = row.Options.Merge(req.Options)
	opts, err := row.Options.Resolve("", a.cfg.Defaults)
	if err != nil {
		return fail(http.StatusBadRequest, "%v", err)
	}
	for name, v := range opts.Headers {
		if v == outbox.Masked { // not a stored one given back (Merge kept those)
			return fail(http.StatusBadRequest, "headers.%s: %s is how answers mask a value: give the value", name, outbox.Masked)
		}
	}
	if strings.Contains(opts.ProxyURL, ":"+outbox.Masked+"@") && req.ProxyURL != nil && *req.ProxyURL == opts.ProxyURL {
		return fail(http.StatusBadRequest, "proxy_url: %s is how answers mask a password: give the password", outbox.Masked)
	}
	if strings.HasPrefix(opts.ProxyURL, "socks5:") {
		return fail(http.StatusBadRequest, "proxy_url: socks5:// would be handed the target's name, not the checked address: use http:// or https://")
	}
	if req.TLS != nil {
		if _, err := sender.LoadTLS(opts.TLS); err != nil {
			return fail(http.StatusBadRequest, "%v", err)
		}
	}
	targetChanged := req.TargetURL != "" && req.TargetURL != row.TargetURL
	if create && req.TargetURL == "" {
		return fail(http.StatusBadRequest, "target_url: required")
	}
	if !targetChanged {
		return nil
	}
	if err := a.cfg.Guard.CheckURL(ctx, req.TargetURL); err != nil {
		return fail(http.StatusBadRequest, "target_url: %v", err)
	}
	if row.VerifyIntent {
		opts, _ := row.Options.Resolve("", a.cfg.Defaults) // checked above
		sub := &outbox.Subscription{ID: row.ID, TargetURL: req.TargetURL, Delivery: opts}
		if err := a.cfg.Verifier.VerifyTarget(ctx, sub, 10*time.Second); err != nil {
			return fail(http.StatusBadRequest, "target_url: intent verification failed: %v", err)
		}
	}
	row.TargetURL = req.TargetURL
	return nil
}

// listPageMax is the most API subscriptions one page of the list holds.
const listPageMax = 1000

// list answers GET /v1/subscriptions: the config file's subscriptions (admin
// only; on the first page) and a page of API subscriptions, at most limit
// (default and most listPageMax). When more may follow, a Link header
// (rel="next") gives the next page's URL, with its cursor.
func (a *API) list(w http.ResponseWriter, r *http.Request, c caller) (int, any, error) {
	q, err := query(r, "tenant", "event", "limit", "cursor")
	if err != nil {
		return 0, nil, err
	}
	limit := listPageMax
	if v := q.Get("limit"); v != "" {
		n, err := parseCount("limit", v, 1, listPageMax)
		if err != nil {
			return 0, nil, err
		}
		limit = int(n)
	}
	cursor := q.Get("cursor")
	if cursor != "" {
		if _, _, err := outbox.ParseSubscriptionCursor(cursor); err != nil {
			return 0, nil, fail(http.StatusBadRequest, "%v", err)
		}
	}
	var tenant *string
	if t := q.Get("tenant"); t != "" {
		tenant = &t
	}
	if !c.admin {
		if tenant != nil && *tenant != c.tenant {
			return http.StatusOK, []View{}, nil
		}
		tenant = &c.tenant
	}
	event := q.Get("event")
	wants := func(events []string, t string) bool {
		if tenant != nil && t != *tenant {
			return false
		}
		return event == "" || (&outbox.Subscription{Events: events}).Matches(&outbox.Event{Type: event, Tenant: t})
	}
	out := []View{}
	if c.admin && cursor == "" {
		for _, s := range a.cfg.Static {
			if wants(s.Events, s.Tenant) {
				out = append(out, staticView(s))
			}
		}
	}
	// Pages of the store until this page is full or the store has no more;
	// with an event filter some rows are left out, so a few reads may be needed.
	found, more := 0, true
	for found < limit && more {
		rows, err := a.cfg.Store.ListSubscriptionsAfter(r.Context(), tenant, cursor, limit-found)
		if err != nil {
			return 0, nil, err
		}
		more = len(rows) == limit-found
		for i := range rows {
			cursor = rows[i].Cursor()
			if wants(rows[i].Events, deref(rows[i].Tenant)) {
				out = append(out, a.view(&rows[i]))
				found++
			}
		}
	}
	if more {
		next := url.Values{"cursor": {cursor}, "limit": {strconv.Itoa(limit)}}
		for _, k := range []string{"tenant", "event"} {
			if v := q.Get(k); v != "" {
				next.Set(k, v)
			}
		}
		w.Header().Set("Link", `</v1/subscriptions?`+next.Encode()+`>; rel="next"`)
	}
	return http.StatusOK, out, nil
}

// find returns the caller's subscription id: a static one (read-only) or a row.
func (a *API) find(r *http.Request, c caller) (*outbox.Subscription, *outbox.SubscriptionRow, error) {
	id, err := pathID(r)
	if err != nil {
		return nil, nil, err
	}
	if i := slices.IndexFunc(a.cfg.Static, func(s *outbox.Subscription) bool { return s.ID == id }); i >= 0 && c.admin {
		return a.cfg.Static[i], nil, nil
	}
	row, err := a.cfg.Store.GetSubscription(r.Context(), id)
	if errors.Is(err, outbox.ErrNotFound) || (err == nil && !c.admin && deref(row.Tenant) != c.tenant) {
		return nil, nil, fail(http.StatusNotFound, "subscription %q not found", id)
	}
	return nil, row, err
}

// findWritable is find for changes: a static subscription is read-only.
func (a *API) findWritable(r *http.Request, c caller) (*outbox.SubscriptionRow, error) {
	static, row, err := a.find(r, c)
	switch {
	case err != nil:
		return nil, err
	case static != nil:
		return nil, fail(http.StatusConflict, "subscription %q is read-only: it is defined in the config file", static.ID)
	}
	return row, nil
}

func (a *API) get(_ http.ResponseWriter, r *http.Request, c caller) (int, any, error) {
	static, row, err := a.find(r, c)
	switch {
	case err != nil:
		return 0, nil, err
	case static != nil:
		return http.StatusOK, staticView(static), nil
	}
	return http.StatusOK, a.view(row), nil
}

func (a *API) patch(_ http.ResponseWriter, r *http.Request, c caller) (int, any, error) {
	row, err := a.findWritable(r, c)
	if err != nil {
		return 0, nil, err
	}
	var req Request
	if err := decode(r, &req); err != nil {
		return 0, nil, err
	}
	if req.Secret != "" {
		return 0, nil, fail(http.StatusBadRequest, "secret: use POST /v1/subscriptions/{id}/rotate-secret")
	}
	if req.Tenant != nil {
		if !c.admin && *req.Tenant != c.tenant {
			return 0, nil, fail(http.StatusForbidden, "tenant: you may only manage tenant %q's subscriptions", c.tenant)
		}
		row.Tenant = req.Tenant
		if *req.Tenant == "" {
			row.Tenant = nil
		}
	}
	if req.VerifyIntent != nil {
		row.VerifyIntent = *req.VerifyIntent
	}
	if err := a.apply(r.Context(), c, row, &req, false); err != nil {
		return 0, nil, err
	}
	// A changed signature changes the secret: a fresh key for a scheme
	// added (shown in this answer only), none for a scheme dropped.
	fitted, added := sender.FitSecret(row.Secret, a.schemes(row))
	row.Secret, row.SecretChanged = fitted, fitted != row.Secret
	if err := a.cfg.Store.UpdateSubscription(r.Context(), row); err != nil {
		return 0, nil, notFound(err, row.ID)
	}
	v := a.view(row)
	if added {
		v.Secret = row.Secret
	}
	return http.StatusOK, v, nil
}

func (a *API) delete(_ http.ResponseWriter, r *http.Request, c caller) (int, any, error) {
	row, err := a.findWritable(r, c)
	if err != nil {
		return 0, nil, err
	}
	if err := a.cfg.Store.DeleteSubscriptionStrict(r.Context(), row.ID); err != nil {
		return 0, nil, notFound(err, row.ID)
	}
	a.cfg.Logger.Info().Str("subscription", row.ID).Msg("subscription deleted")
	return http.StatusNoContent, nil, nil
}

func (a *API) rotate(_ http.ResponseWriter, r *http.Request, c caller) (int, any, error) {
	row, err := a.findWritable(r, c)
	if err != nil {
		return 0, nil, err
	}
	var req struct {
		Secret string `json:"secret"`
	}
	if r.ContentLength != 0 {
		if err := decode(r, &req); err != nil {
			return 0, nil, err
		}
	}
	schemes := a.schemes(row)
	if req.Secret == "" {
		req.Secret = sender.NewSecret(schemes)
	} else if err := sender.CheckSecret(req.Secret, schemes); err != nil {
		return 0, nil, fail(http.StatusBadRequest, "secret: %v", err)
	}
	until := time.Now().Add(a.cfg.RotationOverlap)
	if err := a.cfg.Store.RotateSecret(r.Context(), row.ID, req.Secret, until); err != nil {
		return 0, nil, notFound(err, row.ID)
	}
	answer := map[string]any{"secret": req.Secret, "previous_secret_valid_until": until.UTC()}
	if pk := sender.PublicKey(req.Secret); pk != "" {
		answer["public_key"] = pk
		if old := sender.PublicKey(row.Secret); old != "" {
			answer["previous_public_key"] = old
		}
	}
	return http.StatusOK, answer, nil
}

func (a *API) enable(_ http.ResponseWriter, r *http.Request, c caller) (int, any, error) {
	row, err := a.findWritable(r, c)
	if err != nil {
		return 0, nil, err
	}
	if err := a.cfg.Store.EnableSubscription(r.Context(), row.ID); err != nil {
		return 0, nil, notFound(err, row.ID)
	}
	row.DisabledAt = nil
	return http.StatusOK, a.view(row), nil
}

func notFound(err error, id string) error {
	if errors.Is(err, outbox.ErrNotFound) {
		return fail(http.StatusNotFound, "subscription %q not found", id)
	}
	return err
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// NewSecret returns a fresh v1 signing secret: whsec_ and 32 random bytes, base64.
func NewSecret() string { return sender.NewKey(outbox.SchemeV1) }

// schemes are the signature schemes row's options resolve to.
func (a *API) schemes(row *outbox.SubscriptionRow) outbox.Schemes {
	opts, _ := row.Options.Resolve("", a.cfg.Defaults) // checked by apply
	return opts.Signature
}

// NewID returns a fresh subscription id.
func NewID() string {
	var b [12]byte
	rand.Read(b[:])
	return "sub_" + hex.EncodeToString(b[:])
}

// deadFilter scopes a filter to what the caller may see: a tenant sees the dead
// letters of the subscriptions it owns, whatever tenant their events name.
func deadFilter(c caller, f outbox.DeadLetterFilter) outbox.DeadLetterFilter {
	if !c.admin {
		t := c.tenant
		f.Owner = &t
	}
	return f
}

func parseTime(field, v string) (*time.Time, error) {
	if v == "" {
		return nil, nil
	}
	t, err := time.Parse(time.RFC3339, v)
	if err != nil {
		return nil, fail(http.StatusBadRequest, "%s: %q is not an RFC 3339 time", field, v)
	}
	if t.Year() < 1 || t.Year() > 9999 {
		return nil, fail(http.StatusBadRequest, "%s: %q is out of range", field, v)
	}
	return &t, nil
}

func (a *API) listDead(_ http.ResponseWriter, r *http.Request, c caller) (int, any, error) {
	q, err := query(r, "subscription", "since", "until", "limit")
	if err != nil {
		return 0, nil, err
	}
	f := outbox.DeadLetterFilter{Subscription: q.Get("subscription"), All: true}
	if f.Since, err = parseTime("since", q.Get("since")); err != nil {
		return 0, nil, err
	}
	if f.Until, err = parseTime("until", q.Get("until")); err != nil {
		return 0, nil, err
	}
	limit := int64(100)
	if l := q.Get("limit"); l != "" {
		if limit, err = parseCount("limit", l, 1, 10000); err != nil {
			return 0, nil, err
		}
	}
	rows, err := a.cfg.Store.ListDeadLetters(r.Context(), deadFilter(c, f), int(limit))
	if err != nil {
		return 0, nil, err
	}
	if rows == nil {
		rows = []outbox.DeadLetterRow{}
	}
	return http.StatusOK, rows, nil
}

func (a *API) replayOne(_ http.ResponseWriter, r *http.Request, c caller) (int, any, error) {
	id, err := parseCount("id", r.PathValue("id"), 1, 1<<63-1)
	if err != nil {
		return 0, nil, err
	}
	n, err := a.cfg.Store.ReplayDeadLetters(r.Context(), deadFilter(c, outbox.DeadLetterFilter{ID: id}))
	if err != nil {
		return 0, nil, err
	}
	if n == 0 {
		return 0, nil, fail(http.StatusNotFound, "dead letter %d not found (or not replayable: it has no subscription)", id)
	}
	return http.StatusOK, map[string]int64{"replayed": n}, nil
}

func (a *API) replayMany(_ http.ResponseWriter, r *http.Request, c caller) (int, any, error) {
	var req struct {
		Subscription string `json:"subscription"`
		Since        string `json:"since"`
		Until        string `json:"until"`
		All          bool   `json:"all"`
	}
	if err := decode(r, &req); err != nil {
		return 0, nil, err
	}
	if err := checkText("subscription", req.Subscription); err != nil {
		return 0, nil, err
	}
	f := outbox.DeadLetterFilter{Subscription: req.Subscription, All: req.All}
	var err error
	if f.Since, err = parseTime("since", req.Since); err != nil {
		return 0, nil, err
	}
	if f.Until, err = parseTime("until", req.Until); err != nil {
		return 0, nil, err
	}
	if f.Empty() {
		return 0, nil, fail(http.StatusBadRequest, "give subscription, since, until, or all: true")
	}
	n, err := a.cfg.Store.ReplayDeadLetters(r.Context(), deadFilter(c, f))
	if err != nil {
		return 0, nil, err
	}
	return http.StatusOK, map[string]int64{"replayed": n}, nil
}
