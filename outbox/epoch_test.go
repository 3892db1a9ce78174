package outbox

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rs/zerolog"
)

// TestBudgetFullUntilAnEighthIsFree: a budget that reached its limit stays
// full until an eighth of it is free (so a stream at the limit reads in runs),
// signals once then, and forgets an older epoch's releases.
func TestBudgetFullUntilAnEighthIsFree(t *testing.T) {
	b := NewBudget(800)
	b.Reset(1)
	<-b.Freed() // Reset signals: a stream waiting on the old epoch's budget goes on
	b.Hold(1, 790)
	if b.Full() {
		t.Fatal("full below the limit")
	}
	b.Hold(1, 20) // 810
	if !b.Full() {
		t.Fatal("not full at the limit")
	}
	b.Release(1, 100) // 710: an eighth is 100, so not yet below 700
	if !b.Full() {
		t.Fatal("not full any more with less than an eighth free")
	}
	select {
	case <-b.Freed():
		t.Fatal("freed signalled while still full")
	default:
	}
	b.Release(2, 500) // an older or newer epoch's release changes nothing
	b.Release(1, 20)  // 690
	if b.Full() {
		t.Fatal("still full with more than an eighth free")
	}
	select {
	case <-b.Freed():
	default:
		t.Fatal("no freed signal when it stopped being full")
	}
	b.Hold(1, 50) // 740: below the limit, not full again
	if b.Full() || b.Used() != 740 {
		t.Errorf("full %v, used %d; want not full, 740", b.Full(), b.Used())
	}
	b.Reset(3)
	if b.Full() || b.Used() != 0 {
		t.Errorf("after Reset: full %v, used %d", b.Full(), b.Used())
	}
}

// TestAStaleEpochSendsNothing: an epoch past its freshness (FreshUntil, moved
// on by the stream with every message from the server) starts no attempt:
// a process thawed after a freeze longer than the stall timeout would
// otherwise retry on the slot's behalf before its stream noticed the stall,
// while another process may hold the slot. It ends, with ErrStale.
func TestAStaleEpochSendsNothing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rec := &recorder{answer: func(*Batch) error { return errors.New("503") }}
		acker := NewAcker(0)
		d := NewDispatcher(DispatcherConfig{Subscriptions: []*Subscription{sub("s", "*")}, Acker: acker,
			Deliverer: rec, Store: &memStore{}, Logger: zerolog.Nop()})
		e := NewEpoch(t.Context(), 1)
		e.FreshUntil(time.Now().Add(time.Second))
		defer runOneEvent(t, d, e)()
		stale := time.Now().Add(time.Second)
		time.Sleep(5 * time.Second)
		synctest.Wait()
		rec.mu.Lock()
		defer rec.mu.Unlock()
		if len(rec.batches) == 0 {
			t.Fatal("no attempt while the epoch was fresh")
		}
		for _, b := range rec.batches {
			if !b.at.Before(stale) {
				t.Errorf("an attempt %s after the epoch went stale", b.at.Sub(stale))
			}
		}
		if !errors.Is(e.Err(), ErrStale) {
			t.Errorf("the epoch: %v, want ended with ErrStale", e.Err())
		}
		if f := acker.Flush(); f != 0 {
			t.Errorf("flush %v: nothing was delivered", f)
		}
	})
}

// TestEpochLive: without FreshUntil an epoch is live until it ends; past
// FreshUntil, Live ends it with ErrStale, a later FreshUntil does not make it
// fresh again, and an ended epoch keeps its cause.
func TestEpochLive(t *testing.T) {
	e := NewEpoch(context.Background(), 1)
	if err := e.Live(); err != nil {
		t.Fatalf("a new epoch: %v", err)
	}
	e.FreshUntil(time.Now().Add(time.Hour))
	if err := e.Live(); err != nil {
		t.Fatalf("fresh for an hour: %v", err)
	}
	e.FreshUntil(time.Now().Add(-time.Millisecond))
	if err := e.Live(); !errors.Is(err, ErrStale) || !errors.Is(e.Err(), ErrStale) {
		t.Fatalf("past FreshUntil: Live %v, Err %v; want ErrStale", err, e.Err())
	}
	e.FreshUntil(time.Now().Add(time.Hour)) // too late: ended stays ended
	if err := e.Live(); !errors.Is(err, ErrStale) {
		t.Fatalf("after the end: %v", err)
	}
	// Stale stays stale: a thawed process reads what the server wrote while
	// it was frozen, late, and that must not make it fresh again.
	g := NewEpoch(context.Background(), 3)
	g.FreshUntil(time.Now().Add(-10 * time.Second))
	g.FreshUntil(time.Now().Add(time.Second))
	if err := g.Live(); !errors.Is(err, ErrStale) {
		t.Fatalf("stale, then heard late: %v, want ErrStale", err)
	}
	f := NewEpoch(context.Background(), 2)
	f.End(ErrFenced)
	if err := f.Live(); !errors.Is(err, ErrFenced) {
		t.Fatalf("an ended epoch: %v, want its cause", err)
	}
}

// TestWithFreshChecksEveryLayer: an attempt's context carries the checks of
// every layer it went through (the scheduler's epoch, a relay worker's
// leases), and Fresh passes only when all of them do, the outermost first.
func TestWithFreshChecksEveryLayer(t *testing.T) {
	if err := Fresh(context.Background()); err != nil {
		t.Fatalf("no checks: %v", err)
	}
	var order []string
	errInner := errors.New("inner")
	outer := WithFresh(context.Background(), func() error { order = append(order, "outer"); return nil })
	ctx := WithFresh(outer, func() error { order = append(order, "inner"); return errInner })
	if err := Fresh(ctx); !errors.Is(err, errInner) {
		t.Fatalf("Fresh = %v, want the inner check's error", err)
	}
	if fmt.Sprint(order) != "[outer inner]" {
		t.Fatalf("checks ran %v, want [outer inner]", order)
	}
	if err := Fresh(outer); err != nil {
		t.Fatalf("the outer context alone: %v", err)
	}
	e := NewEpoch(context.Background(), 1)
	ctx = WithFresh(context.Background(), e.Live)
	e.End(nil)
	if err := Fresh(ctx); !errors.Is(err, ErrEpochEnded) {
		t.Fatalf("an ended epoch's attempt: %v, want ErrEpochEnded", err)
	}
}

// freshProbe fails its first attempt (so that the next is cut at
// park_after), and on every later one lets the epoch go stale while it is in
// flight, as a freeze or a wait for a host slot would, and then asks what
// the transport asks before it writes.
type freshProbe struct {
	e        *Epoch
	attempts atomic.Int32
	seen     chan error
}

func (p *freshProbe) Deliver(ctx context.Context, b *Batch) error {
	if p.attempts.Add(1) == 1 {
		return failure{status: 503, retryable: true}
	}
	p.e.FreshUntil(time.Now())
	time.Sleep(time.Millisecond)
	p.seen <- Fresh(ctx)
	return nil
}

// TestAnAttemptCarriesItsEpochsFreshness: the transport's last check
// (Fresh) sees the epoch go stale during an attempt, also an attempt cut at
// park_after, whose deadline once replaced the context that carried it.
func TestAnAttemptCarriesItsEpochsFreshness(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := sub("s", "*")
		s.Delivery.ParkAfter, s.Delivery.Timeout, s.Delivery.RetryInitial = 5*time.Second, 10*time.Second, 100*time.Millisecond
		e := NewEpoch(t.Context(), 1)
		e.FreshUntil(time.Now().Add(time.Minute))
		probe := &freshProbe{e: e, seen: make(chan error, 1)}
		d := NewDispatcher(DispatcherConfig{Subscriptions: []*Subscription{s}, Acker: NewAcker(0),
			Deliverer: probe, Store: &memStore{}, Logger: zerolog.Nop()})
		defer runOneEvent(t, d, e)()
		if err := <-probe.seen; !errors.Is(err, ErrStale) {
			t.Fatalf("the transport's check during a cut attempt: %v, want ErrStale", err)
		}
	})
}

// runOneEvent runs d in epoch e with one committed event on resource r; the
// function it returns stops d and waits for it.
func runOneEvent(t *testing.T, d *Dispatcher, e *Epoch) (stop func()) {
	in := make(chan Change, 16)
	in <- Change{Kind: ChangeStart, Epoch: e}
	in <- Change{Kind: ChangeBegin}
	in <- Change{Kind: ChangeEvent, Event: event(1, "a", "r")}
	in <- Change{Kind: ChangeCommit, LSN: 100}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { d.Run(ctx, in); close(done) }()
	return func() { cancel(); <-done }
}
