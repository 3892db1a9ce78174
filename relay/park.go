package relay

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/walhook/walhook/outbox"
)

// Parking in relay mode (docs/scale-out.md, "Parking in relay mode"): a
// worker's schedulers park a failing resource's events into the stream
// <stream>_parked, one subject per (subscription, resource), fenced by the
// partition's owner marker.

// Headers of a parked message (its body is the relay message).
const (
	hdrKey      = "Walhook-Key"      // JSON ["subscription","resource"]
	hdrSeq      = "Walhook-Seq"      // the event's sequence
	hdrSince    = "Walhook-Since"    // retry_for runs from here (Unix nanoseconds)
	hdrAttempts = "Walhook-Attempts" // attempts made before it was parked
)

// parked is the park stream's name.
func (c Config) parked() string { return c.Stream + "_parked" }

// parkSubject is where (subscription, resource) of partition n is parked.
func (c Config) parkSubject(n int, subscription, resource string) string {
	h := sha256.New()
	h.Write([]byte(subscription))
	h.Write([]byte{0})
	h.Write([]byte(resource))
	return c.parked() + "." + strconv.Itoa(n) + ".k." + hex.EncodeToString(h.Sum(nil)[:12])
}

// markerSubject holds partition n's owner markers: the newest one's stream
// sequence fences every park publish of the partition.
func (c Config) markerSubject(n int) string { return c.parked() + "." + strconv.Itoa(n) + ".o" }

// ensureParkStream creates the park stream if it is missing.
func ensureParkStream(ctx context.Context, js jetstream.JetStream, c Config) (jetstream.Stream, error) {
	cfg := jetstream.StreamConfig{
		Name: c.parked(), Subjects: []string{c.parked() + ".>"}, Retention: jetstream.LimitsPolicy,
		Storage: jetstream.FileStorage, Replicas: c.Replicas, Duplicates: c.Duplicates, Discard: jetstream.DiscardNew,
		// No direct gets: a follower may not have a row yet, and a
		// resource read as drained while a row of it is still to come would
		// let a newer event overtake it.
	}
	s, err := js.Stream(ctx, cfg.Name)
	switch {
	case errors.Is(err, jetstream.ErrStreamNotFound):
		s, err = js.CreateStream(ctx, cfg)
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			s, err = js.Stream(ctx, cfg.Name)
		}
	case err == nil:
		if have := s.CachedInfo().Config; have.Replicas != cfg.Replicas || have.Duplicates != cfg.Duplicates {
			s, err = js.UpdateStream(ctx, cfg)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("create stream %s: %w", cfg.Name, err)
	}
	return s, nil
}

// parkIndex is what an owner knows of its partition's parked resources.
type parkIndex struct {
	pub      sync.Mutex // held while a park publish of the partition is in flight
	mu       sync.Mutex
	fence    uint64                // the stream sequence of this owner's marker; 0: not loaded
	epoch    uint64                // the worker epoch that loaded it: it serves that epoch's schedulers only
	detached bool                  // handed over: feed nothing more
	keys     map[string]*parkedKey // by subject
	flight   map[uint64]bool       // rows handed to a scheduler and not settled yet
}

type parkedKey struct {
	sub, resource string
	maxSeq        uint64    // the highest event sequence parked
	from          uint64    // the stream sequence to read its next rows from: rows before it were handed out and finished
	pre           *prefetch // its next row, read while the rows handed out are sent
	next          time.Time // when its next attempt is due (zero: now)
	attempts      int       // attempts of its head rows so far (owner's memory)
}

// prefetch is a resource's next parked row, read from from in the
// background while its head is being sent: the scheduler's loop then waits
// for no round trip. Only a row found is used (one parked meanwhile may
// follow a miss).
type prefetch struct {
	from uint64
	done chan struct{}
	raw  *jetstream.RawStreamMsg
	err  error
}

// parkStore is the parking half of a worker's outbox.Store.
type parkStore struct {
	w      *Worker
	stream jetstream.Stream

	mu   sync.Mutex
	rows map[uint64]rowRef // rows handed out by NextParked and not settled

	deletes  chan uint64     // finished rows, deleted in the background (deleter)
	finished map[uint64]bool // queued in deletes: never handed out again
}

// deleteQueue bounds the finished rows waiting to be deleted; Unpark waits
// beyond it.
const deleteQueue = 4096

// deleter deletes finished rows off the scheduler's path: NextParked reads
// from a resource's cursor, so a row finished and not deleted yet is not
// read again. A row whose delete was lost (a crash, NATS unreachable) is
// sent again by the next owner: a duplicate with the same webhook-id. When
// ctx ends it deletes what is queued for up to 5 s more.
func (s *parkStore) deleter(ctx context.Context) {
	del := func(ctx context.Context, seq uint64) {
		for attempt := 0; ; attempt++ {
			dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err := s.stream.DeleteMsg(dctx, seq)
			cancel()
			if err == nil || errors.Is(err, jetstream.ErrMsgNotFound) || errors.Is(err, jetstream.ErrMsgDeleteUnsuccessful) {
				s.w.m.unparked.Inc()
				break
			}
			if attempt == 2 || sleep(ctx, 250*time.Millisecond) != nil {
				s.w.log.Debug().Err(err).Uint64("row", seq).Msg("cannot delete a finished parked row: a next owner sends it again")
				break
			}
		}
		s.mu.Lock()
		delete(s.finished, seq)
		s.mu.Unlock()
	}
	for {
		select {
		case seq := <-s.deletes:
			del(ctx, seq)
		case <-ctx.Done():
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			for {
				select {
				case seq := <-s.deletes:
					del(fctx, seq)
				default:
					return
				}
			}
		}
	}
}

func (s *parkStore) cfg() Config { return s.w.cfg.Relay }

// epochKey carries the worker epoch a call belongs to (runEpoch puts it in
// the epoch's context, so every scheduler's calls carry it).
type epochKey struct{}

func withEpoch(ctx context.Context, n uint64) context.Context {
	return context.WithValue(ctx, epochKey{}, n)
}

func epochOf(ctx context.Context) uint64 {
	n, _ := ctx.Value(epochKey{}).(uint64)
	return n
}

// servesLocked says whether px was loaded in epoch n. px.mu is held.
func (px *parkIndex) servesLocked(n uint64) bool { return px.fence != 0 && px.epoch == n }

// index returns partition n's index while this worker owns it, loaded in
// the caller's epoch.
func (s *parkStore) index(ctx context.Context, n int) *parkIndex {
	s.w.mu.Lock()
	p := s.w.owned[n]
	s.w.mu.Unlock()
	if p == nil {
		return nil
	}
	p.park.mu.Lock()
	loaded := p.park.servesLocked(epochOf(ctx))
	p.park.mu.Unlock()
	if !loaded {
		return nil
	}
	return p.park
}

// load fences partition n and reads its parked resources: a marker first,
// so that no older owner can park more once the reading starts. Every worker
// epoch loads its partitions again behind a marker of its own: a park
// publish of an ended epoch that JetStream receives late (it was on the
// wire, or in the client's reconnect buffer, when the epoch ended) is then
// either before the marker, and read, or after it, and refused. With one
// marker per ownership such a late row was stored unseen, and after the
// next owner loaded it, it went out after newer events of its resource.
func (s *parkStore) load(ctx context.Context, p *partition) error {
	p.park.mu.Lock()
	done := p.park.servesLocked(epochOf(ctx))
	p.park.mu.Unlock()
	if done {
		return nil
	}
	lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	subj := s.cfg().markerSubject(p.n)
	ack, err := s.w.cfg.JetStream.Publish(lctx, subj, []byte(s.w.cfg.ID))
	if err != nil {
		return fmt.Errorf("fence parked deliveries of partition %d: %w", p.n, err)
	}
	if err := s.stream.Purge(lctx, jetstream.WithPurgeSubject(subj), jetstream.WithPurgeKeep(1)); err != nil {
		s.w.log.Debug().Err(err).Int("partition", p.n).Msg("cannot purge older owner markers")
	}
	keys := map[string]*parkedKey{}
	prefix := s.cfg().parked() + "." + strconv.Itoa(p.n) + ".k."
	// The rows and the markers, read up to our marker: everything parked
	// before it is then read. Not up to the consumer's NumPending: this
	// consumer has one replica, which may be a follower still catching up
	// after a cluster restart, and counted from there rows parked before the
	// marker were missed, and their newer events sent before them
	// (TestChaosRelay, seed 1796162397722962681).
	cons, err := s.stream.CreateConsumer(lctx, jetstream.ConsumerConfig{
		FilterSubjects: []string{prefix + "*", subj}, HeadersOnly: true, AckPolicy: jetstream.AckNonePolicy,
		DeliverPolicy: jetstream.DeliverAllPolicy, InactiveThreshold: time.Minute, Replicas: 1, MemoryStorage: true,
	})
	if err != nil {
		return fmt.Errorf("read parked deliveries of partition %d: %w", p.n, err)
	}
	defer s.stream.DeleteConsumer(context.WithoutCancel(lctx), cons.CachedInfo().Name)
	for fenced, noResponders := false, 0; !fenced; {
		batch, err := cons.Fetch(1024, jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			return fmt.Errorf("read parked deliveries of partition %d: %w", p.n, err)
		}
		got := 0
		for m := range batch.Messages() {
			got++
			if m.Subject() == subj {
				if md, err := m.Metadata(); err == nil && md.Sequence.Stream >= ack.Sequence {
					fenced = true // ours, or a newer owner's (which fences us anyway)
					break
				}
				continue
			}
			sub, res, seq, ok := parkHeaders(m.Headers())
			if !ok {
				continue
			}
			k := keys[m.Subject()]
			if k == nil {
				k = &parkedKey{sub: sub, resource: res}
				keys[m.Subject()] = k
			}
			k.maxSeq = max(k.maxSeq, seq)
		}
		if fenced {
			break
		}
		err = batch.Error()
		if got == 0 && errors.Is(err, nats.ErrNoResponders) && noResponders < 40 {
			// The consumer was just created on some node of the cluster,
			// and the interest in its pull requests has not reached the
			// node this connection is on yet (seen in CI on a three-node
			// cluster). Ask again for up to 2 s; longer, its node is gone,
			// and the caller's next load makes another.
			noResponders++
			if sleep(lctx, 50*time.Millisecond) != nil {
				return fmt.Errorf("read parked deliveries of partition %d: %w", p.n, err)
			}
			continue
		}
		if err != nil && !errors.Is(err, nats.ErrTimeout) && !errors.Is(err, jetstream.ErrNoMessages) {
			return fmt.Errorf("read parked deliveries of partition %d: %w", p.n, err)
		}
		if got == 0 {
			return fmt.Errorf("read parked deliveries of partition %d: its marker (stream sequence %d) did not come", p.n, ack.Sequence)
		}
	}
	p.park.mu.Lock()
	p.park.fence, p.park.epoch, p.park.keys = ack.Sequence, epochOf(ctx), keys
	p.park.mu.Unlock()
	if len(keys) > 0 {
		s.w.log.Info().Int("partition", p.n).Int("resources", len(keys)).Msg("parked resources loaded")
	}
	return nil
}

func parkHeaders(h nats.Header) (sub, res string, seq uint64, ok bool) {
	var key []string
	if json.Unmarshal([]byte(h.Get(hdrKey)), &key) != nil || len(key) != 2 {
		return "", "", 0, false
	}
	seq, err := strconv.ParseUint(h.Get(hdrSeq), 10, 64)
	return key[0], key[1], seq, err == nil
}

// Park publishes events of one subscription, each behind the fence of its
// partition's owner marker: refused (ErrFenced) once a newer owner, or a
// newer epoch of this worker, marked it.
func (s *parkStore) Park(ctx context.Context, sub string, events []outbox.ParkedEvent) error {
	for _, pe := range events {
		if err := s.park1(ctx, sub, pe); err != nil {
			return err
		}
	}
	return nil
}

// park1 publishes one parked event. The partition's park publishes go one at
// a time: each expects the same marker, and a replicated stream refuses an
// expectation on a subject while another one on it is being proposed
// (error 10164, "wrong last sequence", which is not a verdict on the fence;
// it is retried).
// Taken for a fence, those refusals ended the worker's epoch whenever two
// subscriptions parked into one partition at once.
func (s *parkStore) park1(ctx context.Context, sub string, pe outbox.ParkedEvent) error {
	ev := pe.Event
	n := Partition(sub, ev.ResourceID, s.cfg().Partitions)
	px := s.index(ctx, n)
	if px == nil {
		return fmt.Errorf("park into partition %d: not owned: %w", n, outbox.ErrFenced)
	}
	data, err := json.Marshal(message{Subscription: sub, Event: ev})
	if err != nil {
		return fmt.Errorf("park: %w: %w", err, outbox.ErrPermanent)
	}
	key, _ := json.Marshal([]string{sub, ev.ResourceID})
	subj := s.cfg().parkSubject(n, sub, ev.ResourceID)
	msg := &nats.Msg{Subject: subj, Data: data, Header: nats.Header{}}
	msg.Header.Set(hdrKey, string(key))
	msg.Header.Set(hdrSeq, strconv.FormatUint(ev.Seq, 10))
	msg.Header.Set(hdrSince, strconv.FormatInt(pe.Since.UnixNano(), 10))
	msg.Header.Set(hdrAttempts, strconv.Itoa(pe.Attempts))
	px.pub.Lock()
	px.mu.Lock()
	fence, serves := px.fence, px.servesLocked(epochOf(ctx))
	px.mu.Unlock()
	if !serves {
		px.pub.Unlock()
		return fmt.Errorf("park into partition %d: loaded again since: %w", n, outbox.ErrFenced)
	}
	for attempt := 1; ; attempt++ {
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err = s.w.cfg.JetStream.PublishMsg(pctx, msg, jetstream.WithMsgID(msgID(sub, &ev)),
			jetstream.WithExpectLastSequenceForSubject(fence, s.cfg().markerSubject(n)))
		cancel()
		// The server may still count the previous publish as being
		// proposed just after it acknowledged it: a conflict is retried
		// at once a few times (the scheduler retries beyond).
		if !isCASConflict(err) || attempt == 10 || sleep(ctx, time.Duration(attempt)*time.Millisecond) != nil {
			break
		}
	}
	px.pub.Unlock()
	switch {
	case isCASConflict(err):
		return fmt.Errorf("park into partition %d: a concurrent write: %w", n, err) // retried
	case isWrongRevision(err):
		s.w.m.parkFenced.Inc()
		return fmt.Errorf("park into partition %d: a newer owner marked it: %w", n, outbox.ErrFenced)
	case errors.Is(err, nats.ErrMaxPayload):
		return fmt.Errorf("park: %w: %w", err, outbox.ErrPermanent)
	case err != nil:
		return fmt.Errorf("park into partition %d: %w", n, err)
	}
	px.mu.Lock()
	if px.servesLocked(epochOf(ctx)) { // else a newer epoch's load read the row
		k := px.keys[subj]
		if k == nil {
			k = &parkedKey{sub: sub, resource: ev.ResourceID}
			px.keys[subj] = k
		}
		k.maxSeq, k.next = max(k.maxSeq, ev.Seq), pe.NextAttempt
	}
	px.mu.Unlock()
	s.w.m.parked.Inc()
	return nil
}

// ParkedKeys lists sub's parked resources in the partitions this worker owns.
func (s *parkStore) ParkedKeys(ctx context.Context, sub string) ([]outbox.ParkedKey, error) {
	var out []outbox.ParkedKey
	for _, px := range s.indexes(ctx) {
		px.mu.Lock()
		for _, k := range px.keys {
			if k.sub == sub && !px.detached {
				out = append(out, outbox.ParkedKey{Resource: k.resource, NextAttempt: k.next, MaxSeq: k.maxSeq})
			}
		}
		px.mu.Unlock()
	}
	return out, nil
}

// owned returns the indexes of the owned partitions, in any epoch.
func (s *parkStore) owned() []*parkIndex {
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	out := make([]*parkIndex, 0, len(s.w.owned))
	for _, p := range s.w.owned {
		out = append(out, p.park)
	}
	return out
}

// indexes returns the indexes of the owned partitions loaded in the
// caller's epoch.
func (s *parkStore) indexes(ctx context.Context) []*parkIndex {
	n := epochOf(ctx)
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	out := make([]*parkIndex, 0, len(s.w.owned))
	for _, p := range s.w.owned {
		p.park.mu.Lock()
		if p.park.servesLocked(n) {
			out = append(out, p.park)
		}
		p.park.mu.Unlock()
	}
	return out
}

// NextParked reads a resource's next parked events in subject order. It
// never answers "none" for rows that exist while an event of the resource
// could still be sent by this epoch: a partition being handed over (or
// detached) answers outbox.ErrFeedLater, and so does one taken again and
// not loaded yet. None for a partition this worker no longer owns: then
// nothing of it can be sent (sends cuts an attempt for it, park1 refuses a
// park into it), and its next owner loads the rows.
func (s *parkStore) NextParked(ctx context.Context, sub, resource string, limit, maxBytes int) ([]outbox.ParkedEvent, error) {
	if err := ctx.Err(); err != nil {
		return nil, err // the caller's epoch ended: "none" would let it forget rows that are still there
	}
	n := Partition(sub, resource, s.cfg().Partitions)
	s.w.mu.Lock()
	p := s.w.owned[n]
	s.w.mu.Unlock()
	if p == nil {
		return nil, ctx.Err() // handed over (nil), or lost: then the epoch ended first (lose)
	}
	px := p.park
	subj := s.cfg().parkSubject(n, sub, resource)
	px.mu.Lock()
	k, detached, serves, loading := px.keys[subj], px.detached, px.servesLocked(epochOf(ctx)), px.fence == 0
	px.mu.Unlock()
	if !serves && loading {
		return nil, outbox.ErrFeedLater // taken again in this epoch, its rows not loaded yet
	}
	if !serves {
		return nil, fmt.Errorf("read parked deliveries of partition %d: loaded again since: %w", n, outbox.ErrFenced)
	}
	if k == nil {
		return nil, nil
	}
	if detached || s.w.handingOver(p) {
		// Its rows stay for the next owner, and the resource stays parked
		// here: "none" would return it to memory, and a message of it still
		// on its way in (a fetch stops asynchronously) would overtake them.
		// A relay chaos run saw exactly that (seed 1796174492501587660).
		return nil, outbox.ErrFeedLater
	}
	var out []outbox.ParkedEvent
	size := 0
	px.mu.Lock()
	from := max(k.from, 1)
	px.mu.Unlock()
	for seq := from; len(out) < max(limit, 1); {
		raw, err := s.get(ctx, px, k, seq, subj)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("read parked deliveries: %w", err)
		}
		seq = raw.Sequence + 1
		s.mu.Lock()
		done := s.finished[raw.Sequence]
		s.mu.Unlock()
		if done {
			continue // finished; its delete is queued
		}
		m, err := decodeMessage(raw.Data)
		if err != nil {
			s.w.log.Error().Err(err).Uint64("row", raw.Sequence).Msg("unreadable parked message deleted")
			s.stream.DeleteMsg(ctx, raw.Sequence)
			continue
		}
		if len(out) > 0 && size+len(m.Event.Payload) > maxBytes {
			break
		}
		size += len(m.Event.Payload)
		since, _ := strconv.ParseInt(raw.Header.Get(hdrSince), 10, 64)
		attempts, _ := strconv.Atoi(raw.Header.Get(hdrAttempts))
		px.mu.Lock()
		attempts, next := max(attempts, k.attempts), k.next
		px.mu.Unlock()
		out = append(out, outbox.ParkedEvent{Row: int64(raw.Sequence), Event: m.Event, Attempts: attempts,
			Since: time.Unix(0, since), NextAttempt: next})
	}
	px.mu.Lock()
	defer px.mu.Unlock()
	if !px.servesLocked(epochOf(ctx)) {
		return nil, fmt.Errorf("read parked deliveries of partition %d: loaded again since: %w", n, outbox.ErrFenced)
	}
	if px.detached {
		return nil, outbox.ErrFeedLater // handed over meanwhile: its next owner sends them
	}
	if len(out) == 0 {
		if px.keys[subj] == k {
			delete(px.keys, subj)
		}
		return nil, nil
	}
	k.from = uint64(out[len(out)-1].Row) + 1
	pre := &prefetch{from: k.from, done: make(chan struct{})}
	k.pre = pre
	go func() {
		defer close(pre.done)
		gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		pre.raw, pre.err = s.stream.GetMsg(gctx, pre.from, jetstream.WithGetMsgSubject(subj))
	}()
	s.mu.Lock()
	for _, pe := range out {
		px.flight[uint64(pe.Row)] = true
		s.rows[uint64(pe.Row)] = rowRef{n: n, subj: subj}
	}
	s.mu.Unlock()
	return out, nil
}

// get reads a resource's first row at or after seq: its prefetch if that
// found one from seq, else from the stream.
func (s *parkStore) get(ctx context.Context, px *parkIndex, k *parkedKey, seq uint64, subj string) (*jetstream.RawStreamMsg, error) {
	px.mu.Lock()
	pre := k.pre
	k.pre = nil
	px.mu.Unlock()
	if pre != nil && pre.from == seq {
		select {
		case <-pre.done:
			if pre.err == nil {
				return pre.raw, nil
			}
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return s.stream.GetMsg(gctx, seq, jetstream.WithGetMsgSubject(subj))
}

// settle forgets rows handed out by NextParked; it returns each row's
// place, with a nil index for a partition no longer owned.
func (s *parkStore) settle(rows []int64) map[uint64]rowRef {
	out := make(map[uint64]rowRef, len(rows))
	s.mu.Lock()
	for _, r := range rows {
		if ref, ok := s.rows[uint64(r)]; ok {
			out[uint64(r)] = ref
			delete(s.rows, uint64(r))
		}
	}
	s.mu.Unlock()
	for r, ref := range out {
		s.w.mu.Lock()
		p := s.w.owned[ref.n]
		s.w.mu.Unlock()
		ref.px = nil
		if p != nil {
			p.park.mu.Lock()
			delete(p.park.flight, r)
			p.park.mu.Unlock()
			ref.px = p.park
		}
		out[r] = ref
	}
	return out
}

// rowRef is where a row handed out by NextParked belongs.
type rowRef struct {
	n    int
	subj string
	px   *parkIndex // set by settle
}

// Unpark deletes delivered rows.
func (s *parkStore) Unpark(ctx context.Context, rows []int64) error {
	for r, ref := range s.settle(rows) {
		if ref.px == nil {
			return fmt.Errorf("unpark: partition %d is no longer owned: %w", ref.n, outbox.ErrFenced)
		}
		s.mu.Lock()
		s.finished[r] = true
		s.mu.Unlock()
		select {
		case s.deletes <- r:
		case <-ctx.Done():
			return ctx.Err() // not deleted: a next owner sends it again
		}
	}
	return nil
}

// Reschedule remembers a failed attempt of a resource's head rows, in this
// owner's memory (a next owner retries at once).
func (s *parkStore) Reschedule(_ context.Context, rows []int64, attempts int, next time.Time, _ string) error {
	for r, ref := range s.settle(rows) {
		if ref.px == nil {
			return fmt.Errorf("reschedule: partition %d is no longer owned: %w", ref.n, outbox.ErrFenced)
		}
		ref.px.mu.Lock()
		if k := ref.px.keys[ref.subj]; k != nil {
			k.attempts, k.next = attempts, next
			k.from, k.pre = min(k.from, r), nil // read again
		}
		ref.px.mu.Unlock()
	}
	return nil
}

// DropParked purges a deleted subscription's parked events in the owned partitions.
func (s *parkStore) DropParked(ctx context.Context, sub string) error {
	for _, px := range s.indexes(ctx) {
		if err := s.dropIn(ctx, px, sub); err != nil {
			return err
		}
	}
	return nil
}

// dropIn purges sub's parked events in one partition's index.
func (s *parkStore) dropIn(ctx context.Context, px *parkIndex, sub string) error {
	px.mu.Lock()
	var subjects []string
	for subj, k := range px.keys {
		if k.sub == sub {
			subjects = append(subjects, subj)
		}
	}
	px.mu.Unlock()
	for _, subj := range subjects {
		if err := s.stream.Purge(ctx, jetstream.WithPurgeSubject(subj)); err != nil {
			return fmt.Errorf("drop parked deliveries: %w", err)
		}
		px.mu.Lock()
		delete(px.keys, subj)
		s.mu.Lock()
		for r, ref := range s.rows { // in flight when it was deleted: nobody settles them
			if ref.subj == subj {
				delete(s.rows, r)
				delete(px.flight, r)
			}
		}
		s.mu.Unlock()
		px.mu.Unlock()
	}
	return nil
}

// subscriptions lists the subscriptions with parked resources in px.
func (px *parkIndex) subscriptions() []string {
	px.mu.Lock()
	defer px.mu.Unlock()
	var out []string
	for _, k := range px.keys {
		if !slices.Contains(out, k.sub) {
			out = append(out, k.sub)
		}
	}
	slices.Sort(out)
	return out
}

// DeadLetterParked moves a disabled subscription's parked events in the
// owned partitions to the dead letters: each dead letter is stored before
// its row is deleted (a crash in between leaves both: a duplicate, never a
// loss).
func (s *parkStore) DeadLetterParked(ctx context.Context, sub, reason string) error {
	for _, px := range s.indexes(ctx) {
		px.mu.Lock()
		var keys []*parkedKey
		for _, k := range px.keys {
			if k.sub == sub {
				keys = append(keys, k)
			}
		}
		px.mu.Unlock()
		for _, k := range keys {
			px.mu.Lock()
			k.from, k.pre = 0, nil // also what is in flight: its result counts no more
			px.mu.Unlock()
			for {
				rows, err := s.NextParked(ctx, sub, k.resource, 64, 4<<20)
				if errors.Is(err, outbox.ErrFeedLater) {
					break // being handed over: its next owner has the rows
				}
				if err != nil {
					return err
				}
				if len(rows) == 0 {
					break
				}
				ids := make([]int64, len(rows))
				for j, r := range rows {
					ids[j] = r.Row
					id := r.Event.WebhookID
					if id == "" {
						id = outbox.WebhookID(sub, []outbox.Event{r.Event})
					}
					if err := s.w.cfg.Store.DeadLetter(ctx, outbox.DeadLetter{Subscription: sub, Event: r.Event,
						WebhookID: id, Reason: reason, Attempts: r.Attempts, FirstAttempt: r.Since}); err != nil {
						s.settle(ids)
						return err
					}
				}
				if err := s.Unpark(ctx, ids); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// DeadLetterRows stores dead letters, then deletes their rows.
func (s *parkStore) DeadLetterRows(ctx context.Context, rows []int64, dls []outbox.DeadLetter) error {
	for _, d := range dls {
		if err := s.w.cfg.Store.DeadLetter(ctx, d); err != nil {
			return err
		}
	}
	return s.Unpark(ctx, rows)
}

// forget drops what an ended epoch had in flight of p's parked rows.
func (s *parkStore) forget(p *partition) {
	p.park.mu.Lock()
	rows := make([]int64, 0, len(p.park.flight))
	for r := range p.park.flight {
		rows = append(rows, int64(r))
	}
	clear(p.park.flight)
	p.park.fence = 0 // the next epoch loads it again, behind a marker of its own
	p.park.mu.Unlock()
	s.mu.Lock()
	for _, r := range rows {
		delete(s.rows, uint64(r))
	}
	s.mu.Unlock()
}

// parkedResources counts the parked resources of the owned partitions.
func (s *parkStore) parkedResources() int {
	n := 0
	for _, px := range s.owned() {
		px.mu.Lock()
		n += len(px.keys)
		px.mu.Unlock()
	}
	return n
}

// hasParked says whether sub has parked resources in an owned partition,
// or may have: a partition not loaded in the epoch yet.
func (s *parkStore) hasParked(sub string, epoch uint64) bool {
	for _, px := range s.owned() {
		px.mu.Lock()
		if !px.servesLocked(epoch) {
			px.mu.Unlock()
			return true // not loaded in this epoch yet: it may hold some
		}
		for _, k := range px.keys {
			if k.sub == sub {
				px.mu.Unlock()
				return true
			}
		}
		px.mu.Unlock()
	}
	return false
}

// detach stops feeding the partition's parked resources, unless a parked
// batch of it is in flight (then it says false).
func (px *parkIndex) detach() bool {
	px.mu.Lock()
	defer px.mu.Unlock()
	if len(px.flight) > 0 {
		return false
	}
	px.detached = true
	return true
}
