package ssrf

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

func TestCheckURLRefusesEveryForbiddenSpelling(t *testing.T) {
	g, _ := New(nil)
	for _, u := range []string{
		"http://127.0.0.1/", "http://127.1/", "http://2130706433/", "http://0x7f000001/", "http://0177.0.0.1/",
		"http://0x7f.0.0.1/", "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/",
		"http://localhost/", "http://LOCALHOST./", "http://api.localhost/",
		"http://10.1.2.3/", "http://172.16.0.1/", "http://192.168.1.1/", "http://100.64.0.1/",
		"http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/", "http://[fd00::1]/", "http://[fc00::1]/",
		"http://224.0.0.1/", "http://[ff02::1]/", "http://0.0.0.0/", "http://[::]/", "http://0/",
		"http://[64:ff9b::a9fe:a9fe]/", "http://[2002:7f00:1::]/", "http://255.255.255.255/",
		"ftp://example.com/", "file:///etc/passwd", "gopher://127.0.0.1/", "http://user:pw@example.com/",
	} {
		if err := g.CheckURL(context.Background(), u); err == nil {
			t.Errorf("%s allowed", u)
		}
	}
}

func TestCheckURLAllowsPublicAndAllowTargets(t *testing.T) {
	g, err := New([]string{"10.0.0.0/8", "receiver.internal", "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range []string{"https://93.184.216.34/hooks", "http://[2606:4700::1]/", "http://10.9.9.9/", "http://receiver.internal:8080/h", "http://127.0.0.1:9/"} {
		if err := g.CheckURL(context.Background(), u); err != nil {
			t.Errorf("%s refused: %v", u, err)
		}
	}
	if err := g.CheckURL(context.Background(), "http://192.168.0.1/"); err == nil {
		t.Error("allow_targets opened more than it names")
	}
	if _, err := New([]string{"not a/cidr"}); err == nil {
		t.Error("New accepted a bad entry")
	}
}

// TestDialRefusesForbiddenIPs: the check at connect time stops a target whose
// name resolves somewhere forbidden (DNS rebinding), here "localhost".
func TestDialRefusesForbiddenIPs(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	defer srv.Close()
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	g, _ := New(nil)
	client := &http.Client{Transport: &http.Transport{DialContext: g.DialContext(&net.Dialer{Timeout: time.Second})}}
	for _, host := range []string{"127.0.0.1", "localhost"} {
		_, err := client.Get("http://" + net.JoinHostPort(host, port) + "/")
		if !errors.Is(err, ErrForbidden) {
			t.Errorf("dial %s: err = %v, want ErrForbidden", host, err)
		}
	}
	open, _ := New([]string{"127.0.0.0/8"})
	client = &http.Client{Transport: &http.Transport{DialContext: open.DialContext(&net.Dialer{Timeout: time.Second})}}
	resp, err := client.Get(srv.URL)
	if err != nil {
		t.Fatalf("allowed dial failed: %v", err)
	}
	resp.Body.Close()
}

// Pin resolves and checks at send time, like the dial-time check, and gives
// one spelling of the address to send to.
func TestPin(t *testing.T) {
	ctx := context.Background()
	g, _ := New([]string{"127.0.0.0/8", "receiver.internal"})
	for host, want := range map[string]string{
		"localhost": "127.0.0.1", "0x7f.1": "127.0.0.1", "2130706433": "127.0.0.1",
		"receiver.internal": "receiver.internal", "93.184.216.34": "93.184.216.34",
	} {
		if got, err := g.Pin(ctx, host); err != nil || got != want {
			t.Errorf("Pin(%s) = %q, %v; want %q", host, got, err, want)
		}
	}
	closed, _ := New(nil)
	for _, host := range []string{"localhost", "127.1", "::1", "169.254.169.254"} {
		if _, err := closed.Pin(ctx, host); !errors.Is(err, ErrForbidden) {
			t.Errorf("Pin(%s): err = %v, want ErrForbidden", host, err)
		}
	}
}
