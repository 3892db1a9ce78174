package api

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"time"
)

const (
	maxAuthCalls    = 32               // auth_url calls in flight at once
	maxAuthCacheTTL = 30 * time.Second // an answer is never reused longer: a revoked token stops working by then
	authCacheSize   = 10000            // entries; the cache never grows past it
	limiterSize     = 10000            // client addresses tracked by the rate limit
)

// errAuthUnavailable is an auth_url that did not answer (or answered 5xx): the
// caller is not told it is unauthorised, and nothing is cached or counted.
var errAuthUnavailable = errors.New("auth_url unavailable")

// LoopbackHost reports whether a Host header names this machine's loopback:
// localhost, or a loopback address, with or without a port.
func LoopbackHost(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		host = hostport
	}
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(strings.Trim(host, "[]"))
	return err == nil && ip.IsLoopback()
}

// crossSite reports whether a browser says r comes from another origin
// (Sec-Fetch-Site, else Origin). Clients that are not browsers send neither.
func crossSite(r *http.Request) bool {
	switch r.Header.Get("Sec-Fetch-Site") {
	case "", "same-origin", "none":
	default:
		return true
	}
	o := r.Header.Get("Origin")
	if o == "" {
		return false
	}
	u, err := url.Parse(o)
	return err != nil || u.Host != r.Host
}

func (a *API) authenticate(r *http.Request) (caller, error) {
	h := r.Header.Get("Authorization")
	if a.cfg.AdminToken != "" {
		if tok, ok := strings.CutPrefix(h, "Bearer "); ok &&
			subtle.ConstantTimeCompare([]byte(tok), []byte(a.cfg.AdminToken)) == 1 {
			return caller{admin: true}, nil
		}
	} else if a.cfg.AuthURL == "" {
		// Loopback only, without a token: and only under a loopback name, or
		// a web page that rebinds its own name to 127.0.0.1 would be admin.
		if !LoopbackHost(r.Host) {
			return caller{}, fail(http.StatusForbidden, "without admin_token the API answers only at a loopback address (127.0.0.1, [::1], localhost), not at Host %q", r.Host)
		}
		// A web page's form reaches loopback too: a change that a browser
		// says comes from another site is refused (no token stops it here).
		if r.Method != http.MethodGet && r.Method != http.MethodHead && crossSite(r) {
			return caller{}, fail(http.StatusForbidden, "without admin_token the API refuses changes a browser sends from another site (Origin %q)", r.Header.Get("Origin"))
		}
		return caller{admin: true}, nil
	}
	var key [sha256.Size]byte
	tenant, ok, hit := "", false, false
	if h != "" && a.cfg.AuthURL != "" {
		key = sha256.Sum256([]byte(h))
		if tenant, ok, hit = a.cache.get(key); hit && ok {
			return caller{tenant: tenant}, nil
		}
	}
	// From here the caller is unauthenticated until auth_url says otherwise:
	// a client address that failed too often does not get that far.
	if a.limit != nil && !a.limit.allowed(ClientPrefix(r)) {
		return caller{}, fail(http.StatusTooManyRequests, "too many unauthenticated requests: slow down")
	}
	if a.cfg.AuthURL == "" || h == "" || hit {
		return caller{}, a.refuse(r)
	}
	tenant, err := a.forwardAuth(r.Context(), h)
	if unavailable := errors.Is(err, errAuthUnavailable); a.authDown.CompareAndSwap(!unavailable, unavailable) {
		if unavailable { // logged once per outage, and its end once
			a.cfg.Logger.Warn().Err(err).Msg("forward auth unavailable")
		} else {
			a.cfg.Logger.Info().Msg("forward auth recovered")
		}
	}
	switch {
	case errors.Is(err, errAuthUnavailable):
		return caller{}, fail(http.StatusServiceUnavailable, "auth_url unavailable: try again")
	case err != nil:
		a.cfg.Logger.Debug().Err(err).Msg("forward auth refused")
		a.cache.put(key, "", false)
		return caller{}, a.refuse(r)
	}
	a.cache.put(key, tenant, true)
	return caller{tenant: tenant}, nil
}

// refuse counts a failed authentication against the client's address.
func (a *API) refuse(r *http.Request) error {
	if a.limit != nil {
		a.limit.take(ClientPrefix(r))
	}
	if a.cfg.AuthURL == "" {
		return fail(http.StatusUnauthorized, "missing or wrong bearer token")
	}
	return fail(http.StatusUnauthorized, "not authorized")
}

// forwardAuth asks auth_url who the caller is, within AuthTimeout.
func (a *API) forwardAuth(ctx context.Context, authorization string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, a.cfg.AuthTimeout)
	defer cancel()
	select {
	case a.authSem <- struct{}{}:
		defer func() { <-a.authSem }()
	case <-ctx.Done():
		return "", fmt.Errorf("%w: %d calls in flight", errAuthUnavailable, maxAuthCalls)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.cfg.AuthURL, nil)
	if err != nil {
		return "", fmt.Errorf("%w: %v", errAuthUnavailable, err)
	}
	req.Header.Set("Authorization", authorization)
	resp, err := a.auth.Do(req)
	if err != nil {
		return "", fmt.Errorf("%w: %v", errAuthUnavailable, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 500 {
		return "", fmt.Errorf("%w: it answered %d", errAuthUnavailable, resp.StatusCode)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return "", fmt.Errorf("auth_url answered %d", resp.StatusCode)
	}
	var who struct {
		Tenant string `json:"tenant"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&who); err != nil || who.Tenant == "" {
		return "", errors.New("auth_url named no tenant")
	}
	if err := checkText("tenant", who.Tenant); err != nil {
		return "", fmt.Errorf("auth_url named a tenant walhook cannot store: %w", err)
	}
	return who.Tenant, nil
}

// authCache keeps auth_url's answers for ttl, keyed by a SHA-256 of the
// Authorization header (the header itself is never kept).
type authCache struct {
	ttl     time.Duration
	now     func() time.Time
	mu      sync.Mutex
	entries map[[sha256.Size]byte]authEntry
}

type authEntry struct {
	tenant  string
	ok      bool
	expires time.Time
}

func newAuthCache(ttl time.Duration, now func() time.Time) *authCache {
	return &authCache{ttl: ttl, now: now, entries: map[[sha256.Size]byte]authEntry{}}
}

func (c *authCache) get(key [sha256.Size]byte) (tenant string, ok, hit bool) {
	if c.ttl <= 0 {
		return "", false, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	e, found := c.entries[key]
	if !found || !c.now().Before(e.expires) {
		return "", false, false
	}
	return e.tenant, e.ok, true
}

func (c *authCache) put(key [sha256.Size]byte, tenant string, ok bool) {
	if c.ttl <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	if len(c.entries) >= authCacheSize {
		for k, e := range c.entries {
			if !now.Before(e.expires) {
				delete(c.entries, k)
			}
		}
	}
	for k := range c.entries { // still full: drop any one
		if len(c.entries) < authCacheSize {
			break
		}
		delete(c.entries, k)
	}
	c.entries[key] = authEntry{tenant: tenant, ok: ok, expires: now.Add(c.ttl)}
}

// limiter is a token bucket per client address for unauthenticated requests:
// each failure takes a token; a client without tokens is refused before its
// credentials are looked at (so before auth_url is called).
type limiter struct {
	rate, burst float64
	now         func() time.Time
	mu          sync.Mutex
	buckets     map[netip.Prefix]*bucket
}

type bucket struct {
	tokens float64
	at     time.Time
}

func newLimiter(rate float64, now func() time.Time) *limiter {
	return &limiter{rate: rate, burst: max(1, 4*rate), now: now, buckets: map[netip.Prefix]*bucket{}}
}

// refill brings b's tokens to now; the caller holds mu.
func (l *limiter) refill(b *bucket, now time.Time) {
	b.tokens = min(l.burst, b.tokens+now.Sub(b.at).Seconds()*l.rate)
	b.at = now
}

func (l *limiter) allowed(addr netip.Prefix) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[addr]
	if b == nil {
		return true
	}
	l.refill(b, l.now())
	return b.tokens >= 1
}

func (l *limiter) take(addr netip.Prefix) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	b := l.buckets[addr]
	if b == nil {
		if len(l.buckets) >= limiterSize {
			for k, o := range l.buckets { // forget the clients whose buckets are full again
				if l.refill(o, now); o.tokens >= l.burst {
					delete(l.buckets, k)
				}
			}
		}
		for k := range l.buckets { // still full: forget any one
			if len(l.buckets) < limiterSize {
				break
			}
			delete(l.buckets, k)
		}
		b = &bucket{tokens: l.burst, at: now}
		l.buckets[addr] = b
	}
	l.refill(b, now)
	b.tokens = max(0, b.tokens-1)
}

// clientAddr is the rate limit's key: the peer's IPv4 address, or its IPv6 /64
// (one host usually has a whole /64).
// ClientPrefix is r's client address as rate limits count it: the address
// for IPv4, its /64 for IPv6 (one host's share of a network).
func ClientPrefix(r *http.Request) netip.Prefix {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Prefix{}
	}
	ip = ip.Unmap().WithZone("")
	if ip.Is4() {
		return netip.PrefixFrom(ip, 32)
	}
	p, _ := ip.Prefix(64)
	return p
}
