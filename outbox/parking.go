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
func (s *scheduler) handleParkedEvent(ctx context.Context, k *key, dv delivery, ev Event, now time.Time) {
	if ev.WebhookID == "" && ev.Seq < k.parkedSeq {
		s.done(dv.txn, dv.size)
		return
	}
	err := s.park(ctx, []ParkedEvent{{Event: ev, NextAttempt: k.feedAt, Since: now}})
	if errors.Is(err, ErrPermanent) {
		s.unstorable(ctx, ev, dv.txn, dv.size, err)
		return
	}
	if err == nil {
		k.parkedSeq = max(k.parkedSeq, ev.Seq)
		s.done(dv.txn, dv.size)
	}
}

// unstorable dead-letters an event the store refused to park for good (a
// payload its jsonb cannot hold): the stream goes on, nothing is retried
// forever.
func (s *scheduler) unstorable(ctx context.Context, ev Event, t *Txn, size int64, cause error) {
	s.log.Error().Err(cause).Str("event_id", ev.ID).Msg("cannot park the event: dead-lettered")
	if s.d.deadLetter(ctx, DeadLetter{Subscription: s.sub.ID, Event: ev, WebhookID: WebhookID(s.sub.ID, []Event{ev}),
		Reason: "cannot be parked: " + cause.Error()}) == nil {
		s.done(t, size)
		s.metrics.finished(s.sub.ID, "dead_lettered", []Event{ev})
	}
}

// retireParked dead-letters parked rows and deletes them in one transaction:
// an event is never in the table and in the dead letters at once, so a
// replay of the dead letter cannot meet its old row (and be dropped as a
// duplicate of it).
func (s *scheduler) retireParked(ctx context.Context, j *job, cause error) {
	dls := s.deadLetters(j, cause)
	if s.write(ctx, "cannot dead-letter parked deliveries", func() error {
		return s.store.DeadLetterRows(ctx, j.rows(), dls)
	}) != nil {
		return
	}
	s.metrics.finished(s.sub.ID, "dead_lettered", j.batch.Events)
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

// park writes events to walhook.deliveries. On error nothing is finished:
// the epoch ended, or (ErrPermanent) the store cannot hold them.
func (s *scheduler) park(ctx context.Context, events []ParkedEvent) error {
	return s.write(ctx, "cannot park deliveries", func() error {
		return s.store.Park(ctx, s.sub.ID, events)
	})
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
// keys parked.
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
		err := s.park(ctx, events)
		if errors.Is(err, ErrPermanent) {
			// One of them the store cannot hold: park them one by one, and
			// dead-letter what cannot be parked.
			err = nil
			for i, it := range k.items {
				if e := s.park(ctx, events[i:i+1]); errors.Is(e, ErrPermanent) {
					s.unstorable(ctx, it.ev, it.txn, it.size, e)
					it.txn, it.size = nil, 0
				} else if e != nil {
					err = e
					break
				}
			}
		}
		if err != nil {
			return n, len(keys) // the epoch ended: nothing acked, all replayed
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
	return n, len(keys)
}

// feedJob loads a parked key's next rows; with none left the key returns to
// memory.
func (s *scheduler) feedJob(ctx context.Context, k *key) *job {
	var rows []ParkedEvent
	err := retryForever(ctx, s.log, "cannot read parked deliveries", func() error {
		var err error
		rows, err = s.store.NextParked(ctx, s.sub.ID, k.id, s.opts.BatchMax, s.opts.BatchBytes)
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
func (s *scheduler) finishParked(ctx context.Context, j *job) {
	rows := make([]int64, len(j.items))
	for i, it := range j.items {
		rows[i] = it.row
	}
	if s.write(ctx, "cannot unpark deliveries", func() error { return s.store.Unpark(ctx, rows) }) != nil {
		return
	}
	k := j.keys[0]
	k.busy, k.feedAt = false, s.now()
	s.schedule(k, s.now())
}

// retryParked reschedules failed rows, or dead-letters them after retry_for.
func (s *scheduler) retryParked(ctx context.Context, j *job, cause error, next time.Time) {
	if s.now().Sub(j.first) >= s.opts.RetryFor {
		s.retireParked(ctx, j, fmt.Errorf("retry_for (%s) exhausted: %w", s.opts.RetryFor, cause))
		return
	}
	rows := make([]int64, len(j.items))
	for i, it := range j.items {
		rows[i] = it.row
	}
	err := s.write(ctx, "cannot reschedule parked deliveries", func() error {
		return s.store.Reschedule(ctx, rows, j.attempt, next, cause.Error())
	})
	if err != nil {
		return
	}
	k := j.keys[0]
	k.busy, k.feedAt = false, next
	s.schedule(k, s.now())
}
