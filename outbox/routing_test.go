package outbox

import (
	"encoding/json"
	"testing"
	"testing/synctest"
	"time"
)

func row(id string, events ...string) []byte {
	b, _ := json.Marshal(SubscriptionRow{ID: id, Events: events, TargetURL: "http://x/" + id, Secret: "whsec_x"})
	return b
}

// change commits a transaction that changes a subscription (row nil: delete).
func (h *harness) change(id string, row []byte) LSN {
	h.in <- Change{Kind: ChangeBegin}
	h.in <- Change{Kind: ChangeSubscription, SubscriptionID: id, Row: row, Event: Event{Seq: uint64(h.lsn+50) << 16}}
	h.lsn += 100
	h.in <- Change{Kind: ChangeCommit, LSN: h.lsn}
	return h.lsn
}

func delivered(h *harness) map[string][]string {
	h.rec.mu.Lock()
	defer h.rec.mu.Unlock()
	got := map[string][]string{}
	for _, b := range h.rec.batches {
		for _, e := range b.events {
			got[b.sub] = append(got[b.sub], e.ID)
		}
	}
	return got
}

func TestSubscriptionChangesApplyInStreamOrder(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil) // static "s" takes everything
		h.commit(event(1, "a", "r"))
		h.change("dyn", row("dyn", "*"))
		h.commit(event(2, "a", "r"))
		h.change("dyn", row("dyn", "b")) // now only b
		h.commit(event(3, "a", "r"))
		h.commit(event(4, "b", "r"))
		last := h.change("dyn", nil) // event 4 was committed before: still delivered
		h.commit(event(5, "b", "r"))
		time.Sleep(time.Second)
		synctest.Wait()
		got := delivered(h)
		if fmt := got["dyn"]; len(fmt) != 2 || fmt[0] != "2" || fmt[1] != "4" {
			t.Errorf("dyn got %v, want [2 4]", got["dyn"])
		}
		if len(got["s"]) != 5 {
			t.Errorf("static got %v", got["s"])
		}
		if f := h.acker.Flush(); f != last+100 {
			t.Errorf("flush = %v, want %v", f, last+100)
		}
		if len(h.store.routing) != 3 {
			t.Errorf("%d routing changes recorded, want 3", len(h.store.routing))
		}
	})
}

func TestStartLoadsTheRoutingInForceThere(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *DeliveryOptions) {})
		h.store.mu.Lock()
		h.store.routing = []RoutingChange{
			{Commit: 100, ID: "old", Row: row("old", "*")},
			{Commit: 200, ID: "later", Row: row("later", "*")}, // committed after the start: replayed by the stream
		}
		h.store.mu.Unlock()
		h.in <- Change{Kind: ChangeStart, LSN: 150}
		h.commit(event(1, "a", "r"))
		time.Sleep(time.Second)
		synctest.Wait()
		got := delivered(h)
		if len(got["old"]) != 1 || len(got["later"]) != 0 {
			t.Errorf("got %v: want the event for old only", got)
		}
	})
}

func TestGoneUnsubscribesAndDropsPending(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		h.rec.answer = func(b *Batch) error {
			if b.Subscription.ID == "dyn" {
				return failure{status: 410}
			}
			return nil
		}
		h.change("dyn", row("dyn", "*"))
		var last LSN
		for i := 1; i <= 5; i++ {
			last = h.commit(event(i, "a", "r")) // one resource: 2..5 queue behind 1
		}
		time.Sleep(time.Second)
		synctest.Wait()
		if got := delivered(h); len(got["dyn"]) != 1 {
			t.Errorf("dyn got %d attempts, want 1 (nothing after the 410)", len(got["dyn"]))
		}
		if len(h.store.deleted) != 1 || h.store.deleted[0] != "dyn" {
			t.Errorf("deleted %v, want [dyn]", h.store.deleted)
		}
		if len(h.store.dead) != 0 {
			t.Errorf("410 made dead letters: %v", h.store.dead)
		}
		if f := h.acker.Flush(); f != last {
			t.Errorf("flush = %v, want %v: dropped events count as finished", f, last)
		}
	})
}

func TestStaticGoneIsADeadLetter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		h.rec.answer = func(*Batch) error { return failure{status: 410} }
		h.commit(event(1, "a", "r"))
		time.Sleep(time.Second)
		synctest.Wait()
		if len(h.store.dead) != 1 || len(h.store.deleted) != 0 {
			t.Errorf("dead %d, deleted %v: a static subscription's 410 is a dead letter", len(h.store.dead), h.store.deleted)
		}
	})
}

// TestReenableWhileInFlightFinishesOnce: subscription dyn is disabled while
// its request is in flight (its events are dead-lettered then) and enabled
// again before the request comes back. The late success must not finish the
// event a second time: static s still owes it, so the flush stays behind.
func TestReenableWhileInFlightFinishesOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		release := make(chan struct{})
		h.rec.answer = func(b *Batch) error {
			if b.Subscription.ID == "dyn" {
				<-release // in flight until the test says
				return nil
			}
			return failure{status: 503, retryable: true} // s keeps failing: it owes the event
		}
		h.change("dyn", row("dyn", "*"))
		start := h.lsn
		end := h.commit(event(1, "a", "r"))
		synctest.Wait()
		disabled := SubscriptionRow{ID: "dyn", Events: []string{"*"}, TargetURL: "http://x/dyn", Secret: "whsec_x",
			DisabledAt: new(time.Now())}
		b, _ := json.Marshal(disabled)
		h.change("dyn", b)
		h.change("dyn", row("dyn", "*"))
		synctest.Wait()
		close(release)
		time.Sleep(time.Second)
		synctest.Wait()
		if f := h.acker.Flush(); f >= end {
			t.Errorf("flush = %v, at or past the event's transaction (%v, after %v) that s still owes", f, end, start)
		}
	})
}

// TestDeletedInTheSameTransactionDelivers: a batched subscription gets an
// event and is deleted in one transaction. It gets no commit marker (it is no
// longer routed to), yet it must send what it holds and let the flush pass.
func TestDeletedInTheSameTransactionDelivers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		ten := 10
		b, _ := json.Marshal(SubscriptionRow{ID: "dyn", Events: []string{"*"}, TargetURL: "http://x/dyn", Secret: "whsec_x",
			Options: Options{BatchMax: &ten}})
		h.change("dyn", b)
		h.in <- Change{Kind: ChangeBegin}
		h.in <- Change{Kind: ChangeEvent, Event: event(1, "a", "r")}
		h.in <- Change{Kind: ChangeSubscription, SubscriptionID: "dyn", Event: Event{Seq: uint64(h.lsn+60) << 16}}
		h.lsn += 100
		h.in <- Change{Kind: ChangeCommit, LSN: h.lsn}
		time.Sleep(5 * time.Second)
		synctest.Wait()
		if got := delivered(h); len(got["dyn"]) != 1 {
			t.Errorf("dyn got %v, want event 1", got["dyn"])
		}
		if f := h.acker.Flush(); f != h.lsn {
			t.Errorf("flush = %v, want %v", f, h.lsn)
		}
	})
}
