package pgstore

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

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

func (f DeadLetterFilter) where() (string, []any) {
	var cond []string
	var args []any
	add := func(c string, v any) {
		args = append(args, v)
		cond = append(cond, strings.ReplaceAll(c, "$?", "$"+strconv.Itoa(len(args))))
	}
	if f.ID != 0 {
		add("id = $?", f.ID)
	}
	if f.Subscription != "" {
		add("subscription = $?", f.Subscription)
	}
	if f.Owner != nil {
		add("subscription IN (SELECT id FROM walhook.subscriptions WHERE tenant = $?)", *f.Owner)
	}
	if f.Since != nil {
		add("created_at >= $?", *f.Since)
	}
	if f.Until != nil {
		add("created_at < $?", *f.Until)
	}
	if len(cond) == 0 {
		if !f.All {
			return "false", nil
		}
		return "true", nil
	}
	return strings.Join(cond, " AND "), args
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

// ListDeadLetters returns up to limit dead letters, oldest first.
func (s *Store) ListDeadLetters(ctx context.Context, f DeadLetterFilter, limit int) ([]DeadLetterRow, error) {
	where, args := f.where()
	args = append(args, limit)
	rows, err := s.pool.Query(ctx, `SELECT id, subscription, event_id, event, resource_id, tenant, webhook_id, status,
		reason, attempts, first_attempt_at, last_attempt_at, created_at FROM walhook.dead_letters
		WHERE `+where+` ORDER BY id LIMIT $`+strconv.Itoa(len(args)), args...)
	if err != nil {
		return nil, fmt.Errorf("list dead letters: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (DeadLetterRow, error) {
		var d DeadLetterRow
		err := r.Scan(&d.ID, &d.Subscription, &d.EventID, &d.Event, &d.ResourceID, &d.Tenant, &d.WebhookID, &d.Status,
			&d.Reason, &d.Attempts, &d.FirstAttempt, &d.LastAttempt, &d.CreatedAt)
		return d, err
	})
}

// ReplayDeadLetters sends the selected dead letters again: in one transaction it
// deletes them and writes, in order, a walhook.control row of kind replay for
// each, which reaches the pipeline through the replication stream and is
// delivered with its original event id, sequence and webhook-id. Rows without a
// subscription (undecodable outbox rows) are left. It returns how many were
// replayed.
func (s *Store) ReplayDeadLetters(ctx context.Context, f DeadLetterFilter) (int64, error) {
	where, args := f.where()
	var n int64
	err := s.pool.QueryRow(ctx, `
		WITH d AS (DELETE FROM walhook.dead_letters WHERE subscription IS NOT NULL AND event IS NOT NULL AND (`+where+`) RETURNING *),
		replayed AS (INSERT INTO walhook.control (kind, body)
		  SELECT 'replay', jsonb_build_object(
		    'subscription', subscription, 'webhook_id', webhook_id, 'payload_text', payload_text,
		    'event', jsonb_build_object('ID', event_id, 'Type', event, 'ResourceID', coalesce(resource_id, ''),
		      'Tenant', coalesce(tenant, ''), 'Payload', coalesce(payload, '{}'::jsonb), 'CommitTime', committed_at,
		      'Seq', coalesce(sequence, 0)))
		  FROM d ORDER BY id RETURNING 1)
		SELECT count(*) FROM replayed`, args...).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("replay dead letters: %w", err)
	}
	return n, nil
}

// PurgeDeadLetters deletes the selected dead letters.
func (s *Store) PurgeDeadLetters(ctx context.Context, f DeadLetterFilter) (int64, error) {
	where, args := f.where()
	tag, err := s.pool.Exec(ctx, `DELETE FROM walhook.dead_letters WHERE `+where, args...)
	if err != nil {
		return 0, fmt.Errorf("purge dead letters: %w", err)
	}
	return tag.RowsAffected(), nil
}
