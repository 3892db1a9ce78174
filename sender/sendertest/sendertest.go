// Package sendertest is a real HTTP endpoint for tests: it records every request
// walhook sends, answers as a test scripts it, and lets tests wait for requests
// without sleeping. Hostile is a target that misbehaves on purpose (huge
// headers, endless bodies, trickles, hangs); Proxy is a forward proxy.
package sendertest

import (
	"crypto/tls"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

// Request is one recorded request.
type Request struct {
	Host   string // the Host header
	Header http.Header
	Body   []byte
	At     time.Time
	Status int // what the endpoint answered
	// ClientCert is the common name of the client certificate the request
	// came with over TLS; "" without one.
	ClientCert string
}

// Responder decides the answer to the n-th request (0-based).
type Responder func(n int, r *Request) (status int, header http.Header)

// Server is a recording endpoint.
type Server struct {
	*httptest.Server
	mu      sync.Mutex
	reqs    []Request
	changed chan struct{} // closed and replaced on every request
	respond Responder
}

// NewServer starts an endpoint that answers with respond (204 for all when nil)
// and stops when t ends.
func NewServer(t testing.TB, respond Responder) *Server {
	s := newServer(respond)
	s.Start()
	t.Cleanup(s.Close)
	return s
}

// NewTLSServer is NewServer over TLS with cert (httptest's own when cert is
// empty; it names 127.0.0.1 and example.com).
func NewTLSServer(t testing.TB, respond Responder, cert tls.Certificate) *Server {
	s := newServer(respond)
	if cert.Certificate != nil {
		s.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
	s.StartTLS()
	t.Cleanup(s.Close)
	return s
}

// NewTLSServerConfig is NewServer over TLS with cfg: a test's own
// certificates, client certificates required (mTLS), versions.
func NewTLSServerConfig(t testing.TB, respond Responder, cfg *tls.Config) *Server {
	s := newServer(respond)
	s.TLS = cfg
	s.StartTLS()
	t.Cleanup(s.Close)
	return s
}

func newServer(respond Responder) *Server {
	if respond == nil {
		respond = func(int, *Request) (int, http.Header) { return http.StatusNoContent, nil }
	}
	s := &Server{changed: make(chan struct{}), respond: respond}
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	return s
}

// URL of the endpoint's /hooks path.
func (s *Server) HooksURL() string { return s.URL + "/hooks" }

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return // the sender went away mid-request (killed): no endpoint sees this request
	}
	req := Request{Host: r.Host, Header: r.Header.Clone(), Body: body, At: time.Now()}
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		req.ClientCert = r.TLS.PeerCertificates[0].Subject.CommonName
	}
	s.mu.Lock()
	n := len(s.reqs)
	s.mu.Unlock()
	status, header := s.respond(n, &req)
	req.Status = status
	for k, v := range header {
		w.Header()[k] = v
	}
	w.WriteHeader(status)
	s.mu.Lock()
	s.reqs = append(s.reqs, req)
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
}

// Requests returns a copy of what was received so far.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.reqs...)
}

// Wait blocks until cond holds for the requests received, or fails t after timeout.
func (s *Server) Wait(t testing.TB, timeout time.Duration, what string, cond func([]Request) bool) []Request {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		reqs := append([]Request(nil), s.reqs...)
		changed := s.changed
		s.mu.Unlock()
		if cond(reqs) {
			return reqs
		}
		select {
		case <-changed:
		case <-deadline.C:
			t.Fatalf("sendertest: timed out after %s waiting for %s; got %d requests", timeout, what, len(reqs))
			return nil
		}
	}
}

// WaitN waits until at least n requests arrived.
func (s *Server) WaitN(t testing.TB, n int, timeout time.Duration) []Request {
	t.Helper()
	return s.Wait(t, timeout, "requests", func(r []Request) bool { return len(r) >= n })
}

// Delivered keeps the requests answered 2xx.
func Delivered(reqs []Request) []Request {
	var out []Request
	for _, r := range reqs {
		if r.Status >= 200 && r.Status < 300 {
			out = append(out, r)
		}
	}
	return out
}
