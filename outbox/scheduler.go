package outbox

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/rs/zerolog"
)

// pendingLimit is how many items one scheduler holds before it stops reading its
// input (and so, through the Dispatcher, pauses the stream).
const pendingLimit = 10_000

// envelopeOverhead estimates an envelope's size beyond its payload, for batch_bytes.
const envelopeOverhead = 256

// scheduler delivers one subscription's events: per-key order, debounce,
// batching, retries and max_in_flight (see docs/scheduler.md). One goroutine,
// run, owns every field below; sends run in a pool of sender goroutines (as
// many as were ever in flight at once) and report back through results.
type scheduler struct {
	sub   *Subscription
	opts  DeliveryOptions
	in    <-chan delivery
	d     *Dispatcher
	log   zerolog.Logger
	now   func() time.Time
	ctx   context.Context // run's
	sends sync.WaitGroup

	keys        map[string]*key
	ready       []*key // not busy, head ready; FIFO
	readyEvents int    // items held by keys in ready (an estimate of what a batch could take)
	retries     []*job // due for another attempt
	feeds       []*key // parked keys due for their next rows
	timers      timerHeap
	pending     int               // items held
	inFlight    int               // requests in flight
	gatherUntil time.Time         // batch_wait deadline while gathering; zero otherwise
	inTxn       bool              // events came that their transaction's commit has not followed yet
	gone        bool              // the target answered 410: drop everything
	closing     bool              // deleted: deliver what is held, then stop
	failingFrom time.Time         // first failure since the last success; zero while healthy
	disabled    bool              // dead-letter everything (the subscription is disabled)
	gen         int               // bumped when held events are let go (disable, enable, release): older results change nothing
	epoch       *Epoch            // the one it runs in
	startLSN    LSN               // where the epoch's stream started
	sentMarks   map[string]uint64 // debounced: per resource, the newest sequence sent before this epoch
	senders     int               // sender goroutines started
	jobs        chan *job         // to the senders
	results     chan result
}

type key struct {
	id       string
	items    []*item
	busy     bool // some items are in a batch
	queued   bool // in ready
	timerSet bool // a debounce or feed deadline is in timers

	// Parked keys live in walhook.deliveries (docs/parking.md).
	parked    bool
	parkedSeq uint64    // the highest sequence parked for it: the table holds or has finished everything up to it
	feedAt    time.Time // when to send the next parked rows
	feed      bool      // in feeds
}

type item struct {
	ev      Event
	txn     *Txn
	first   time.Time // arrival of the first event merged into it
	readyAt time.Time
	sent    bool  // in a batch: never merged into again
	row     int64 // parked: its row in walhook.deliveries
	size    int64 // what it holds of the budget (0 for parked rows)
}

// job is one batch and its attempts.
type job struct {
	batch   *Batch
	items   []*item
	keys    []*key
	taken   []int // items taken from each of keys
	attempt int
	first   time.Time
	backoff *backoff.ExponentialBackOff
	parked  bool              // items are parked rows
	gen     int               // the scheduler's gen when the attempt started
	cutAt   time.Time         // the attempt is cut off here (park_after passes meanwhile); zero: only timeout bounds it
	marks   map[string]uint64 // debounced: what MarkSent records before the first attempt; nil when written
}

type result struct {
	job  *job
	err  error
	dead bool // the failure was permanent and the events are dead-lettered
	gone bool // the target answered 410 Gone: unsubscribe
}

func newScheduler(d *Dispatcher, s *Subscription, in <-chan delivery) *scheduler {
	sc := &scheduler{in: in, d: d, now: time.Now, epoch: d.epoch, startLSN: d.start,
		log:  d.cfg.Logger.With().Str("subscription", s.ID).Logger(),
		keys: map[string]*key{},
	}
	sc.setSubscription(s)
	sc.disabled = s.Disabled // disabled before this epoch: stays so
	// Room for every send that can be in flight, under any later options.
	sc.jobs = make(chan *job, 1024)
	sc.results = make(chan result, 1024)
	return sc
}

func (s *scheduler) setSubscription(sub *Subscription) {
	if s.sub != nil && s.sub.Disabled && !sub.Disabled {
		s.disabled, s.failingFrom = false, time.Time{}
		s.gen++ // what was in flight when it was disabled was dead-lettered then
		s.log.Info().Msg("subscription enabled")
	}
	s.sub, s.opts = sub, sub.Delivery
	if s.d.cfg.NoParking {
		s.opts.ParkAfter = 100 * 365 * 24 * time.Hour
	}
	s.opts.MaxInFlight = min(max(s.opts.MaxInFlight, 1), 1024)
	s.opts.BatchMax = max(s.opts.BatchMax, 1)
}

func (s *scheduler) run(ctx context.Context) error {
	s.ctx = ctx
	if err := s.loadParked(); err != nil {
		return nil // ctx ended
	}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	defer s.sends.Wait()
	defer close(s.jobs) // the senders stop once their sends are back
	report := time.NewTicker(2 * time.Second)
	defer report.Stop()
	draining := false
	var armed time.Time // the timer's deadline
	for {
		if s.closing && s.pending == 0 && s.inFlight == 0 {
			return s.closed()
		}
		if draining {
			if s.inFlight == 0 {
				return nil
			}
			s.handleResult(<-s.results) // only let what is in flight come back
			continue
		}
		now := s.now()
		s.dispatch(ctx, now)
		in := s.in
		if s.pending >= pendingLimit {
			in = nil // backpressure
		}
		var wake <-chan time.Time
		if at, ok := s.nextWake(now); ok {
			if !at.Equal(armed) {
				timer.Reset(max(at.Sub(now), 0))
				armed = at
			}
			wake = timer.C
		}
		select {
		case <-ctx.Done():
			return nil
		case dv := <-in:
			s.take(dv)
		case r := <-s.results:
			s.handleResult(r)
		case <-wake:
			armed = time.Time{}
			s.handleTimers()
		case <-report.C:
			s.report()
		case <-s.d.drain:
			draining = true
		}
	}
}

// take handles dv and whatever else waits in the input, up to a burst: one
// select per burst instead of one per event.
func (s *scheduler) take(dv delivery) {
	now := s.now()
	s.handleEvent(dv, now)
	for range 256 {
		if s.pending >= pendingLimit {
			return
		}
		select {
		case dv := <-s.in:
			s.handleEvent(dv, now)
		default:
			return
		}
	}
}

// handleEvent queues an event under its key, merging it into the key's tail item
// when debounce allows.
func (s *scheduler) handleEvent(dv delivery, now time.Time) {
	switch {
	case dv.commit:
		s.inTxn = false
		return
	case dv.update != nil:
		s.setSubscription(dv.update) // batches from now on use it
		if dv.update.Disabled && !s.disabled {
			s.disable()
		}
		return
	case dv.close:
		s.closing = true
		s.inTxn = false // nothing more comes: a partial batch must not wait for a commit marker
		return
	case s.gone:
		s.done(dv.txn, dv.size)
		s.d.cfg.Metrics.deliveries.WithLabelValues(s.sub.ID, "dropped").Inc()
		return
	}
	s.inTxn = true
	if s.disabled {
		if s.d.deadLetter(s.ctx, DeadLetter{Subscription: s.sub.ID, Event: dv.event,
			WebhookID: WebhookID(s.sub.ID, []Event{dv.event}), Reason: disabledReason}) == nil {
			s.done(dv.txn, dv.size)
			s.d.cfg.Metrics.finished(s.sub.ID, "dead_lettered", []Event{dv.event})
		}
		return
	}
	ev := dv.event
	if m, ok := s.sentMarks[ev.ResourceID]; ok && ev.WebhookID == "" {
		if ev.Seq < m {
			// Streamed again, and superseded by an event already sent (or
			// sent again later in this stream): debounce says it is not owed.
			s.done(dv.txn, dv.size)
			return
		}
		delete(s.sentMarks, ev.ResourceID) // the stream has passed it
	}
	k := s.key(dv.event.ResourceID)
	ev.Coalesced = 1
	if k.parked {
		s.handleParkedEvent(k, dv, ev, now)
		return
	}
	// Order is by sequence, not arrival: an event older than the unsent tail
	// (a replayed dead letter) goes before it.
	at := len(k.items)
	for at > 0 && !k.items[at-1].sent && k.items[at-1].ev.Seq > ev.Seq {
		at--
	}
	if s.opts.Debounce > 0 && at == len(k.items) && at > 0 {
		if tail := k.items[at-1]; !tail.sent && tail.ev.Type == ev.Type && tail.ev.WebhookID == "" && ev.WebhookID == "" {
			// The older event is superseded: its delivery is done (docs/scheduler.md).
			s.done(tail.txn, tail.size)
			s.d.cfg.Metrics.coalesced.WithLabelValues(s.sub.ID).Inc()
			ev.Coalesced = tail.ev.Coalesced + 1
			tail.ev, tail.txn, tail.size = ev, dv.txn, dv.size
			tail.readyAt = s.readyAt(tail.first, now)
			return
		}
	}
	it := &item{ev: ev, txn: dv.txn, size: dv.size, first: now, readyAt: s.readyAt(now, now)}
	k.items = slices.Insert(k.items, at, it)
	s.pending++
	if k.queued {
		s.readyEvents++
	}
	if len(k.items) == 1 || at == 0 {
		s.schedule(k, now)
	}
}

// handleParkedEvent puts an event of a parked key in the table, in sequence
// order, and finishes it once written. An event below the key's parked
// high-water mark that is not a dead-letter replay was streamed again (after
// a restart or takeover): the table holds it or it was finished, so it is
// finished without a request (docs/parking.md). One at the mark goes to the
// table, whose unique (subscription, event_id) keeps it once: sequences
// saturate in transactions of more than 65,535 events, so equal is not old.
func (s *scheduler) handleParkedEvent(k *key, dv delivery, ev Event, now time.Time) {
	if ev.WebhookID == "" && ev.Seq < k.parkedSeq {
		s.done(dv.txn, dv.size)
		return
	}
	err := s.park([]ParkedEvent{{Event: ev, NextAttempt: k.feedAt, Since: now}})
	if errors.Is(err, ErrPermanent) {
		s.unstorable(ev, dv.txn, dv.size, err)
		return
	}
	if err == nil {
		k.parkedSeq = max(k.parkedSeq, ev.Seq)
		s.done(dv.txn, dv.size)
	}
}

// done finishes one delivery: the Acker's count and the budget's bytes.
func (s *scheduler) done(t *Txn, size int64) {
	s.d.cfg.Acker.Done(t)
	s.d.cfg.Budget.Release(s.epoch.N, size)
}

// unstorable dead-letters an event the store refused to park for good (a
// payload its jsonb cannot hold): the stream goes on, nothing is retried
// forever.
func (s *scheduler) unstorable(ev Event, t *Txn, size int64, cause error) {
	s.log.Error().Err(cause).Str("event_id", ev.ID).Msg("cannot park the event: dead-lettered")
	if s.d.deadLetter(s.ctx, DeadLetter{Subscription: s.sub.ID, Event: ev, WebhookID: WebhookID(s.sub.ID, []Event{ev}),
		Reason: "cannot be parked: " + cause.Error()}) == nil {
		s.done(t, size)
		s.d.cfg.Metrics.finished(s.sub.ID, "dead_lettered", []Event{ev})
	}
}

func (s *scheduler) key(id string) *key {
	k := s.keys[id]
	if k == nil {
		k = &key{id: id}
		s.keys[id] = k
	}
	return k
}

func (s *scheduler) readyAt(first, now time.Time) time.Time {
	if s.opts.Debounce <= 0 {
		return now
	}
	at := now.Add(s.opts.Debounce)
	if limit := first.Add(s.opts.MaxWait); limit.Before(at) {
		at = limit
	}
	return at
}

// schedule puts an idle key in ready, or sets its debounce timer.
func (s *scheduler) schedule(k *key, now time.Time) {
	if k.parked {
		switch {
		case k.busy || k.feed:
		case !k.feedAt.After(now):
			k.feed = true
			s.feeds = append(s.feeds, k)
		case !k.timerSet:
			k.timerSet = true
			heap.Push(&s.timers, timerEntry{at: k.feedAt, key: k})
		}
		return
	}
	if k.busy || k.queued || len(k.items) == 0 {
		return
	}
	head := k.items[0]
	if !head.readyAt.After(now) {
		k.queued = true
		s.ready = append(s.ready, k)
		s.readyEvents += len(k.items)
		return
	}
	if !k.timerSet {
		k.timerSet = true
		heap.Push(&s.timers, timerEntry{at: head.readyAt, key: k})
	}
}

// dispatch starts as many sends as max_in_flight allows: due retries first, then
// new batches.
func (s *scheduler) dispatch(ctx context.Context, now time.Time) {
	for s.inFlight < s.opts.MaxInFlight && len(s.retries) > 0 {
		j := s.retries[0]
		s.retries = s.retries[1:]
		s.start(ctx, j)
	}
	for s.inFlight < s.opts.MaxInFlight && len(s.feeds) > 0 && !s.closing {
		k := s.feeds[0]
		s.feeds[0] = nil
		s.feeds = s.feeds[1:]
		k.feed = false
		if j := s.feedJob(k); j != nil {
			s.start(ctx, j)
		}
	}
	for s.inFlight < s.opts.MaxInFlight && len(s.ready) > 0 {
		if s.opts.Batched() {
			if s.gatherUntil.IsZero() {
				s.gatherUntil = now.Add(s.opts.BatchWait)
			}
			// Wait for a fuller batch until batch_wait has passed, and while
			// more events are sure to come: the transaction is still streaming
			// in, or events wait in the input (unless memory is full).
			midBurst := (s.inTxn || len(s.in) > 0) && s.pending < pendingLimit && !s.d.cfg.Budget.Full()
			if s.readyEvents < s.opts.BatchMax && (now.Before(s.gatherUntil) || midBurst) {
				return
			}
		}
		j := s.assemble(now)
		if j == nil {
			return
		}
		s.start(ctx, j)
	}
	if len(s.ready) == 0 {
		s.gatherUntil = time.Time{}
	}
}

// assemble takes ready keys in order, and from each its consecutive ready items,
// up to batch_max events and batch_bytes.
func (s *scheduler) assemble(now time.Time) *job {
	j := &job{}
	size := 0
	for len(s.ready) > 0 && len(j.items) < s.opts.BatchMax {
		k := s.ready[0]
		if k.items[0].readyAt.After(now) {
			// A merge moved the head's debounce deadline after it became ready.
			s.popReady()
			s.schedule(k, now)
			continue
		}
		taken := 0
		for _, it := range k.items {
			if it.readyAt.After(now) || len(j.items) >= s.opts.BatchMax {
				break
			}
			// A replayed event keeps its own webhook-id: it goes alone.
			if it.ev.WebhookID != "" && len(j.items) > 0 {
				break
			}
			if len(j.items) == 1 && j.items[0].ev.WebhookID != "" {
				break
			}
			sz := len(it.ev.Payload) + envelopeOverhead
			if len(j.items) > 0 && size+sz > s.opts.BatchBytes {
				break
			}
			it.sent = true
			j.items = append(j.items, it)
			size += sz
			taken++
		}
		if taken == 0 {
			break // the batch is full by bytes
		}
		s.popReady()
		k.busy = true
		j.keys = append(j.keys, k)
		j.taken = append(j.taken, taken)
	}
	if len(j.items) == 0 {
		return nil
	}
	events := make([]Event, len(j.items))
	for i, it := range j.items {
		events[i] = it.ev
	}
	j.batch = NewBatch(s.sub, events...)
	j.first = now
	if s.opts.Debounce > 0 {
		j.marks = map[string]uint64{}
		for _, e := range events {
			if e.WebhookID == "" {
				j.marks[e.ResourceID] = max(j.marks[e.ResourceID], e.Seq)
			}
		}
	}
	return j
}

func (s *scheduler) popReady() {
	k := s.ready[0]
	s.ready[0] = nil
	s.ready = s.ready[1:]
	s.readyEvents -= len(k.items)
	k.queued = false
}

// start hands j to a sender, starting one when all are busy. Senders outlive
// their jobs: a goroutine per request would cost a fresh stack every time.
func (s *scheduler) start(ctx context.Context, j *job) {
	s.inFlight++
	j.attempt++
	j.gen = s.gen
	// park_after also runs while an attempt does, once the endpoint is
	// failing: an attempt that would outlast it is cut off there, and its
	// failure parks the batch (an endpoint that accepts and then stops
	// answering must not pin the slot for a whole timeout per attempt). A
	// healthy endpoint's attempts are never cut: slow is not failing.
	j.cutAt = time.Time{}
	if at := j.first.Add(s.opts.ParkAfter); !j.parked && !s.failingFrom.IsZero() && s.now().Add(s.opts.Timeout).After(at) {
		j.cutAt = at
	}
	if s.inFlight > s.senders {
		s.senders++
		s.sends.Add(1)
		go s.sender(ctx)
	}
	s.jobs <- j // buffered beyond max_in_flight: never blocks
}

// sender delivers jobs until run closes jobs.
func (s *scheduler) sender(ctx context.Context) {
	defer s.sends.Done()
	for j := range s.jobs {
		// Only what the job captured: the loop may replace s.sub meanwhile.
		sub := j.batch.Subscription
		actx, cancel := ctx, context.CancelFunc(nil)
		if !j.cutAt.IsZero() {
			actx, cancel = context.WithDeadline(ctx, j.cutAt)
		}
		var r result
		if len(j.marks) > 0 {
			if err := s.d.cfg.Store.MarkSent(actx, sub.ID, j.marks); err != nil {
				r = result{job: j, err: fmt.Errorf("record the debounce mark before sending: %w", err)}
			} else {
				j.marks = nil // written: retries need not
			}
		}
		if r.err == nil {
			r = result{job: j, err: s.d.cfg.Deliverer.Deliver(actx, j.batch)}
		}
		if cancel != nil {
			cancel()
		}
		if ctx.Err() == nil {
			s.d.cfg.Metrics.attempt(sub.ID, r.err)
		}
		switch {
		case r.err == nil || ctx.Err() != nil:
		case gone(r.err) && !sub.Static:
			r.gone = true
		case !retryable(r.err) && !j.parked: // parked rows: retireParked, with their delete
			r.dead = s.deadLetter(ctx, j, r.err) == nil
		}
		s.results <- r // buffered to max_in_flight: never blocks
	}
}

func (s *scheduler) deadLetter(ctx context.Context, j *job, cause error) error {
	for _, dl := range s.deadLetters(j, cause) {
		if err := s.d.deadLetter(ctx, dl); err != nil {
			return err
		}
	}
	return nil
}

// deadLetters are j's events as dead letters, and logs that they are.
func (s *scheduler) deadLetters(j *job, cause error) []DeadLetter {
	status := 0
	if f, ok := errors.AsType[Failure](cause); ok {
		status = f.StatusCode()
	}
	s.log.Warn().Str("webhook_id", j.batch.WebhookID).Int("events", len(j.items)).Int("status", status).
		Err(cause).Msg("dead-lettered")
	now := s.now()
	dls := make([]DeadLetter, len(j.items))
	for i, it := range j.items {
		// The id a replay will carry: the request's, or for an event of a
		// larger batch its own (a replay sends it alone; sharing the batch's
		// id would make a deduplicating receiver drop all but one).
		id := j.batch.WebhookID
		if len(j.items) > 1 {
			id = WebhookID(j.batch.Subscription.ID, []Event{it.ev})
		}
		dls[i] = DeadLetter{Subscription: j.batch.Subscription.ID, Event: it.ev, WebhookID: id,
			Status: status, Reason: cause.Error(), Attempts: j.attempt, FirstAttempt: j.first, LastAttempt: now}
	}
	return dls
}

// retireParked dead-letters parked rows and deletes them in one transaction:
// an event is never in the table and in the dead letters at once, so a
// replay of the dead letter cannot meet its old row (and be dropped as a
// duplicate of it).
func (s *scheduler) retireParked(j *job, cause error) {
	dls := s.deadLetters(j, cause)
	if s.store("cannot dead-letter parked deliveries", func() error {
		return s.d.cfg.Store.DeadLetterRows(s.ctx, j.rows(), dls)
	}) != nil {
		return
	}
	s.d.cfg.Metrics.finished(s.sub.ID, "dead_lettered", j.batch.Events)
	k := j.keys[0]
	k.busy, k.feedAt = false, s.now()
	s.schedule(k, s.now())
}

func (j *job) rows() []int64 {
	rows := make([]int64, len(j.items))
	for i, it := range j.items {
		rows[i] = it.row
	}
	return rows
}

func errorsAsFailure(err error) (Failure, bool) { return errors.AsType[Failure](err) }

func gone(err error) bool {
	f, ok := errors.AsType[Failure](err)
	return ok && f.StatusCode() == 410
}

func retryable(err error) bool {
	if f, ok := errors.AsType[Failure](err); ok {
		return f.Retryable()
	}
	return true
}

func (s *scheduler) handleResult(r result) {
	s.inFlight--
	j := r.job
	if s.gone || s.disabled || j.gen != s.gen {
		return // released or dead-lettered already; a 410 from then is old news
	}
	if r.gone {
		s.unsubscribe()
		return
	}
	if r.err == nil {
		s.failingFrom = time.Time{}
	} else if s.failingFrom.IsZero() {
		s.failingFrom = j.first
	}
	if j.parked && r.err != nil && !retryable(r.err) {
		s.retireParked(j, r.err)
		return
	}
	if r.err == nil || r.dead {
		outcome := "dead_lettered"
		if r.err == nil {
			outcome = "delivered"
			s.log.Debug().Str("webhook_id", j.batch.WebhookID).Int("events", len(j.items)).Int("attempts", j.attempt).Msg("delivered")
		}
		s.d.cfg.Metrics.finished(s.sub.ID, outcome, j.batch.Events)
		if j.parked {
			s.finishParked(j)
			return
		}
		s.finish(j)
		return
	}
	if !retryable(r.err) {
		return // shutting down before the dead letter was stored: it stays unacked
	}
	if j.backoff == nil {
		j.backoff = s.newBackoff() // most jobs never fail: made at the first failure
	}
	wait := j.backoff.NextBackOff()
	if f, ok := errors.AsType[Failure](r.err); ok && f.RetryAfter() > wait {
		wait = min(f.RetryAfter(), s.opts.RetryMaxInterval)
	}
	s.log.Debug().Str("webhook_id", j.batch.WebhookID).Int("attempt", j.attempt).Err(r.err).Dur("retry_in", wait).Msg("attempt failed")
	now := s.now()
	if !s.disabled && now.Sub(s.failingFrom) >= s.opts.DisableAfter {
		s.disable() // the batch's events are among those it dead-letters
		return
	}
	switch {
	case j.parked:
		s.retryParked(j, r.err, now.Add(wait))
	case now.Sub(j.first) >= s.opts.ParkAfter || s.d.cfg.Budget.Full():
		// Failing for park_after, or failing while memory is full: the
		// endpoint is failing anyway, its events make room in the table.
		s.parkJob(j, now.Add(wait))
	default:
		heap.Push(&s.timers, timerEntry{at: now.Add(wait), job: j})
	}
}

// loadParked marks the keys that have parked rows (from before a restart),
// and, debounced, loads the sequences already sent.
func (s *scheduler) loadParked() error {
	if s.opts.Debounce > 0 {
		err := retryForever(s.ctx, s.log, "cannot read debounce marks", func() error {
			var err error
			s.sentMarks, err = s.d.cfg.Store.SentMarks(s.ctx, s.sub.ID, uint64(s.startLSN)<<16)
			return err
		})
		if err != nil {
			return err
		}
	}
	var keys []ParkedKey
	err := retryForever(s.ctx, s.log, "cannot read parked deliveries", func() error {
		var err error
		keys, err = s.d.cfg.Store.ParkedKeys(s.ctx, s.sub.ID)
		return err
	})
	if err != nil {
		return err
	}
	now := s.now()
	for _, pk := range keys {
		k := s.key(pk.Resource)
		k.parked, k.feedAt, k.parkedSeq = true, pk.NextAttempt, pk.MaxSeq
		s.schedule(k, now)
	}
	if len(keys) > 0 {
		s.log.Info().Int("resources", len(keys)).Msg("resuming parked deliveries")
	}
	return nil
}

// park writes events to walhook.deliveries. On error nothing is finished:
// the epoch ended, or (ErrPermanent) the store cannot hold them.
func (s *scheduler) park(events []ParkedEvent) error {
	return s.store("cannot park deliveries", func() error {
		return s.d.cfg.Store.Park(s.ctx, s.sub.ID, events)
	})
}

// store runs a store write until it succeeds, the epoch ends, or it fails for
// good. Fenced, the epoch is over: another process delivers now.
func (s *scheduler) store(what string, f func() error) error {
	err := retryForever(s.ctx, s.log, what, f)
	if errors.Is(err, ErrFenced) {
		s.log.Warn().Msg("another walhook process took over delivery: stopping")
		s.epoch.End(err)
	}
	return err
}

// parkJob parks every key of a batch that failed for park_after: its items
// and every later item of those keys move to the table, and stop holding the
// slot back.
func (s *scheduler) parkJob(j *job, next time.Time) {
	if s.closing {
		// A deleted subscription's failing events are not kept for days.
		for _, k := range j.keys {
			for _, it := range k.items {
				s.done(it.txn, it.size)
			}
			s.d.cfg.Metrics.deliveries.WithLabelValues(s.sub.ID, "dropped").Add(float64(len(k.items)))
			s.pending -= len(k.items)
			delete(s.keys, k.id)
		}
		return
	}
	n := 0
	keys := j.keys
	// The endpoint keeps failing: keys that waited as long for a free request
	// slot go too, without an attempt, or the slot would stay pinned by them.
	now := s.now()
	full := s.d.cfg.Budget.Full()
	kept := s.ready[:0]
	for _, k := range s.ready {
		if full || now.Sub(k.items[0].first) >= s.opts.ParkAfter {
			s.readyEvents -= len(k.items)
			k.queued = false
			keys = append(keys, k)
			continue
		}
		kept = append(kept, k)
	}
	clear(s.ready[len(kept):])
	s.ready = kept
	for _, k := range keys {
		events := make([]ParkedEvent, len(k.items))
		for i, it := range k.items {
			events[i] = ParkedEvent{Event: it.ev, NextAttempt: next, Since: now}
			if it.sent {
				events[i].Attempts, events[i].Since = j.attempt, j.first
			}
		}
		err := s.park(events)
		if errors.Is(err, ErrPermanent) {
			// One of them the store cannot hold: park them one by one, and
			// dead-letter what cannot be parked.
			err = nil
			for i, it := range k.items {
				if e := s.park(events[i : i+1]); errors.Is(e, ErrPermanent) {
					s.unstorable(it.ev, it.txn, it.size, e)
					it.txn, it.size = nil, 0
				} else if e != nil {
					err = e
					break
				}
			}
		}
		if err != nil {
			return // the epoch ended: nothing acked, all replayed
		}
		for _, it := range k.items {
			if it.txn != nil {
				s.done(it.txn, it.size)
			}
			k.parkedSeq = max(k.parkedSeq, it.ev.Seq)
		}
		s.pending -= len(k.items)
		n += len(k.items)
		clear(k.items)
		k.items, k.busy, k.parked, k.feedAt = nil, false, true, next
		s.schedule(k, s.now())
	}
	s.log.Warn().Int("resources", len(keys)).Int("events", n).Dur("failing_for", s.now().Sub(j.first)).
		Msg("parked: the endpoint keeps failing; events moved to walhook.deliveries")
}

// feedJob loads a parked key's next rows; with none left the key returns to
// memory.
func (s *scheduler) feedJob(k *key) *job {
	var rows []ParkedEvent
	err := retryForever(s.ctx, s.log, "cannot read parked deliveries", func() error {
		var err error
		rows, err = s.d.cfg.Store.NextParked(s.ctx, s.sub.ID, k.id, s.opts.BatchMax, s.opts.BatchBytes)
		return err
	})
	if err != nil {
		return nil
	}
	// A replayed dead letter keeps its webhook-id: it goes alone.
	for i, r := range rows {
		if r.Event.WebhookID != "" {
			rows = rows[:max(i, 1)]
			break
		}
	}
	if len(rows) == 0 {
		k.parked = false
		if len(k.items) == 0 {
			delete(s.keys, k.id)
		}
		s.log.Info().Str("resource", k.id).Msg("parked resource drained")
		return nil
	}
	j := &job{parked: true, keys: []*key{k}, first: rows[0].Since}
	events := make([]Event, len(rows))
	for i, r := range rows {
		events[i] = r.Event
		j.items = append(j.items, &item{ev: r.Event, row: r.Row, sent: true})
		j.attempt = max(j.attempt, r.Attempts)
		if r.Since.Before(j.first) {
			j.first = r.Since
		}
	}
	j.batch = NewBatch(s.sub, events...)
	j.backoff = s.newBackoff()
	for range j.attempt { // continue the backoff where the rows left it
		j.backoff.NextBackOff()
	}
	k.busy = true
	return j
}

// finishParked deletes delivered or dead-lettered rows and feeds the key on.
func (s *scheduler) finishParked(j *job) {
	rows := make([]int64, len(j.items))
	for i, it := range j.items {
		rows[i] = it.row
	}
	if s.store("cannot unpark deliveries", func() error { return s.d.cfg.Store.Unpark(s.ctx, rows) }) != nil {
		return
	}
	k := j.keys[0]
	k.busy, k.feedAt = false, s.now()
	s.schedule(k, s.now())
}

// retryParked reschedules failed rows, or dead-letters them after retry_for.
func (s *scheduler) retryParked(j *job, cause error, next time.Time) {
	if s.now().Sub(j.first) >= s.opts.RetryFor {
		s.retireParked(j, fmt.Errorf("retry_for (%s) exhausted: %w", s.opts.RetryFor, cause))
		return
	}
	rows := make([]int64, len(j.items))
	for i, it := range j.items {
		rows[i] = it.row
	}
	err := s.store("cannot reschedule parked deliveries", func() error {
		return s.d.cfg.Store.Reschedule(s.ctx, rows, j.attempt, next, cause.Error())
	})
	if err != nil {
		return
	}
	k := j.keys[0]
	k.busy, k.feedAt = false, next
	s.schedule(k, s.now())
}

func (s *scheduler) newBackoff() *backoff.ExponentialBackOff {
	return backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(s.opts.RetryInitial),
		backoff.WithMaxInterval(s.opts.RetryMaxInterval),
		backoff.WithMultiplier(2),
		backoff.WithRandomizationFactor(0.5),
		backoff.WithMaxElapsedTime(0),
	)
}

// finish releases a delivered or dead-lettered batch: acks its events and lets
// its keys send their next items.
func (s *scheduler) finish(j *job) {
	for _, it := range j.items {
		s.done(it.txn, it.size)
	}
	s.pending -= len(j.items)
	now := s.now()
	for i, k := range j.keys {
		clear(k.items[:j.taken[i]])
		k.items = k.items[j.taken[i]:]
		k.busy = false
		if len(k.items) == 0 {
			delete(s.keys, k.id)
			continue
		}
		s.schedule(k, now)
	}
}

// closed ends a deleted subscription's scheduler once it has drained: its
// parked rows go, and its metrics.
func (s *scheduler) closed() error {
	s.store("cannot drop parked events", func() error {
		return s.d.cfg.Store.DropParked(s.ctx, s.sub.ID)
	})
	s.d.cfg.Metrics.removeSubscription(s.sub.ID)
	s.log.Info().Msg("deleted subscription drained")
	return nil
}

const disabledReason = "subscription disabled: its endpoint failed for disable_after without a success"

// disable turns a failing subscription off: what it holds, parked or in
// memory, becomes dead letters (replayable), and so does every later event,
// until it is enabled again.
func (s *scheduler) disable() {
	s.disabled = true
	s.gen++ // what is in flight is dead-lettered here; its result changes nothing
	s.log.Error().Dur("disable_after", s.opts.DisableAfter).Msg("subscription disabled: its endpoint keeps failing")
	switch {
	case s.sub.Static:
		s.d.mu.Lock()
		s.d.disabledStatic[s.sub.ID] = true
		s.d.mu.Unlock()
	case !s.sub.Disabled:
		id := s.sub.ID
		if s.store("cannot mark subscription disabled", func() error {
			return s.d.cfg.Store.DisableSubscription(s.ctx, id)
		}) != nil {
			return // the epoch ended
		}
	}
	if s.store("cannot dead-letter parked events", func() error {
		return s.d.cfg.Store.DeadLetterParked(s.ctx, s.sub.ID, disabledReason)
	}) != nil {
		return
	}
	for _, k := range s.keys {
		for _, it := range k.items {
			if s.d.deadLetter(s.ctx, DeadLetter{Subscription: s.sub.ID, Event: it.ev,
				WebhookID: WebhookID(s.sub.ID, []Event{it.ev}), Reason: disabledReason}) != nil {
				return // the epoch ended: unacked, replayed
			}
			s.done(it.txn, it.size)
		}
		s.d.cfg.Metrics.deliveries.WithLabelValues(s.sub.ID, "dead_lettered").Add(float64(len(k.items)))
	}
	clear(s.keys)
	s.ready, s.retries, s.timers, s.feeds = nil, nil, nil, nil
	s.pending, s.readyEvents = 0, 0
	s.gatherUntil = time.Time{}
}

// report publishes the in-memory backlog for metrics.
func (s *scheduler) report() {
	var oldest time.Time
	for _, k := range s.keys {
		if len(k.items) > 0 {
			if t := k.items[0].ev.CommitTime; oldest.IsZero() || t.Before(oldest) {
				oldest = t
			}
		}
	}
	s.d.cfg.Metrics.setPending(s.sub.ID, int64(s.pending), oldest)
}

// unsubscribe handles a 410 Gone: every held event is dropped (finished), later
// ones too, and the subscription is deleted; its deletion then comes back
// through the stream and stops this scheduler.
func (s *scheduler) unsubscribe() {
	s.log.Warn().Msg("target answered 410 Gone: unsubscribing, pending events dropped")
	s.gone = true
	s.release()
	id := s.sub.ID
	s.sends.Add(1)
	go func() {
		defer s.sends.Done()
		s.store("cannot delete gone subscription", func() error {
			return s.d.cfg.Store.DeleteSubscription(s.ctx, id)
		})
	}()
}

// release finishes every event the scheduler holds without sending it. Only
// for a subscription that is gone: after run returned, or from run itself.
func (s *scheduler) release() {
	s.gen++
	dropped := 0
	for _, k := range s.keys {
		for _, it := range k.items {
			s.done(it.txn, it.size)
		}
		dropped += len(k.items)
	}
	s.d.cfg.Metrics.deliveries.WithLabelValues(s.sub.ID, "dropped").Add(float64(dropped))
	clear(s.keys)
	s.ready, s.retries, s.timers, s.feeds = nil, nil, nil, nil
	s.pending, s.readyEvents = 0, 0
	s.gatherUntil = time.Time{}
}

func (s *scheduler) nextWake(now time.Time) (time.Time, bool) {
	var at time.Time
	if len(s.timers) > 0 {
		at = s.timers[0].at
	}
	gathering := len(s.ready) > 0 && s.inFlight < s.opts.MaxInFlight && s.gatherUntil.After(now)
	if gathering && (at.IsZero() || s.gatherUntil.Before(at)) {
		at = s.gatherUntil
	}
	return at, !at.IsZero()
}

func (s *scheduler) handleTimers() {
	now := s.now()
	for len(s.timers) > 0 && !s.timers[0].at.After(now) {
		e := heap.Pop(&s.timers).(timerEntry)
		if e.job != nil {
			s.retries = append(s.retries, e.job)
			continue
		}
		e.key.timerSet = false
		s.schedule(e.key, now) // re-arms itself if merges or a reschedule moved the deadline
	}
}

type timerEntry struct {
	at  time.Time
	key *key // a debounce deadline
	job *job // or a retry
}

type timerHeap []timerEntry

func (h timerHeap) Len() int           { return len(h) }
func (h timerHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h timerHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *timerHeap) Push(x any)        { *h = append(*h, x.(timerEntry)) }
func (h *timerHeap) Pop() any {
	old := *h
	e := old[len(old)-1]
	old[len(old)-1] = timerEntry{}
	*h = old[:len(old)-1]
	return e
}
