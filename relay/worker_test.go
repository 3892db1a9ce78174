package relay

import (
	"context"
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
