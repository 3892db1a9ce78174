package outbox

import (
	"errors"
	"time"
)

// What a store lists for operators (the API, the CLI and the console read
// these without knowing which store answers).

// ErrNotFound is returned for a subscription that does not exist.
var ErrNotFound = errors.New("outbox: subscription not found")

// DeadLetterFilter selects dead letters. An empty filter selects nothing
// unless All is set.
//
// Owner is the subscription's owner (walhook.subscriptions.tenant), never the
// event's tenant: a tenant's events also reach tenant-less and config-file
// subscriptions, whose dead letters are the admin's alone.
type DeadLetterFilter struct {
	ID           int64      // one dead letter
	Subscription string     // of one subscription
	Owner        *string    // of the API subscriptions this tenant owns (forward-authenticated callers)
	Since, Until *time.Time // created in [Since, Until)
	All          bool
}

// Empty reports whether f selects nothing on its own (needs All).
func (f DeadLetterFilter) Empty() bool {
	return f.ID == 0 && f.Subscription == "" && f.Owner == nil && f.Since == nil && f.Until == nil && !f.All
}

// DeadLetterRow is a dead letter as listed.
type DeadLetterRow struct {
	ID           int64      `json:"id"`
	Subscription *string    `json:"subscription"`
	EventID      string     `json:"event_id"`
	Event        *string    `json:"event"`
	ResourceID   *string    `json:"resource_id"`
	Tenant       *string    `json:"tenant"`
	WebhookID    *string    `json:"webhook_id"`
	Status       *int32     `json:"status"`
	Reason       string     `json:"reason"`
	Attempts     int32      `json:"attempts"`
	FirstAttempt *time.Time `json:"first_attempt_at"`
	LastAttempt  *time.Time `json:"last_attempt_at"`
	CreatedAt    time.Time  `json:"created_at"`
}

// AttemptFilter selects attempts; Subscription or EventID is required.
type AttemptFilter struct {
	Subscription string
	EventID      string
	Owner        *string    // only API subscriptions this tenant owns (forward-authenticated callers)
	Failed       *bool      // only failed (true) or delivered (false) attempts
	Status       int        // only this response status
	Since, Until *time.Time // at in [Since, Until)
	Before       int64      // the cursor: ids below it
}

// AttemptRow is an attempt as listed.
type AttemptRow struct {
	ID           int64     `json:"id"`
	At           time.Time `json:"at"`
	Subscription string    `json:"subscription"`
	WebhookID    string    `json:"webhook_id"`
	Attempt      int32     `json:"attempt"`
	EventCount   int32     `json:"event_count"`
	EventIDs     []string  `json:"event_ids"`
	Outcome      string    `json:"outcome"`
	Status       *int32    `json:"status"`
	Class        string    `json:"class"`
	Reason       *string   `json:"reason"`
	DurationMS   float64   `json:"duration_ms"`
}
