package sender

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// countingServer is a real endpoint that counts the connections it accepted.
type countingServer struct {
	*httptest.Server
	conns  atomic.Int32
	closed atomic.Int32
}

func newCountingServer(t *testing.T, tls bool, h http.HandlerFunc) *countingServer {
	s := &countingServer{Server: httptest.NewUnstartedServer(h)}
	s.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			s.conns.Add(1)
		case http.StateClosed:
			s.closed.Add(1)
		}
	}
	if tls {
		s.StartTLS()
	} else {
		s.Start()
	}
	t.Cleanup(s.Close)
	return s
}

func testTransport(s *httptest.Server) *transport {
	t := newTransport((&net.Dialer{}).DialContext, http.ProxyFromEnvironment, nil)
	t.proxy = func(*http.Request) (*url.URL, error) { return nil, nil }
	if s.TLS != nil {
		t.tlsConfig = s.Client().Transport.(*http.Transport).TLSClientConfig
	}
	return t
}

func post(t *testing.T, tr http.RoundTripper, target, body string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, target, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("webhook-id", "msg_1")
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatalf("RoundTrip: %v", err)
	}
	defer resp.Body.Close()
	got, _ := io.ReadAll(io.LimitReader(resp.Body, 1024)) // as Deliver: a prefix
	return resp, got
}

// echo answers 200 with the request's method, path, webhook-id and body.
func echo(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	io.WriteString(w, r.Method+" "+r.URL.RequestURI()+" "+r.Header.Get("webhook-id")+" "+string(b))
}

func TestTransportKeepsConnectionsAlive(t *testing.T) {
	for _, tls := range []bool{false, true} {
		srv := newCountingServer(t, tls, echo)
		tr := testTransport(srv.Server)
		for i := range 3 {
			resp, got := post(t, tr, srv.URL+"/hooks?x=1", `{"n":1}`)
			if resp.StatusCode != 200 || string(got) != `POST /hooks?x=1 msg_1 {"n":1}` {
				t.Fatalf("tls %v, request %d: %d %q", tls, i, resp.StatusCode, got)
			}
		}
		if n := srv.conns.Load(); n != 1 {
			t.Errorf("tls %v: %d connections for 3 sequential requests, want 1", tls, n)
		}
		tr.CloseIdleConnections()
	}
}

// A kept-alive connection the server has closed meanwhile costs no failed
// attempt: the request goes again on a fresh connection.
func TestTransportRetriesAConnectionClosedWhileIdle(t *testing.T) {
	srv := newCountingServer(t, false, echo)
	tr := testTransport(srv.Server)
	post(t, tr, srv.URL+"/a", "1")
	srv.CloseClientConnections()
	if _, got := post(t, tr, srv.URL+"/b", "2"); string(got) != "POST /b msg_1 2" {
		t.Fatalf("after the server closed the idle connection: %q", got)
	}
	if n := srv.conns.Load(); n != 2 {
		t.Errorf("%d connections, want 2", n)
	}
}

// A connection is only reused after a clean exchange: not after a large
// response body, nor when the server asked to close it.
func TestTransportDropsConnectionsThatCannotBeReused(t *testing.T) {
	srv := newCountingServer(t, false, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		switch r.URL.Path {
		case "/big":
			w.WriteHeader(http.StatusInternalServerError)
			w.Write(bytes.Repeat([]byte("x"), 2*maxResponseBody)) // chunked, beyond what is read
		case "/close":
			w.Header().Set("Connection", "close")
		}
	})
	tr := testTransport(srv.Server)
	for _, path := range []string{"/big", "/close", "/ok", "/ok"} {
		post(t, tr, srv.URL+path, "x")
	}
	if n := srv.conns.Load(); n != 3 {
		t.Errorf("%d connections, want 3 (one each for /big and /close, then one kept)", n)
	}
}

func TestTransportRefusesHeaderInjection(t *testing.T) {
	srv := newCountingServer(t, false, echo)
	tr := testTransport(srv.Server)
	req, _ := http.NewRequest(http.MethodPost, srv.URL, strings.NewReader("x"))
	req.Header.Set("webhook-id", "msg_1\r\nx-injected: yes")
	if _, err := tr.RoundTrip(req); err == nil || !strings.Contains(err.Error(), "invalid header") {
		t.Fatalf("err = %v, want invalid header", err)
	}
}

func TestTransportHonoursTheContext(t *testing.T) {
	release := make(chan struct{})
	srv := newCountingServer(t, false, func(w http.ResponseWriter, r *http.Request) { <-release })
	defer close(release)
	tr := testTransport(srv.Server)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL, strings.NewReader("x"))
	start := time.Now()
	_, err := tr.RoundTrip(req)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want the deadline", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("returned after %s", d)
	}
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if len(tr.idle) != 0 {
		t.Error("an interrupted connection went back to the pool")
	}
}

// A request whose context has ended is never sent, not even on a
// kept-alive connection (where the write used to race the context's
// AfterFunc and usually won): an epoch that ended sends nothing more.
func TestTransportSendsNothingForAnEndedContext(t *testing.T) {
	var requests atomic.Int32
	srv := newCountingServer(t, false, func(w http.ResponseWriter, r *http.Request) { requests.Add(1) })
	tr := testTransport(srv.Server)
	post(t, tr, srv.URL, "first") // leaves a kept-alive connection in the pool
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for range 20 {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL, strings.NewReader("late"))
		if _, err := tr.RoundTrip(req); !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
	}
	post(t, tr, srv.URL, "after") // the connection is still good
	if n := requests.Load(); n != 2 {
		t.Fatalf("the server got %d requests, want 2 (none with the ended context)", n)
	}
	if n := srv.conns.Load(); n != 1 {
		t.Errorf("%d connections, want 1", n)
	}
}

// Requests through a proxy go through net/http.
func TestTransportSendsThroughAProxy(t *testing.T) {
	var seen atomic.Value
	proxy := newCountingServer(t, false, func(w http.ResponseWriter, r *http.Request) {
		seen.Store(r.URL.String()) // a proxy gets the absolute URL
	})
	pu, _ := url.Parse(proxy.URL)
	tr := testTransport(proxy.Server)
	tr.proxy = http.ProxyURL(pu)
	tr.fallback = &http.Transport{Proxy: tr.proxy}
	post(t, tr, "http://receiver.example/hooks", "x")
	if got, _ := seen.Load().(string); got != "http://receiver.example/hooks" {
		t.Fatalf("proxy saw %q", got)
	}
}

// An idle connection is closed after idleTimeout even when its target is never
// asked for again (a deleted subscription's).
func TestTransportClosesIdleConnections(t *testing.T) {
	srv := newCountingServer(t, false, echo)
	tr := testTransport(srv.Server)
	tr.idleTimeout = 50 * time.Millisecond
	post(t, tr, srv.URL, "x")
	deadline := time.Now().Add(5 * time.Second)
	for srv.closed.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the idle connection is still open")
		}
		time.Sleep(10 * time.Millisecond) // poll interval
	}
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if len(tr.idle) != 0 {
		t.Errorf("pool still holds %v", tr.idle)
	}
}
