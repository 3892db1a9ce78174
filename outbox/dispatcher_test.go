package outbox

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rs/zerolog"
)

// The dispatcher is pure: these tests drive it with an in-memory Deliverer and
// Store, and synctest's fake clock for its retry timers.

type failure struct {
	status    int
	retryable bool
	after     time.Duration
}

func (f failure) Error() string             { return fmt.Sprintf("status %d", f.status) }
func (f failure) Retryable() bool           { return f.retryable }
func (f failure) RetryAfter() time.Duration { return f.after }
func (f failure) StatusCode() int           { return f.status }

type attempt struct {
	sub, webhookID, event string
	at                    time.Time
}

type fakeDeliverer struct {
	mu       sync.Mutex
	attempts []attempt
	answer   func(n int, b *Batch) error
}

func (f *fakeDeliverer) Deliver(_ context.Context, b *Batch) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.attempts = append(f.attempts, attempt{b.Subscription.ID, b.WebhookID, b.Events[0].ID, time.Now()})
	return f.answer(len(f.attempts)-1, b)
}

type memStore struct {
	mu         sync.Mutex
	dead       []DeadLetter
	routing    []RoutingChange
	deleted    []string
	parked     []parkedRow
	nextRow    int64
	everParked int
	disabled   []string
	marks      map[string]map[string]uint64
	parkGate   chan struct{} // non-nil: Park waits until it is closed (a write stuck on a lock)
	feedLater  atomic.Int32  // NextParked answers ErrFeedLater this many more times
	laterAt    []time.Time   // when it did
}

func (m *memStore) Acquire(context.Context, uint32) error { return nil }

func (m *memStore) DeadLetterRows(_ context.Context, rows []int64, dls []DeadLetter) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.dead = append(m.dead, dls...)
	m.parked = slices.DeleteFunc(m.parked, func(r parkedRow) bool { return slices.Contains(rows, r.Row) })
	return nil
}

func (m *memStore) MarkSent(_ context.Context, sub string, marks map[string]uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.marks == nil {
		m.marks = map[string]map[string]uint64{}
	}
	if m.marks[sub] == nil {
		m.marks[sub] = map[string]uint64{}
	}
	for k, v := range marks {
		m.marks[sub][k] = max(m.marks[sub][k], v)
	}
	return nil
}

func (m *memStore) SentMarks(_ context.Context, sub string, from uint64) (map[string]uint64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[string]uint64{}
	for k, v := range m.marks[sub] {
		if v >= from {
			out[k] = v
		}
	}
	return out, nil
}

func (m *memStore) RecordRouting(_ context.Context, c RoutingChange) error {
	m.mu.Lock()
	m.routing = append(m.routing, c)
	m.mu.Unlock()
	return nil
}

func (m *memStore) LoadRouting(_ context.Context, at LSN) ([]SubscriptionRow, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	rows := map[string]*SubscriptionRow{}
	var order []string
	for _, c := range m.routing {
		if c.Commit >= at {
			continue
		}
		if c.Row == nil {
			delete(rows, c.ID)
			continue
		}
		var r SubscriptionRow
		json.Unmarshal(c.Row, &r)
		if rows[c.ID] == nil {
			order = append(order, c.ID)
		}
		rows[c.ID] = &r
	}
	var out []SubscriptionRow
	for _, id := range order {
		if r := rows[id]; r != nil {
			out = append(out, *r)
		}
	}
	return out, nil
}

func (m *memStore) DeleteSubscription(_ context.Context, id string) error {
	m.mu.Lock()
	m.deleted = append(m.deleted, id)
	m.mu.Unlock()
	return nil
}

func (m *memStore) DeadLetter(_ context.Context, d DeadLetter) error {
	m.mu.Lock()
	m.dead = append(m.dead, d)
	m.mu.Unlock()
	return nil
}

func sub(id string, events ...string) *Subscription {
	return &Subscription{ID: id, Events: events, Delivery: DefaultDeliveryOptions(), Static: true}
}

func ev(id, typ string) Event { return Event{ID: id, Type: typ, Payload: json.RawMessage(`{}`)} }

// feed sends one transaction per event and returns after queuing them.
func feed(ch chan<- Change, events ...Event) {
	for i, e := range events {
		ch <- Change{Kind: ChangeBegin}
		ch <- Change{Kind: ChangeEvent, Event: e}
		ch <- Change{Kind: ChangeCommit, LSN: LSN(100 * (i + 1))}
	}
}

func TestDispatcherRetriesWithBackoffThenAcks(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		del := &fakeDeliverer{answer: func(n int, _ *Batch) error {
			if n < 2 {
				return failure{status: 500, retryable: true}
			}
			return nil
		}}
		acker := NewAcker(0)
		d := NewDispatcher(DispatcherConfig{Subscriptions: []*Subscription{sub("s", "*")}, Acker: acker,
			Deliverer: del, Store: &memStore{}, Logger: zerolog.Nop()})
		ch := make(chan Change, 16)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error)
		ch <- Change{Kind: ChangeStart}
		go func() { done <- d.Run(ctx, ch) }()
		start := time.Now()
		feed(ch, ev("1", "a"))
		synctest.Wait()
		if got := acker.Flush(); got != 0 {
			t.Fatalf("acked %v before delivery", got)
		}
		time.Sleep(10 * time.Second) // fake clock: lets the retry timers fire
		synctest.Wait()
		if len(del.attempts) != 3 {
			t.Fatalf("%d attempts, want 3", len(del.attempts))
		}
		for _, a := range del.attempts {
			if a.webhookID != del.attempts[0].webhookID {
				t.Errorf("webhook-id changed across retries")
			}
		}
		// Backoff: first retry after retry_initial ±50%, second after about twice that.
		if d := del.attempts[1].at.Sub(start); d < 500*time.Millisecond || d > 1500*time.Millisecond {
			t.Errorf("first retry after %s, want about 1s", d)
		}
		if d := del.attempts[2].at.Sub(del.attempts[1].at); d < time.Second || d > 3*time.Second {
			t.Errorf("second retry after %s, want about 2s", d)
		}
		if got := acker.Flush(); got != 100 {
			t.Errorf("flush = %v, want 100", got)
		}
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

func TestDispatcherHonoursRetryAfterUpToCap(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		del := &fakeDeliverer{answer: func(n int, _ *Batch) error {
			if n == 0 {
				return failure{status: 429, retryable: true, after: time.Hour}
			}
			return nil
		}}
		s := sub("s", "*")
		s.Delivery.RetryMaxInterval = 30 * time.Second
		d := NewDispatcher(DispatcherConfig{Subscriptions: []*Subscription{s}, Acker: NewAcker(0),
			Deliverer: del, Store: &memStore{}, Logger: zerolog.Nop()})
		ch := make(chan Change, 16)
		go d.Run(t.Context(), ch)
		ch <- Change{Kind: ChangeStart}
		feed(ch, ev("1", "a"))
		time.Sleep(time.Minute)
		synctest.Wait()
		if len(del.attempts) != 2 {
			t.Fatalf("%d attempts, want 2", len(del.attempts))
		}
		if gap := del.attempts[1].at.Sub(del.attempts[0].at); gap != 30*time.Second {
			t.Errorf("retried after %s, want Retry-After capped at 30s", gap)
		}
	})
}

func TestDispatcherDeadLettersPermanentFailureAndGoesOn(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		del := &fakeDeliverer{answer: func(_ int, b *Batch) error {
			if b.Events[0].ID == "1" {
				return failure{status: 400}
			}
			return nil
		}}
		store := &memStore{}
		acker := NewAcker(0)
		d := NewDispatcher(DispatcherConfig{Subscriptions: []*Subscription{sub("s", "*")}, Acker: acker,
			Deliverer: del, Store: store, Logger: zerolog.Nop()})
		ch := make(chan Change, 16)
		go d.Run(t.Context(), ch)
		ch <- Change{Kind: ChangeStart}
		feed(ch, ev("1", "a"), ev("2", "a"))
		synctest.Wait()
		if len(store.dead) != 1 || store.dead[0].Event.ID != "1" || store.dead[0].Status != 400 || store.dead[0].Attempts != 1 {
			t.Fatalf("dead letters = %+v", store.dead)
		}
		if len(del.attempts) != 2 {
			t.Fatalf("%d attempts, want 2 (the 400 is not retried, the next event flows)", len(del.attempts))
		}
		if got := acker.Flush(); got != 200 {
			t.Errorf("flush = %v, want 200", got)
		}
	})
}

func TestDispatcherRoutesAndKeepsOrderPerSubscription(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		del := &fakeDeliverer{answer: func(int, *Batch) error { return nil }}
		acker := NewAcker(0)
		subs := []*Subscription{sub("contacts", "contact.*"), sub("all", "*"), sub("none", "invoice.paid")}
		d := NewDispatcher(DispatcherConfig{Subscriptions: subs, Acker: acker, Deliverer: del,
			Store: &memStore{}, Logger: zerolog.Nop(), QueueSize: 1})
		ch := make(chan Change)
		go d.Run(t.Context(), ch)
		ch <- Change{Kind: ChangeStart}
		feed(ch, ev("1", "contact.created"), ev("2", "order.placed"), ev("3", "contact.updated"))
		synctest.Wait()
		got := map[string][]string{}
		for _, a := range del.attempts {
			got[a.sub] = append(got[a.sub], a.event)
		}
		want := map[string][]string{"contacts": {"1", "3"}, "all": {"1", "2", "3"}}
		if len(got) != len(want) || !equal(got["contacts"], want["contacts"]) || !equal(got["all"], want["all"]) {
			t.Errorf("deliveries = %v, want %v", got, want)
		}
		if f := acker.Flush(); f != 300 {
			t.Errorf("flush = %v, want 300", f)
		}
	})
}

func TestDispatcherStopsWithoutAckingUnfinished(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		del := &fakeDeliverer{answer: func(int, *Batch) error { return errors.New("connection refused") }}
		acker := NewAcker(0)
		s := sub("s", "*")
		s.Delivery.ParkAfter = 2 * time.Hour
		d := NewDispatcher(DispatcherConfig{Subscriptions: []*Subscription{s}, Acker: acker,
			Deliverer: del, Store: &memStore{}, Logger: zerolog.Nop()})
		ch := make(chan Change, 16)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error)
		ch <- Change{Kind: ChangeStart}
		go func() { done <- d.Run(ctx, ch) }()
		feed(ch, ev("1", "a"))
		time.Sleep(time.Hour)
		synctest.Wait()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		if f := acker.Flush(); f != 0 {
			t.Errorf("flush = %v after only failed attempts", f)
		}
	})
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

type parkedRow struct {
	sub string
	ParkedEvent
}

func (m *memStore) Park(ctx context.Context, sub string, events []ParkedEvent) error {
	m.mu.Lock()
	gate := m.parkGate
	m.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, e := range events {
		if slices.ContainsFunc(m.parked, func(r parkedRow) bool { return r.sub == sub && r.Event.ID == e.Event.ID }) {
			continue
		}
		m.nextRow++
		e.Row = m.nextRow
		m.parked = append(m.parked, parkedRow{sub, e})
		m.everParked++
	}
	return nil
}

func (m *memStore) ParkedKeys(_ context.Context, sub string) ([]ParkedKey, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []ParkedKey
	for _, r := range m.parked {
		if r.sub == sub && !slices.ContainsFunc(out, func(k ParkedKey) bool { return k.Resource == r.Event.ResourceID }) {
			out = append(out, ParkedKey{Resource: r.Event.ResourceID, NextAttempt: r.NextAttempt})
		}
		for i := range out {
			if out[i].Resource == r.Event.ResourceID {
				out[i].MaxSeq = max(out[i].MaxSeq, r.Event.Seq)
			}
		}
	}
	return out, nil
}

func (m *memStore) NextParked(_ context.Context, sub, resource string, limit, _ int) ([]ParkedEvent, error) {
	if m.feedLater.Add(-1) >= 0 {
		m.mu.Lock()
		m.laterAt = append(m.laterAt, time.Now())
		m.mu.Unlock()
		return nil, ErrFeedLater
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []ParkedEvent
	for _, r := range m.parked {
		if r.sub == sub && r.Event.ResourceID == resource {
			out = append(out, r.ParkedEvent)
		}
	}
	slices.SortStableFunc(out, func(a, b ParkedEvent) int { return cmp.Compare(a.Event.Seq, b.Event.Seq) })
	return out[:min(limit, len(out))], nil
}

func (m *memStore) Unpark(_ context.Context, rows []int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.parked = slices.DeleteFunc(m.parked, func(r parkedRow) bool { return slices.Contains(rows, r.Row) })
	return nil
}

func (m *memStore) Reschedule(_ context.Context, rows []int64, attempts int, next time.Time, _ string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := range m.parked {
		if slices.Contains(rows, m.parked[i].Row) {
			m.parked[i].Attempts, m.parked[i].NextAttempt = attempts, next
		}
	}
	return nil
}

func (m *memStore) DropParked(_ context.Context, sub string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.parked = slices.DeleteFunc(m.parked, func(r parkedRow) bool { return r.sub == sub })
	return nil
}

func (m *memStore) DisableSubscription(_ context.Context, id string) error {
	m.mu.Lock()
	m.disabled = append(m.disabled, id)
	m.mu.Unlock()
	return nil
}

func (m *memStore) DeadLetterParked(_ context.Context, sub, reason string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.parked = slices.DeleteFunc(m.parked, func(r parkedRow) bool {
		if r.sub == sub {
			m.dead = append(m.dead, DeadLetter{Subscription: sub, Event: r.Event, Reason: reason})
			return true
		}
		return false
	})
	return nil
}
