package sender

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/walhook/walhook/outbox"
)

// transport is a lean HTTP/1.1 round tripper for webhook requests: the request
// goes out in one write, the response is read in the caller's goroutine, and
// keep-alive connections are pooled per target. net/http's Transport runs two
// goroutines per connection and hands every request and response between them;
// at one request per event that was half of walhook's CPU (docs/performance.md).
//
// Requests through a proxy (HTTP_PROXY, HTTPS_PROXY) go to pinned when it is
// set (dynamic subscriptions: proxy.go), else to fallback. Requests to schemes
// other than http and https, and with bodies over maxLeanBody go to fallback:
// writing and reading in turn, the lean transport would wait out its deadline on a target
// that answers early (413, say) without reading a large body, where net/http,
// reading while it writes, sees the answer. Large bodies are batches, whose
// per-request cost hardly counts.
type transport struct {
	dial        func(ctx context.Context, network, addr string) (net.Conn, error)
	tlsConfig   *tls.Config // cloned per connection; nil: the system's roots (TLS 1.2 at least)
	proxy       func(*http.Request) (*url.URL, error)
	pinned      *pinnedProxy // nil: requests through a proxy go to fallback as they are
	fallback    http.RoundTripper
	maxIdle     int           // idle connections kept per target
	idleTimeout time.Duration // an idle connection older than this is closed
	stdlib      bool          // http_transport: stdlib: every request but proxied dynamic ones goes to fallback

	mu   sync.Mutex
	idle map[string][]*conn // by scheme://host:port, most recently used last
}

type conn struct {
	net.Conn
	key    string
	lr     limitedReader // under br: what one response may still read from the network
	br     *bufio.Reader
	bw     *bufio.Writer
	expire *time.Timer // closes the connection after idleTimeout in the pool
}

const tlsHandshakeTimeout = 5 * time.Second

// bodySlack is what a response may read beyond maxResponseBody for the
// framing of a chunked body and what the read buffer holds ahead.
const bodySlack = 4 << 10

// limitedReader reads from r until n bytes have been read, then reports EOF.
// It is reset for each response rather than allocated (cf. io.LimitedReader).
type limitedReader struct {
	r io.Reader
	n int64
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	return n, err
}

// maxLeanBody is the largest body the lean transport sends: less than the
// socket buffers between walhook and the target take without the target reading.
const maxLeanBody = 64 << 10

// aLongTimeAgo is a deadline that makes pending I/O fail at once.
var aLongTimeAgo = time.Unix(1, 0)

func (t *transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme != "http" && req.URL.Scheme != "https" {
		return viaNetHTTP(t.fallback, req)
	}
	if p, err := t.proxy(req); err != nil {
		closeBody(req)
		return nil, fmt.Errorf("proxy: %w", err)
	} else if p != nil {
		if t.pinned != nil {
			return t.pinned.roundTrip(req, p)
		}
		return viaNetHTTP(t.fallback, req)
	}
	if t.stdlib || req.ContentLength < 0 || req.ContentLength == 0 && req.Body != nil && req.Body != http.NoBody ||
		req.ContentLength > maxLeanBody {
		return viaNetHTTP(t.fallback, req) // a body of unknown length, or a large one
	}
	for retried := false; ; retried = true {
		c, reused, err := t.get(req)
		if err != nil {
			closeBody(req)
			return nil, err
		}
		if err := req.Context().Err(); err != nil {
			// Never start a request whose context has ended: on a
			// kept-alive connection nothing else would stop it (exchange's
			// AfterFunc runs on its own goroutine, racing the write), and
			// an epoch that ended must send nothing more.
			t.put(c)
			closeBody(req)
			return nil, err
		}
		if err := outbox.Fresh(req.Context()); err != nil {
			// Nor one whose sender may no longer send (outbox.WithFresh):
			// checked here, where the request goes out in the next write.
			t.put(c)
			closeBody(req)
			return nil, err
		}
		resp, err := t.exchange(c, req)
		if err == nil {
			return resp, nil
		}
		c.Close()
		// A kept-alive connection the server closed meanwhile fails before
		// any answer: send once more on a fresh one, as net/http does, and
		// only for a request with an idempotency key: a webhook's is its
		// webhook-id (Standard Webhooks), by which the receiver dedups should
		// it have seen the first attempt after all.
		if !reused || retried || req.GetBody == nil || !idempotent(req) || !errors.Is(err, errNoAnswer) || req.Context().Err() != nil {
			closeBody(req)
			return nil, err
		}
		body, gerr := req.GetBody()
		if gerr != nil {
			return nil, err
		}
		req = req.Clone(req.Context())
		req.Body = body
	}
}

// idempotent reports whether req may be sent twice: it carries a key the
// receiver deduplicates by.
func idempotent(req *http.Request) bool {
	return req.Header.Get("webhook-id") != "" || req.Header.Get("Idempotency-Key") != ""
}

// newNetHTTP is a net/http transport with the lean one's limits.
func newNetHTTP(dial func(ctx context.Context, network, addr string) (net.Conn, error), proxy func(*http.Request) (*url.URL, error),
	tlsConfig *tls.Config) *http.Transport {
	if tlsConfig == nil {
		tlsConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	// HTTP/1.1 only (TLSNextProto), as the lean transport: one request per
	// connection at a time is what lets the last freshness check
	// (viaNetHTTP) close the connection under a stale request alone, and
	// write right after it; an HTTP/2 request may still wait for a stream.
	return &http.Transport{
		TLSClientConfig:        tlsConfig.Clone(),
		TLSNextProto:           map[string]func(string, *tls.Conn) http.RoundTripper{},
		Proxy:                  proxy,
		DialContext:            dial,
		MaxIdleConns:           256,
		MaxIdleConnsPerHost:    32,
		IdleConnTimeout:        90 * time.Second,
		TLSHandshakeTimeout:    tlsHandshakeTimeout,
		MaxResponseHeaderBytes: maxResponseHeader,
		DisableCompression:     true, // as the lean transport: no Accept-Encoding, bodies as sent
	}
}

// viaNetHTTP sends req with rt, a net/http transport. Its error for headers
// over MaxResponseHeaderBytes is a bare string, which
// TestHugeResponseHeadersFailTheAttempt pins.
//
// The request's freshness (outbox.WithFresh) is checked once net/http has
// the connection it will write the request on, which over HTTP/1.1 carries
// this request alone: a failed check closes it, so nothing of the request is
// written, and ends the request's context, so net/http does not go on to try
// its other idle connections, or dial, for a request that must not go out.
func viaNetHTTP(rt http.RoundTripper, req *http.Request) (*http.Response, error) {
	var stale atomic.Pointer[error]
	ctx, cancel := context.WithCancelCause(req.Context())
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
		if err := outbox.Fresh(req.Context()); err != nil {
			stale.Store(&err)
			cancel(err)
			info.Conn.Close()
		}
	}})
	resp, err := rt.RoundTrip(req.WithContext(ctx))
	if p := stale.Load(); p != nil {
		if resp != nil {
			resp.Body.Close()
		}
		return nil, *p
	}
	if err != nil && strings.Contains(err.Error(), "server response headers exceeded") {
		return nil, errHeadersTooLarge
	}
	return resp, err
}

func closeBody(req *http.Request) {
	if req.Body != nil {
		req.Body.Close()
	}
}

// errNoAnswer wraps failures that happened before any byte of a response came.
var errNoAnswer = errors.New("connection closed before an answer")

// exchange writes req on c and reads the response head. The response body, once
// closed, puts c back into the pool when it can be reused.
func (t *transport) exchange(c *conn, req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	deadline, _ := ctx.Deadline()
	c.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(aLongTimeAgo) })
	if err := writeRequest(c.bw, req); err != nil {
		stop()
		return nil, fmt.Errorf("%w: %w", errNoAnswer, ctxErr(ctx, err))
	}
	// The heads of one answer, interim ones included, read at most
	// maxResponseHeader bytes from the network; its body maxResponseBody
	// (and the slack).
	c.lr.n = maxResponseHeader
	for {
		if _, err := c.br.Peek(1); err != nil {
			stop()
			return nil, fmt.Errorf("%w: %w", errNoAnswer, ctxErr(ctx, err))
		}
		resp, err := http.ReadResponse(c.br, req)
		if err != nil {
			stop()
			if c.lr.n <= 0 {
				return nil, errHeadersTooLarge
			}
			return nil, ctxErr(ctx, err)
		}
		if resp.StatusCode >= 100 && resp.StatusCode < 200 && resp.StatusCode != http.StatusSwitchingProtocols {
			continue // 100 Continue, 103 Early Hints: the answer follows
		}
		c.lr.n = maxResponseBody + bodySlack
		resp.Body = &body{ReadCloser: resp.Body, t: t, c: c, resp: resp, stop: stop}
		return resp, nil
	}
}

// ctxErr prefers the context's error: a deadline or a cancellation shows as an
// I/O timeout on the connection.
func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if d, ok := ctx.Deadline(); ok && !time.Now().Before(d) {
		return context.DeadlineExceeded // the connection's deadline fired first
	}
	return err
}

// writeRequest writes req with the standard library's framing
// ((*http.Request).Write) into the connection's buffer, which leaves it, a
// small body with its head, in one write. The header is checked first:
// Request.Write turns a newline in a value into a space rather than refusing
// it, where net/http's Transport refuses the request.
func writeRequest(bw *bufio.Writer, req *http.Request) error {
	for k, vs := range req.Header {
		for _, v := range vs {
			if !validHeader(k, v) {
				closeBody(req)
				return fmt.Errorf("invalid header %q", k)
			}
		}
	}
	if err := req.Write(bw); err != nil {
		return err
	}
	return bw.Flush()
}

// validHeader rejects what would break the request's framing: a header name or
// value with CR, LF or other control characters.
func validHeader(k, v string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		if c := k[i]; c <= ' ' || c == ':' || c >= 0x7f {
			return false
		}
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

// body is a response body; closing it reads a small remainder and returns the
// connection to the pool when the exchange ended cleanly. A body longer than
// maxResponseBody is never read to its end: its connection is closed instead.
type body struct {
	io.ReadCloser
	t    *transport
	c    *conn
	resp *http.Response
	stop func() bool
	once sync.Once
}

func (b *body) Close() error {
	b.once.Do(func() {
		// Reading the remainder ends at the connection's read limit; not so
		// closing the body from http.ReadResponse, which reads to EOF however
		// far that is. It is closed only once at EOF.
		var err error
		if b.resp.ContentLength > maxResponseBody {
			err = errBodyTooLarge // known to be too long: not worth reading
		} else {
			_, err = io.Copy(io.Discard, b.ReadCloser)
		}
		interrupted := !b.stop() // the context ended: the deadline is spoiled
		if err != nil || b.resp.Close || interrupted {
			b.c.Close()
			return
		}
		b.ReadCloser.Close()
		b.c.SetDeadline(time.Time{})
		b.t.put(b.c)
	})
	return nil
}

// get returns an idle connection to req's target, or dials one.
func (t *transport) get(req *http.Request) (c *conn, reused bool, err error) {
	key := req.URL.Scheme + "://" + canonicalAddr(req.URL)
	t.mu.Lock()
	if list := t.idle[key]; len(list) > 0 {
		c = list[len(list)-1]
		list[len(list)-1] = nil
		t.idle[key] = list[:len(list)-1]
		t.mu.Unlock()
		c.expire.Stop() // should it be firing, it no longer finds c in the pool
		return c, true, nil
	}
	t.mu.Unlock()
	c, err = t.connect(req.Context(), req.URL, key)
	return c, false, err
}

func (t *transport) connect(ctx context.Context, u *url.URL, key string) (*conn, error) {
	nc, err := t.dial(ctx, "tcp", canonicalAddr(u))
	if err != nil {
		return nil, err
	}
	if u.Scheme == "https" {
		cfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if t.tlsConfig != nil {
			cfg = t.tlsConfig.Clone()
		}
		if cfg.ServerName == "" { // server_name: verified and sent instead of the host
			cfg.ServerName = u.Hostname()
		}
		cfg.NextProtos = []string{"http/1.1"}
		tc := tls.Client(nc, cfg)
		hctx, cancel := context.WithTimeout(ctx, tlsHandshakeTimeout)
		defer cancel()
		if err := tc.HandshakeContext(hctx); err != nil {
			nc.Close()
			return nil, err
		}
		nc = tc
	}
	c := &conn{Conn: nc, key: key, lr: limitedReader{r: nc}, bw: bufio.NewWriterSize(nc, 16<<10)}
	c.br = bufio.NewReaderSize(&c.lr, 4<<10)
	return c, nil
}

func (t *transport) put(c *conn) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.idle[c.key]) >= t.maxIdle {
		c.Close()
		return
	}
	if t.idle == nil {
		t.idle = map[string][]*conn{}
	}
	t.idle[c.key] = append(t.idle[c.key], c)
	// Idle connections do not outlive idleTimeout, also to targets that are
	// never asked for again (a deleted subscription's).
	if c.expire == nil {
		c.expire = time.AfterFunc(t.idleTimeout, func() { t.expire(c) })
	} else {
		c.expire.Reset(t.idleTimeout)
	}
}

// expire closes c if it is still idle in the pool.
func (t *transport) expire(c *conn) {
	t.mu.Lock()
	list := t.idle[c.key]
	i := slices.Index(list, c)
	if i >= 0 {
		t.idle[c.key] = slices.Delete(list, i, i+1)
		if len(t.idle[c.key]) == 0 {
			delete(t.idle, c.key)
		}
	}
	t.mu.Unlock()
	if i >= 0 {
		c.Close()
	}
}

// CloseIdleConnections closes the pooled connections.
func (t *transport) CloseIdleConnections() {
	t.mu.Lock()
	idle := t.idle
	t.idle = nil
	t.mu.Unlock()
	for _, list := range idle {
		for _, c := range list {
			c.expire.Stop()
			c.Close()
		}
	}
	if f, ok := t.fallback.(interface{ CloseIdleConnections() }); ok {
		f.CloseIdleConnections()
	}
	if t.pinned != nil {
		t.pinned.closeIdle()
	}
}

// canonicalAddr is u's host:port, with the scheme's default port.
func canonicalAddr(u *url.URL) string {
	port := u.Port()
	if port == "" {
		port = "80"
		if u.Scheme == "https" {
			port = "443"
		}
	}
	return net.JoinHostPort(u.Hostname(), port)
}
