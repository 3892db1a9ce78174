package relay

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/walhook/walhook/internal/natstest"
	"github.com/walhook/walhook/outbox"
)

// parkWorker is a worker that owns partition 0 of a one-partition stream,
// without running: its park store only.
func parkWorker(t *testing.T, js jetstream.JetStream, cfg Config, id string) (*Worker, *partition) {
	t.Helper()
	w := NewWorker(WorkerConfig{Relay: cfg, JetStream: js, ID: id})
	dctx, stop := context.WithCancel(context.Background())
	t.Cleanup(stop)
	go w.park.deleter(dctx)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var err error
	if w.park.stream, err = ensureParkStream(ctx, js, w.cfg.Relay); err != nil {
		t.Fatal(err)
	}
	p := &partition{n: 0, held: map[uint64]heldMsg{}, park: &parkIndex{keys: map[string]*parkedKey{}, flight: map[uint64]bool{}}}
	w.owned[0] = p
	if err := w.park.load(ctx, p); err != nil {
		t.Fatal(err)
	}
	return w, p
}

func parkedEvent(res string, seq uint64) outbox.ParkedEvent {
	return outbox.ParkedEvent{Event: outbox.Event{ID: fmt.Sprint(seq), Type: "t", ResourceID: res, Seq: seq,
		Payload: []byte(`{}`), CommitTime: time.Unix(1, 0)}, Since: time.Unix(2, 0)}
}

// TestParkFencedByNewerOwner: once a new owner marked the partition, the old
// owner (a zombie) can park nothing more into it; the new owner sees what
// the old one parked before, in order, and its own rows behind them.
func TestParkFencedByNewerOwner(t *testing.T) {
	nc := natstest.Start(t)
	cfg := Config{URL: nc.URL(), Stream: "F", Partitions: 1, Replicas: 1}.WithDefaults()
	conn, err := cfg.Connect("test")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	js, _ := jetstream.New(conn)
	ctx := context.Background()

	old, _ := parkWorker(t, js, cfg, "old")
	if err := old.park.Park(ctx, "s", []outbox.ParkedEvent{parkedEvent("r", 1), parkedEvent("r", 2)}); err != nil {
		t.Fatal(err)
	}
	// Parked again (its ack was lost): the same message id, one row.
	if err := old.park.Park(ctx, "s", []outbox.ParkedEvent{parkedEvent("r", 2)}); err != nil {
		t.Fatal(err)
	}
	next, _ := parkWorker(t, js, cfg, "next")
	keys, _ := next.park.ParkedKeys(ctx, "s")
	if len(keys) != 1 || keys[0].Resource != "r" || keys[0].MaxSeq != 2 {
		t.Fatalf("the next owner loaded %+v, want r up to sequence 2", keys)
	}
	if err := old.park.Park(ctx, "s", []outbox.ParkedEvent{parkedEvent("r", 3)}); !errors.Is(err, outbox.ErrFenced) {
		t.Fatalf("the old owner parked after a newer owner marked the partition: %v", err)
	}
	if err := next.park.Park(ctx, "s", []outbox.ParkedEvent{parkedEvent("r", 3)}); err != nil {
		t.Fatal(err)
	}
	var got []uint64
	for {
		rows, err := next.park.NextParked(ctx, "s", "r", 2, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		if len(rows) == 0 {
			break
		}
		ids := make([]int64, len(rows))
		for i, r := range rows {
			got, ids[i] = append(got, r.Event.Seq), r.Row
			if !r.Since.Equal(time.Unix(2, 0)) {
				t.Errorf("since %v, want the time it was parked with", r.Since)
			}
		}
		if err := next.park.Unpark(ctx, ids); err != nil {
			t.Fatal(err)
		}
	}
	if fmt.Sprint(got) != "[1 2 3]" {
		t.Errorf("parked rows drained as %v, want [1 2 3]", got)
	}
	if keys, _ := next.park.ParkedKeys(ctx, "s"); len(keys) != 0 {
		t.Errorf("a drained resource is still listed: %+v", keys)
	}
}
