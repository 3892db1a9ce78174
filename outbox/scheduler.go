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
	sub     *Subscription
	opts    DeliveryOptions
	in      <-chan delivery
	d       *Dispatcher
	store   Store    // the Dispatcher's, and
	metrics *Metrics // its metrics and
	budget  *Budget  // memory budget
	log     zerolog.Logger
	now     func() time.Time
	sends   sync.WaitGroup

	keys        map[string]*key
	ready       []*key // not busy, head ready; FIFO
	readyEvents int    // items held by keys in ready (an estimate of what a batch could take)
	retries     []*job // due for another attempt
	feeds       []*key // parked keys due for their next rows
	timers      timerHeap
	pending     int               // items held
	held        int64             // bytes of the events held (their budget sizes)
	share       int64             // past this many bytes held, a failing endpoint parks at once (SubscriptionBytes)
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
	parkedMarks map[string]uint64 // per resource, the highest sequence parked before this epoch (loadParked)
	senders     int               // sender goroutines started
	jobs        chan *job         // to the senders
	results     chan result
	ops         []*storeOp    // store work queued off the loop; the head runs (storeops.go)
	stored      chan *storeOp // the head, done
	draining    bool          // the Dispatcher drains: let what is in flight or queued come back, start nothing

	// rate_limit and 429s (docs/scheduler.md, "Rate limits").
	rate      float64   // attempts per second; 0 = no limit
	tokens    float64   // the bucket: at most one attempt's token
	tokensAt  time.Time // when tokens was counted
	holdUntil time.Time // a 429's Retry-After: no attempt before
}

type key struct {
	id       string
	items    []*item
	busy     bool // some items are in a batch
	queued   bool // in ready
	timerSet bool // a debounce or feed deadline is in timers
	writes   int  // store work queued for it (storeops.go): held, new events wait in items

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
		store: d.cfg.Store, metrics: d.cfg.Metrics, budget: d.cfg.Budget, share: d.cfg.SubscriptionBytes,
		log:  d.cfg.Logger.With().Str("subscription", s.ID).Logger(),
		keys: map[string]*key{},
	}
	sc.setSubscription(s)
	d.cfg.Metrics.known(s.ID)
	sc.disabled = s.Disabled // disabled before this epoch: stays so
	// Room for every send that can be in flight, under any later options.
	sc.jobs = make(chan *job, 1024)
	sc.results = make(chan result, 1024)
	sc.stored = make(chan *storeOp, 1) // one store goroutine at a time
	return sc
}

func (s *scheduler) setSubscription(sub *Subscription) {
	if s.sub != nil && s.sub.Disabled && !sub.Disabled {
		s.disabled, s.failingFrom = false, time.Time{}
		s.gen++ // what was in flight when it was disabled was dead-lettered then
		s.log.Info().Msg("subscription enabled")
	}
	s.sub, s.opts = sub, sub.Delivery
	s.rate = s.opts.RateLimit.PerSecond()
	s.opts.MaxInFlight = min(max(s.opts.MaxInFlight, 1), 1024)
	s.opts.BatchMax = max(s.opts.BatchMax, 1)
}

func (s *scheduler) run(ctx context.Context) error {
	if err := s.loadParked(ctx); err != nil {
		return nil // ctx ended
	}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	defer s.sends.Wait()
	defer close(s.jobs) // the senders stop once their sends are back
	report := time.NewTicker(2 * time.Second)
	defer report.Stop()
	var armed time.Time // the timer's deadline
	for {
		if s.closing && s.pending == 0 && s.inFlight == 0 && len(s.ops) == 0 {
			return s.closed(ctx)
		}
		if s.draining {
			if s.inFlight == 0 && len(s.ops) == 0 {
				return nil
			}
			// Only let what is in flight or queued for the store come back.
			select {
			case r := <-s.results:
				s.handleResult(ctx, r)
			case op := <-s.stored:
				s.handleStored(ctx, op)
			case <-ctx.Done():
				return nil
			}
			continue
		}
		now := s.now()
		s.dispatch(ctx, now)
		in := s.in
		if s.saturated() {
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
			s.take(ctx, dv)
		case r := <-s.results:
			s.handleResult(ctx, r)
		case op := <-s.stored:
			s.handleStored(ctx, op)
		case <-wake:
			armed = time.Time{}
			s.handleTimers()
		case <-report.C:
			s.report()
		case <-s.d.drain:
			s.draining = true
		}
	}
}

// take handles dv and whatever else waits in the input, up to a burst: one
// select per burst instead of one per event.
func (s *scheduler) take(ctx context.Context, dv delivery) {
	now := s.now()
	s.handleEvent(ctx, dv, now)
	for range 256 {
		if s.saturated() {
			return
		}
		select {
		case dv := <-s.in:
			s.handleEvent(ctx, dv, now)
		default:
			return
		}
	}
}

// saturated reports whether the scheduler holds as many events as it may: it
// takes no more input until it holds fewer (and so, once the Dispatcher's
// queue to it is full, the stream pauses). Bytes are not a reason: the stream
// already pauses while the budget is full, and one subscription's input
// waiting on its share would pause the stream for everyone just the same,
// only sooner.
func (s *scheduler) saturated() bool { return s.pending >= pendingLimit }

// overBudget reports whether memory is short, for the whole process or for
// this subscription (its share): a failing endpoint's events park at once.
func (s *scheduler) overBudget() bool { return s.held >= s.share || s.budget.Full() }

// handleEvent queues an event under its key, merging it into the key's tail item
// when debounce allows.
func (s *scheduler) handleEvent(ctx context.Context, dv delivery, now time.Time) {
	s.held += dv.size // until done
	switch {
	case dv.commit:
		s.inTxn = false
		return
	case dv.update != nil:
		s.setSubscription(dv.update) // batches from now on use it
		if dv.update.Disabled && !s.disabled {
			s.disable(ctx)
		}
		return
	case dv.reload:
		s.reloadParked(ctx)
		return
	case dv.close:
		s.closing = true
		s.inTxn = false // nothing more comes: a partial batch must not wait for a commit marker
		return
	case s.gone:
		s.done(dv.txn, dv.size)
		s.metrics.deliveries.WithLabelValues(s.sub.ID, "dropped").Inc()
		return
	}
	s.inTxn = true
	if s.disabled {
		if s.d.deadLetter(ctx, DeadLetter{Subscription: s.sub.ID, Event: dv.event,
			WebhookID: WebhookID(s.sub.ID, []Event{dv.event}), Reason: disabledReason}) == nil {
			s.done(dv.txn, dv.size)
			s.metrics.finished(s.sub.ID, "dead_lettered", []Event{dv.event})
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
	if m, ok := s.parkedMarks[ev.ResourceID]; ok && ev.WebhookID == "" {
		if ev.Seq < m {
			// Streamed again after a restart or takeover, and parked before
			// it: the table holds it or has finished it, even if the key has
			// drained since (docs/parking.md).
			s.done(dv.txn, dv.size)
			return
		}
		delete(s.parkedMarks, ev.ResourceID) // the stream has passed it
	}
	k := s.key(dv.event.ResourceID)
	ev.Coalesced = 1
	if k.parked {
		s.handleParkedEvent(ctx, k, dv, ev, now)
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
			s.metrics.coalesced.WithLabelValues(s.sub.ID).Inc()
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

// done finishes one delivery: the Acker's count and the budget's bytes.
func (s *scheduler) done(t *Txn, size int64) {
	s.held -= size
	s.d.cfg.Acker.Done(t)
	s.budget.Release(s.epoch.N, size)
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
		case k.busy || k.feed || k.writes > 0:
		case !k.feedAt.After(now):
			k.feed = true
			s.feeds = append(s.feeds, k)
		case !k.timerSet:
			k.timerSet = true
			heap.Push(&s.timers, timerEntry{at: k.feedAt, key: k})
		}
		return
	}
	if k.busy || k.queued || len(k.items) == 0 || k.writes > 0 {
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
	if s.limited(now) {
		s.parkLimited(ctx, now)
		return
	}
	for s.inFlight < s.opts.MaxInFlight && len(s.retries) > 0 && s.token(now) {
		j := s.retries[0]
		s.retries = s.retries[1:]
		s.start(ctx, j)
	}
	for s.inFlight < s.opts.MaxInFlight && len(s.feeds) > 0 && !s.closing && s.token(now) {
		k := s.feeds[0]
		s.feeds[0] = nil
		s.feeds = s.feeds[1:]
		k.feed = false
		s.feedJob(ctx, k) // its attempt starts once the rows are read

	}
	for s.inFlight < s.opts.MaxInFlight && len(s.ready) > 0 {
		if s.opts.Batched() {
			if s.gatherUntil.IsZero() {
				s.gatherUntil = now.Add(s.opts.BatchWait)
			}
			// Wait for a fuller batch until batch_wait has passed, and while
			// more events are sure to come: the transaction is still streaming
			// in, or events wait in the input (unless memory is full).
			midBurst := (s.inTxn || len(s.in) > 0) && !s.saturated() && !s.budget.Full()
			if s.readyEvents < s.opts.BatchMax && (now.Before(s.gatherUntil) || midBurst) {
				return
			}
		}
		if !s.token(now) {
			s.parkLimited(ctx, now)
			return
		}
		j := s.assemble(now)
		if j == nil {
			s.tokens++ // no attempt
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
	ctx = WithFresh(ctx, s.epoch.Live) // once: a scheduler runs in one epoch
	for j := range s.jobs {
		// Only what the job captured: the loop may replace s.sub meanwhile.
		sub := j.batch.Subscription
		actx, cancel := ctx, context.CancelFunc(nil)
		if !j.cutAt.IsZero() {
			actx, cancel = context.WithDeadline(actx, j.cutAt)
		}
		// Nothing, not even the debounce mark (which is not fenced), after
		// a freeze past the stall timeout: another may hold the slot
		// (Epoch.Live, before the mark, before the attempt, and through
		// WithFresh as the transport writes it).
		r := result{job: j}
		if len(j.marks) > 0 {
			if r.err = s.epoch.Live(); r.err == nil {
				if err := s.store.MarkSent(actx, sub.ID, j.marks); err != nil {
					r.err = fmt.Errorf("record the debounce mark before sending: %w", err)
				} else {
					j.marks = nil // written: retries need not
				}
			}
		}
		if r.err == nil {
			r.err = s.epoch.Live()
		}
		if r.err == nil {
			start := s.now()
			r = result{job: j, err: s.d.cfg.Deliverer.Deliver(actx, j.batch)}
			if log := s.d.cfg.Attempts; log != nil && ctx.Err() == nil && log.Wants(r.err == nil) {
				log.Record(newAttempt(j, start, s.now().Sub(start), r.err))
			}
		}
		if cancel != nil {
			cancel()
		}
		if ctx.Err() == nil {
			s.metrics.attempt(sub.ID, r.err)
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

func (s *scheduler) handleResult(ctx context.Context, r result) {
	s.inFlight--
	j := r.job
	if s.gone || s.disabled || j.gen != s.gen {
		return // released or dead-lettered already; a 410 from then is old news
	}
	if r.gone {
		s.unsubscribe(ctx)
		return
	}
	if r.err == nil {
		s.failingFrom = time.Time{}
	} else if s.failingFrom.IsZero() {
		s.failingFrom = j.first
	}
	if j.parked && r.err != nil && !retryable(r.err) {
		s.retireParked(ctx, j, r.err)
		return
	}
	if r.err == nil || r.dead {
		outcome := "dead_lettered"
		if r.err == nil {
			outcome = "delivered"
			s.log.Debug().Str("webhook_id", j.batch.WebhookID).Int("events", len(j.items)).Int("attempts", j.attempt).Msg("delivered")
		}
		s.metrics.finished(s.sub.ID, outcome, j.batch.Events)
		if j.parked {
			s.finishParked(ctx, j)
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
	if f, ok := errors.AsType[Failure](r.err); ok && f.StatusCode() == 429 && f.RetryAfter() > 0 {
		// The receiver's limit is the subscription's, not this resource's:
		// every attempt waits as long.
		s.holdUntil = maxTime(s.holdUntil, s.now().Add(min(f.RetryAfter(), s.opts.RetryMaxInterval)))
	}
	s.log.Debug().Str("webhook_id", j.batch.WebhookID).Int("attempt", j.attempt).Err(r.err).Dur("retry_in", wait).Msg("attempt failed")
	now := s.now()
	if !s.disabled && now.Sub(s.failingFrom) >= s.opts.DisableAfter {
		s.disable(ctx) // the batch's events are among those it dead-letters
		return
	}
	switch {
	case j.parked:
		s.retryParked(ctx, j, r.err, now.Add(wait))
	case now.Sub(j.first) >= s.opts.ParkAfter || s.overBudget():
		// Failing for park_after, or failing while memory is short: the
		// endpoint is failing anyway, its events make room in the table.
		s.parkJob(ctx, j, now.Add(wait))
	default:
		heap.Push(&s.timers, timerEntry{at: now.Add(wait), job: j})
	}
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

const disabledReason = "subscription disabled: its endpoint failed for disable_after without a success"

func (s *scheduler) nextWake(now time.Time) (time.Time, bool) {
	var at time.Time
	if len(s.timers) > 0 {
		at = s.timers[0].at
	}
	gathering := len(s.ready) > 0 && s.inFlight < s.opts.MaxInFlight && s.gatherUntil.After(now)
	if gathering && (at.IsZero() || s.gatherUntil.Before(at)) {
		at = s.gatherUntil
	}
	// Work that only the rate limit or a 429's pause holds back: wake when
	// the next attempt may go, or when the oldest of it is due to park.
	if waiting := len(s.retries) > 0 || len(s.feeds) > 0 || len(s.ready) > 0; waiting && s.inFlight < s.opts.MaxInFlight {
		if next := s.nextAttempt(); next.After(now) {
			if at.IsZero() || next.Before(at) {
				at = next
			}
			if len(s.ready) > 0 && !s.closing {
				if park := s.ready[0].items[0].first.Add(s.opts.ParkAfter); park.After(now) && park.Before(at) {
					at = park
				}
			}
		}
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
