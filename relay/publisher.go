package relay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/walhook/walhook/outbox"
)

// Publisher limits.
const (
	maxInFlight = 4096                   // publishes awaiting their PubAck
	maxQueued   = 8192                   // publishes held, in flight or waiting
	ackTimeout  = 10 * time.Second       // a PubAck not back by then is a failure
	stuckAfter  = 10 * time.Second       // /readyz: the oldest publish is this old
	keepEvery   = 250 * time.Millisecond // an idle publisher's keep message (Run)
)

// PublisherConfig configures a Publisher.
type PublisherConfig struct {
	Relay      Config
	JetStream  jetstream.JetStream
	Conn       *nats.Conn
	Logger     zerolog.Logger
	Registerer prometheus.Registerer // default: registered nowhere
	// DeadLetter stores an event that cannot be published (larger than
	// the server's max_payload).
	DeadLetter func(ctx context.Context, d outbox.DeadLetter) error
	// Owns says whether this process still holds the slot's delivery lease
	// (pgstore's Store.Owns): nil, outbox.ErrFenced once another took it, or
	// why it cannot tell. Every publish that does not follow one of this
	// publisher's own in the stream waits for a nil (fence, in Run). Nil
	// means never fenced (tests of one publisher).
	Owns func(ctx context.Context) error
}

// Publisher is the sidecar's outbox.Relay: the Dispatcher calls Publish in
// stream order; Run, one goroutine, publishes asynchronously in that order
// and calls each delivery's done once JetStream stored it.
type Publisher struct {
	cfg PublisherConfig
	in  chan *pub
	log zerolog.Logger
	m   *publisherMetrics

	pending atomic.Int64 // held: waiting or in flight
	oldest  atomic.Int64 // unix nanos of the oldest unacknowledged publish; 0 none
	failing atomic.Bool  // the last attempt failed and none succeeded since
	mu      sync.Mutex
	lastErr string
}

type pub struct {
	msg   *nats.Msg
	id    string
	epoch *outbox.Epoch
	done  func()
	at    time.Time
	fut   jetstream.PubAckFuture
	keep  bool // the stream's keep message, not a delivery
}

// NewPublisher returns a Publisher; Run starts it.
func NewPublisher(cfg PublisherConfig) *Publisher {
	cfg.Relay = cfg.Relay.WithDefaults()
	if cfg.Registerer == nil {
		cfg.Registerer = prometheus.NewRegistry()
	}
	p := &Publisher{cfg: cfg, in: make(chan *pub, 1024), log: cfg.Logger}
	p.m = newPublisherMetrics(cfg.Registerer, p)
	return p
}

// Publish implements outbox.Relay.
func (p *Publisher) Publish(ctx context.Context, e *outbox.Epoch, sub *outbox.Subscription, ev outbox.Event, done func()) error {
	data, err := json.Marshal(message{Subscription: sub.ID, Event: ev})
	if err != nil {
		return fmt.Errorf("encode relay message: %w", err)
	}
	id := msgID(sub.ID, &ev)
	if max := p.cfg.Conn.MaxPayload(); max > 0 && int64(len(data))+512 > max {
		// JetStream would refuse it every time: it must not wedge the slot.
		dl := outbox.DeadLetter{Subscription: sub.ID, Event: ev, WebhookID: outbox.WebhookID(sub.ID, []outbox.Event{ev}),
			Reason: fmt.Sprintf("relay: %d bytes is more than the NATS server's max_payload (%d)", len(data), max)}
		if ev.WebhookID != "" {
			dl.WebhookID = ev.WebhookID
		}
		for err := p.cfg.DeadLetter(ctx, dl); err != nil; err = p.cfg.DeadLetter(ctx, dl) {
			if errors.Is(err, outbox.ErrPermanent) {
				p.log.Error().Err(err).Str("subscription", sub.ID).Str("event_id", ev.ID).
					Msg("event dropped: too large for nats, and the store cannot hold its dead letter")
				break
			}
			p.log.Error().Err(err).Msg("cannot write dead letter; retrying")
			if err := sleep(ctx, time.Second); err != nil {
				return err
			}
		}
		p.log.Warn().Str("subscription", sub.ID).Str("event_id", ev.ID).Int("bytes", len(data)).Msg("event too large for nats: dead-lettered")
		done()
		return nil
	}
	msg := &nats.Msg{Subject: p.cfg.Relay.subject(Partition(sub.ID, ev.ResourceID, p.cfg.Relay.Partitions)), Data: data}
	x := &pub{msg: msg, id: id, epoch: e, done: done}
	p.pending.Add(1)
	select {
	case p.in <- x:
		return nil
	case <-ctx.Done():
		p.pending.Add(-1)
		return ctx.Err()
	}
}

// Health says whether publishing works: not when the last attempt failed, or
// the oldest publish has waited for its acknowledgement for long.
func (p *Publisher) Health() (ok bool, reason string) {
	if p.failing.Load() {
		p.mu.Lock()
		defer p.mu.Unlock()
		return false, "relay: cannot publish to JetStream: " + p.lastErr
	}
	if o := p.oldest.Load(); o > 0 && time.Since(time.Unix(0, o)) > stuckAfter {
		return false, "relay: JetStream has not acknowledged a publish for " + time.Since(time.Unix(0, o)).Round(time.Second).String()
	}
	return true, ""
}

// Pending is the number of publishes not yet acknowledged.
func (p *Publisher) Pending() int64 { return p.pending.Load() }

// Run publishes until ctx ends. Order: in flight, every publish expects its
// predecessor as the stream's last message (by sequence: the one stored
// before it, plus one per publish since), so JetStream refuses one that
// would overtake a lost one. After a failure, and when an epoch starts, the
// publisher waits for everything in flight, then fences: it reads the
// stream's last sequence, makes sure it still holds the slot (Owns), and
// publishes again from the first unacknowledged message, one at a time,
// expecting that sequence, until one is stored anew; then it pipelines
// again. No publish goes without an expectation, and none of an epoch past
// its freshness (Epoch.Live): a zombie (a sidecar that lost the slot and
// does not know yet) fails its fence, and a thawed one publishes nothing of
// what it queued (docs/scale-out.md, "Zombies": the chain alone does not
// stop it). Publishes of an ended epoch are dropped unacknowledged: the next
// epoch streams them again.
//
// While it keeps up, the publisher also keeps one message that no worker
// consumes in the stream, published again (a rollup of its subject) every
// keepEvery when nothing waits: nats-server's file store creates a new block
// file whenever an acknowledgement empties its last block, which in a work
// queue that keeps up is nearly every acknowledgement (docs/performance.md).
// It goes only in the chain, with an expectation, and a failed one is not
// retried: it never stores anything another writer's chain did not expect.
func (p *Publisher) Run(ctx context.Context) error {
	var (
		queue    []*pub // to publish, in order
		inflight []*pub // published, in order
		failed   []*pub // failed while others were in flight: republished first
		chain    bool   // pipelining: the last publish is expected to be stored
		fenced   bool   // serial: last was read from the stream before Owns said this process holds the slot
		last     uint64 // the stream sequence the next publish expects as the stream's last
		epoch    *outbox.Epoch
		dupsIn   *outbox.Epoch // the epoch whose first duplicate was logged
		stale    *outbox.Epoch // the epoch found stale (logged)
		retryAt  time.Time
		keepOff  time.Time // no keep message before
	)
	bo := backoff.NewExponentialBackOff(backoff.WithInitialInterval(100*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second), backoff.WithMaxElapsedTime(0))
	for { // the stream first; publishes wait in the input meanwhile
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := EnsureStream(sctx, p.cfg.JetStream, p.cfg.Relay)
		cancel()
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, ErrPartitions) {
			return err
		}
		p.fail(err)
		if sleep(ctx, bo.NextBackOff()) != nil {
			return nil
		}
	}
	bo.Reset()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	keep := time.NewTicker(keepEvery)
	defer keep.Stop()
	for {
		// Publish what may go now.
		for len(queue) > 0 && len(inflight) < maxInFlight && len(failed) == 0 && (chain || len(inflight) == 0) &&
			!time.Now().Before(retryAt) {
			x := queue[0]
			if x.keep && (!chain || x.epoch != epoch) {
				// Never without an expectation: a sidecar whose epoch has
				// not ended yet (paused, say) would then store one after
				// another sidecar's publish, and that one's next publish,
				// expecting its predecessor, would take the keep's place
				// while its predecessor is republished after it.
				queue[0] = nil
				queue = queue[1:]
				continue
			}
			if err := x.epoch.Live(); err != nil { // ended, or past its freshness: another may hold the slot
				if errors.Is(err, outbox.ErrStale) && stale != x.epoch {
					stale = x.epoch
					p.log.Warn().Uint64("epoch", x.epoch.N).Msg("the session went silent past stall_timeout (a frozen or starved process): publishing nothing more of its epoch")
				}
				queue[0] = nil
				queue = queue[1:]
				if !x.keep {
					p.pending.Add(-1)
				}
				continue
			}
			if x.epoch != epoch { // a new epoch starts serial: the old one's tail may be lost
				epoch, chain, fenced = x.epoch, false, false
				if len(inflight) > 0 {
					break
				}
			}
			if !chain && !fenced {
				if err := p.fence(x.epoch, &last); err != nil {
					if x.epoch.Err() != nil {
						continue // ended meanwhile (a yield, a lost session): no failure of publishing
					}
					if errors.Is(err, outbox.ErrFenced) {
						p.log.Warn().Err(err).Uint64("epoch", x.epoch.N).Msg("another sidecar holds the slot: this one's epoch ends and publishes nothing more")
						x.epoch.End(err)
						continue // dropped above
					}
					p.fail(err)
					retryAt = time.Now().Add(bo.NextBackOff())
					break
				}
				if x.epoch.Live() != nil { // ended while fencing (Owns then spoke of a newer epoch), or stale
					continue
				}
				fenced = true
			}
			// Headers afresh: an earlier attempt's expectation must not stick.
			x.msg.Header = nats.Header{}
			opts := []jetstream.PublishOpt{jetstream.WithExpectStream(p.cfg.Relay.Stream)}
			if x.keep {
				x.msg.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupSubject)
			} else {
				opts = append(opts, jetstream.WithMsgID(x.id))
			}
			// Always an expectation: pipelining, the predecessor's sequence;
			// serial, the one the fence read. The sequence, not the message
			// id: in a cluster every replica checks an expected message id
			// when it applies the message, against a last id it rebuilds
			// after a restart from its last stored message (a work queue
			// removes it); one that disagrees fails with a critical write
			// error and the stream stops storing. The leader alone checks an
			// expected sequence, before proposing, against the stream's
			// sequence (TestPublisherSurvivesClusterRestart).
			opts = append(opts, jetstream.WithExpectLastSequence(last))
			fut, err := p.cfg.JetStream.PublishMsgAsync(x.msg, opts...)
			if err != nil {
				p.fail(err)
				chain, fenced, retryAt = false, false, time.Now().Add(bo.NextBackOff())
				break
			}
			queue[0] = nil
			queue = queue[1:]
			if x.at.IsZero() {
				x.at = time.Now()
			}
			x.fut = fut
			inflight = append(inflight, x)
			if chain {
				last++ // stored, x has the next sequence
			}
		}
		if len(inflight) > 0 {
			p.oldest.Store(inflight[0].at.UnixNano())
		} else if len(queue) > 0 && !queue[0].at.IsZero() {
			p.oldest.Store(queue[0].at.UnixNano())
		} else {
			p.oldest.Store(0)
		}

		in := p.in
		if len(queue)+len(inflight)+len(failed) >= maxQueued {
			in = nil // backpressure: the Dispatcher, and behind it the stream, wait
		}
		var okc <-chan *jetstream.PubAck
		var errc <-chan error
		if len(inflight) > 0 {
			okc, errc = inflight[0].fut.Ok(), inflight[0].fut.Err()
		}
		var retry <-chan time.Time
		if len(queue) > 0 && len(inflight) == 0 && time.Now().Before(retryAt) {
			timer.Reset(time.Until(retryAt))
			retry = timer.C
		}
		select {
		case <-ctx.Done():
			return nil
		case x := <-in:
			queue = append(queue, x)
			p.takeMore(&queue)
		case ack := <-okc:
			x := inflight[0]
			inflight[0] = nil
			inflight = inflight[1:]
			if ack.Duplicate {
				p.m.duplicates.Inc()
				if dupsIn != x.epoch {
					dupsIn = x.epoch
					p.log.Info().Msg("jetstream already holds deliveries streamed again after a restart: dropped as duplicates")
				}
			} else if !chain && len(failed) == 0 {
				// Stored anew: pipelining is safe from here. (A duplicate
				// stores nothing: the fence's sequence still holds.)
				chain, fenced, last = true, false, ack.Sequence
			}
			if p.failing.Swap(false) {
				p.log.Info().Msg("publishing to jetstream again")
			}
			bo.Reset()
			if !x.keep {
				p.m.published.Inc()
				p.m.ackSeconds.Observe(time.Since(x.at).Seconds())
				p.pending.Add(-1)
				x.done()
			}
		case err := <-errc:
			x := inflight[0]
			inflight[0] = nil
			inflight = inflight[1:]
			chain, fenced = false, false // stored or not: what follows goes serial, fenced afresh
			if x.keep {
				// Not retried, and no failure of publishing: deliveries go
				// on without it (nats-server creates block files again).
				// Refused, it means another writer; lasting (no subject,
				// no permission), a minute's pause between tries.
				keepOff = time.Now().Add(time.Minute)
				p.log.Warn().Err(err).Msg("cannot publish the relay stream's keep message; trying again in a minute")
				break
			}
			failed = append(failed, x)
			p.fail(err)
		case <-retry:
		case <-keep.C:
			if len(queue) == 0 && len(failed) == 0 && chain && epoch != nil && epoch.Err() == nil && time.Now().After(keepOff) {
				queue = append(queue, &pub{msg: &nats.Msg{Subject: p.cfg.Relay.keepSubject()}, epoch: epoch, keep: true})
			}
		}
		if len(failed) > 0 && len(inflight) == 0 {
			// Everything in flight is back: republish from the first failure.
			queue = append(failed, queue...)
			failed = nil
			retryAt = time.Now().Add(bo.NextBackOff())
		}
	}
}

// fence prepares a publish that follows none of this publisher's own: it
// reads the stream's last sequence into last, then asks Owns whether this
// process still holds the slot. Another sidecar stores only once it holds
// the slot, and it takes the slot only after Owns said no one had: a publish
// expecting last is stored only if no one stored anything since, so never
// after the holder's publish by one that lost the slot.
func (p *Publisher) fence(e *outbox.Epoch, last *uint64) error {
	fctx, cancel := context.WithTimeout(e.Context(), 5*time.Second)
	defer cancel()
	s, err := p.cfg.JetStream.Stream(fctx, p.cfg.Relay.Stream)
	if err != nil {
		return fmt.Errorf("read the relay stream's last sequence: %w", err)
	}
	if p.cfg.Owns != nil {
		if err := p.cfg.Owns(fctx); err != nil {
			if errors.Is(err, outbox.ErrFenced) {
				return fmt.Errorf("relay: publish: %w", err)
			}
			return fmt.Errorf("relay: cannot tell whether this process still holds the slot: %w", err)
		}
	}
	*last = s.CachedInfo().State.LastSeq
	return nil
}

func (p *Publisher) fail(err error) {
	p.m.errors.Inc()
	p.log.Debug().Err(err).Msg("publish failed")
	msg := err.Error()
	p.mu.Lock()
	p.lastErr = msg
	p.mu.Unlock()
	if !p.failing.Swap(true) {
		p.log.Error().Err(err).Msg("cannot publish to jetstream; retrying, the slot is not confirmed meanwhile")
	}
}

// Drained waits until every publish was acknowledged or ctx ends (shutdown).
func (p *Publisher) Drained(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for p.pending.Load() > 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// takeMore moves what waits in the input to the queue, up to its bound: one
// select per burst instead of one per delivery.
func (p *Publisher) takeMore(queue *[]*pub) {
	for len(*queue) < maxQueued {
		select {
		case x := <-p.in:
			*queue = append(*queue, x)
		default:
			return
		}
	}
}
