package sender

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/sender/ssrf"
)

// Version is walhook's version, sent in user-agent.
var Version = "dev"

// Limits on what a target's answer may make walhook read: more header bytes
// fail the attempt; a longer body is read only this far (the start of it is
// the error's excerpt), and its connection is closed rather than drained.
const (
	maxResponseHeader = 64 << 10
	maxResponseBody   = 64 << 10
	maxExcerpt        = 200 // characters of a failed answer's body kept in its error
)

var (
	errHeadersTooLarge = errors.New("response headers exceed 64 KiB")
	errBodyTooLarge    = errors.New("response body exceeds 64 KiB")
)

// Sender delivers batches over HTTP. It is safe for concurrent use.
type Sender struct {
	trusted   *transport // static subscriptions: any target
	guarded   *transport // dynamic subscriptions: safe targets only, checked at dial
	userAgent string
	now       func() time.Time

	dialer   *net.Dialer
	guard    *ssrf.Guard
	proxyEnv func(*http.Request) (*url.URL, error) // the proxy without proxy_url

	mu     sync.Mutex
	routes map[routeKey]*route // subscriptions with proxy_url or tls (route.go)

	log zerolog.Logger

	perHost int  // max_in_flight_per_host; 0 = none
	stdlib  bool // http_transport: stdlib
	hostsMu sync.Mutex
	hosts   map[string]*hostSlots // while requests to the host are in flight or waiting
}

// hostSlots bound the requests in flight to one host.
type hostSlots struct {
	slots chan struct{}
	users int // requests holding or waiting for a slot: at 0 the entry goes
}

// acquireHost waits for a slot to host; release gives it back.
func (s *Sender) acquireHost(ctx context.Context, host string) (release func(), err error) {
	s.hostsMu.Lock()
	h := s.hosts[host]
	if h == nil {
		if s.hosts == nil {
			s.hosts = map[string]*hostSlots{}
		}
		h = &hostSlots{slots: make(chan struct{}, s.perHost)}
		s.hosts[host] = h
	}
	h.users++
	s.hostsMu.Unlock()
	done := func() {
		s.hostsMu.Lock()
		if h.users--; h.users == 0 {
			delete(s.hosts, host)
		}
		s.hostsMu.Unlock()
	}
	select {
	case h.slots <- struct{}{}:
		return func() { <-h.slots; done() }, nil
	case <-ctx.Done():
		done()
		return nil, ctx.Err()
	}
}

// Config configures a Sender; its zero value is the defaults.
type Config struct {
	// Transport is TransportLean (the default) or TransportStdlib
	// (http_transport). Both keep the SSRF guard and the limits on what an
	// answer may make walhook read.
	Transport string
	// MaxInFlightPerHost bounds the requests in flight to one host (by name,
	// across all subscriptions and ports); 0 = no bound. A request waits for
	// a slot before its attempt's timeout starts.
	MaxInFlightPerHost int
	// Logger is where the Sender reports what a person must know: TLS files
	// that cannot be read, and read again; default nowhere (the zero Logger).
	Logger zerolog.Logger
}

// New returns a Sender with hardened clients; guard checks the addresses that
// dynamic subscriptions' requests dial, or, through a proxy (HTTP_PROXY,
// HTTPS_PROXY), the address each request is pinned to.
func New(guard *ssrf.Guard, cfg Config) *Sender {
	return newSender(guard, http.ProxyFromEnvironment, cfg)
}

// The HTTP transports (http_transport).
const (
	// TransportLean frames requests with the standard library's writer and
	// reads answers in the sender's goroutine, on its own connection pool
	// (transport.go); the default, for its CPU per request (docs/performance.md).
	TransportLean = "lean"
	// TransportStdlib sends every request with net/http's Transport.
	TransportStdlib = "stdlib"
)

// transportUnderTest, when set (by the tests' TestMain, from
// WALHOOK_TEST_HTTP_TRANSPORT), is the transport of every Sender that does
// not name one: the package's tests run through both.
var transportUnderTest string

func newSender(guard *ssrf.Guard, proxy func(*http.Request) (*url.URL, error), cfg Config) *Sender {
	s := &Sender{
		userAgent: "walhook/" + Version,
		now:       time.Now,
		log:       cfg.Logger,
		dialer:    &net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second},
		guard:     guard,
		proxyEnv:  proxy,
		stdlib:    cmp.Or(cfg.Transport, transportUnderTest) == TransportStdlib,
		perHost:   cfg.MaxInFlightPerHost,
	}
	s.trusted = s.newTransports(true, "", nil)
	s.guarded = s.newTransports(false, "", nil)
	return s
}

// newTransport is a transport that dials with dial, goes through proxy and
// speaks TLS with tlsConfig (nil: the system's roots; TLS 1.2 at least).
func newTransport(dial func(ctx context.Context, network, addr string) (net.Conn, error), proxy func(*http.Request) (*url.URL, error),
	tlsConfig *tls.Config) *transport {
	return &transport{
		dial:        dial,
		proxy:       proxy,
		tlsConfig:   tlsConfig,
		maxIdle:     32,
		idleTimeout: 90 * time.Second,
		fallback:    newNetHTTP(dial, proxy, tlsConfig), // through a proxy, and large bodies (transport.go)
	}
}

// roundTrip sends req as is: redirects are not followed (a 3xx is a failed
// attempt), and credentials in the target URL become basic auth.
func (s *Sender) roundTrip(sub *outbox.Subscription, req *http.Request) (*http.Response, error) {
	if u := req.URL.User; u != nil && req.Header.Get("Authorization") == "" {
		password, _ := u.Password()
		req.SetBasicAuth(u.Username(), password)
	}
	if sub == nil {
		return s.guarded.RoundTrip(req)
	}
	t, err := s.transportFor(sub)
	if err != nil {
		closeBody(req)
		return nil, err
	}
	return t.RoundTrip(req)
}

// Close closes idle connections.
func (s *Sender) Close() {
	s.trusted.CloseIdleConnections()
	s.guarded.CloseIdleConnections()
	s.closeRoutes()
}

// Deliver sends b once. It returns nil on 2xx and a *DeliveryError otherwise.
func (s *Sender) Deliver(ctx context.Context, b *outbox.Batch) error {
	sub := b.Subscription
	if s.perHost > 0 {
		u, err := url.Parse(sub.TargetURL)
		if err != nil {
			return &DeliveryError{Reason: "build request: target_url is not a URL"}
		}
		release, err := s.acquireHost(ctx, strings.ToLower(u.Hostname()))
		if err != nil {
			return &DeliveryError{Reason: "waiting for a request slot to the host (max_in_flight_per_host)", Err: err, retry: true}
		}
		defer release()
	}
	ctx, cancel := context.WithTimeout(ctx, sub.Delivery.Timeout)
	defer cancel()
	body, req, release, err := newRequest(ctx, b)
	if err != nil {
		return &DeliveryError{Reason: "build request: " + err.Error()}
	}
	defer release()
	now := s.now()
	ts := now.Unix()
	// Each key of the secret signs for its scheme; during a rotation's
	// overlap the previous secret's keys sign too, all space-separated.
	schemes := sub.Delivery.Signature
	if len(schemes) == 0 {
		schemes = outbox.DefaultDeliveryOptions().Signature
	}
	var buf [4]string // two schemes, two secrets during a rotation
	sigs := buf[:0]
	for _, secret := range sub.Secrets(now) {
		var err error
		if sigs, err = signatures(sigs, secret, schemes, b.WebhookID, ts, body); err != nil {
			return &DeliveryError{Reason: "subscription " + sub.ID + ": " + err.Error()}
		}
	}
	if len(sigs) == 0 {
		return &DeliveryError{Reason: "subscription " + sub.ID + ": no key for its signature schemes"}
	}
	for name, v := range sub.Delivery.Headers { // checked: none of those below
		req.Header.Set(name, v)
	}
	req.Header.Set("content-type", "application/json")
	req.Header.Set("user-agent", s.userAgent)
	req.Header.Set("webhook-id", b.WebhookID)
	req.Header.Set("webhook-timestamp", strconv.FormatInt(ts, 10))
	req.Header.Set("webhook-signature", strings.Join(sigs, " "))

	resp, err := s.roundTrip(sub, req)
	if err != nil {
		return requestError(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		io.Copy(io.Discard, io.LimitReader(resp.Body, maxResponseBody)) // let small bodies reuse the connection
		return nil
	}
	var prefix [4 * maxExcerpt]byte // maxExcerpt characters, of up to 4 bytes each
	n, err := io.ReadFull(resp.Body, prefix[:])
	if err == nil {
		_, err = io.Copy(io.Discard, io.LimitReader(resp.Body, maxResponseBody-int64(n)))
	}
	if err != nil && err != io.ErrUnexpectedEOF && ctx.Err() != nil {
		return &DeliveryError{Status: resp.StatusCode, Err: scrubURL(err), Reason: "reading response", retry: true}
	}
	return newStatusError(resp, prefix[:n], s.now())
}

// requestError classifies an attempt that got no response. A target the SSRF
// guard refused is not allowed now and will not be on a retry: it fails for
// good. Everything else (connection refused, reset, timed out, a response
// that is not HTTP or has oversized headers) is retried.
func requestError(err error) *DeliveryError {
	if fe, ok := errors.AsType[*ssrf.Error](err); ok {
		return &DeliveryError{Reason: "target not allowed", Err: refusal{fe}}
	}
	if errors.Is(err, errHeadersTooLarge) {
		return &DeliveryError{Reason: errHeadersTooLarge.Error(), retry: true}
	}
	return &DeliveryError{Err: scrubURL(err), Reason: "request failed", retry: true}
}

// newRequest builds b's request. A large body comes from bodies; it goes back
// once release has been called and the transport has closed every reader of
// it. A small one is copied out into a plain bytes.Reader: cheap, and on the
// proxy path net/http, knowing it is in memory, sends it with the headers in
// one write.
func newRequest(ctx context.Context, b *outbox.Batch) (body []byte, req *http.Request, release func(), err error) {
	buf := bodies.Get().(*[]byte)
	*buf = AppendBody((*buf)[:0], b)
	if len(*buf) < pooledBodyMin {
		body := bytes.Clone(*buf)
		bodies.Put(buf)
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, b.Subscription.TargetURL, bytes.NewReader(body))
		return body, req, func() {}, err
	}
	pb := &pooledBody{buf: buf}
	pb.refs.Store(1) // the caller's, until release: a retry may ask for the body again
	req, err = http.NewRequestWithContext(ctx, http.MethodPost, b.Subscription.TargetURL, pb.reader())
	if err != nil {
		pb.release()
		return nil, nil, nil, err
	}
	req.ContentLength = int64(len(*buf))
	req.GetBody = func() (io.ReadCloser, error) { return pb.reader(), nil }
	return *buf, req, pb.release, nil
}

// pooledBodyMin is the smallest body that is recycled.
const pooledBodyMin = 16 << 10

// bodies recycles request bodies: a batch of a thousand events is half a
// megabyte, which would otherwise be allocated, zeroed and collected per request.
var bodies = sync.Pool{New: func() any { return new([]byte) }}

// pooledBody is a request body that goes back to bodies once Deliver is done
// with it and the transport has closed every reader of it: the transport may
// still be writing it after the response has come, and may ask for it again
// (GetBody) to retry on a fresh connection.
type pooledBody struct {
	buf  *[]byte
	refs atomic.Int32
}

func (pb *pooledBody) reader() io.ReadCloser {
	pb.refs.Add(1)
	return &bodyReader{Reader: bytes.NewReader(*pb.buf), pb: pb}
}

func (pb *pooledBody) release() {
	if pb.refs.Add(-1) == 0 {
		bodies.Put(pb.buf)
	}
}

type bodyReader struct {
	*bytes.Reader
	pb   *pooledBody
	once sync.Once
}

func (r *bodyReader) Close() error {
	r.once.Do(r.pb.release)
	return nil
}

func newStatusError(resp *http.Response, body []byte, now time.Time) *DeliveryError {
	code := resp.StatusCode
	e := &DeliveryError{Status: code}
	switch {
	case code == http.StatusRequestTimeout, code == http.StatusTooManyRequests, code >= 500:
		e.retry = true
		e.retryAfter = parseRetryAfter(resp.Header.Get("Retry-After"), now)
	case code >= 300 && code < 400:
		e.Reason = "redirect not followed"
	}
	e.Body = excerpt(body)
	return e
}

// excerpt is the start of a failed answer's body as it goes into errors, logs
// and dead letters (a text column): valid UTF-8, without NUL or other control
// characters, at most maxExcerpt characters.
func excerpt(body []byte) string {
	s := strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return ' '
		}
		return r
	}, strings.ToValidUTF8(string(body), "\uFFFD"))
	s = strings.TrimSpace(s)
	n := 0
	for i := range s {
		if n == maxExcerpt {
			return s[:i] + "…"
		}
		n++
	}
	return s
}

// VerifyIntent runs the REST Hooks handshake with a dynamic subscription's
// target: a POST carrying a random X-Hook-Secret, which the target must echo in
// a 2xx answer.
func (s *Sender) VerifyIntent(ctx context.Context, target string, timeout time.Duration) error {
	return s.VerifyTarget(ctx, &outbox.Subscription{TargetURL: target, Delivery: outbox.DefaultDeliveryOptions()}, timeout)
}

// VerifyTarget is VerifyIntent for a dynamic subscription about to be
// stored: the request carries its custom headers and goes out as its
// deliveries will (its proxy, its TLS settings).
func (s *Sender) VerifyTarget(ctx context.Context, sub *outbox.Subscription, timeout time.Duration) error {
	target := sub.TargetURL
	var nonce [24]byte
	rand.Read(nonce[:])
	secret := base64.RawURLEncoding.EncodeToString(nonce[:])
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, target, strings.NewReader(`{"type":"walhook.verify_intent"}`))
	if err != nil {
		return fmt.Errorf("build request: %v", err)
	}
	for name, v := range sub.Delivery.Headers {
		req.Header.Set(name, v)
	}
	req.Header.Set("content-type", "application/json")
	req.Header.Set("user-agent", s.userAgent)
	req.Header.Set("X-Hook-Secret", secret)
	resp, err := s.roundTrip(&outbox.Subscription{TargetURL: target, Delivery: sub.Delivery}, req) // never Static: guarded
	if err != nil {
		if de := requestError(err); !de.retry {
			return de // target not allowed
		}
		return fmt.Errorf("target unreachable: %v", scrubURL(err))
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, io.LimitReader(resp.Body, maxResponseBody))
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("target answered %d", resp.StatusCode)
	}
	if resp.Header.Get("X-Hook-Secret") != secret {
		return errors.New("target did not echo the X-Hook-Secret header")
	}
	return nil
}

// parseRetryAfter reads delay-seconds or an HTTP date; 0 when absent or invalid.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if n, err := strconv.Atoi(v); err == nil && n > 0 {
		return time.Duration(n) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// scrubURL drops the request URL from a client error: it may carry credentials
// or tokens in its query.
func scrubURL(err error) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return errDeadline
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// errDeadline is an attempt cut off by its timeout (or by park_after); it
// matches context.DeadlineExceeded, without the URL the client error names.
var errDeadline error = deadlineError{}

type deadlineError struct{}

func (deadlineError) Error() string { return "attempt deadline exceeded" }
func (deadlineError) Unwrap() error { return context.DeadlineExceeded }

// refusal is the guard's refusal under the Reason "target not allowed": it
// says only why, and still matches ssrf.ErrForbidden.
type refusal struct{ e *ssrf.Error }

func (r refusal) Error() string { return r.e.Detail }
func (r refusal) Unwrap() error { return r.e }

// DeliveryError is a failed attempt. It implements outbox.Failure.
type DeliveryError struct {
	Status     int    // response status; 0 when no response arrived
	Reason     string // what went wrong, for people
	Body       string // a prefix of the response body, if any
	Err        error  // the underlying error, if any
	retry      bool
	retryAfter time.Duration
}

func (e *DeliveryError) Error() string {
	var b strings.Builder
	if e.Status != 0 {
		fmt.Fprintf(&b, "status %d", e.Status)
	}
	for _, part := range []string{e.Reason, e.Body} {
		if part == "" {
			continue
		}
		if b.Len() > 0 {
			b.WriteString(": ")
		}
		b.WriteString(part)
	}
	if e.Err != nil {
		if b.Len() > 0 {
			b.WriteString(": ")
		}
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

func (e *DeliveryError) Unwrap() error             { return e.Err }
func (e *DeliveryError) Retryable() bool           { return e.retry }
func (e *DeliveryError) RetryAfter() time.Duration { return e.retryAfter }
func (e *DeliveryError) StatusCode() int           { return e.Status }

var _ outbox.Failure = (*DeliveryError)(nil)
