package relay

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestLeaseRenewalStoredLate: a renewal whose answer timed out but which the
// server stored leaves the worker a stale revision; its next renewal then
// finds another revision. The lease still holds the worker's id, so the
// partition is kept (it used to be dropped as taken, ending the epoch: seen
// on a loaded machine, where a single worker lost all its partitions at
// once). A lease another worker holds is lost.
func TestLeaseRenewalStoredLate(t *testing.T) {
	cfg, js := testJetStream(t, 1, Config{Stream: "L", Partitions: 2, Replicas: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	w := NewWorker(WorkerConfig{Relay: cfg, JetStream: js, ID: "w"})
	var err error
	if w.kv, err = ensureBucket(ctx, js, cfg); err != nil {
		t.Fatal(err)
	}
	for n := range 2 {
		rev, err := w.kv.Create(ctx, leaseKey(n), []byte("w"))
		if err != nil {
			t.Fatal(err)
		}
		w.take(n, rev, time.Now())
	}
	// Partition 0: a renewal of ours stored after its answer timed out.
	if _, err := w.kv.Update(ctx, leaseKey(0), []byte("w"), w.owned[0].rev); err != nil {
		t.Fatal(err)
	}
	// Partition 1: taken by another worker (its lease expired, say).
	if err := w.kv.Delete(ctx, leaseKey(1)); err != nil {
		t.Fatal(err)
	}
	if _, err := w.kv.Create(ctx, leaseKey(1), []byte("other")); err != nil {
		t.Fatal(err)
	}
	w.leaseTick(ctx)
	w.mu.Lock()
	p0, p1 := w.owned[0], w.owned[1]
	w.mu.Unlock()
	if p0 == nil || p1 != nil {
		t.Fatalf("after the renewal: partition 0 owned %v (want kept), partition 1 owned %v (want lost)", p0 != nil, p1 != nil)
	}
	before := p0.renewedAt
	w.leaseTick(ctx)
	w.mu.Lock()
	renewed := p0.renewedAt.After(before)
	w.mu.Unlock()
	if !renewed {
		t.Fatal("partition 0 was not renewed at the next tick")
	}
}

// TestFreshAsTheRequestIsWritten: the check a worker's attempt carries to
// the transport (outbox.WithFresh) fails once a partition of the attempt
// stopped sending or its lease went stale meanwhile, and a stale lease is
// given up there and then, as the guard would.
func TestFreshAsTheRequestIsWritten(t *testing.T) {
	w := NewWorker(WorkerConfig{Relay: Config{Stream: "F", Partitions: 2}.WithDefaults(), ID: "w"})
	w.take(0, 1, time.Now())
	w.take(1, 1, time.Now())
	w.mu.Lock()
	p0, p1 := w.owned[0], w.owned[1]
	w.mu.Unlock()
	send, stop := context.WithCancel(context.Background())
	sends := []context.Context{send}
	if err := w.fresh(sends, []*partition{p0, p1}); err != nil {
		t.Fatalf("fresh leases: %v", err)
	}
	stop()
	if err := w.fresh(sends, []*partition{p0}); !errors.Is(err, errPartitionLost) {
		t.Fatalf("a partition that stopped sending: %v, want errPartitionLost", err)
	}
	w.mu.Lock()
	p1.renewedAt = time.Now().Add(-loseAfter - time.Second)
	w.mu.Unlock()
	if err := w.fresh(nil, []*partition{p0, p1}); !errors.Is(err, errLeaseStale) {
		t.Fatalf("a stale lease: %v, want errLeaseStale", err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.owned[1] != nil || w.owned[0] != p0 {
		t.Fatal("the stale partition is still owned, or the fresh one was given up")
	}
}
