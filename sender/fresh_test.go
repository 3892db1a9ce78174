package sender_test

import (
	"context"
	"errors"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/sender"
	"github.com/walhook/walhook/sender/sendertest"
	"github.com/walhook/walhook/sender/ssrf"
)

var errNotMine = errors.New("another process holds the slot by now")

// TestAnAttemptNoLongerFreshWritesNothing: a request whose freshness check
// (outbox.WithFresh) fails when the transport is about to write it is not
// written, on a new connection or a kept-alive one, through the lean
// transport, net/http (large bodies) and the stdlib transport alike; and the
// connection pool serves the next fresh attempt.
func TestAnAttemptNoLongerFreshWritesNothing(t *testing.T) {
	for _, tr := range []string{sender.TransportLean, sender.TransportStdlib} {
		for _, p := range paths {
			t.Run(tr+"/"+p.name, func(t *testing.T) {
				srv := sendertest.NewServer(t, nil)
				s := sender.New(&ssrf.Guard{}, sender.Config{Transport: tr})
				t.Cleanup(s.Close)
				b := hostileBatch(srv.HooksURL(), p.big, 10*time.Second)
				stale := outbox.WithFresh(context.Background(), func() error { return errNotMine })
				fresh := outbox.WithFresh(context.Background(), func() error { return nil })

				if err := s.Deliver(stale, b); !errors.Is(err, errNotMine) {
					t.Fatalf("a stale attempt on a new connection: %v, want %v", err, errNotMine)
				}
				if err := s.Deliver(fresh, b); err != nil {
					t.Fatal(err)
				}
				if err := s.Deliver(stale, b); !errors.Is(err, errNotMine) { // a kept-alive connection now
					t.Fatalf("a stale attempt on a kept-alive connection: %v, want %v", err, errNotMine)
				}
				if err := s.Deliver(fresh, b); err != nil {
					t.Fatal(err)
				}
				if n := len(srv.Requests()); n != 2 {
					t.Fatalf("the target got %d requests, want the 2 fresh ones", n)
				}
			})
		}
	}
}

// TestFreshnessIsCheckedAfterTheWaitForAHostSlot: an attempt waiting for a
// request slot to its host (max_in_flight_per_host) is checked when it gets
// one, not only when it started: the process may have lost the slot, or a
// worker its partition, meanwhile. Here the check fails once the request
// ahead has been answered, which is before the waiting one can be written,
// and after it started.
func TestFreshnessIsCheckedAfterTheWaitForAHostSlot(t *testing.T) {
	gate, started := make(chan struct{}), make(chan struct{}, 1)
	var answered atomic.Bool
	srv := sendertest.NewServer(t, func(n int, _ *sendertest.Request) (int, http.Header) {
		if n == 0 {
			started <- struct{}{}
			<-gate
			answered.Store(true)
		}
		return http.StatusNoContent, nil
	})
	s := sender.New(&ssrf.Guard{}, sender.Config{MaxInFlightPerHost: 1})
	t.Cleanup(s.Close)
	first := make(chan error, 1)
	go func() { first <- send(s, testSub(srv.HooksURL())) }()
	<-started
	var checks atomic.Int32
	ctx := outbox.WithFresh(context.Background(), func() error {
		checks.Add(1)
		if answered.Load() {
			return errNotMine
		}
		return nil
	})
	second := make(chan error, 1)
	go func() { second <- s.Deliver(ctx, outbox.NewBatch(testSub(srv.HooksURL()), testEvent())) }()
	close(gate)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if err := <-second; !errors.Is(err, errNotMine) {
		t.Fatalf("the attempt that waited for the host: %v, want %v", err, errNotMine)
	}
	if n := len(srv.Requests()); n != 1 || checks.Load() == 0 {
		t.Fatalf("the target got %d requests (want 1) after %d checks", n, checks.Load())
	}
}
