package pgstore

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/walhook/walhook/outbox"
)

// DeadLetterFilter and DeadLetterRow are outbox's (the API reads them
// without knowing the store).
type (
	DeadLetterFilter = outbox.DeadLetterFilter
	DeadLetterRow    = outbox.DeadLetterRow
)

// deadLetterWhere is f as a WHERE clause and its arguments.
func deadLetterWhere(f DeadLetterFilter) (string, []any) {
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

// ListDeadLetters returns up to limit dead letters, oldest first.
func (s *Store) ListDeadLetters(ctx context.Context, f DeadLetterFilter, limit int) ([]DeadLetterRow, error) {
	where, args := deadLetterWhere(f)
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
	where, args := deadLetterWhere(f)
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
	where, args := deadLetterWhere(f)
	tag, err := s.pool.Exec(ctx, `DELETE FROM walhook.dead_letters WHERE `+where, args...)
	if err != nil {
		return 0, fmt.Errorf("purge dead letters: %w", err)
	}
	return tag.RowsAffected(), nil
}
