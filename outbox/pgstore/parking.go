package pgstore

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/walhook/walhook/outbox"
)

// Park appends events to walhook.deliveries in order (the identity column keeps
// it); an event already parked for the subscription is skipped.
func (s *Store) Park(ctx context.Context, subscription string, events []outbox.ParkedEvent) error {
	batch := &pgx.Batch{}
	for _, e := range events {
		ev, err := json.Marshal(e.Event)
		if err != nil {
			return err
		}
		batch.Queue(`INSERT INTO walhook.deliveries (subscription, resource_id, event_id, event, attempts, since, next_attempt_at)
			VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (subscription, event_id) DO NOTHING`,
			subscription, e.Event.ResourceID, e.Event.ID, ev, e.Attempts, e.Since, e.NextAttempt)
	}
	if err := s.pool.SendBatch(ctx, batch).Close(); err != nil {
		return fmt.Errorf("park deliveries: %w", err)
	}
	return nil
}

// ParkedKeys lists the resources with parked events and when each is due.
func (s *Store) ParkedKeys(ctx context.Context, subscription string) ([]outbox.ParkedKey, error) {
	rows, err := s.pool.Query(ctx, `SELECT resource_id, min(next_attempt_at) FROM walhook.deliveries
		WHERE subscription = $1 GROUP BY resource_id`, subscription)
	if err != nil {
		return nil, fmt.Errorf("read parked resources: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (outbox.ParkedKey, error) {
		var k outbox.ParkedKey
		err := r.Scan(&k.Resource, &k.NextAttempt)
		return k, err
	})
}

// NextParked returns a resource's oldest parked events.
func (s *Store) NextParked(ctx context.Context, subscription, resource string, limit int) ([]outbox.ParkedEvent, error) {
	rows, err := s.pool.Query(ctx, `SELECT id, event, attempts, since, next_attempt_at FROM walhook.deliveries
		WHERE subscription = $1 AND resource_id = $2 ORDER BY id LIMIT $3`, subscription, resource, limit)
	if err != nil {
		return nil, fmt.Errorf("read parked deliveries: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (outbox.ParkedEvent, error) {
		var e outbox.ParkedEvent
		var ev []byte
		if err := r.Scan(&e.Row, &ev, &e.Attempts, &e.Since, &e.NextAttempt); err != nil {
			return e, err
		}
		return e, json.Unmarshal(ev, &e.Event)
	})
}

// Unpark deletes rows that were delivered or dead-lettered.
func (s *Store) Unpark(ctx context.Context, rows []int64) error {
	_, err := s.pool.Exec(ctx, `DELETE FROM walhook.deliveries WHERE id = ANY($1)`, rows)
	return err
}

// Reschedule records a failed attempt.
func (s *Store) Reschedule(ctx context.Context, rows []int64, attempts int, next time.Time, reason string) error {
	_, err := s.pool.Exec(ctx, `UPDATE walhook.deliveries SET attempts = $2, next_attempt_at = $3, last_error = $4
		WHERE id = ANY($1)`, rows, attempts, next, reason)
	return err
}

// DropParked deletes a subscription's parked events.
func (s *Store) DropParked(ctx context.Context, subscription string) error {
	_, err := s.pool.Exec(ctx, `DELETE FROM walhook.deliveries WHERE subscription = $1`, subscription)
	return err
}

// DeadLetterParked moves a subscription's parked events to the dead letters.
func (s *Store) DeadLetterParked(ctx context.Context, subscription, reason string) error {
	_, err := s.pool.Exec(ctx, `
		WITH moved AS (DELETE FROM walhook.deliveries WHERE subscription = $1 RETURNING *)
		INSERT INTO walhook.dead_letters (subscription, event_id, event, resource_id, tenant, payload, committed_at,
		       webhook_id, reason, attempts, first_attempt_at, last_attempt_at, sequence)
		SELECT subscription, event_id, event->>'Type', nullif(resource_id, ''), nullif(event->>'Tenant', ''), event->'Payload',
		       (event->>'CommitTime')::timestamptz, NULL, $2, attempts, since, now(), (event->>'Seq')::numeric
		  FROM moved ORDER BY id`, subscription, reason)
	if err != nil {
		return fmt.Errorf("dead-letter parked deliveries: %w", err)
	}
	return nil
}
