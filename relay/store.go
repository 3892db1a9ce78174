package relay

import (
	"context"
	"errors"
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

// errNoParking: a worker never parks (outbox.DispatcherConfig.NoParking).
var errNoParking = errors.New("relay worker: parking in walhook.deliveries is not used in relay mode")

// workerStore is the Store a worker's Dispatcher sees. The slot's lease and
// the routing log belong to the sidecar, which routes; walhook.deliveries is
// direct mode's (a worker's failing events wait in the stream). So: no lease
// (partition leases fence a worker), the subscriptions as they are now, no
// parked rows, and endpoint health kept in the worker (not shared yet).
type workerStore struct {
	WorkerStore
	rows atomic.Pointer[[]outbox.SubscriptionRow] // what LoadRouting returns: set before each epoch starts
}

func (s *workerStore) Acquire(context.Context, uint32) error                     { return nil }
func (s *workerStore) RecordRouting(context.Context, outbox.RoutingChange) error { return nil }
func (s *workerStore) LoadRouting(context.Context, outbox.LSN) ([]outbox.SubscriptionRow, error) {
	if r := s.rows.Load(); r != nil {
		return *r, nil
	}
	return nil, nil
}
func (s *workerStore) Park(context.Context, string, []outbox.ParkedEvent) error { return errNoParking }
func (s *workerStore) ParkedKeys(context.Context, string) ([]outbox.ParkedKey, error) {
	return nil, nil
}
func (s *workerStore) NextParked(context.Context, string, string, int, int) ([]outbox.ParkedEvent, error) {
	return nil, nil
}
func (s *workerStore) Unpark(context.Context, []int64) error { return nil }
func (s *workerStore) Reschedule(context.Context, []int64, int, time.Time, string) error {
	return nil
}
func (s *workerStore) DropParked(context.Context, string) error               { return nil }
func (s *workerStore) DisableSubscription(context.Context, string) error      { return nil }
func (s *workerStore) DeadLetterParked(context.Context, string, string) error { return nil }
func (s *workerStore) DeadLetterRows(ctx context.Context, _ []int64, dls []outbox.DeadLetter) error {
	for _, d := range dls {
		if err := s.DeadLetter(ctx, d); err != nil {
			return err
		}
	}
	return nil
}
