package sender

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/sender/sendertest"
	"github.com/walhook/walhook/sender/ssrf"
)

// localhostTLS is a server certificate for the name localhost, and a pool
// that trusts it: httptest's certificate does not name localhost.
func localhostTLS(t *testing.T) (tls.Certificate, *x509.CertPool) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "localhost"},
		DNSNames: []string{"localhost"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA: true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool
}

// proxyTargets are a plain and a TLS endpoint on 127.0.0.1, each named by
// localhost in its URL; the Sender returned goes through proxy and trusts the
// TLS endpoint's certificate.
func proxyTargets(t *testing.T, guard *ssrf.Guard, proxy *url.URL) (s *Sender, plain, secure *sendertest.Server) {
	cert, pool := localhostTLS(t)
	plain = sendertest.NewServer(t, nil)
	secure = sendertest.NewTLSServer(t, nil, cert)
	s = newSender(guard, http.ProxyURL(proxy), Config{})
	s.guarded.pinned.https.TLSClientConfig = &tls.Config{RootCAs: pool}
	t.Cleanup(s.Close)
	return s, plain, secure
}

func byName(raw string) string {
	return strings.Replace(raw, "127.0.0.1", "localhost", 1) + "/hooks?q=1"
}

func dynamicBatch(target string, big bool) *outbox.Batch {
	sub := &outbox.Subscription{ID: "dyn", Events: []string{"*"}, TargetURL: target,
		Secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", Delivery: outbox.DefaultDeliveryOptions()}
	sub.Delivery.Timeout = 10 * time.Second
	ev := outbox.Event{ID: "1", Type: "contact.updated", Payload: []byte(`{}`)}
	if big {
		ev.Payload = []byte(`"` + strings.Repeat("x", 2*maxLeanBody) + `"`)
	}
	return outbox.NewBatch(sub, ev)
}

// Through a proxy, a dynamic subscription's request goes through a tunnel to
// the address the guard checked, never to the name, which the proxy would
// resolve again; inside, Host and TLS still name the target.
func TestProxiedRequestsGoToTheCheckedAddress(t *testing.T) {
	proxy := sendertest.NewProxy(t, "")
	pu, _ := url.Parse(proxy.URL)
	pu.User = url.UserPassword("walhook", "pr0xy-s3cret")
	guard, _ := ssrf.New([]string{"127.0.0.1"})
	s, plain, secure := proxyTargets(t, guard, pu)
	_, plainPort, _ := net.SplitHostPort(plain.Listener.Addr().String())
	_, securePort, _ := net.SplitHostPort(secure.Listener.Addr().String())
	auth := "Basic " + base64.StdEncoding.EncodeToString([]byte("walhook:pr0xy-s3cret"))

	for _, big := range []bool{false, true} {
		if err := s.Deliver(context.Background(), dynamicBatch(byName(plain.URL), big)); err != nil {
			t.Fatalf("http through the proxy (big %v): %v", big, err)
		}
		if err := s.Deliver(context.Background(), dynamicBatch(byName(secure.URL), big)); err != nil {
			t.Fatalf("https through the proxy (big %v): %v", big, err)
		}
	}
	if len(plain.Requests()) != 2 || len(secure.Requests()) != 2 {
		t.Fatalf("%d and %d requests arrived, want 2 each", len(plain.Requests()), len(secure.Requests()))
	}
	var sawPlain, sawSecure bool
	for _, a := range proxy.Asked() {
		switch a.Method {
		case http.MethodConnect:
			switch a.Target {
			case "127.0.0.1:" + plainPort:
				sawPlain = true
			case "127.0.0.1:" + securePort:
				sawSecure = true
			default:
				t.Errorf("CONNECT %s, want a checked address: 127.0.0.1:%s or :%s", a.Target, plainPort, securePort)
			}
			if a.ProxyAuth != auth {
				t.Errorf("CONNECT %s with Proxy-Authorization %q", a.Target, a.ProxyAuth)
			}
		default:
			t.Errorf("proxy asked for %s %s, want only tunnels", a.Method, a.Target)
		}
	}
	// Inside the tunnel the request is as sent directly: Host names the target.
	for _, r := range append(plain.Requests(), secure.Requests()...) {
		if !strings.HasPrefix(r.Host, "localhost:") {
			t.Errorf("the target saw Host %q", r.Host)
		}
	}
	if !sawPlain || !sawSecure {
		t.Fatalf("the proxy saw %+v", proxy.Asked())
	}
}

// An https:// proxy: the tunnel's CONNECT goes inside TLS to the proxy, the
// target's TLS inside the tunnel.
func TestThroughAnHTTPSProxy(t *testing.T) {
	proxy := sendertest.NewTLSProxy(t, "")
	pu, _ := url.Parse(proxy.URL)
	guard, _ := ssrf.New([]string{"127.0.0.1"})
	s, plain, secure := proxyTargets(t, guard, pu)
	s.guarded.pinned.proxyTLS = proxy.Client().Transport.(*http.Transport).TLSClientConfig
	for _, target := range []string{byName(plain.URL), byName(secure.URL)} {
		if err := s.Deliver(context.Background(), dynamicBatch(target, false)); err != nil {
			t.Fatalf("%s through an https proxy: %v", target, err)
		}
	}
	if a := proxy.Asked(); len(a) != 2 || a[0].Method != http.MethodConnect || !strings.HasPrefix(a[1].Target, "127.0.0.1:") {
		t.Errorf("the proxy was asked %+v", a)
	}
}

// A name that resolves to a forbidden address when the request is sent (DNS
// rebinding: it was public when the subscription was made) is refused before
// the proxy is asked, for good, and without the proxy's credentials in the
// reason. The proxy itself, here on 127.0.0.2, is the operator's: it is
// allowed, the target behind it is not.
func TestProxyKeepsTheSSRFGuard(t *testing.T) {
	proxy := sendertest.NewProxy(t, "127.0.0.2:0")
	pu, _ := url.Parse(proxy.URL)
	pu.User = url.UserPassword("walhook", "pr0xy-s3cret")
	guard, _ := ssrf.New([]string{"127.0.0.2"})
	s, plain, secure := proxyTargets(t, guard, pu)
	for _, target := range []string{byName(plain.URL), byName(secure.URL), plain.URL, secure.URL} {
		for _, big := range []bool{false, true} {
			err := s.Deliver(context.Background(), dynamicBatch(target, big))
			var de *DeliveryError
			if !errors.As(err, &de) || de.Retryable() || !errors.Is(err, ssrf.ErrForbidden) {
				t.Fatalf("%s (big %v) through the proxy: err = %v, want a permanent \"target not allowed\"", target, big, err)
			}
			if strings.Contains(err.Error(), "s3cret") {
				t.Errorf("reason leaks the proxy's password: %s", err)
			}
		}
	}
	if n := len(plain.Requests()) + len(secure.Requests()); n != 0 {
		t.Fatalf("%d requests reached loopback through the proxy", n)
	}
	if a := proxy.Asked(); len(a) != 0 {
		t.Errorf("the proxy was asked %+v", a)
	}
}

// Static subscriptions are the operator's: through the proxy as they are.
func TestStaticTargetsGoThroughTheProxyAsTheyAre(t *testing.T) {
	proxy := sendertest.NewProxy(t, "")
	pu, _ := url.Parse(proxy.URL)
	s, plain, _ := proxyTargets(t, &ssrf.Guard{}, pu)
	b := dynamicBatch(byName(plain.URL), false)
	b.Subscription.Static = true
	if err := s.Deliver(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	if a := proxy.Asked(); len(a) != 1 || !strings.HasPrefix(a[0].Target, "http://localhost:") {
		t.Errorf("the proxy was asked %+v", a)
	}
}

// A proxy that never answers CONNECT, or answers with endless headers, costs
// an attempt its timeout at most.
func TestAHostileProxyIsBounded(t *testing.T) {
	guard, _ := ssrf.New([]string{"127.0.0.1"})
	for _, tt := range []struct {
		name   string
		behave sendertest.Behavior
		want   string
	}{
		{"hang", sendertest.Hang(), "deadline exceeded"},
		{"huge headers", sendertest.HugeHeader(200, 100<<20), "response headers exceed 64 KiB"},
		{"refusal", sendertest.Raw("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"), "proxy answered CONNECT with 403"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			proxy := sendertest.NewHostile(t, tt.behave)
			s := newSender(guard, http.ProxyURL(&url.URL{Scheme: "http", Host: proxy.Addr()}), Config{})
			s.guarded.pinned.connectTimeout = 2 * time.Second // the dial outlives the attempt this long
			defer s.Close()
			b := dynamicBatch("http://127.0.0.1:1/hooks", false)
			b.Subscription.Delivery.Timeout = time.Second
			start := time.Now()
			err := s.Deliver(context.Background(), b)
			var de *DeliveryError
			if !errors.As(err, &de) || !de.Retryable() || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want a retryable %q", err, tt.want)
			}
			if d := time.Since(start); d > time.Second+700*time.Millisecond {
				t.Errorf("the attempt took %s with a timeout of 1s", d)
			}
			proxy.WaitEnded(t, 1, 10*time.Second)
		})
	}
}
