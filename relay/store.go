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
}

// workerStore is the Store a worker's Dispatcher sees. The slot's lease and
// the routing log belong to the sidecar, which routes; walhook.deliveries is
// direct mode's. So: no lease (partition leases fence a worker), the
// subscriptions as they are now, parking into the park stream (park.go), and
// endpoint health kept in the worker (not shared yet).
type workerStore struct {
	WorkerStore
	rows atomic.Pointer[[]outbox.SubscriptionRow] // what LoadRouting returns: set before each epoch starts
	park *parkStore
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
func (s *workerStore) DisableSubscription(context.Context, string) error { return nil }
func (s *workerStore) DeadLetterParked(ctx context.Context, sub, reason string) error {
	return s.park.DeadLetterParked(ctx, sub, reason)
}
func (s *workerStore) DeadLetterRows(ctx context.Context, rows []int64, dls []outbox.DeadLetter) error {
	return s.park.DeadLetterRows(ctx, rows, dls)
}
