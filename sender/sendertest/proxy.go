package sendertest

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

// Proxy is a real forward proxy, as HTTP_PROXY names one: absolute-form
// requests for http targets, CONNECT tunnels for https ones. It connects to
// whatever it is asked for, resolving names itself, as proxies do; it records
// what it was asked.
type Proxy struct {
	*httptest.Server
	forward *http.Transport

	mu      sync.Mutex
	asked   []Asked
	tunnels map[net.Conn]bool
	wg      sync.WaitGroup
}

// Asked is one request the proxy received.
type Asked struct {
	Method    string // CONNECT for a tunnel
	Target    string // the absolute URL, or CONNECT's host:port
	Host      string // the Host header
	ProxyAuth string // the Proxy-Authorization header
}

// NewProxy starts a proxy on listen ("127.0.0.1:0" when empty) that stops when
// t ends.
func NewProxy(t testing.TB, listen string) *Proxy {
	p := newProxy(t, listen)
	p.Start()
	t.Cleanup(p.Close)
	return p
}

// NewTLSProxy is NewProxy spoken to over TLS (an https:// proxy), with
// httptest's certificate; Client() trusts it.
func NewTLSProxy(t testing.TB, listen string) *Proxy {
	p := newProxy(t, listen)
	p.StartTLS()
	t.Cleanup(p.Close)
	return p
}

func newProxy(t testing.TB, listen string) *Proxy {
	if listen == "" {
		listen = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		t.Fatalf("sendertest: proxy listen: %v", err)
	}
	p := &Proxy{forward: &http.Transport{Proxy: nil}, tunnels: map[net.Conn]bool{}}
	p.Server = &httptest.Server{Listener: ln, Config: &http.Server{Handler: http.HandlerFunc(p.serve)}}
	return p
}

// Close stops the proxy, its tunnels included.
func (p *Proxy) Close() {
	p.Server.Close()
	p.mu.Lock()
	for c := range p.tunnels {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	p.forward.CloseIdleConnections()
}

// Asked returns what the proxy was asked so far.
func (p *Proxy) Asked() []Asked {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Asked(nil), p.asked...)
}

func (p *Proxy) serve(w http.ResponseWriter, r *http.Request) {
	a := Asked{Method: r.Method, Target: r.RequestURI, Host: r.Host, ProxyAuth: r.Header.Get("Proxy-Authorization")}
	p.mu.Lock()
	p.asked = append(p.asked, a)
	p.mu.Unlock()
	if r.Method == http.MethodConnect {
		p.tunnel(w, r.RequestURI)
		return
	}
	if r.URL.Host == "" {
		http.Error(w, "not a proxy request", http.StatusBadRequest)
		return
	}
	out := r.Clone(r.Context())
	out.RequestURI = ""
	out.Header.Del("Proxy-Authorization")
	resp, err := p.forward.RoundTrip(out)
	if err != nil {
		http.Error(w, "proxy: "+err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	for k, v := range resp.Header {
		w.Header()[k] = v
	}
	w.WriteHeader(resp.StatusCode)
	io.Copy(w, resp.Body)
}

func (p *Proxy) tunnel(w http.ResponseWriter, target string) {
	up, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		http.Error(w, "proxy: "+err.Error(), http.StatusBadGateway)
		return
	}
	down, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		up.Close()
		return
	}
	p.mu.Lock()
	p.tunnels[up], p.tunnels[down] = true, true
	p.mu.Unlock()
	if _, err := io.WriteString(down, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		up.Close()
		down.Close()
		return
	}
	splice := func(dst, src net.Conn) {
		io.Copy(dst, src)
		dst.Close()
		src.Close()
		p.mu.Lock()
		delete(p.tunnels, dst)
		delete(p.tunnels, src)
		p.mu.Unlock()
	}
	p.wg.Go(func() { splice(up, down) })
	p.wg.Go(func() { splice(down, up) })
}
