package outbox

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rs/zerolog"
)

// recorder is a Deliverer that keeps every batch it was given, at what time.
type recorder struct {
	mu      sync.Mutex
	batches []recorded
	answer  func(b *Batch) error
}

type recorded struct {
	at     time.Time
	events []Event
	id     string
	sub    string
}

// eventIDs lists the ids of the events delivered so far, in delivery order.
func (r *recorder) eventIDs() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var ids []string
	for _, b := range r.batches {
		for _, e := range b.events {
			ids = append(ids, e.ID)
		}
	}
	return ids
}

func (r *recorder) Deliver(_ context.Context, b *Batch) error {
	r.mu.Lock()
	r.batches = append(r.batches, recorded{time.Now(), b.Events, b.WebhookID, b.Subscription.ID})
	answer := r.answer
	r.mu.Unlock()
	if answer != nil {
		return answer(b)
	}
	return nil
}

// harness runs a Dispatcher with one subscription inside a synctest bubble.
type harness struct {
	t     *testing.T
	acker *Acker
	in    chan Change
	rec   *recorder
	store *memStore
	lsn   LSN
}

func newHarness(t *testing.T, opts func(*DeliveryOptions)) *harness {
	return newHarnessWith(t, &memStore{}, opts)
}

// newHarnessWith is newHarness on a store that may hold rows already (a
// previous epoch's).
func newHarnessWith(t *testing.T, store *memStore, opts func(*DeliveryOptions)) *harness {
	s := sub("s", "*")
	if opts != nil {
		opts(&s.Delivery)
	}
	h := &harness{t: t, acker: NewAcker(0), in: make(chan Change, 1024), rec: &recorder{}, store: store}
	d := NewDispatcher(DispatcherConfig{Subscriptions: []*Subscription{s}, Acker: h.acker,
		Deliverer: h.rec, Store: h.store, Logger: zerolog.Nop()})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	h.in <- Change{Kind: ChangeStart}
	go func() { d.Run(ctx, h.in); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return h
}

// commit sends one transaction holding events; it returns the transaction's end LSN.
func (h *harness) commit(events ...Event) LSN {
	h.in <- Change{Kind: ChangeBegin}
	for _, e := range events {
		h.in <- Change{Kind: ChangeEvent, Event: e}
	}
	h.lsn += 100
	h.in <- Change{Kind: ChangeCommit, LSN: h.lsn}
	return h.lsn
}

func event(id int, typ, resource string) Event {
	return Event{ID: strconv.Itoa(id), Type: typ, ResourceID: resource, Seq: uint64(id),
		Payload: json.RawMessage(fmt.Sprintf(`{"n":%d}`, id))}
}

func TestDebounceCollapsesABurstIntoTheNewest(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *DeliveryOptions) { o.Debounce = time.Second })
		start := time.Now()
		var last LSN
		for i := 1; i <= 12; i++ {
			last = h.commit(event(i, "contact.updated", "c1"))
			time.Sleep(40 * time.Millisecond) // 12 updates within half a second
		}
		time.Sleep(5 * time.Second)
		synctest.Wait()
		if len(h.rec.batches) != 1 {
			t.Fatalf("%d deliveries, want 1", len(h.rec.batches))
		}
		b := h.rec.batches[0]
		if e := b.events[0]; e.ID != "12" || e.Coalesced != 12 || string(e.Payload) != `{"n":12}` {
			t.Errorf("delivered %+v, want event 12 coalescing 12", e)
		}
		if sent := b.at.Sub(start); sent < 1440*time.Millisecond || sent > 1500*time.Millisecond {
			t.Errorf("sent %s after the first event, want debounce (1s) after the last (0.44s)", sent)
		}
		if f := h.acker.Flush(); f != last {
			t.Errorf("flush = %v, want %v", f, last)
		}
	})
}

func TestDebounceMaxWaitBoundsTheDelay(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *DeliveryOptions) { o.Debounce = time.Second; o.MaxWait = time.Second })
		start := time.Now()
		for i := 1; i <= 25; i++ { // every 200ms for 5s
			h.commit(event(i, "contact.updated", "c1"))
			time.Sleep(200 * time.Millisecond)
		}
		time.Sleep(3 * time.Second)
		synctest.Wait()
		prev := start
		total := 0
		for _, b := range h.rec.batches {
			if gap := b.at.Sub(prev); gap > 1200*time.Millisecond {
				t.Errorf("%s without a delivery, want at most max_wait (1s) plus one update interval", gap)
			}
			prev = b.at
			total += b.events[0].Coalesced
		}
		if len(h.rec.batches) < 4 || total != 25 {
			t.Errorf("%d deliveries coalescing %d events, want about 5 covering all 25", len(h.rec.batches), total)
		}
	})
}

func TestDebounceNeverMergesAcrossTypes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *DeliveryOptions) { o.Debounce = time.Second })
		h.commit(event(1, "contact.created", "c1"))
		for i := 2; i <= 6; i++ {
			h.commit(event(i, "contact.updated", "c1"))
		}
		h.commit(event(7, "contact.deleted", "c1"))
		time.Sleep(10 * time.Second)
		synctest.Wait()
		var got []string
		for _, b := range h.rec.batches {
			for _, e := range b.events {
				got = append(got, fmt.Sprintf("%s#%s×%d", e.Type, e.ID, e.Coalesced))
			}
		}
		want := []string{"contact.created#1×1", "contact.updated#6×5", "contact.deleted#7×1"}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("got %v, want %v", got, want)
		}
	})
}

func TestBatchingTakesManyResourcesInOrder(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *DeliveryOptions) { o.BatchMax = 500 })
		var events []Event
		for i := 1; i <= 2000; i++ {
			events = append(events, event(i, "x", "r"+strconv.Itoa(i%37)))
		}
		last := h.commit(events...)
		time.Sleep(time.Second)
		synctest.Wait()
		if len(h.rec.batches) != 4 {
			t.Errorf("%d requests for 2000 events with batch_max 500", len(h.rec.batches))
		}
		seen := map[string]int{}
		lastOf := map[string]int{}
		for _, b := range h.rec.batches {
			if len(b.events) > 500 {
				t.Errorf("batch of %d", len(b.events))
			}
			for _, e := range b.events {
				n, _ := strconv.Atoi(e.ID)
				if n <= lastOf[e.ResourceID] {
					t.Fatalf("resource %s: event %d after %d", e.ResourceID, n, lastOf[e.ResourceID])
				}
				lastOf[e.ResourceID] = n
				seen[e.ID]++
			}
		}
		if len(seen) != 2000 {
			t.Errorf("%d distinct events delivered, want 2000", len(seen))
		}
		if f := h.acker.Flush(); f != last {
			t.Errorf("flush = %v, want %v", f, last)
		}
	})
}

func TestBatchBytesClosesABatch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *DeliveryOptions) { o.BatchMax = 100; o.BatchBytes = 4096 })
		var events []Event
		for i := 1; i <= 20; i++ {
			e := event(i, "x", strconv.Itoa(i))
			e.Payload = json.RawMessage(`"` + string(make([]byte, 0)) + fmt.Sprintf("%01000d", i) + `"`)
			events = append(events, e)
		}
		h.commit(events...)
		time.Sleep(time.Second)
		synctest.Wait()
		for _, b := range h.rec.batches {
			if len(b.events) > 3 { // (1002 + 256) × 3 < 4096 < × 4
				t.Errorf("batch of %d events over batch_bytes", len(b.events))
			}
		}
	})
}

// TestSchedulerInvariants drives random traffic over a few resources through a
// Deliverer that is slow, fails at random (retryably or for good) and checks at
// every attempt: never two requests in flight for one resource; an attempt for
// event n+1 of a resource only after event n is delivered or dead-lettered; the
// ack never passes an unfinished event. In the end every event is finished once.
func TestSchedulerInvariants(t *testing.T) {
	for seed := range uint64(30) {
		t.Run(strconv.Itoa(int(seed)), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) { checkInvariants(t, seed, false) })
		})
	}
}

// TestSchedulerInvariantsWhileParking: the same with a park_after so short that
// resources keep moving to the table and back. Order and exactly-once finishing
// hold; the ack may pass parked events (that is parking's point).
func TestSchedulerInvariantsWhileParking(t *testing.T) {
	for seed := range uint64(30) {
		t.Run(strconv.Itoa(int(seed)), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) { checkInvariants(t, seed, true) })
		})
	}
}

func checkInvariants(t *testing.T, seed uint64, parking bool) {
	r := rand.New(rand.NewPCG(seed, 7))  // the feeder's
	dr := rand.New(rand.NewPCG(seed, 8)) // the deliverer's, under mu

	const events = 300
	resources := 1 + r.IntN(12)
	h := newHarness(t, func(o *DeliveryOptions) {
		o.MaxInFlight = 1 + r.IntN(8)
		o.BatchMax = []int{1, 1, 3, 50}[r.IntN(4)]
		o.RetryInitial = 10 * time.Millisecond
		o.RetryMaxInterval = 100 * time.Millisecond
		if parking {
			o.ParkAfter = 30 * time.Millisecond
		}
	})
	var mu sync.Mutex
	inFlight := map[string]bool{}
	finished := map[int]bool{}
	next := map[string]int{} // resource -> index into order of its first unfinished event
	order := map[string][]int{}
	endOf := map[int]LSN{}

	h.rec.answer = func(b *Batch) error {
		mu.Lock()
		keys := map[string]bool{}
		pos := map[string]int{}
		for _, e := range b.Events {
			n, _ := strconv.Atoi(e.ID)
			k := e.ResourceID
			if inFlight[k] && !keys[k] {
				t.Errorf("two requests in flight for resource %s", k)
			}
			keys[k] = true
			if want := order[k][next[k]+pos[k]]; n != want {
				t.Errorf("resource %s: attempt for event %d while event %d is unfinished", k, n, want)
			}
			pos[k]++
		}
		for k := range keys {
			inFlight[k] = true
		}
		// The ack must not pass the first unfinished event.
		flush := h.acker.Flush()
		for n := 1; n <= events && !parking; n++ {
			if !finished[n] && endOf[n] != 0 && flush >= endOf[n] {
				t.Errorf("flush %v passes unfinished event %d (ends %v)", flush, n, endOf[n])
				break
			}
		}
		delay := time.Duration(dr.IntN(50)) * time.Millisecond
		x := dr.IntN(100)
		mu.Unlock()

		time.Sleep(delay)

		var err error
		switch {
		case x < 30:
			err = failure{status: 503, retryable: true}
		case x < 35:
			err = failure{status: 400}
		}
		mu.Lock()
		for k := range keys {
			inFlight[k] = false
		}
		if err == nil || err.(failure).status == 400 {
			for _, e := range b.Events {
				n, _ := strconv.Atoi(e.ID)
				finished[n] = true
				next[e.ResourceID]++
			}
		}
		mu.Unlock()
		return err
	}

	for n := 1; n <= events; {
		size := 1 + r.IntN(5)
		var batch []Event
		mu.Lock()
		for ; size > 0 && n <= events; size, n = size-1, n+1 {
			k := "r" + strconv.Itoa(r.IntN(resources))
			if r.IntN(10) == 0 {
				k = "" // no resource id: ordered among themselves
			}
			order[k] = append(order[k], n)
			batch = append(batch, event(n, "x", k))
			endOf[n] = h.lsn + 100 // commit() assigns this next
		}
		mu.Unlock()
		h.commit(batch...)
		time.Sleep(time.Duration(r.IntN(20)) * time.Millisecond)
	}
	time.Sleep(time.Minute)
	synctest.Wait()
	mu.Lock()
	defer mu.Unlock()
	for n := 1; n <= events; n++ {
		if !finished[n] {
			t.Fatalf("event %d never finished", n)
		}
	}
	if f := h.acker.Flush(); f != h.lsn {
		t.Errorf("final flush %v, want %v", f, h.lsn)
	}
	if parking && h.store.everParked == 0 {
		t.Error("nothing was parked: the test proves nothing")
	}
	if len(h.store.parked) != 0 {
		t.Errorf("%d rows left parked", len(h.store.parked))
	}
}

// TestDebounceAcrossEpochsNeverSendsAnOlderEvent: an epoch sends event 5,
// which superseded 1..4. The next epoch streams 1..5 again, slowly enough
// that debounce would cut a window at 1: the marks keep 1..4 from going out
// after 5.
func TestDebounceAcrossEpochsNeverSendsAnOlderEvent(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(o *DeliveryOptions) { o.Debounce = time.Second; o.MaxWait = time.Second })
		for i := 1; i <= 5; i++ {
			h.commit(event(i, "contact.updated", "c1"))
		}
		time.Sleep(3 * time.Second)
		synctest.Wait()
		h.lsn = 0
		h.in <- Change{Kind: ChangeStart} // a new epoch, from before event 1
		h.commit(event(1, "contact.updated", "c1"))
		time.Sleep(3 * time.Second) // debounce closes the window at 1
		for i := 2; i <= 5; i++ {
			h.commit(event(i, "contact.updated", "c1"))
		}
		time.Sleep(3 * time.Second)
		synctest.Wait()
		var sent []string
		for _, b := range h.rec.batches {
			sent = append(sent, b.events[0].ID)
		}
		if len(sent) != 2 || sent[0] != "5" || sent[1] != "5" {
			t.Errorf("sent %v, want [5 5]: nothing older after 5", sent)
		}
	})
}
