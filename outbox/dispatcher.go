package outbox

import (
	"context"
	"errors"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/rs/zerolog"
	"golang.org/x/sync/errgroup"
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

// Store keeps what must survive a restart.
type Store interface {
	DeadLetter(ctx context.Context, d DeadLetter) error
}

// DispatcherConfig configures a Dispatcher.
type DispatcherConfig struct {
	Subscriptions []*Subscription
	Acker         *Acker
	Deliverer     Deliverer
	Store         Store
	Logger        zerolog.Logger
	QueueSize     int // pending deliveries per subscription before the stream pauses; default 1024
}

// Dispatcher routes the stream's events to subscriptions, each delivered by its
// own scheduler (docs/scheduler.md).
type Dispatcher struct {
	cfg    DispatcherConfig
	queues []chan delivery // parallel to cfg.Subscriptions
	txn    *Txn            // the open transaction; owned by Run's goroutine
	sent   []bool          // which queues got events of the open transaction
}

type delivery struct {
	event  Event
	txn    *Txn
	commit bool // no event: the transaction of the previous events committed
}

// NewDispatcher returns a Dispatcher; Run starts it.
func NewDispatcher(cfg DispatcherConfig) *Dispatcher {
	if cfg.QueueSize <= 0 {
		cfg.QueueSize = 1024
	}
	d := &Dispatcher{cfg: cfg, sent: make([]bool, len(cfg.Subscriptions))}
	for range cfg.Subscriptions {
		d.queues = append(d.queues, make(chan delivery, cfg.QueueSize))
	}
	return d
}

// Run consumes changes until ctx ends or changes closes. Reading pauses (and so
// does the stream behind it) while a subscription's queue is full.
func (d *Dispatcher) Run(ctx context.Context, changes <-chan Change) error {
	g, ctx := errgroup.WithContext(ctx)
	for i, s := range d.cfg.Subscriptions {
		sc := newScheduler(d, s, d.queues[i])
		g.Go(func() error { return sc.run(ctx) })
	}
	g.Go(func() error {
		for {
			select {
			case <-ctx.Done():
				return nil
			case c, ok := <-changes:
				if !ok {
					return nil
				}
				if err := d.handleChange(ctx, c); err != nil {
					return err
				}
			}
		}
	})
	err := g.Wait()
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

func (d *Dispatcher) handleChange(ctx context.Context, c Change) error {
	switch c.Kind {
	case ChangeBegin:
		d.txn = d.cfg.Acker.Begin()
	case ChangeEvent:
		for i, s := range d.cfg.Subscriptions {
			if !s.Matches(&c.Event) {
				continue
			}
			d.cfg.Acker.Add(d.txn, 1)
			d.sent[i] = true
			if err := d.enqueue(ctx, i, delivery{event: c.Event, txn: d.txn}); err != nil {
				return err
			}
		}
	case ChangeMalformed:
		d.cfg.Logger.Warn().Str("event_id", c.Event.ID).Str("reason", c.Reason).Msg("malformed outbox row dead-lettered")
		return d.deadLetter(ctx, DeadLetter{Event: c.Event, Reason: c.Reason})
	case ChangeCommit:
		d.cfg.Acker.Commit(d.txn, c.LSN)
		d.txn = nil
		// Schedulers hold partial batches while a transaction streams in.
		for i, sent := range d.sent {
			if sent {
				d.sent[i] = false
				if err := d.enqueue(ctx, i, delivery{commit: true}); err != nil {
					return err
				}
			}
		}
	case ChangeIdle:
		d.cfg.Acker.Idle(c.LSN)
	}
	return nil
}

func (d *Dispatcher) enqueue(ctx context.Context, i int, dv delivery) error {
	select {
	case d.queues[i] <- dv:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// deadLetter writes dl, retrying until it is stored or ctx ends: an event is not
// finished before its dead letter is durable.
func (d *Dispatcher) deadLetter(ctx context.Context, dl DeadLetter) error {
	b := backoff.NewExponentialBackOff(backoff.WithMaxElapsedTime(0), backoff.WithMaxInterval(30*time.Second))
	logged := false
	for {
		err := d.cfg.Store.DeadLetter(ctx, dl)
		if err == nil {
			if logged {
				d.cfg.Logger.Info().Msg("dead letter store recovered")
			}
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !logged {
			d.cfg.Logger.Error().Err(err).Msg("cannot write dead letter; retrying")
			logged = true
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
