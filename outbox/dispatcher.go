package outbox

import (
	"context"
	"encoding/json"
	"errors"
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
type Store interface {
	DeadLetter(ctx context.Context, d DeadLetter) error
	// RecordRouting stores an applied subscription change, before its
	// transaction may be acknowledged.
	RecordRouting(ctx context.Context, c RoutingChange) error
	// LoadRouting returns the dynamic subscriptions in force at a stream
	// position: every recorded change committed before it.
	LoadRouting(ctx context.Context, at LSN) ([]SubscriptionRow, error)
	// DeleteSubscription removes a dynamic subscription (after a 410 Gone).
	DeleteSubscription(ctx context.Context, id string) error

	// Parking (docs/parking.md). Park appends events of one subscription to
	// walhook.deliveries, ignoring ones already there.
	Park(ctx context.Context, subscription string, events []ParkedEvent) error
	// ParkedKeys lists the resources of a subscription that have parked events.
	ParkedKeys(ctx context.Context, subscription string) ([]ParkedKey, error)
	// NextParked returns up to limit parked events of one resource, in order.
	NextParked(ctx context.Context, subscription, resource string, limit int) ([]ParkedEvent, error)
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
}

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
	QueueSize     int      // pending deliveries per subscription before the stream pauses; default 1024
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
	ctx      context.Context
	workers  sync.WaitGroup
	started  bool          // routing was loaded once
	drain    chan struct{} // closed at ChangeDrained: schedulers finish what is in flight
	drained  chan struct{} // closed when every scheduler has stopped after that
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
	commit bool          // no event: the transaction of the previous events committed
	update *Subscription // no event: the subscription changed
	close  bool          // no event: the subscription was deleted; drain and stop
}

// NewDispatcher returns a Dispatcher; Run starts it.
func NewDispatcher(cfg DispatcherConfig) *Dispatcher {
	if cfg.QueueSize <= 0 {
		cfg.QueueSize = 1024
	}
	if cfg.Defaults == (DeliveryOptions{}) {
		cfg.Defaults = DefaultDeliveryOptions
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(prometheus.NewRegistry(), cfg.Acker)
	}
	return &Dispatcher{cfg: cfg, byID: map[string]*running{}, drain: make(chan struct{}), drained: make(chan struct{})}
}

// Drained is closed once Run has stopped after a ChangeDrained: the sends in
// flight came back (or Run's context ended). Unfinished events are not
// acknowledged: the stream replays them next time.
func (d *Dispatcher) Drained() <-chan struct{} { return d.drained }

// Run consumes changes until ctx ends or changes closes. Reading pauses (and so
// does the stream behind it) while a subscription's queue is full.
func (d *Dispatcher) Run(ctx context.Context, changes <-chan Change) error {
	ctx, cancel := context.WithCancel(ctx)
	defer func() {
		cancel()
		d.workers.Wait()
	}()
	d.ctx = ctx
	for _, s := range d.cfg.Subscriptions {
		d.add(s)
	}
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
		if c.Kind == ChangeDrained {
			close(d.drain)
			d.workers.Wait() // each scheduler stops once its sends are back
			close(d.drained)
			return nil
		}
		if err := d.handleChange(ctx, c); err != nil {
			if errors.Is(err, context.Canceled) {
				return nil
			}
			return err
		}
	}
	return nil
}

func (d *Dispatcher) add(s *Subscription) {
	r := &running{sub: s, queue: make(chan delivery, d.cfg.QueueSize), done: make(chan struct{})}
	r.sc = newScheduler(d, s, r.queue)
	ctx, cancel := context.WithCancel(d.ctx)
	r.cancel = cancel
	d.subs = append(d.subs, r)
	d.byID[s.ID] = r
	d.cfg.Metrics.addSubscription(s.ID)
	d.workers.Add(1)
	go func() {
		defer d.workers.Done()
		defer close(r.done)
		r.sc.run(ctx)
	}()
}

// remove stops a subscription's scheduler and releases what it held: its
// events count as finished (the subscription is gone).
func (d *Dispatcher) remove(r *running) {
	r.cancel()
	<-r.done
	r.sc.release()
	retryForever(d.ctx, d.cfg.Logger, "cannot drop parked events", func() error {
		return d.cfg.Store.DropParked(d.ctx, r.sub.ID)
	})
	for {
		select {
		case dv := <-r.queue:
			if dv.txn != nil {
				d.cfg.Acker.Done(dv.txn)
			}
			continue
		default:
		}
		break
	}
	delete(d.byID, r.sub.ID)
	d.cfg.Metrics.removeSubscription(r.sub.ID)
	d.subs = slices.DeleteFunc(d.subs, func(x *running) bool { return x == r })
}

func (d *Dispatcher) handleChange(ctx context.Context, c Change) error {
	switch c.Kind {
	case ChangeStart:
		if d.txn != nil { // the stream was cut inside it: it comes again whole
			d.cfg.Acker.Abort(d.txn)
			d.txn, d.txnMaxID = nil, 0
		}
		for _, r := range d.subs {
			r.sent = false
		}
		return d.loadRouting(ctx, c.LSN)
	case ChangeBegin:
		d.txn = d.cfg.Acker.Begin(c.Event.CommitTime)
	case ChangeEvent:
		d.cfg.Metrics.events.Inc()
		if id, err := strconv.ParseUint(c.Event.ID, 10, 64); err == nil {
			d.txnMaxID = max(d.txnMaxID, id)
		}
		for _, r := range d.subs {
			if !r.sub.Matches(&c.Event) {
				continue
			}
			d.cfg.Acker.Add(d.txn, 1)
			r.sent = true
			if err := enqueue(ctx, r, delivery{event: c.Event, txn: d.txn}); err != nil {
				return err
			}
		}
	case ChangeMalformed:
		d.cfg.Logger.Warn().Str("event_id", c.Event.ID).Str("reason", c.Reason).Msg("malformed outbox row dead-lettered")
		return d.deadLetter(ctx, DeadLetter{Event: c.Event, Reason: c.Reason})
	case ChangeSubscription:
		return d.handleSubscription(ctx, c)
	case ChangeReplay:
		r := d.byID[c.SubscriptionID]
		if r == nil {
			return d.deadLetter(ctx, DeadLetter{Subscription: c.SubscriptionID, Event: c.Event, WebhookID: c.Event.WebhookID,
				Reason: "replay: the subscription no longer exists"})
		}
		d.cfg.Acker.Add(d.txn, 1)
		r.sent = true
		return enqueue(ctx, r, delivery{event: c.Event, txn: d.txn})
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
				if err := enqueue(ctx, r, delivery{commit: true}); err != nil {
					return err
				}
			}
		}
	case ChangeIdle:
		d.cfg.Acker.Idle(c.LSN)
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
		return enqueue(ctx, r, delivery{update: s})
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
	return enqueue(ctx, r, delivery{close: true})
}

// loadRouting sets the dynamic subscriptions to those in force at the stream's
// start position.
//
// On a reconnect the routing in memory is kept if the load fails for a few
// seconds: it differs from the one at the start position only if a
// subscription changed in the replayed window, and blocking here would block
// confirmations too (a PostgreSQL fast shutdown waits for those, and refuses
// the new connections a load needs: a deadlock).
func (d *Dispatcher) loadRouting(ctx context.Context, at LSN) error {
	var rows []SubscriptionRow
	load := func(ctx context.Context) func() error {
		return func() error {
			var err error
			rows, err = d.cfg.Store.LoadRouting(ctx, at)
			return err
		}
	}
	if d.started {
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := retryForever(lctx, d.cfg.Logger, "cannot load subscriptions", load(lctx))
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			d.cfg.Logger.Warn().Msg("subscriptions not reloaded after a reconnect: keeping those in memory")
			return nil
		}
	} else if err := retryForever(ctx, d.cfg.Logger, "cannot load subscriptions", load(ctx)); err != nil {
		return err
	}
	d.started = true
	keep := map[string]bool{}
	for i := range rows {
		keep[rows[i].ID] = true
		if err := d.subscribe(ctx, &rows[i]); err != nil {
			return err
		}
	}
	for _, r := range append([]*running(nil), d.subs...) {
		if !r.sub.Static && !keep[r.sub.ID] {
			d.remove(r)
		}
	}
	d.cfg.Logger.Info().Int("dynamic", len(rows)).Int("static", len(d.cfg.Subscriptions)).Msg("subscriptions loaded")
	return nil
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
func (d *Dispatcher) deadLetter(ctx context.Context, dl DeadLetter) error {
	return retryForever(ctx, d.cfg.Logger, "cannot write dead letter", func() error {
		return d.cfg.Store.DeadLetter(ctx, dl)
	})
}

// retryForever runs f until it succeeds or ctx ends, logging the first failure
// and the recovery once.
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
