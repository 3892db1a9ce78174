package sender_test

import (
	"context"
	"errors"
	"net/http"
	"reflect"
	"testing"
	"time"

	"github.com/walhook/walhook/sender"
	"github.com/walhook/walhook/sender/sendertest"
	"github.com/walhook/walhook/sender/ssrf"
)

// outcome is what the core sees of an attempt.
type outcome struct {
	OK         bool
	Status     int
	Retryable  bool
	RetryAfter time.Duration
	Reason     string // for an answer with a status; network failures may word it differently
	Timeout    bool
}

func attempt(t *testing.T, s *sender.Sender, target string, timeout time.Duration) outcome {
	t.Helper()
	err := s.Deliver(context.Background(), hostileBatch(target, false, timeout))
	if err == nil {
		return outcome{OK: true}
	}
	var de *sender.DeliveryError
	if !errors.As(err, &de) {
		t.Fatalf("err = %v, want a *DeliveryError", err)
	}
	o := outcome{Status: de.Status, Retryable: de.Retryable(), RetryAfter: de.RetryAfter(), Timeout: errors.Is(err, context.DeadlineExceeded)}
	if de.Status != 0 {
		o.Reason = de.Error()
	}
	return o
}

// TestLeanAndStdlibTransportsAgree: the same attempts through the lean
// transport and through net/http's end the same for the core, and the
// receiver sees the same request (method, path, headers, body).
func TestLeanAndStdlibTransportsAgree(t *testing.T) {
	lean := sender.New(&ssrf.Guard{}, sender.Config{Transport: sender.TransportLean})
	std := sender.New(&ssrf.Guard{}, sender.Config{Transport: sender.TransportStdlib})
	defer lean.Close()
	defer std.Close()
	if sender.UsesStdlib(lean) || !sender.UsesStdlib(std) {
		t.Fatal("WithHTTPTransport does not pick the transport")
	}
	servers := map[string]func(http.Header) (int, http.Header){
		"204":              func(http.Header) (int, http.Header) { return http.StatusNoContent, nil },
		"500":              func(http.Header) (int, http.Header) { return http.StatusInternalServerError, nil },
		"503, Retry-After": func(http.Header) (int, http.Header) { return 503, http.Header{"Retry-After": {"7"}} },
		"429, Retry-After": func(http.Header) (int, http.Header) { return 429, http.Header{"Retry-After": {"2"}} },
		"410":              func(http.Header) (int, http.Header) { return http.StatusGone, nil },
		"400":              func(http.Header) (int, http.Header) { return http.StatusBadRequest, nil },
		"redirect": func(http.Header) (int, http.Header) {
			return http.StatusFound, http.Header{"Location": {"http://127.0.0.1:1/elsewhere"}}
		},
	}
	for name, answer := range servers {
		t.Run(name, func(t *testing.T) {
			srv := sendertest.NewServer(t, func(_ int, r *sendertest.Request) (int, http.Header) { return answer(r.Header) })
			var got [2]outcome
			for i, s := range []*sender.Sender{lean, std} {
				got[i] = attempt(t, s, srv.HooksURL(), 5*time.Second)
			}
			if got[0] != got[1] {
				t.Errorf("lean %+v, stdlib %+v", got[0], got[1])
			}
			seen := srv.Requests()
			if len(seen) != 2 {
				t.Fatalf("%d requests, want one from each", len(seen))
			}
			a, b := seen[0], seen[1]
			// The signature covers the timestamp, which may tick between the two.
			for _, h := range []string{"Webhook-Timestamp", "Webhook-Signature"} {
				a.Header.Del(h)
				b.Header.Del(h)
			}
			if !reflect.DeepEqual(a.Header, b.Header) || string(a.Body) != string(b.Body) || a.Host != b.Host {
				t.Errorf("the receiver saw different requests:\nlean   %v %q\nstdlib %v %q", a.Header, a.Host, b.Header, b.Host)
			}
		})
	}
	hostile := map[string]sendertest.Behavior{
		"huge header":          sendertest.HugeHeader(200, 1<<20),
		"long 200 body":        sendertest.LongBody(200, 1<<20),
		"long 500 body":        sendertest.LongBody(500, 1<<20),
		"100 Continue, 204":    sendertest.Raw("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"),
		"closed without reply": sendertest.Raw(""),
		"hang":                 sendertest.Hang(),
	}
	for name, b := range hostile {
		t.Run(name, func(t *testing.T) {
			var got [2]outcome
			for i, s := range []*sender.Sender{lean, std} {
				h := sendertest.NewHostile(t, b)
				got[i] = attempt(t, s, h.URL, 500*time.Millisecond)
			}
			if got[0] != got[1] {
				t.Errorf("lean %+v, stdlib %+v", got[0], got[1])
			}
		})
	}
}
