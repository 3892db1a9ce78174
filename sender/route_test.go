package sender_test

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/sender"
	"github.com/walhook/walhook/sender/sendertest"
	"github.com/walhook/walhook/sender/ssrf"
)

func send(s *sender.Sender, sub *outbox.Subscription) error {
	return s.Deliver(context.Background(), outbox.NewBatch(sub, testEvent()))
}

func TestMTLSClientCertificateIsSentAndReloaded(t *testing.T) {
	serverCA, clientCA := sendertest.NewCA(t, "server-ca"), sendertest.NewCA(t, "client-ca")
	srv := sendertest.NewMTLSServer(t, nil, serverCA, clientCA)
	dir := t.TempDir()
	certFile, keyFile, caFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"), filepath.Join(dir, "ca.crt")
	sendertest.WritePEM(t, clientCA.Issue(t, "client-1"), certFile, keyFile)
	serverCA.WriteCA(t, caFile)

	var logs syncLog
	s := sender.New(&ssrf.Guard{}, sender.Config{Logger: zerolog.New(&logs)})
	t.Cleanup(s.Close)
	sub := testSub(srv.HooksURL())
	if err := send(s, sub); err == nil {
		t.Fatal("a server requiring a client certificate (and not in the system's roots) accepted a request without tls settings")
	}
	sub.Delivery.TLS = outbox.TLSOptions{ClientCertFile: certFile, ClientKeyFile: keyFile, CAFile: caFile}
	if err := send(s, sub); err != nil {
		t.Fatalf("with the client certificate: %v", err)
	}
	if got := srv.Requests()[len(srv.Requests())-1].ClientCert; got != "client-1" {
		t.Fatalf("the server saw client certificate %q, want client-1", got)
	}

	// cert-manager rotates the certificate: later connections use the new
	// one, without a restart.
	sendertest.WritePEM(t, clientCA.Issue(t, "client-2"), certFile, keyFile)
	deadline := time.Now().Add(15 * time.Second)
	for srv.Requests()[len(srv.Requests())-1].ClientCert != "client-2" {
		if time.Now().After(deadline) {
			t.Fatal("the rotated client certificate was not picked up within 15s")
		}
		if err := send(s, sub); err != nil {
			t.Fatalf("during the rotation: %v", err)
		}
	}

	// A broken file keeps the last good settings.
	if err := os.WriteFile(keyFile, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(15 * time.Second)
	for !strings.Contains(logs.String(), "tls files cannot be read") {
		if time.Now().After(deadline) {
			t.Fatalf("the broken key file was never reported:\n%s", logs.String())
		}
		if err := send(s, sub); err != nil {
			t.Fatalf("with a broken key file the last good one must go on: %v", err)
		}
	}
	// Once for the broken file however often it is checked (a check between
	// the two renames of the rotation may have logged a mismatch as well).
	for range 3 {
		send(s, sub)
	}
	if n := strings.Count(logs.String(), "PEM data in key input"); n != 1 || !strings.Contains(logs.String(), "tls files read again") {
		t.Errorf("logged %d times (want once), and the reload must be logged:\n%s", n, logs.String())
	}
}

type syncLog struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *syncLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *syncLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func TestTLSServerNameAndMinimumVersion(t *testing.T) {
	ca := sendertest.NewCA(t, "ca")
	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.crt")
	ca.WriteCA(t, caFile)
	s := sender.New(&ssrf.Guard{}, sender.Config{})
	t.Cleanup(s.Close)

	// The certificate names hooks.internal, not 127.0.0.1: server_name says
	// which name to verify and send.
	named := sendertest.NewTLSServerConfig(t, nil, &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "s", "hooks.internal")}})
	sub := testSub(named.HooksURL())
	sub.Delivery.TLS = outbox.TLSOptions{CAFile: caFile}
	if err := send(s, sub); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("a certificate for another name was accepted: %v", err)
	}
	sub.Delivery.TLS.ServerName = "hooks.internal"
	if err := send(s, sub); err != nil {
		t.Fatalf("with server_name: %v", err)
	}

	// TLS 1.1 is refused, with or without tls settings.
	old := sendertest.NewTLSServerConfig(t, nil, &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "s", "127.0.0.1")},
		MaxVersion: tls.VersionTLS11})
	for _, o := range []outbox.TLSOptions{{CAFile: caFile}, {}} {
		sub := testSub(old.HooksURL())
		sub.Delivery.TLS = o
		if err := send(s, sub); err == nil || !strings.Contains(err.Error(), "version") {
			t.Errorf("tls %+v: a TLS 1.1 server was accepted: %v", o, err)
		}
	}
}

func TestLoadTLSNamesTheKey(t *testing.T) {
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk.pem")
	os.WriteFile(junk, []byte("junk"), 0o600)
	for _, tc := range []struct {
		o    outbox.TLSOptions
		want string
	}{
		{outbox.TLSOptions{ClientCertFile: filepath.Join(dir, "missing"), ClientKeyFile: junk}, "tls.client_cert_file: open"},
		{outbox.TLSOptions{ClientCertFile: junk, ClientKeyFile: filepath.Join(dir, "missing")}, "tls.client_key_file: open"},
		{outbox.TLSOptions{ClientCertFile: junk, ClientKeyFile: junk}, "tls.client_cert_file, tls.client_key_file: not a certificate"},
		{outbox.TLSOptions{CAFile: junk}, "tls.ca_file: " + junk + " holds no PEM certificate"},
	} {
		if _, err := sender.LoadTLS(tc.o); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("LoadTLS(%+v) = %v, want %q", tc.o, err, tc.want)
		}
	}
}

func TestProxyURLPerSubscription(t *testing.T) {
	proxy := sendertest.NewProxy(t, "")
	target := sendertest.NewServer(t, nil)
	guard, err := ssrf.New([]string{"127.0.0.1/32"})
	if err != nil {
		t.Fatal(err)
	}
	s := sender.New(guard, sender.Config{})
	t.Cleanup(s.Close)
	pu, _ := url.Parse(proxy.URL)
	pu.User = url.UserPassword("walhook", "pr0xy-pass")

	// Static: through the proxy as it is, absolute-form for http.
	static := testSub(target.HooksURL())
	static.Delivery.ProxyURL = pu.String()
	if err := send(s, static); err != nil {
		t.Fatalf("static through proxy_url: %v", err)
	}
	// Dynamic: a tunnel to the checked address (the SSRF rule).
	dynamic := testSub(strings.Replace(target.HooksURL(), "127.0.0.1", "localhost", 1))
	dynamic.Static, dynamic.Delivery.ProxyURL = false, pu.String()
	if err := send(s, dynamic); err != nil {
		t.Fatalf("dynamic through proxy_url: %v", err)
	}
	// Without proxy_url: straight to the target (the environment names no
	// proxy for loopback).
	if err := send(s, testSub(target.HooksURL())); err != nil {
		t.Fatal(err)
	}
	asked := proxy.Asked()
	if len(asked) != 2 {
		t.Fatalf("the proxy was asked %d times, want 2: %+v", len(asked), asked)
	}
	_, port, _ := net.SplitHostPort(target.Listener.Addr().String())
	if a := asked[0]; a.Method != "POST" || a.Target != target.HooksURL() || a.ProxyAuth == "" {
		t.Errorf("static: the proxy was asked %+v, want POST %s in absolute form with Proxy-Authorization", a, target.HooksURL())
	}
	if a := asked[1]; a.Method != "CONNECT" || (a.Target != "127.0.0.1:"+port && a.Target != "[::1]:"+port) || a.ProxyAuth == "" {
		t.Errorf("dynamic: the proxy was asked %+v, want CONNECT to the checked address with Proxy-Authorization", a)
	}
	if reqs := target.Requests(); len(reqs) != 3 || !strings.HasPrefix(reqs[1].Host, "localhost:") {
		t.Errorf("the target got %d requests; the tunneled one's Host %q must name the target", len(reqs), reqs[1].Host)
	}
}

func TestMaxInFlightPerHostAcrossSubscriptions(t *testing.T) {
	var inFlight, most atomic.Int32
	gate := make(chan struct{})
	srv := sendertest.NewServer(t, func(int, *sendertest.Request) (int, http.Header) {
		n := inFlight.Add(1)
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
		<-gate
		inFlight.Add(-1)
		return http.StatusNoContent, nil
	})
	s := sender.New(&ssrf.Guard{}, sender.Config{MaxInFlightPerHost: 2})
	t.Cleanup(s.Close)
	errs := make(chan error, 6)
	for i := range 6 {
		sub := testSub(srv.URL + "/hooks/" + string(rune('a'+i))) // six subscriptions, one host
		sub.ID = "s" + string(rune('a'+i))
		go func() { errs <- send(s, sub) }()
	}
	deadline := time.Now().Add(10 * time.Second)
	for inFlight.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatal("two requests never got in flight")
		}
		runtime.Gosched()
	}
	for range 6 {
		gate <- struct{}{}
	}
	for range 6 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if m := most.Load(); m != 2 {
		t.Fatalf("at most %d requests were in flight to the host, want 2", m)
	}
	// The wait is bounded by the caller's context, not left hanging.
	gate2, started := make(chan struct{}), make(chan struct{}, 1)
	slow := sendertest.NewServer(t, func(int, *sendertest.Request) (int, http.Header) {
		started <- struct{}{}
		<-gate2
		return 204, nil
	})
	first := make(chan error, 1)
	one := sender.New(&ssrf.Guard{}, sender.Config{MaxInFlightPerHost: 1})
	t.Cleanup(func() { close(gate2); <-first; one.Close() }) // before the server's Close, which waits for its handler
	go func() { first <- send(one, testSub(slow.HooksURL())) }()
	<-started
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	err := one.Deliver(ctx, outbox.NewBatch(testSub(slow.HooksURL()), testEvent()))
	var de *sender.DeliveryError
	if !errors.As(err, &de) || !de.Retryable() || !strings.Contains(err.Error(), "max_in_flight_per_host") {
		t.Fatalf("waiting past the context: %v", err)
	}
}
