package sender_test

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/sender"
	"github.com/walhook/walhook/sender/sendertest"
	"github.com/walhook/walhook/sender/ssrf"
)

// paths are the two ways a request leaves: the lean transport (small bodies)
// and net/http (bodies over 64 KiB).
var paths = []struct {
	name string
	big  bool
}{{"lean", false}, {"net/http", true}}

// hostileBatch is a batch for target: one small event, or (big) a body of
// 128 KiB, which goes through net/http.
func hostileBatch(target string, big bool, timeout time.Duration) *outbox.Batch {
	sub := testSub(target)
	sub.Delivery.Timeout = timeout
	if !big {
		return outbox.NewBatch(sub, testEvent())
	}
	sub.Delivery.BatchMax = 10
	events := make([]outbox.Event, 4)
	payload := json.RawMessage(`"` + strings.Repeat("x", 32<<10) + `"`)
	for i := range events {
		events[i] = testEvent()
		events[i].ID = strconv.Itoa(i)
		events[i].Payload = payload
	}
	return outbox.NewBatch(sub, events...)
}

// deliver sends b once with a fresh Sender; it returns the failure (nil for a
// success) and how long the attempt took.
func deliver(t *testing.T, b *outbox.Batch) (*sender.DeliveryError, time.Duration) {
	t.Helper()
	s := sender.New(&ssrf.Guard{}, sender.Config{})
	defer s.Close()
	start := time.Now()
	err := s.Deliver(context.Background(), b)
	took := time.Since(start)
	if err == nil {
		return nil, took
	}
	var de *sender.DeliveryError
	if !errors.As(err, &de) {
		t.Fatalf("err = %v, want a *DeliveryError", err)
	}
	return de, took
}

// socketSlack bounds what a target can have written that the sender never
// read: the kernel's socket buffers on loopback, which grow to a few MB.
const socketSlack = 32 << 20

// A target answering with 300 MB of headers fails the attempt once 64 KiB are
// read (it took RSS to 1.5 GB before), retryably, as a broken answer would.
func TestHugeResponseHeadersFailTheAttempt(t *testing.T) {
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			h := sendertest.NewHostile(t, sendertest.HugeHeader(200, 300<<20))
			de, _ := deliver(t, hostileBatch(h.URL, p.big, 20*time.Second))
			if de == nil || !de.Retryable() || de.StatusCode() != 0 || de.Error() != "response headers exceed 64 KiB" {
				t.Fatalf("err = %v, want a retryable \"response headers exceed 64 KiB\"", de)
			}
			h.WaitEnded(t, 1, 10*time.Second) // the sender hung up
			if n := h.Written(); n > socketSlack {
				t.Errorf("the target wrote %d MB of headers before the sender hung up", n>>20)
			}
		})
	}
}

// Headers just under the limit are fine.
func TestResponseHeadersUnderTheLimit(t *testing.T) {
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			h := sendertest.NewHostile(t, sendertest.HugeHeader(204, 60<<10))
			if de, _ := deliver(t, hostileBatch(h.URL, p.big, 20*time.Second)); de != nil {
				t.Fatalf("60 KiB of headers: %v", de)
			}
		})
	}
}

// A long or endless body is read to the cap, not to its end: the connection
// is closed instead. A failed answer keeps the start of it as the excerpt.
func TestLongResponseBodiesAreNotReadToTheEnd(t *testing.T) {
	for _, p := range paths {
		for _, tt := range []struct {
			name   string
			behave sendertest.Behavior
			status int
		}{
			{"2GiB 500", sendertest.LongBody(500, 2<<30), 500},
			{"2GiB 200", sendertest.LongBody(200, 2<<30), 200},
			{"endless 500", sendertest.EndlessBody(500), 500},
			{"endless 200", sendertest.EndlessBody(200), 200},
		} {
			t.Run(p.name+" "+tt.name, func(t *testing.T) {
				h := sendertest.NewHostile(t, tt.behave)
				de, took := deliver(t, hostileBatch(h.URL, p.big, 20*time.Second))
				switch {
				case tt.status == 200 && de != nil:
					t.Fatalf("a 2xx with a long body: %v", de)
				case tt.status != 200 && (de == nil || de.StatusCode() != tt.status || !strings.HasPrefix(de.Body, "xxxx")):
					t.Fatalf("err = %v, want status %d with an excerpt", de, tt.status)
				}
				h.WaitEnded(t, 1, 10*time.Second) // closed, not drained
				if n := h.Written(); n > socketSlack {
					t.Errorf("the sender read about %d MB of the body (took %s)", n>>20, took)
				}
			})
		}
	}
}

// The excerpt of a failed answer goes into dead letters (a text column): valid
// UTF-8, no NUL, at most 200 characters.
func TestErrorExcerptIsCleanText(t *testing.T) {
	body := "\x00bad\xff\xfe\r\nrequest " + strings.Repeat("é", 300)
	h := sendertest.NewHostile(t, sendertest.Raw("HTTP/1.1 400 Bad Request\r\nContent-Length: "+
		strconv.Itoa(len(body))+"\r\n\r\n"+body))
	de, _ := deliver(t, hostileBatch(h.URL, false, 5*time.Second))
	if de == nil || de.StatusCode() != 400 {
		t.Fatalf("err = %v, want the 400", de)
	}
	if !utf8.ValidString(de.Body) || strings.ContainsAny(de.Body, "\x00\r\n") || !strings.HasPrefix(de.Body, "bad\uFFFD") {
		t.Errorf("excerpt %q is not clean text", de.Body)
	}
	if n := utf8.RuneCountInString(de.Body); n != 201 || !strings.HasSuffix(de.Body, "é…") {
		t.Errorf("excerpt has %d characters, want 200 and the ellipsis: %q", n, de.Body)
	}
}

// The whole attempt, connect to last byte, ends at the subscription's timeout:
// a target that accepts and never answers, one that trickles its headers a
// byte at a time, one that trickles its body.
func TestSlowTargetsEndAtTheTimeout(t *testing.T) {
	const timeout = 1500 * time.Millisecond
	for _, p := range paths {
		for _, tt := range []struct {
			name   string
			behave sendertest.Behavior
		}{
			{"hang", sendertest.Hang()},
			{"trickled headers", sendertest.Trickle("HTTP/1.1 200 OK\r\nX-Slow: "+strings.Repeat("a", 100)+"\r\n\r\n", 200*time.Millisecond)},
			{"trickled body", sendertest.Trickle("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 100\r\n\r\n"+strings.Repeat("a", 100), 50*time.Millisecond)},
		} {
			t.Run(p.name+" "+tt.name, func(t *testing.T) {
				h := sendertest.NewHostile(t, tt.behave)
				de, took := deliver(t, hostileBatch(h.URL, p.big, timeout))
				if de == nil || !de.Retryable() || !errors.Is(de, context.DeadlineExceeded) && !strings.Contains(de.Error(), "deadline exceeded") {
					t.Fatalf("err = %v, want the attempt's deadline", de)
				}
				if took < timeout || took > timeout+2*time.Second {
					t.Errorf("the attempt took %s with a timeout of %s", took, timeout)
				}
				h.WaitEnded(t, 1, 10*time.Second)
			})
		}
	}
}

// A dynamic subscription's target that the guard refuses at dial time fails
// for good with "target not allowed", instead of being retried for retry_for
// as a network error.
func TestRefusedTargetIsAPermanentFailure(t *testing.T) {
	srv := sendertest.NewServer(t, nil)
	for _, target := range []string{srv.HooksURL(), strings.Replace(srv.HooksURL(), "127.0.0.1", "localhost", 1)} {
		sub := testSub(target)
		sub.Static = false
		err := sender.New(&ssrf.Guard{}, sender.Config{}).Deliver(context.Background(), outbox.NewBatch(sub, testEvent()))
		var de *sender.DeliveryError
		if !errors.As(err, &de) || de.Retryable() || de.Reason != "target not allowed" || !errors.Is(err, ssrf.ErrForbidden) {
			t.Fatalf("%s: err = %v, want a permanent \"target not allowed\"", target, err)
		}
		if !strings.HasPrefix(err.Error(), "target not allowed: ") || !strings.Contains(err.Error(), "loopback") {
			t.Errorf("reason %q does not say why", err)
		}
	}
	if n := len(srv.Requests()); n != 0 {
		t.Fatalf("%d requests reached loopback", n)
	}
	err := sender.New(&ssrf.Guard{}, sender.Config{}).VerifyIntent(context.Background(), srv.HooksURL(), 5*time.Second)
	if !errors.Is(err, ssrf.ErrForbidden) {
		t.Errorf("VerifyIntent: err = %v, want target not allowed", err)
	}
}

// The intent handshake, which any tenant triggers with one POST
// /v1/subscriptions, reads no more of a hostile answer than a delivery.
func TestVerifyIntentAgainstAHostileTarget(t *testing.T) {
	guard, _ := ssrf.New([]string{"127.0.0.1"})
	s := sender.New(guard, sender.Config{})
	defer s.Close()
	for _, tt := range []struct {
		name   string
		behave sendertest.Behavior
		want   string
	}{
		{"huge headers", sendertest.HugeHeader(200, 300<<20), "response headers exceed 64 KiB"},
		{"endless body", sendertest.EndlessBody(200), "did not echo"},
		{"hang", sendertest.Hang(), "deadline exceeded"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := sendertest.NewHostile(t, tt.behave)
			err := s.VerifyIntent(context.Background(), h.URL, time.Second)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
			h.WaitEnded(t, 1, 10*time.Second)
			if n := h.Written(); n > socketSlack {
				t.Errorf("the target wrote %d MB before the sender hung up", n>>20)
			}
		})
	}
}
