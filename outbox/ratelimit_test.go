package outbox

import (
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

func TestRateLimitSpacesEveryAttemptRetriesIncluded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var n atomic.Int32
		h := newHarness(t, func(o *DeliveryOptions) {
			o.RateLimit = Rate{N: 10, Per: time.Second}
			o.RetryInitial, o.RetryMaxInterval = 100*time.Millisecond, 200*time.Millisecond
		})
		h.rec.answer = func(*Batch) error {
			if n.Add(1)%3 == 0 {
				return failure{status: 503, retryable: true} // a third of the attempts are retried
			}
			return nil
		}
		for i := 1; i <= 60; i++ {
			h.commit(event(i, "x", string(rune('a'+i%20))))
		}
		time.Sleep(30 * time.Second)
		synctest.Wait()
		delivered := map[string]bool{}
		var prev time.Time
		for i, b := range h.rec.batches {
			if i > 0 && b.at.Sub(prev) < 100*time.Millisecond {
				t.Fatalf("attempt %d came %s after the one before: rate_limit 10/s wants 100ms", i, b.at.Sub(prev))
			}
			prev = b.at
			delivered[b.events[0].ID] = true
		}
		if len(delivered) != 60 || len(h.rec.batches) < 80 {
			t.Fatalf("%d events in %d attempts; want 60 events and their retries", len(delivered), len(h.rec.batches))
		}
	})
}

func Test429PausesTheWholeSubscription(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *DeliveryOptions) { o.RetryMaxInterval = 20 * time.Second })
		var first atomic.Bool
		h.rec.answer = func(b *Batch) error {
			if b.Events[0].ResourceID == "a" && first.CompareAndSwap(false, true) {
				return failure{status: 429, retryable: true, after: time.Hour} // capped at retry_max_interval
			}
			return nil
		}
		start := time.Now()
		h.commit(event(1, "x", "a"))
		synctest.Wait()
		h.commit(event(2, "x", "b"), event(3, "x", "c"))
		time.Sleep(time.Minute)
		synctest.Wait()
		if len(h.rec.batches) != 4 {
			t.Fatalf("%d attempts, want 4", len(h.rec.batches))
		}
		for _, b := range h.rec.batches[1:] {
			if d := b.at.Sub(start); d != 20*time.Second {
				t.Errorf("resource %s sent %s after the 429, want 20s: the pause is the subscription's, capped by retry_max_interval",
					b.events[0].ResourceID, d)
			}
		}
	})
}

func TestRateLimitedBacklogParksPastParkAfter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *DeliveryOptions) {
			o.RateLimit = Rate{N: 60, Per: time.Minute}
			o.ParkAfter = 30 * time.Second
		})
		var last LSN
		for i := 1; i <= 100; i++ {
			last = h.commit(event(i, "x", string(rune('a'+i%26))))
		}
		time.Sleep(20 * time.Second)
		synctest.Wait()
		if f := h.acker.Flush(); f == last {
			t.Fatal("the backlog was let go before park_after")
		}
		time.Sleep(11 * time.Second)
		synctest.Wait()
		if f := h.acker.Flush(); f != last {
			t.Fatalf("flush = %v past park_after, want %v: a rate-limited backlog must not pin the slot", f, last)
		}
		if h.store.everParked == 0 {
			t.Fatal("nothing was parked")
		}
		// Fed from the table, still at the rate, in order per resource.
		time.Sleep(3 * time.Minute)
		synctest.Wait()
		lastOf := map[string]uint64{}
		var prev time.Time
		for i, b := range h.rec.batches {
			if i > 0 && b.at.Sub(prev) < time.Second {
				t.Fatalf("attempt %d came %s after the one before, want 1s", i, b.at.Sub(prev))
			}
			prev = b.at
			e := b.events[0]
			if e.Seq <= lastOf[e.ResourceID] {
				t.Fatalf("resource %s: %d after %d", e.ResourceID, e.Seq, lastOf[e.ResourceID])
			}
			lastOf[e.ResourceID] = e.Seq
		}
		if len(h.rec.batches) != 100 || len(h.store.parked) != 0 {
			t.Fatalf("%d delivered, %d rows left; want 100 and 0", len(h.rec.batches), len(h.store.parked))
		}
	})
}
