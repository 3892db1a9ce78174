package outbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// Deliverer sends one batch. A nil error means the receiver accepted it (2xx).
type Deliverer interface {
	Deliver(ctx context.Context, b *Batch) error
}

// Failure is implemented by the errors a Deliverer returns, so the core can
// classify them without knowing HTTP. An error that does not implement it is
// treated as retryable with no status (a network error).
type Failure interface {
	error
	Retryable() bool           // false: dead-letter at once
	RetryAfter() time.Duration // the receiver's requested delay; 0 if none
	StatusCode() int           // the response status; 0 when there was none
}

// DeadLetter is an event a subscription gave up on.
type DeadLetter struct {
	Subscription string // "" for an outbox row that could not be decoded
	Event        Event
	WebhookID    string
	Status       int // last response status, 0 for none
	Reason       string
	Attempts     int
	FirstAttempt time.Time // zero when no attempt was made
	LastAttempt  time.Time
}

// RoutingChange is one applied change of the dynamic subscriptions.
type RoutingChange struct {
	Commit LSN    // commit LSN of the transaction that made it
	Seq    uint64 // its place in the stream
	ID     string
	Row    []byte // the new SubscriptionRow as JSON; nil for a deletion
}

// Store keeps what must survive a restart.
//
// Writes to walhook.deliveries and to a subscription's disabled state are
// fenced: Acquire takes the lease of a new epoch, and once another process
// has taken a newer one, those writes fail with ErrFenced (docs/design.md,
// "Ownership"). Errors that retrying cannot fix wrap ErrPermanent.
type Store interface {
	// Acquire takes the delivery lease for a new epoch of this process, if
	// the slot is still held by the server process holder (the epoch's
	// replication session; 0: unchecked), and fails with ErrFenced if not.
	Acquire(ctx context.Context, holder uint32) error

	DeadLetter(ctx context.Context, d DeadLetter) error
	// RecordRouting stores an applied subscription change, before its
	// transaction may be acknowledged.
	RecordRouting(ctx context.Context, c RoutingChange) error
	// LoadRouting returns the dynamic subscriptions in force at a stream
	// position: every recorded change committed before it.
	LoadRouting(ctx context.Context, at LSN) ([]SubscriptionRow, error)
	// DeleteSubscription removes a dynamic subscription (after a 410 Gone).
	DeleteSubscription(ctx context.Context, id string) error

	// Parking (docs/parking.md). Park adds events of one subscription to
	// walhook.deliveries, ignoring ones already there.
	Park(ctx context.Context, subscription string, events []ParkedEvent) error
	// ParkedKeys lists the resources of a subscription that have parked events.
	ParkedKeys(ctx context.Context, subscription string) ([]ParkedKey, error)
	// NextParked returns a resource's parked events in sequence order: up to
	// limit of them and maxBytes of payload (at least one). None only when
	// none are left; ErrFeedLater when they cannot be handed out now.
	NextParked(ctx context.Context, subscription, resource string, limit, maxBytes int) ([]ParkedEvent, error)
	// Unpark deletes delivered or dead-lettered rows.
	Unpark(ctx context.Context, rows []int64) error
	// Reschedule records a failed attempt of rows.
	Reschedule(ctx context.Context, rows []int64, attempts int, next time.Time, reason string) error
	// DropParked deletes every parked event of a subscription.
	DropParked(ctx context.Context, subscription string) error
	// DisableSubscription marks a dynamic subscription disabled (endpoint health).
	DisableSubscription(ctx context.Context, id string) error
	// DeadLetterParked moves a subscription's parked events to the dead letters.
	DeadLetterParked(ctx context.Context, subscription, reason string) error
	// DeadLetterRows records dead letters and deletes parked rows, at once.
	DeadLetterRows(ctx context.Context, rows []int64, dls []DeadLetter) error

	// Debounce marks (docs/scheduler.md, "Debounce across restarts").
	// MarkSent records, before a debounced request is sent, the newest
	// sequence it carries for each resource.
	MarkSent(ctx context.Context, subscription string, marks map[string]uint64) error
	// SentMarks returns a subscription's marks at or above from, and forgets
	// the ones below it (no event below from can be streamed again).
	SentMarks(ctx context.Context, subscription string, from uint64) (map[string]uint64, error)
}

var (
	// ErrFenced means another process took a newer delivery lease: this
	// process's epoch is over.
	ErrFenced = errors.New("outbox: another walhook process took over delivery (lease fenced)")
	// ErrPermanent marks a store error that retrying cannot fix (the data
	// cannot be stored as it is).
	ErrPermanent = errors.New("outbox: permanent store error")
	// ErrFeedLater is NextParked's "not now": the resource's parked events
	// are there but cannot be handed out at the moment (a relay partition
	// being handed over). The resource stays parked, so nothing newer of it
	// goes first, and is asked again after feedLaterAfter. Never answer
	// "none" for rows that exist: the resource would return to memory, and
	// what comes for it next would overtake them.
	ErrFeedLater = errors.New("outbox: parked events cannot be read now; asking again later")
)

// ParkedEvent is an event in walhook.deliveries.
type ParkedEvent struct {
	Row         int64 // set by the store
	Event       Event
	Attempts    int
	Since       time.Time // retry_for runs from here: its first attempt, or when it was parked
	NextAttempt time.Time
}

// ParkedKey is a resource with parked events.
type ParkedKey struct {
	Resource    string
	NextAttempt time.Time
	MaxSeq      uint64 // the highest sequence parked for it
}

// DispatcherConfig configures a Dispatcher.
type DispatcherConfig struct {
	Subscriptions []*Subscription // static subscriptions, from the config file
	Defaults      DeliveryOptions // for dynamic subscriptions' unset options
	Acker         *Acker
	Deliverer     Deliverer
	Store         Store
	Logger        zerolog.Logger
	Metrics       *Metrics // default: registered nowhere
	Budget        *Budget  // bytes held in memory, shared with the stream; default NewBudget(0)
	// SubscriptionBytes bounds the bytes one subscription holds in memory
	// (max_pending_bytes_per_subscription) while its endpoint fails: over it,
	// a failing endpoint's events park at once (docs/design.md, "Memory");
	// default a quarter of the Budget.
	SubscriptionBytes int64
	QueueSize         int        // pending deliveries per subscription before the stream pauses; default 1024
	Attempts          AttemptLog // where attempts are recorded; nil: nowhere

	// Relay, when set, takes every routed delivery instead of schedulers
	// (relay mode, docs/scale-out.md): no scheduler runs and nothing is sent
	// from here; a delivery is finished once the relay has stored it.
	Relay Relay
}

// Relay hands routed deliveries on to a durable queue (relay mode).
type Relay interface {
	// Publish hands ev for sub on, in stream order, blocking while the relay
	// is full until ctx ends. done is called once, when it is stored.
	Publish(ctx context.Context, e *Epoch, sub *Subscription, ev Event, done func()) error
}

// Dispatcher routes the stream's events to subscriptions, each delivered by its
// own scheduler (docs/scheduler.md), and applies subscription changes in stream
// order (docs/subscriptions.md).
type Dispatcher struct {
	cfg DispatcherConfig

	// Owned by Run's goroutine.
	subs     []*running // in creation order
	byID     map[string]*running
	txn      *Txn   // the open transaction
	txnMaxID uint64 // highest numeric outbox id seen in it
	epoch    *Epoch // the slot's current hold; nil before the first Start
	start    LSN    // where it started
	workers  sync.WaitGroup
	drain    chan struct{} // closed at ChangeDrained: schedulers finish what is in flight
	drained  chan struct{} // closed when every scheduler has stopped after that

	// Config-file subscriptions that endpoint health disabled stay disabled
	// until walhook restarts, across epochs. Written by schedulers.
	mu             sync.Mutex
	disabledStatic map[string]bool
}

// running is a subscription with its scheduler.
type running struct {
	sub    *Subscription
	queue  chan delivery
	sent   bool // got events of the open transaction
	sc     *scheduler
	cancel context.CancelFunc
	done   chan struct{}
}

type delivery struct {
	event  Event
	txn    *Txn
	size   int64         // what the event holds of the budget
	commit bool          // no event: the transaction of the previous events committed
	update *Subscription // no event: the subscription changed
	close  bool          // no event: the subscription was deleted; drain and stop
	reload bool          // no event: the store parked more resources (ChangeParked)
}

// NewDispatcher returns a Dispatcher; Run starts it.
func NewDispatcher(cfg DispatcherConfig) *Dispatcher {
	if cfg.QueueSize <= 0 {
		cfg.QueueSize = 1024
	}
	if cfg.Defaults.Timeout == 0 { // unset
		cfg.Defaults = DefaultDeliveryOptions()
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(prometheus.NewRegistry(), cfg.Acker)
	}
	if cfg.Budget == nil {
		cfg.Budget = NewBudget(0)
	}
	if cfg.SubscriptionBytes <= 0 {
		cfg.SubscriptionBytes = cfg.Budget.Limit() / 4
	}
	return &Dispatcher{cfg: cfg, byID: map[string]*running{}, drain: make(chan struct{}), drained: make(chan struct{}),
		disabledStatic: map[string]bool{}}
}

// Drained is closed once Run has stopped after a ChangeDrained: the sends in
// flight came back (or Run's context ended). Unfinished events are not
// acknowledged: the stream replays them next time.
func (d *Dispatcher) Drained() <-chan struct{} { return d.drained }

// Run consumes changes until ctx ends or changes closes. Reading pauses (and so
// does the stream behind it) while a subscription's queue is full.
//
// Schedulers run only inside an epoch: a ChangeStart begins one, and when it
// ends every scheduler stops and the changes of its session that are still
// queued are dropped (the next session streams them again).
func (d *Dispatcher) Run(ctx context.Context, changes <-chan Change) error {
	defer d.stopEpoch()
	for ctx.Err() == nil {
		var c Change
		var ok bool
		select {
		case c, ok = <-changes: // the common case, without locking ctx's channel too
		default:
			select {
			case <-ctx.Done():
				return nil
			case c, ok = <-changes:
			}
		}
		if !ok {
			return nil
		}
		switch {
		case c.Kind == ChangeDrained:
			close(d.drain)
			d.workers.Wait() // each scheduler stops once its sends are back
			close(d.drained)
			return nil
		case c.Kind == ChangeStart:
			d.startEpoch(ctx, c)
			continue
		case d.epoch == nil || d.epoch.Err() != nil:
			continue // the tail of an ended session
		}
		if err := d.handleChange(d.epoch.Context(), c); err != nil {
			if d.epoch.Err() != nil || errors.Is(err, context.Canceled) {
				continue
			}
			return err
		}
	}
	return nil
}

// startEpoch stops the previous epoch's schedulers and starts this one's,
// from what the database says at the start position: the lease, the
// subscriptions in force there, and (each scheduler) the parked resources.
// When that cannot be read for a while the epoch is given up: the stream
// leaves the slot and tries again, rather than deliver from a partial state.
func (d *Dispatcher) startEpoch(ctx context.Context, c Change) {
	d.stopEpoch()
	e := c.Epoch
	if e == nil { // tests drive the Dispatcher without a stream
		var n uint64
		if d.epoch != nil {
			n = d.epoch.N
		}
		e = NewEpoch(ctx, n+1)
		d.cfg.Budget.Reset(e.N)
	}
	d.epoch, d.start = e, c.LSN
	d.cfg.Acker.Reset(c.LSN)
	ectx := e.Context()
	var rows []SubscriptionRow
	lctx, cancel := context.WithTimeout(ectx, 10*time.Second)
	err := retryForever(lctx, d.cfg.Logger, "cannot take over delivery", func() error {
		if err := d.cfg.Store.Acquire(lctx, e.Holder); err != nil {
			return err
		}
		var err error
		rows, err = d.cfg.Store.LoadRouting(lctx, c.LSN)
		if errors.Is(err, ErrPermanent) { // some rows unreadable: the others are in force
			d.cfg.Logger.Error().Err(err).Msg("subscriptions ignored")
			return nil
		}
		return err
	})
	cancel()
	if err != nil {
		if ectx.Err() == nil {
			d.cfg.Logger.Error().Err(err).Msg("cannot take over delivery: leaving the slot to try again")
			e.End(fmt.Errorf("take over delivery: %w", err))
		}
		return
	}
	for _, s := range d.cfg.Subscriptions {
		d.mu.Lock()
		if d.disabledStatic[s.ID] {
			cp := *s
			cp.Disabled = true
			s = &cp
		}
		d.mu.Unlock()
		d.add(s)
	}
	for i := range rows {
		d.subscribe(ectx, &rows[i])
	}
	d.cfg.Logger.Info().Uint64("epoch", e.N).Stringer("start_lsn", c.LSN).Int("dynamic", len(rows)).
		Int("static", len(d.cfg.Subscriptions)).Msg("delivering: subscriptions loaded")
}

// stopEpoch ends the current epoch, if any, and waits for its schedulers:
// after it returns nothing of that epoch sends or writes anything.
func (d *Dispatcher) stopEpoch() {
	if d.epoch == nil {
		return
	}
	d.epoch.End(nil)
	d.workers.Wait()
	d.subs, d.txn, d.txnMaxID = nil, nil, 0
	clear(d.byID)
}

func (d *Dispatcher) add(s *Subscription) {
	if d.cfg.Relay != nil { // nothing to schedule: the relay takes the deliveries
		r := &running{sub: s}
		d.subs = append(d.subs, r)
		d.byID[s.ID] = r
		return
	}
	r := &running{sub: s, queue: make(chan delivery, d.cfg.QueueSize), done: make(chan struct{})}
	r.sc = newScheduler(d, s, r.queue)
	ctx, cancel := context.WithCancel(d.epoch.Context())
	r.cancel = cancel
	d.subs = append(d.subs, r)
	d.byID[s.ID] = r
	d.cfg.Metrics.addSubscription(s.ID)
	d.workers.Add(1)
	go func() {
		defer d.workers.Done()
		defer close(r.done)
		defer cancel()
		r.sc.run(ctx)
	}()
}

func (d *Dispatcher) handleChange(ctx context.Context, c Change) error {
	switch c.Kind {
	case ChangeBegin:
		d.txn = d.cfg.Acker.Begin(c.Event.CommitTime)
	case ChangeEvent:
		d.cfg.Metrics.events.Inc()
		if id, err := strconv.ParseUint(c.Event.ID, 10, 64); err == nil {
			d.txnMaxID = max(d.txnMaxID, id)
		}
		// The stream held the event's size once; each delivery holds it.
		size, routed := EventSize(&c.Event), 0
		for _, r := range d.subs {
			if !r.sub.Matches(&c.Event) {
				continue
			}
			if routed++; routed > 1 {
				d.cfg.Budget.Hold(d.epoch.N, size)
			}
			d.cfg.Acker.Add(d.txn, 1)
			r.sent = true
			if err := d.deliver(ctx, r, delivery{event: c.Event, txn: d.txn, size: size}); err != nil {
				return err
			}
		}
		if routed == 0 {
			d.cfg.Budget.Release(d.epoch.N, size)
		}
	case ChangeMalformed:
		defer d.cfg.Budget.Release(d.epoch.N, EventSize(&c.Event))
		d.cfg.Logger.Warn().Str("event_id", c.Event.ID).Str("reason", c.Reason).Msg("malformed outbox row dead-lettered")
		return d.deadLetter(ctx, DeadLetter{Event: c.Event, Reason: c.Reason})
	case ChangeSubscription:
		return d.handleSubscription(ctx, c)
	case ChangeRouted:
		return d.handleRouted(ctx, c)
	case ChangeReplay:
		if c.Done != nil { // a relay worker: the sidecar routed it
			return d.handleRouted(ctx, c)
		}
		// A replay always carries a webhook-id (the one it would have had
		// alone, if it was stored without): that is what marks it as one
		// downstream (sent alone, never merged, ordered by its own sequence).
		if c.Event.WebhookID == "" {
			c.Event.WebhookID = WebhookID(c.SubscriptionID, []Event{c.Event})
		}
		size := EventSize(&c.Event)
		r := d.byID[c.SubscriptionID]
		if r == nil {
			defer d.cfg.Budget.Release(d.epoch.N, size)
			return d.deadLetter(ctx, DeadLetter{Subscription: c.SubscriptionID, Event: c.Event, WebhookID: c.Event.WebhookID,
				Reason: "replay: the subscription no longer exists"})
		}
		d.cfg.Acker.Add(d.txn, 1)
		r.sent = true
		return d.deliver(ctx, r, delivery{event: c.Event, txn: d.txn, size: size})
	case ChangeCommit:
		if d.txnMaxID > 0 {
			d.cfg.Acker.SawID(d.txn, d.txnMaxID)
			d.txnMaxID = 0
		}
		d.cfg.Acker.Commit(d.txn, c.LSN)
		d.txn = nil
		// Schedulers hold partial batches while a transaction streams in.
		for _, r := range d.subs {
			if r.sent {
				r.sent = false
				if err := d.deliver(ctx, r, delivery{commit: true}); err != nil {
					return err
				}
			}
		}
	case ChangeIdle:
		d.cfg.Acker.Idle(c.LSN)
	case ChangeParked:
		// Behind everything routed so far and before what follows: a
		// scheduler marks the resources parked before their next event.
		for _, r := range d.subs {
			if err := d.deliver(ctx, r, delivery{reload: true}); err != nil {
				return err
			}
		}
	}
	return nil
}

// handleSubscription applies a dynamic subscription's change at its place in
// the stream, after recording it durably.
func (d *Dispatcher) handleSubscription(ctx context.Context, c Change) error {
	change := RoutingChange{Commit: LSN(c.Event.Seq >> 16), Seq: c.Event.Seq, ID: c.SubscriptionID, Row: c.Row}
	err := retryForever(ctx, d.cfg.Logger, "cannot record subscription change", func() error {
		return d.cfg.Store.RecordRouting(ctx, change)
	})
	if err != nil {
		return err
	}
	if c.Row == nil {
		return d.unsubscribe(ctx, c.SubscriptionID)
	}
	var row SubscriptionRow
	if err := json.Unmarshal(c.Row, &row); err != nil {
		d.cfg.Logger.Error().Str("subscription", c.SubscriptionID).Err(err).Msg("unreadable subscription change ignored")
		return nil
	}
	return d.subscribe(ctx, &row)
}

func (d *Dispatcher) subscribe(ctx context.Context, row *SubscriptionRow) error {
	s, err := row.Subscription(d.cfg.Defaults)
	if err != nil {
		d.cfg.Logger.Error().Str("subscription", row.ID).Err(err).Msg("invalid subscription ignored")
		return nil
	}
	r := d.byID[s.ID]
	switch {
	case r == nil:
		d.add(s)
		d.cfg.Logger.Info().Str("subscription", s.ID).Msg("subscribed")
	case r.sub.Static:
		d.cfg.Logger.Warn().Str("subscription", s.ID).Msg("a dynamic subscription has a static one's id; ignored")
	default:
		r.sub = s
		return d.deliver(ctx, r, delivery{update: s})
	}
	return nil
}

// unsubscribe stops routing to a deleted subscription at this point of the
// stream; its scheduler still delivers what was committed before, then stops.
func (d *Dispatcher) unsubscribe(ctx context.Context, id string) error {
	r := d.byID[id]
	if r == nil || r.sub.Static {
		return nil
	}
	delete(d.byID, id)
	d.subs = slices.DeleteFunc(d.subs, func(x *running) bool { return x == r })
	d.cfg.Logger.Info().Str("subscription", id).Msg("unsubscribed; delivering what was committed before")
	return d.deliver(ctx, r, delivery{close: true})
}

// deliver hands dv to r's scheduler, or in relay mode an event to the relay
// (which needs no markers: it keeps stream order itself).
func (d *Dispatcher) deliver(ctx context.Context, r *running, dv delivery) error {
	if d.cfg.Relay == nil {
		return enqueue(ctx, r, dv)
	}
	if dv.commit || dv.update != nil || dv.close || dv.reload {
		return nil
	}
	txn, size, n := dv.txn, dv.size, d.epoch.N
	return d.cfg.Relay.Publish(ctx, d.epoch, r.sub, dv.event, func() {
		d.cfg.Acker.Done(txn)
		d.cfg.Budget.Release(n, size)
	})
}

// handleRouted delivers one event that a relay routed (a relay worker): a
// transaction of its own, finished (c.Done) when its delivery is, whatever
// the events before it. A subscription deleted since has nothing to deliver.
func (d *Dispatcher) handleRouted(ctx context.Context, c Change) error {
	d.cfg.Metrics.events.Inc()
	if c.Kind == ChangeReplay && c.Event.WebhookID == "" {
		c.Event.WebhookID = WebhookID(c.SubscriptionID, []Event{c.Event})
	}
	r := d.byID[c.SubscriptionID]
	if r == nil {
		if c.Kind == ChangeReplay {
			err := d.deadLetter(ctx, DeadLetter{Subscription: c.SubscriptionID, Event: c.Event, WebhookID: c.Event.WebhookID,
				Reason: "replay: the subscription no longer exists"})
			if err != nil {
				return err
			}
		}
		c.Done()
		return nil
	}
	size := EventSize(&c.Event)
	d.cfg.Budget.Hold(d.epoch.N, size)
	txn := d.cfg.Acker.BeginFunc(c.Event.CommitTime, c.Done)
	d.cfg.Acker.Add(txn, 1)
	if err := enqueue(ctx, r, delivery{event: c.Event, txn: txn, size: size}); err != nil {
		return err
	}
	d.cfg.Acker.Commit(txn, c.LSN)
	return enqueue(ctx, r, delivery{commit: true})
}

func enqueue(ctx context.Context, r *running, dv delivery) error {
	select {
	case r.queue <- dv: // the common case, without locking ctx's channel too
		return nil
	default:
	}
	select {
	case r.queue <- dv:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// deadLetter writes dl, retrying until it is stored or ctx ends: an event is not
// finished before its dead letter is durable.
//
// A dead letter the store refuses for good (ErrPermanent) is logged and counted
// as dropped: retrying would wedge the stream on it and pin the slot.
func (d *Dispatcher) deadLetter(ctx context.Context, dl DeadLetter) error {
	err := retryForever(ctx, d.cfg.Logger, "cannot write dead letter", func() error {
		return d.cfg.Store.DeadLetter(ctx, dl)
	})
	if errors.Is(err, ErrPermanent) {
		d.cfg.Logger.Error().Err(err).Str("subscription", dl.Subscription).Str("event_id", dl.Event.ID).
			Msg("event dropped: the store cannot hold its dead letter")
		d.cfg.Metrics.deliveries.WithLabelValues(dl.Subscription, "dropped").Inc()
		return nil
	}
	return err
}

// retryForever runs f until it succeeds or ctx ends, logging the first failure
// and the recovery once. Errors that retrying cannot fix (ErrPermanent,
// ErrFenced) are returned at once.
func retryForever(ctx context.Context, log zerolog.Logger, what string, f func() error) error {
	b := backoff.NewExponentialBackOff(backoff.WithMaxElapsedTime(0), backoff.WithMaxInterval(30*time.Second))
	for failed := false; ; failed = true {
		err := f()
		if err == nil {
			if failed {
				log.Info().Msg(what + ": recovered")
			}
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, ErrPermanent) || errors.Is(err, ErrFenced) || errors.Is(err, ErrFeedLater) {
			return err
		}
		if !failed {
			log.Error().Err(err).Msg(what + "; retrying")
		}
		if err := sleep(ctx, b.NextBackOff()); err != nil {
			return err
		}
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
