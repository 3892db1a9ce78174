package sender

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"time"
)

// pinnedProxy sends dynamic subscriptions' requests through the proxy that
// HTTP_PROXY or HTTPS_PROXY names without giving up the SSRF guard. The
// guard's dial-time check would see only the proxy, which then resolves the
// target's name itself, perhaps to a forbidden address (DNS rebinding). So the
// target's name is resolved and checked when a connection is made
// (ssrf.Guard.Pin), and the proxy is asked for a tunnel to the checked
// address, never to the name: CONNECT 203.0.113.7:443. Inside the tunnel the
// request is what it would be without a proxy: for https, TLS verifies the
// certificate for the name and sends it as SNI; for http, Host is the name.
//
// Plain http goes through CONNECT too, not in absolute form to the address
// (POST http://203.0.113.7/hooks, Host: the name): a proxy must replace Host
// with the request target's host (RFC 9112 §3.2.2), so the receiver would see
// the address as its Host. A proxy must then allow CONNECT to the ports http
// targets use (Squid allows only 443 by default); docs/security.md says so.
//
// The proxy itself is the operator's and is dialed without the guard.
type pinnedProxy struct {
	pin      func(ctx context.Context, host string) (string, error)
	proxy    func(*http.Request) (*url.URL, error)
	dial     func(ctx context.Context, network, addr string) (net.Conn, error) // to the proxy
	proxyTLS *tls.Config                                                       // for an https:// proxy; nil: the system's roots
	// connectTimeout bounds making a tunnel: net/http lets a dial go on after
	// the attempt that asked for it has ended (for the next one to use), and
	// without a deadline; a proxy that never answers would hold it forever.
	connectTimeout time.Duration
	http           *http.Transport // http targets, through tunnels
	https          *http.Transport // https targets, through tunnels
}

func newPinnedProxy(pin func(context.Context, string) (string, error), proxy func(*http.Request) (*url.URL, error),
	dial func(ctx context.Context, network, addr string) (net.Conn, error), targetTLS *tls.Config) *pinnedProxy {
	pp := &pinnedProxy{pin: pin, proxy: proxy, dial: dial, connectTimeout: 10 * time.Second}
	// Proxy nil: net/http dials the target through dialTunnel, which knows the
	// target's scheme only from the transport it belongs to.
	pp.http = newNetHTTP(func(ctx context.Context, _, addr string) (net.Conn, error) { return pp.dialTunnel(ctx, "http", addr) }, nil, nil)
	pp.https = newNetHTTP(func(ctx context.Context, _, addr string) (net.Conn, error) { return pp.dialTunnel(ctx, "https", addr) }, nil, targetTLS)
	return pp
}

// errProxyScheme: a socks5 proxy would be handed the name, not the address.
var errProxyScheme = errors.New("only http:// and https:// proxies keep the SSRF guard")

func (pp *pinnedProxy) roundTrip(req *http.Request, p *url.URL) (*http.Response, error) {
	if p.Scheme != "http" && p.Scheme != "https" {
		closeBody(req)
		return nil, errProxyScheme
	}
	if req.URL.Scheme == "https" {
		return viaNetHTTP(pp.https, req)
	}
	return viaNetHTTP(pp.http, req)
}

// dialTunnel dials for the tunnel transports: addr is the target's host:port;
// the connection returned is a tunnel to its checked address.
func (pp *pinnedProxy) dialTunnel(ctx context.Context, scheme, addr string) (net.Conn, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, pp.connectTimeout)
	defer cancel()
	p, err := pp.proxy(&http.Request{URL: &url.URL{Scheme: scheme, Host: addr}}) // as RoundTrip decided
	if err != nil {
		return nil, err
	}
	if p == nil || p.Scheme != "http" && p.Scheme != "https" {
		return nil, errProxyScheme
	}
	pinned, err := pp.pin(ctx, host)
	if err != nil {
		return nil, err
	}
	c, err := pp.dial(ctx, "tcp", canonicalAddr(p))
	if err != nil {
		return nil, fmt.Errorf("proxy: %w", err)
	}
	if p.Scheme == "https" {
		cfg := &tls.Config{}
		if pp.proxyTLS != nil {
			cfg = pp.proxyTLS.Clone()
		}
		cfg.ServerName = p.Hostname()
		tc := tls.Client(c, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			c.Close()
			return nil, fmt.Errorf("proxy: %w", err)
		}
		c = tc
	}
	if err := connectTunnel(ctx, c, p, net.JoinHostPort(pinned, port)); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// connectTunnel asks the proxy on c for a tunnel to target, an address.
func connectTunnel(ctx context.Context, c net.Conn, p *url.URL, target string) error {
	deadline, _ := ctx.Deadline()
	c.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(aLongTimeAgo) })
	head := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n"
	if p.User != nil {
		password, _ := p.User.Password()
		head += "Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte(p.User.Username()+":"+password)) + "\r\n"
	}
	if _, err := c.Write([]byte(head + "\r\n")); err != nil {
		stop()
		return fmt.Errorf("proxy: %w", ctxErr(ctx, err))
	}
	lr := &limitedReader{r: c, n: maxResponseHeader}
	br := bufio.NewReaderSize(lr, 1<<10)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect, URL: &url.URL{Host: target}})
	interrupted := !stop()
	switch {
	case err != nil && lr.n <= 0:
		return fmt.Errorf("proxy: %w", errHeadersTooLarge)
	case err != nil:
		return fmt.Errorf("proxy: %w", ctxErr(ctx, err))
	case interrupted:
		return ctx.Err()
	case resp.StatusCode != http.StatusOK:
		return fmt.Errorf("proxy answered CONNECT with %d", resp.StatusCode)
	case br.Buffered() > 0:
		return errors.New("proxy sent data into the tunnel unasked")
	}
	c.SetDeadline(time.Time{})
	return nil
}

func (pp *pinnedProxy) closeIdle() {
	pp.http.CloseIdleConnections()
	pp.https.CloseIdleConnections()
}
