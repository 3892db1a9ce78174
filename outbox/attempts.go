package outbox

import (
	"context"
	"errors"
	"time"
)

// Attempt is one HTTP attempt, as the attempt log keeps it (docs/attempts.md).
type Attempt struct {
	Subscription string
	WebhookID    string
	Number       int // 1 for the first attempt of the request
	At           time.Time
	Duration     time.Duration
	Events       int      // events in the request
	EventIDs     []string // all of them when at most MaxAttemptEventIDs, else the first and the last
	Status       int      // the response status; 0 when none came
	Class        string   // 2xx, 3xx, 4xx, 5xx, timeout or network
	Reason       string   // why it failed; "" when delivered
}

// Delivered reports whether the attempt got a 2xx.
func (a *Attempt) Delivered() bool { return a.Class == "2xx" }

// MaxAttemptEventIDs is how many event ids an attempt keeps before it keeps
// only the first and the last.
const MaxAttemptEventIDs = 16

// AttemptLog records attempts. Record must not block: a log that cannot keep
// up drops entries and counts them.
type AttemptLog interface {
	Record(a *Attempt)
	// Wants reports whether an attempt with this outcome would be kept, so
	// that nothing is built for one that would not.
	Wants(delivered bool) bool
}

// newAttempt describes the attempt of j that started at start and ended with err.
func newAttempt(j *job, start time.Time, took time.Duration, err error) *Attempt {
	b := j.batch
	a := &Attempt{Subscription: b.Subscription.ID, WebhookID: b.WebhookID, Number: j.attempt,
		At: start, Duration: took, Events: len(b.Events), Class: attemptClass(err)}
	if n := len(b.Events); n <= MaxAttemptEventIDs {
		a.EventIDs = make([]string, n)
		for i := range b.Events {
			a.EventIDs[i] = b.Events[i].ID
		}
	} else {
		a.EventIDs = []string{b.Events[0].ID, b.Events[n-1].ID}
	}
	if err != nil {
		a.Reason = err.Error()
		if f, ok := errors.AsType[Failure](err); ok {
			a.Status = f.StatusCode()
		}
	}
	return a
}

// attemptClass is the status class of an attempt's outcome, as in the
// walhook_delivery_attempts_total metric, with timeouts apart from other
// network failures.
func attemptClass(err error) string {
	switch {
	case err == nil:
		return "2xx"
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	}
	if f, ok := errors.AsType[Failure](err); ok && f.StatusCode() > 0 {
		return string('0'+byte(f.StatusCode()/100)) + "xx"
	}
	return "network"
}
