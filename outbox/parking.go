package outbox

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Parking (docs/parking.md): a key whose endpoint keeps failing moves to
// walhook.deliveries and is fed from there, in sequence order.

// handleParkedEvent puts an event of a parked key in the table, in sequence
// order, and finishes it once written. An event below the key's parked
// high-water mark that is not a dead-letter replay was streamed again (after
// a restart or takeover): the table holds it or it was finished, so it is
// finished without a request (docs/parking.md). One at the mark goes to the
// table, whose unique (subscription, event_id) keeps it once: sequences
// saturate in transactions of more than 65,535 events, so equal is not old.
// While store work for the key is queued, the event waits in memory behind it
// and follows it into the table (flushParked).
func (s *scheduler) handleParkedEvent(ctx context.Context, k *key, dv delivery, ev Event, now time.Time) {
	if ev.WebhookID == "" && ev.Seq < k.parkedSeq {
		s.done(dv.txn, dv.size)
		return
	}
	k.items = append(k.items, &item{ev: ev, txn: dv.txn, size: dv.size, first: now, readyAt: now})
	s.pending++
	if k.writes == 0 {
		s.flushParked(ctx, k)
	}
}

// flushParked writes the events waiting in a parked key's memory to the
// table, behind its rows.
func (s *scheduler) flushParked(ctx context.Context, k *key) {
	if len(k.items) == 0 {
		return
	}
	items := k.items
	k.items = nil
	events := make([]ParkedEvent, len(items))
	for i, it := range items {
		events[i] = ParkedEvent{Event: it.ev, NextAttempt: k.feedAt, Since: it.first}
	}
	s.park(ctx, k, items, events)
}

// unstorable dead-letters an event the store refused to park for good (a
// payload its jsonb cannot hold): the stream goes on, nothing is retried
// forever.
func (s *scheduler) unstorable(ctx context.Context, k *key, it *item, cause error) {
	s.log.Error().Err(cause).Str("event_id", it.ev.ID).Msg("cannot park the event: dead-lettered")
	dl := DeadLetter{Subscription: s.sub.ID, Event: it.ev, WebhookID: WebhookID(s.sub.ID, []Event{it.ev}),
		Reason: "cannot be parked: " + cause.Error()}
	s.enqueue(ctx, &storeOp{what: "cannot write dead letter", key: k,
		f: func(ctx context.Context) error { return s.d.deadLetter(ctx, dl) },
		then: func(_ context.Context, err error) {
			if err != nil {
				return // the epoch ended: unacked, replayed
			}
			s.done(it.txn, it.size)
			s.pending--
			s.metrics.finished(s.sub.ID, "dead_lettered", []Event{it.ev})
		}})
}

// retireParked dead-letters parked rows and deletes them in one transaction:
// an event is never in the table and in the dead letters at once, so a
// replay of the dead letter cannot meet its old row (and be dropped as a
// duplicate of it).
func (s *scheduler) retireParked(ctx context.Context, j *job, cause error) {
	dls := s.deadLetters(j, cause)
	rows := j.rows()
	k := j.keys[0]
	s.enqueue(ctx, &storeOp{what: "cannot dead-letter parked deliveries", key: k,
		f: func(ctx context.Context) error { return s.store.DeadLetterRows(ctx, rows, dls) },
		then: func(_ context.Context, err error) {
			if err != nil {
				return
			}
			s.metrics.finished(s.sub.ID, "dead_lettered", j.batch.Events)
			k.busy, k.feedAt = false, s.now()
		}})
}

func (j *job) rows() []int64 {
	rows := make([]int64, len(j.items))
	for i, it := range j.items {
		rows[i] = it.row
	}
	return rows
}

// loadParked marks the keys that have parked rows (from before a restart),
// and, debounced, loads the sequences already sent.
func (s *scheduler) loadParked(ctx context.Context) error {
	if s.opts.Debounce > 0 {
		err := retryForever(ctx, s.log, "cannot read debounce marks", func() error {
			var err error
			s.sentMarks, err = s.store.SentMarks(ctx, s.sub.ID, uint64(s.startLSN)<<16)
			return err
		})
		if err != nil {
			return err
		}
	}
	var keys []ParkedKey
	err := retryForever(ctx, s.log, "cannot read parked deliveries", func() error {
		var err error
		keys, err = s.store.ParkedKeys(ctx, s.sub.ID)
		return err
	})
	if err != nil {
		return err
	}
	now := s.now()
	s.parkedMarks = make(map[string]uint64, len(keys))
	for _, pk := range keys {
		k := s.key(pk.Resource)
		k.parked, k.feedAt, k.parkedSeq = true, pk.NextAttempt, pk.MaxSeq
		s.parkedMarks[pk.Resource] = pk.MaxSeq // outlives the key, which may drain before the stream gets here
		s.schedule(k, now)
	}
	if len(keys) > 0 {
		s.log.Info().Int("resources", len(keys)).Msg("resuming parked deliveries")
	}
	return nil
}

// reloadParked marks the resources the store has parked since loadParked, and
// merges in the debounce marks written since
// (a relay worker took a partition, docs/scale-out.md): none of their events
// has reached this scheduler yet, so later ones go behind the parked ones.
func (s *scheduler) reloadParked(ctx context.Context) {
	if s.opts.Debounce > 0 {
		// The debounce marks too: the partition's previous owner may have
		// sent newer events of its resources than what comes again now. A
		// mark only says that an event was sent, and what is older than it
		// is superseded, so merging newer marks in is always safe.
		var marks map[string]uint64
		if retryForever(ctx, s.log, "cannot read debounce marks", func() error {
			var err error
			marks, err = s.store.SentMarks(ctx, s.sub.ID, uint64(s.startLSN)<<16)
			return err
		}) != nil {
			return // the epoch ended
		}
		if s.sentMarks == nil {
			s.sentMarks = make(map[string]uint64, len(marks))
		}
		for r, m := range marks {
			s.sentMarks[r] = max(s.sentMarks[r], m)
		}
	}
	var keys []ParkedKey
	if retryForever(ctx, s.log, "cannot read parked deliveries", func() error {
		var err error
		keys, err = s.store.ParkedKeys(ctx, s.sub.ID)
		return err
	}) != nil {
		return // the epoch ended
	}
	now := s.now()
	for _, pk := range keys {
		if k := s.keys[pk.Resource]; k != nil && (k.parked || len(k.items) > 0) {
			continue // known already
		}
		k := s.key(pk.Resource)
		k.parked, k.feedAt, k.parkedSeq = true, pk.NextAttempt, pk.MaxSeq
		s.parkedMarks[pk.Resource] = max(s.parkedMarks[pk.Resource], pk.MaxSeq)
		s.schedule(k, now)
	}
}

// park writes a key's items (events, the same in order) to
// walhook.deliveries, off the loop; each is finished once written. The key is
// held meanwhile. On error nothing is finished: the epoch ended, or
// (ErrPermanent) the store cannot hold one of them: then they are parked one
// by one, and what cannot be parked is dead-lettered.
func (s *scheduler) park(ctx context.Context, k *key, items []*item, events []ParkedEvent) {
	sub := s.sub.ID
	s.enqueue(ctx, &storeOp{what: "cannot park deliveries", key: k,
		f: func(ctx context.Context) error { return s.store.Park(ctx, sub, events) },
		then: func(ctx context.Context, err error) {
			switch {
			case errors.Is(err, ErrPermanent) && len(items) == 1:
				s.unstorable(ctx, k, items[0], err)
			case errors.Is(err, ErrPermanent):
				for i := range items {
					s.park(ctx, k, items[i:i+1], events[i:i+1])
				}
			case err == nil:
				for _, it := range items {
					s.done(it.txn, it.size)
					k.parkedSeq = max(k.parkedSeq, it.ev.Seq)
				}
				s.pending -= len(items)
			}
		}})
}

// write runs a store write until it succeeds, the epoch ends, or it fails for
// good. Fenced, the epoch is over: another process delivers now.
func (s *scheduler) write(ctx context.Context, what string, f func() error) error {
	err := retryForever(ctx, s.log, what, f)
	if errors.Is(err, ErrFenced) {
		s.log.Warn().Msg("another walhook process took over delivery: stopping")
		s.epoch.End(err)
	}
	return err
}

// parkJob parks every key of a batch that failed for park_after: its items
// and every later item of those keys move to the table, and stop holding the
// slot back.
func (s *scheduler) parkJob(ctx context.Context, j *job, next time.Time) {
	if s.closing {
		// A deleted subscription's failing events are not kept for days.
		for _, k := range j.keys {
			for _, it := range k.items {
				s.done(it.txn, it.size)
			}
			s.metrics.deliveries.WithLabelValues(s.sub.ID, "dropped").Add(float64(len(k.items)))
			s.pending -= len(k.items)
			delete(s.keys, k.id)
		}
		return
	}
	now := s.now()
	n, keys := s.parkWaiting(ctx, j, next, now)
	s.log.Warn().Int("resources", keys).Int("events", n).Dur("failing_for", s.now().Sub(j.first)).
		Msg("parked: the endpoint keeps failing; events moved out of memory (walhook.deliveries, or a relay worker's park stream)")
}

// parkWaiting parks j's keys (j may be nil) and the ready keys that waited
// park_after (all of them while memory is full); it returns the events and
// keys parked. The writes run off the loop (park); the keys are parked from
// now on, and what comes for them meanwhile follows their events.
func (s *scheduler) parkWaiting(ctx context.Context, j *job, next, now time.Time) (n, parked int) {
	var keys []*key
	if j != nil {
		keys = j.keys
	}
	// The endpoint keeps failing: keys that waited as long for a free request
	// slot go too, without an attempt, or the slot would stay pinned by them.
	full := s.overBudget()
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
			if it.sent && j != nil {
				events[i].Attempts, events[i].Since = j.attempt, j.first
			}
		}
		items := k.items
		n += len(items)
		k.items, k.busy, k.parked, k.feedAt = nil, false, true, next
		s.park(ctx, k, items, events)
	}
	return n, len(keys)
}

// feedLaterAfter is how long a parked key waits after the store said
// ErrFeedLater.
const feedLaterAfter = time.Second

// feedJob loads a parked key's next rows, off the loop, and starts their
// attempt; with none left the key returns to memory. The attempt's request
// slot (and rate token) is taken now, so max_in_flight holds.
func (s *scheduler) feedJob(ctx context.Context, k *key) {
	var rows []ParkedEvent
	sub, limit, maxBytes := s.sub.ID, s.opts.BatchMax, s.opts.BatchBytes
	s.inFlight++
	k.busy = true
	s.enqueue(ctx, &storeOp{what: "cannot read parked deliveries", key: k,
		f: func(ctx context.Context) error {
			var err error
			rows, err = s.store.NextParked(ctx, sub, k.id, limit, maxBytes)
			return err
		},
		then: func(ctx context.Context, err error) {
			s.inFlight--
			if errors.Is(err, ErrFeedLater) { // still parked: asked again later
				k.busy, k.feedAt = false, s.now().Add(feedLaterAfter)
				s.tokens++ // no attempt
				return
			}
			if err != nil {
				return
			}
			k.busy = false
			if j := s.parkedJob(k, rows); j != nil && !s.draining && !s.closing && !s.disabled && !s.gone {
				k.busy = true
				s.start(ctx, j)
				return
			}
			s.tokens++ // no attempt
		}})
}

// parkedJob is the job of a parked key's next rows; with none left the key
// returns to memory (with what came for it while they were read).
func (s *scheduler) parkedJob(k *key, rows []ParkedEvent) *job {
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
		} else {
			for _, it := range k.items {
				it.readyAt = s.readyAt(it.first, s.now())
			}
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
	return j
}

// finishParked deletes delivered or dead-lettered rows and feeds the key on.
func (s *scheduler) finishParked(ctx context.Context, j *job) {
	rows := j.rows()
	k := j.keys[0]
	s.enqueue(ctx, &storeOp{what: "cannot unpark deliveries", key: k,
		f: func(ctx context.Context) error { return s.store.Unpark(ctx, rows) },
		then: func(_ context.Context, err error) {
			if err == nil {
				k.busy, k.feedAt = false, s.now()
			}
		}})
}

// retryParked reschedules failed rows, or dead-letters them after retry_for.
func (s *scheduler) retryParked(ctx context.Context, j *job, cause error, next time.Time) {
	if s.now().Sub(j.first) >= s.opts.RetryFor {
		s.retireParked(ctx, j, fmt.Errorf("retry_for (%s) exhausted: %w", s.opts.RetryFor, cause))
		return
	}
	rows, attempt, reason := j.rows(), j.attempt, cause.Error()
	k := j.keys[0]
	s.enqueue(ctx, &storeOp{what: "cannot reschedule parked deliveries", key: k,
		f: func(ctx context.Context) error { return s.store.Reschedule(ctx, rows, attempt, next, reason) },
		then: func(_ context.Context, err error) {
			if err == nil {
				k.busy, k.feedAt = false, next
			}
		}})
}
