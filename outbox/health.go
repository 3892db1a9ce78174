package outbox

import (
	"context"
	"errors"
	"time"
)

// Endpoint health and endings: dead letters, disable, 410 Gone, release.

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

// closed ends a deleted subscription's scheduler once it has drained: its
// parked rows go, and its metrics.
func (s *scheduler) closed(ctx context.Context) error {
	s.write(ctx, "cannot drop parked events", func() error {
		return s.store.DropParked(ctx, s.sub.ID)
	})
	s.metrics.removeSubscription(s.sub.ID)
	s.log.Info().Msg("deleted subscription drained")
	return nil
}

// disable turns a failing subscription off: what it holds, parked or in
// memory, becomes dead letters (replayable), and so does every later event,
// until it is enabled again.
func (s *scheduler) disable(ctx context.Context) {
	s.disabled = true
	s.gen++ // what is in flight is dead-lettered here; its result changes nothing
	// Every key in its place first: rows being parked must be in the table
	// before its rows become dead letters.
	if !s.settle(ctx) {
		return // the epoch ended
	}
	s.log.Error().Dur("disable_after", s.opts.DisableAfter).Msg("subscription disabled: its endpoint keeps failing")
	switch {
	case s.sub.Static:
		s.d.mu.Lock()
		s.d.disabledStatic[s.sub.ID] = true
		s.d.mu.Unlock()
	case !s.sub.Disabled:
		id := s.sub.ID
		if s.write(ctx, "cannot mark subscription disabled", func() error {
			return s.store.DisableSubscription(ctx, id)
		}) != nil {
			return // the epoch ended
		}
	}
	if s.write(ctx, "cannot dead-letter parked events", func() error {
		return s.store.DeadLetterParked(ctx, s.sub.ID, disabledReason)
	}) != nil {
		return
	}
	for _, k := range s.keys {
		for _, it := range k.items {
			if s.d.deadLetter(ctx, DeadLetter{Subscription: s.sub.ID, Event: it.ev,
				WebhookID: WebhookID(s.sub.ID, []Event{it.ev}), Reason: disabledReason}) != nil {
				return // the epoch ended: unacked, replayed
			}
			s.done(it.txn, it.size)
		}
		s.metrics.deliveries.WithLabelValues(s.sub.ID, "dead_lettered").Add(float64(len(k.items)))
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
	s.metrics.setPending(s.sub.ID, int64(s.pending), s.held, oldest)
}

// unsubscribe handles a 410 Gone: every held event is dropped (finished), later
// ones too, and the subscription is deleted; its deletion then comes back
// through the stream and stops this scheduler.
func (s *scheduler) unsubscribe(ctx context.Context) {
	s.log.Warn().Msg("target answered 410 Gone: unsubscribing, pending events dropped")
	s.gone = true
	s.release()
	id := s.sub.ID
	s.sends.Add(1)
	go func() {
		defer s.sends.Done()
		s.write(ctx, "cannot delete gone subscription", func() error {
			return s.store.DeleteSubscription(ctx, id)
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
	s.metrics.deliveries.WithLabelValues(s.sub.ID, "dropped").Add(float64(dropped))
	clear(s.keys)
	s.ready, s.retries, s.timers, s.feeds = nil, nil, nil, nil
	s.pending -= dropped // what store work still holds (storeops.go) is finished when it comes back
	s.readyEvents = 0
	s.gatherUntil = time.Time{}
}
