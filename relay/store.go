package relay

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/walhook/walhook/outbox"
)

// WorkerStore is what a worker needs of the database: dead letters, debounce
// marks, subscription rows (pgstore.Store has it all).
type WorkerStore interface {
	outbox.Store
	ListSubscriptions(ctx context.Context, tenant *string) ([]outbox.SubscriptionRow, error)
	// DisableSubscriptionSeen disables a dynamic subscription if its row is
	// still the version updated at seen.
	DisableSubscriptionSeen(ctx context.Context, id string, seen time.Time) error
	// RetiredSubscription returns a deleted subscription's last definition,
	// or nil if there is none.
	RetiredSubscription(ctx context.Context, id string) (*outbox.SubscriptionRow, error)
}

// workerStore is the Store a worker's Dispatcher sees. The slot's lease and
// the routing log belong to the sidecar, which routes; walhook.deliveries is
// direct mode's. So: no lease (partition leases fence a worker), the
// subscriptions as they are now, parking into the park stream (park.go), and
// endpoint health shared through the subscription's row.
type workerStore struct {
	WorkerStore
	rows atomic.Pointer[[]outbox.SubscriptionRow] // what LoadRouting returns: set before each epoch starts
	park *parkStore
	w    *Worker
}

func (s *workerStore) Acquire(context.Context, uint32) error                     { return nil }
func (s *workerStore) RecordRouting(context.Context, outbox.RoutingChange) error { return nil }
func (s *workerStore) LoadRouting(context.Context, outbox.LSN) ([]outbox.SubscriptionRow, error) {
	if r := s.rows.Load(); r != nil {
		return *r, nil
	}
	return nil, nil
}
func (s *workerStore) Park(ctx context.Context, sub string, events []outbox.ParkedEvent) error {
	return s.park.Park(ctx, sub, events)
}
func (s *workerStore) ParkedKeys(ctx context.Context, sub string) ([]outbox.ParkedKey, error) {
	return s.park.ParkedKeys(ctx, sub)
}
func (s *workerStore) NextParked(ctx context.Context, sub, resource string, limit, maxBytes int) ([]outbox.ParkedEvent, error) {
	return s.park.NextParked(ctx, sub, resource, limit, maxBytes)
}
func (s *workerStore) Unpark(ctx context.Context, rows []int64) error {
	return s.park.Unpark(ctx, rows)
}
func (s *workerStore) Reschedule(ctx context.Context, rows []int64, attempts int, next time.Time, reason string) error {
	return s.park.Reschedule(ctx, rows, attempts, next, reason)
}
func (s *workerStore) DropParked(ctx context.Context, sub string) error {
	return s.park.DropParked(ctx, sub)
}

// DisableSubscription writes endpoint health's verdict to the row, fenced by
// the version this worker judged; every worker's refresh then disables it.
func (s *workerStore) DisableSubscription(ctx context.Context, id string) error {
	seen, ok := s.w.version(id)
	s.w.disabledHere(id)
	if !ok {
		return nil // deleted meanwhile
	}
	return s.WorkerStore.DisableSubscriptionSeen(ctx, id, seen)
}
func (s *workerStore) DeadLetterParked(ctx context.Context, sub, reason string) error {
	return s.park.DeadLetterParked(ctx, sub, reason)
}
func (s *workerStore) DeadLetterRows(ctx context.Context, rows []int64, dls []outbox.DeadLetter) error {
	return s.park.DeadLetterRows(ctx, rows, dls)
}
