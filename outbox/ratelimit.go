package outbox

import (
	"context"
	"time"
)

// The rate limit (rate_limit) and a 429's pause (docs/scheduler.md).

// token takes an attempt's token from the rate_limit bucket, which holds at
// most one and refills at the rate: attempts are at least 1/rate apart.
func (s *scheduler) token(now time.Time) bool {
	if s.rate <= 0 {
		return true
	}
	if now.Before(s.holdUntil) {
		return false
	}
	s.tokens = min(1, s.tokens+now.Sub(s.tokensAt).Seconds()*s.rate)
	s.tokensAt = now
	if s.tokens < 1 {
		return false
	}
	s.tokens--
	return true
}

// nextAttempt is when the rate limit and a 429's pause let the next attempt go.
func (s *scheduler) nextAttempt() time.Time {
	at := s.holdUntil
	if s.rate > 0 && s.tokens < 1 {
		at = maxTime(at, s.tokensAt.Add(time.Duration((1-s.tokens)/s.rate*float64(time.Second))))
	}
	return at
}

// limited: a 429's Retry-After pauses every attempt of the subscription.
func (s *scheduler) limited(now time.Time) bool { return now.Before(s.holdUntil) }

// parkLimited parks what the rate limit or a 429's pause holds back past
// park_after (or at once while memory is short): a subscription that cannot
// send as fast as its events come must not pin WAL. Its keys move to
// walhook.deliveries and are fed from there, at the rate.
func (s *scheduler) parkLimited(ctx context.Context, now time.Time) {
	if s.closing || len(s.ready) == 0 {
		return
	}
	if now.Sub(s.ready[0].items[0].first) < s.opts.ParkAfter && !s.overBudget() {
		return
	}
	if n, keys := s.parkWaiting(ctx, nil, now, now); n > 0 {
		s.log.Warn().Int("resources", keys).Int("events", n).Float64("rate_limit", s.rate).
			Msg("parked: rate-limited events waited past park_after; moved to walhook.deliveries")
	}
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
