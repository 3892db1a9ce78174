package relay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/walhook/walhook/internal/testwait"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/walhook/walhook/internal/natstest"
	"github.com/walhook/walhook/outbox"
)

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	testwait.For(t, timeout, what, cond)
}

type testRig struct {
	nats *natstest.Cluster
	nc   *nats.Conn
	js   jetstream.JetStream
	cfg  Config
	pub  *Publisher
	done atomic.Int64
	ep   *outbox.Epoch
	sub  *outbox.Subscription
	logs *testwait.Buffer // the publisher's
	// fenced makes the publisher's Owns answer that another process took
	// the slot.
	fenced atomic.Bool
}

// startPublisher runs another publisher on the rig's stream until the test
// ends.
func (r *testRig) startPublisher(t *testing.T, logs *testwait.Buffer, owns func(context.Context) error) *Publisher {
	p := NewPublisher(PublisherConfig{Relay: r.cfg, JetStream: r.js, Conn: r.nc, Logger: zerolog.New(logs), Owns: owns})
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() { p.Run(ctx); close(stopped) }()
	t.Cleanup(func() { cancel(); <-stopped })
	return p
}

func newRig(t *testing.T) *testRig { return newClusterRig(t, 1) }

// newClusterRig is a publisher on n NATS nodes, its stream with n replicas.
func newClusterRig(t *testing.T, n int) *testRig {
	r := &testRig{nats: natstest.StartCluster(t, n)}
	r.cfg = Config{URL: r.nats.URL(), Stream: "P", Partitions: 4, Replicas: n}.WithDefaults()
	var err error
	if r.nc, err = r.cfg.Connect("test"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.nc.Close)
	r.js, _ = jetstream.New(r.nc, jetstream.WithPublishAsyncTimeout(2*time.Second))
	r.logs = &testwait.Buffer{}
	r.pub = r.startPublisher(t, r.logs, func(context.Context) error {
		if r.fenced.Load() {
			return outbox.ErrFenced
		}
		return nil
	})
	r.ep = outbox.NewEpoch(context.Background(), 1)
	r.sub = &outbox.Subscription{ID: "s"}
	return r
}

func (r *testRig) publish(t *testing.T, from, n int) {
	for i := from; i < from+n; i++ {
		ev := outbox.Event{ID: fmt.Sprint(i), Type: "t", ResourceID: "r", Payload: json.RawMessage(`{}`), Seq: uint64(i)}
		if err := r.pub.Publish(context.Background(), r.ep, r.sub, ev, func() { r.done.Add(1) }); err != nil {
			t.Fatal(err)
		}
	}
}

// stored reads the stream's messages in stream order.
func (r *testRig) stored(t *testing.T) []string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := r.js.Stream(ctx, r.cfg.Stream)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for seq := s.CachedInfo().State.FirstSeq; seq <= s.CachedInfo().State.LastSeq; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue // a keep message rolled up
		}
		if err != nil {
			t.Fatal(err)
		}
		if m.Subject == r.cfg.keepSubject() {
			continue
		}
		msg, _ := decodeMessage(m.Data)
		ids = append(ids, msg.Event.ID)
	}
	return ids
}

// TestPublisherSurvivesNATSRestart: publishes while NATS is down wait, the
// publisher says it is failing, and once NATS is back every delivery is
// stored once, in order.
func TestPublisherSurvivesNATSRestart(t *testing.T) {
	r := newRig(t)
	r.publish(t, 0, 50)
	waitFor(t, 20*time.Second, "the first publishes", func() bool { return r.done.Load() == 50 })
	// As if workers had finished them: after the restart the stream has no
	// last message id, which the publisher's next expectation meets.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if s, err := r.js.Stream(ctx, r.cfg.Stream); err != nil || s.Purge(ctx) != nil {
		t.Fatalf("purge: %v", err)
	}
	r.nats.Shutdown(0)
	r.publish(t, 50, 50)
	waitFor(t, 20*time.Second, "the publisher to say it fails", func() bool { ok, _ := r.pub.Health(); return !ok })
	if n := r.done.Load(); n != 50 {
		t.Fatalf("%d deliveries acknowledged while NATS was down", n-50)
	}
	if err := r.nats.Restart(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "every publish", func() bool { return r.done.Load() == 100 })
	ids := r.stored(t)
	if len(ids) != 50 {
		t.Fatalf("stream holds %d messages, want 50", len(ids))
	}
	for i, id := range ids {
		if id != fmt.Sprint(50+i) {
			t.Fatalf("message %d is event %s: out of order", i, id)
		}
	}
}

// TestPublisherSurvivesClusterRestart: a 3-node cluster (R3) stopped whole
// between two publishes and started again: the second is stored, in order,
// and the stream keeps its leader. The publisher used to chain its publishes
// by the message id of the stream's last message: in a cluster every replica
// checks that expectation when it applies a message, against a last id it
// keeps in memory only. After a restart only the leader rebuilds it (from its
// last stored message; a work queue may have removed even that), the
// followers failed the check with "last msgid mismatch", a critical write
// error, and the stream stopped storing: found by TestChaosRelay. An expected
// last sequence is checked by the leader alone, before it proposes a message,
// against the stream's sequence, which survives restarts.
func TestPublisherSurvivesClusterRestart(t *testing.T) {
	r := newClusterRig(t, 3)
	leader := func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		s, err := r.js.Stream(ctx, r.cfg.Stream)
		return err == nil && s.CachedInfo().Cluster != nil && s.CachedInfo().Cluster.Leader != ""
	}
	r.publish(t, 0, 50)
	waitFor(t, 30*time.Second, "the first publishes", func() bool { return r.done.Load() == 50 })
	// As if workers had finished them: the stream's messages are removed.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if s, err := r.js.Stream(ctx, r.cfg.Stream); err != nil || s.Purge(ctx) != nil {
		t.Fatalf("purge: %v", err)
	}
	for i := range r.nats.Nodes {
		r.nats.Shutdown(i)
	}
	if err := r.nats.Restart(); err != nil {
		t.Fatal(err)
	}
	// The stream's leader is back before the next publish: it goes out
	// chained to the last one, as when NATS restarts between two.
	waitFor(t, 30*time.Second, "the stream's leader", leader)
	r.publish(t, 50, 50)
	waitFor(t, 45*time.Second, "the publishes after the restart", func() bool { return r.done.Load() == 100 })
	waitFor(t, 30*time.Second, "the stream's leader after them", leader)
	ids := r.stored(t)
	if len(ids) != 50 {
		t.Fatalf("stream holds %d messages, want 50", len(ids))
	}
	for i, id := range ids {
		if id != fmt.Sprint(50+i) {
			t.Fatalf("message %d is event %s: out of order", i, id)
		}
	}
}

// TestPublisherKeepsEachReplay: a dead letter replayed twice is two
// deliveries; the second must not be dropped as a duplicate of the first. A
// replay keeps the event's id, webhook-id and commit time, so only its own
// place in the stream (ReplaySeq) tells the two apart.
func TestPublisherKeepsEachReplay(t *testing.T) {
	r := newRig(t)
	ev := outbox.Event{ID: "7", Type: "t", ResourceID: "r", Payload: json.RawMessage(`{}`), Seq: 7,
		CommitTime: time.Now(), WebhookID: "msg_first"}
	for i, at := range []uint64{1000, 2000} {
		ev.ReplaySeq = at
		if err := r.pub.Publish(context.Background(), r.ep, r.sub, ev, func() { r.done.Add(1) }); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 20*time.Second, fmt.Sprintf("replay %d stored", i+1), func() bool { return r.done.Load() == int64(i+1) })
	}
	if ids := r.stored(t); len(ids) != 2 {
		t.Fatalf("the stream holds %d messages for two replays: the second was taken for a duplicate", len(ids))
	}
}

// TestOldestEvent: the oldest event still in the stream, past what workers
// finished; none once it is empty.
func TestOldestEvent(t *testing.T) {
	cfg, js := testJetStream(t, 1, Config{Stream: "O", Partitions: 2, Replicas: 1})
	ctx := context.Background()
	s, err := EnsureStream(ctx, js, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok, err := OldestEvent(ctx, js, cfg); ok || err != nil {
		t.Fatalf("an empty stream: %v, %v", ok, err)
	}
	if _, err := js.Publish(ctx, cfg.keepSubject(), nil); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := OldestEvent(ctx, js, cfg); ok || err != nil {
		t.Fatalf("a stream of the keep message alone: %v, %v", ok, err)
	}
	var seqs []uint64
	for i, ev := range []uint64{7 << 16, 9 << 16} {
		data, _ := json.Marshal(message{Subscription: "s", Event: outbox.Event{ID: fmt.Sprint(i), Type: "t", ResourceID: "r",
			Seq: ev, Payload: []byte(`{}`)}})
		ack, err := js.Publish(ctx, cfg.subject(i), data)
		if err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, ack.Sequence)
	}
	if got, ok, err := OldestEvent(ctx, js, cfg); !ok || err != nil || got != 7<<16 {
		t.Fatalf("OldestEvent: %d, %v, %v; want %d", got, ok, err, 7<<16)
	}
	if err := s.DeleteMsg(ctx, seqs[0]); err != nil { // finished
		t.Fatal(err)
	}
	if got, ok, err := OldestEvent(ctx, js, cfg); !ok || err != nil || got != 9<<16 {
		t.Fatalf("OldestEvent after the first finished: %d, %v, %v; want %d", got, ok, err, 9<<16)
	}
}

// TestStreamPartitionsFixed: a process configured with another number of
// partitions than the stream was created with is refused, naming the key.
func TestStreamPartitionsFixed(t *testing.T) {
	cfg, js := testJetStream(t, 1, Config{Stream: "P", Partitions: 8, Replicas: 1})
	ctx := context.Background()
	if _, err := EnsureStream(ctx, js, cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := EnsureStream(ctx, js, cfg); err != nil {
		t.Fatalf("the same partitions again: %v", err)
	}
	other := cfg
	other.Partitions = 4
	_, err := EnsureStream(ctx, js, other)
	if !errors.Is(err, ErrPartitions) || !strings.Contains(err.Error(), "relay.partitions is 4") || !strings.Contains(err.Error(), "created with 8") {
		t.Fatalf("4 partitions on a stream of 8: %v", err)
	}
}

// TestKeepMessageSparesBlockFiles: in a work queue that keeps up, every
// acknowledgement empties the file store's last block, and nats-server then
// creates a new block file (an open, a write and an unlink each time, the
// largest part of its CPU at 1,000 events/s). The publisher's keep message
// holds the last block, so one block file serves many acknowledgements.
func TestKeepMessageSparesBlockFiles(t *testing.T) {
	r := newRig(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := EnsureStream(ctx, r.js, r.cfg)
	if err != nil {
		t.Fatal(err)
	}
	c, err := s.CreateConsumer(ctx, jetstream.ConsumerConfig{Durable: "all", FilterSubject: r.cfg.Stream + ".p.*",
		AckPolicy: jetstream.AckExplicitPolicy})
	if err != nil {
		t.Fatal(err)
	}
	finish := func() { // as a worker would: the stream empties but for the keep message
		t.Helper()
		b, err := c.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		for m := range b.Messages() {
			if err := m.DoubleAck(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	r.publish(t, 0, 1)
	waitFor(t, 20*time.Second, "the first publish", func() bool { return r.done.Load() == 1 })
	finish()
	waitFor(t, 20*time.Second, "the keep message", func() bool {
		info, err := s.Info(ctx, jetstream.WithSubjectFilter(r.cfg.keepSubject()))
		return err == nil && info.State.Subjects[r.cfg.keepSubject()] == 1
	})
	const rounds = 100
	for i := 1; i <= rounds; i++ {
		r.publish(t, i, 1)
		waitFor(t, 20*time.Second, "a publish", func() bool { return r.done.Load() == int64(i+1) })
		finish()
	}
	if n, err := Deliveries(ctx, s, r.cfg); err != nil || n != 0 {
		t.Fatalf("Deliveries: %d, %v; want 0: the keep message is not a delivery", n, err)
	}
	dir := filepath.Join(r.nats.Nodes[0].Server().StoreDir(), "$G", "streams", r.cfg.Stream, "msgs")
	blks, err := filepath.Glob(filepath.Join(dir, "*.blk"))
	if err != nil || len(blks) == 0 {
		t.Fatalf("no block files in %s: %v (has nats-server's store layout changed?)", dir, err)
	}
	last := 0
	for _, b := range blks {
		n, _ := strconv.Atoi(strings.TrimSuffix(filepath.Base(b), ".blk"))
		last = max(last, n)
	}
	if last > 10 {
		t.Fatalf("the file store is at block %d after %d acknowledgements that emptied the stream: a new block file each time", last, rounds)
	}
}

// TestEnsureStreamAddsTheKeepSubject: a stream created before the keep
// message gains its subject and rollups, and keeps its partitions' messages.
func TestEnsureStreamAddsTheKeepSubject(t *testing.T) {
	cfg, js := testJetStream(t, 1, Config{Stream: "U", Partitions: 2, Replicas: 1})
	ctx := context.Background()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "U", Subjects: []string{"U.p.*"}, Retention: jetstream.WorkQueuePolicy,
		Storage: jetstream.FileStorage, Replicas: 1, Discard: jetstream.DiscardNew, Metadata: map[string]string{partitionsKey: "2"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, cfg.subject(1), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	s, err := EnsureStream(ctx, js, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if got := s.CachedInfo().Config; !slices.Contains(got.Subjects, cfg.keepSubject()) || !got.AllowRollup {
		t.Fatalf("after EnsureStream: subjects %v, allow_rollup_hdrs %v", got.Subjects, got.AllowRollup)
	}
	keep := &nats.Msg{Subject: cfg.keepSubject(), Header: nats.Header{jetstream.MsgRollup: []string{jetstream.MsgRollupSubject}}}
	for range 2 {
		if _, err := js.PublishMsg(ctx, keep); err != nil {
			t.Fatal(err)
		}
	}
	if n, err := Deliveries(ctx, s, cfg); err != nil || n != 1 {
		t.Fatalf("Deliveries: %d, %v; want the one published before", n, err)
	}
}

// TestKeepMessageNeverWithoutExpectation: once another writer stored a
// message after the publisher's last, the publisher's keep message is
// refused and not tried again (without an expectation it would be stored,
// and could take the place another sidecar's next publish expects). A
// delivery published afterwards goes serial, and is stored.
func TestKeepMessageNeverWithoutExpectation(t *testing.T) {
	r := newRig(t)
	r.publish(t, 0, 1)
	waitFor(t, 20*time.Second, "the first publish", func() bool { return r.done.Load() == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ack, err := r.js.Publish(ctx, r.cfg.subject(0), []byte(`{}`)) // another writer
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "the keep message refused", func() bool {
		return strings.Contains(r.logs.String(), "cannot publish the relay stream's keep message")
	})
	s, err := r.js.Stream(ctx, r.cfg.Stream)
	if err != nil {
		t.Fatal(err)
	}
	if last := s.CachedInfo().State.LastSeq; last != ack.Sequence {
		t.Fatalf("the stream's last sequence is %d, the other writer's %d: the publisher stored something after it", last, ack.Sequence)
	}
	if ok, _ := r.pub.Health(); !ok {
		t.Errorf("a refused keep message made the publisher unhealthy")
	}
	r.publish(t, 1, 1)
	waitFor(t, 20*time.Second, "a delivery after it", func() bool { return r.done.Load() == 2 })
}

func testEvent(id string, seq uint64) outbox.Event {
	return outbox.Event{ID: id, Type: "t", ResourceID: "r", Payload: json.RawMessage(`{}`), Seq: seq}
}

// TestPublisherOfAStaleEpochStoresNothing: a sidecar frozen past
// wal_sender_timeout (SIGSTOP, say) is replaced, and thaws with publishes
// queued. Its epoch is past its freshness (the stream's last message from
// the server plus stall_timeout): it publishes none of them, and its epoch
// ends. (Before, they went out before its stream noticed the stall; and the
// chain of expected sequences does not stop them: with one foreign message
// in the stream, the zombie's second publish expects exactly its sequence.)
func TestPublisherOfAStaleEpochStoresNothing(t *testing.T) {
	r := newRig(t)
	r.ep.FreshUntil(time.Now().Add(time.Hour))
	r.publish(t, 0, 10)
	waitFor(t, 20*time.Second, "the first publishes", func() bool { return r.done.Load() == 10 })
	r.ep.FreshUntil(time.Now().Add(-time.Second)) // frozen: the server went silent for it long ago
	r.fenced.Store(true)                          // and another sidecar took the slot
	holder := r.startPublisher(t, &testwait.Buffer{}, nil)
	var held atomic.Int64
	if err := holder.Publish(context.Background(), outbox.NewEpoch(context.Background(), 1), r.sub, testEvent("h", 100), func() { held.Add(1) }); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "the holder's publish", func() bool { return held.Load() == 1 })
	r.publish(t, 10, 10) // the zombie thaws
	waitFor(t, 20*time.Second, "the zombie's publishes dropped", func() bool { return r.pub.Pending() == 0 })
	if !errors.Is(r.ep.Err(), outbox.ErrStale) {
		t.Fatalf("the zombie's epoch: %v, want ended with ErrStale", r.ep.Err())
	}
	want := []string{"0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "h"}
	if got := r.stored(t); !slices.Equal(got, want) {
		t.Fatalf("stream %v, want %v: the zombie stored after the holder", got, want)
	}
	if n := r.done.Load(); n != 10 {
		t.Errorf("%d of the zombie's publishes acknowledged, want the first 10", n)
	}
}

// TestPublisherFenceReadsBeforeItAsks: the fence reads the stream's last
// sequence before it asks whether this process holds the slot. Another
// sidecar that takes the slot right after the answer and stores at once
// moves that sequence, so the publish that expected it is refused, and the
// next fence is told. Read after asking, it would be stored after the new
// holder's.
func TestPublisherFenceReadsBeforeItAsks(t *testing.T) {
	r := newRig(t)
	r.publish(t, 0, 1)
	waitFor(t, 20*time.Second, "the first publish", func() bool { return r.done.Load() == 1 })
	holder := r.startPublisher(t, &testwait.Buffer{}, nil)
	var asked atomic.Int64
	var lost atomic.Bool
	held := make(chan struct{})
	zombie := r.startPublisher(t, &testwait.Buffer{}, func(ctx context.Context) error {
		asked.Add(1)
		if lost.Load() {
			return outbox.ErrFenced
		}
		// Right after this answer, another sidecar takes the slot and stores.
		lost.Store(true)
		if err := holder.Publish(ctx, outbox.NewEpoch(context.Background(), 1), r.sub, testEvent("h", 100), func() { close(held) }); err != nil {
			return err
		}
		select {
		case <-held:
			return nil
		case <-ctx.Done(): // the fence's own bound, 5 s
			return errors.New("the holder's publish was not stored while the zombie fenced")
		}
	})
	ze := outbox.NewEpoch(context.Background(), 1)
	if err := zombie.Publish(context.Background(), ze, r.sub, testEvent("z", 50), func() { t.Error("the zombie's publish was acknowledged") }); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the zombie's epoch to end", func() bool { return ze.Err() != nil })
	if !errors.Is(ze.Err(), outbox.ErrFenced) || asked.Load() != 2 {
		t.Fatalf("the zombie's epoch ended with %v after %d questions, want ErrFenced after 2", ze.Err(), asked.Load())
	}
	if got, want := r.stored(t), []string{"0", "h"}; !slices.Equal(got, want) {
		t.Fatalf("stream %v, want %v", got, want)
	}
}

// TestPublisherFenceCutByTheEpochsEnd: an epoch that ends while its
// publisher fences (the session lost, a yield) is no failure of publishing:
// the publisher stays healthy. (It used to count the fence's cancelled
// context as one, and only a later acknowledged publish cleared it, which a
// sidecar that became a standby never makes: /readyz stayed 503.)
func TestPublisherFenceCutByTheEpochsEnd(t *testing.T) {
	r := newRig(t)
	ep := outbox.NewEpoch(context.Background(), 7)
	p := r.startPublisher(t, &testwait.Buffer{}, func(ctx context.Context) error {
		ep.End(nil) // the session ends meanwhile
		<-ctx.Done()
		return ctx.Err()
	})
	if err := p.Publish(context.Background(), ep, r.sub, testEvent("z", 1), func() { t.Error("acknowledged") }); err != nil {
		t.Fatal(err)
	}
	// Dropped after the fence returned: any failure it counted is in by then.
	waitFor(t, 10*time.Second, "the publish dropped", func() bool { return p.Pending() == 0 })
	if ok, reason := p.Health(); !ok {
		t.Errorf("unhealthy after an epoch's clean end: %s", reason)
	}
}
