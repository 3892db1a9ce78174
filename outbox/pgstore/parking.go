package pgstore

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/walhook/walhook/outbox"
)

// Writes here are fenced by the delivery lease (Store.fenced).

// Park adds events to walhook.deliveries; an event already parked for the
// subscription is skipped. Rows are read in sequence order. The payload is
// stored as text, apart from the rest of the event.
func (s *Store) Park(ctx context.Context, subscription string, events []outbox.ParkedEvent) error {
	batch := &pgx.Batch{}
	for _, e := range events {
		ev := e.Event
		payload := string(ev.Payload)
		ev.Payload = nil
		evJSON, err := json.Marshal(ev)
		if err != nil {
			return err
		}
		batch.Queue(`INSERT INTO walhook.deliveries (subscription, resource_id, event_id, event, payload, sequence, attempts, since, next_attempt_at)
			VALUES ($1, $2, $3, $4, $5, $6::numeric, $7, $8, $9) ON CONFLICT (subscription, event_id) DO NOTHING`,
			subscription, e.Event.ResourceID, e.Event.ID, evJSON, payload, strconv.FormatUint(e.Event.Seq, 10),
			e.Attempts, e.Since, e.NextAttempt)
	}
	err := s.fenced(ctx, func(tx pgx.Tx) error { return tx.SendBatch(ctx, batch).Close() })
	if err != nil {
		return classify(fmt.Errorf("park deliveries: %w", err))
	}
	return nil
}

// ParkedKeys lists the resources with parked events, when each is due, and the
// highest sequence parked for each.
func (s *Store) ParkedKeys(ctx context.Context, subscription string) ([]outbox.ParkedKey, error) {
	rows, err := s.pool.Query(ctx, `SELECT resource_id, min(next_attempt_at),
		coalesce(max(coalesce(sequence, (event->>'Seq')::numeric)), 0)::text FROM walhook.deliveries
		WHERE subscription = $1 GROUP BY resource_id`, subscription)
	if err != nil {
		return nil, fmt.Errorf("read parked resources: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (outbox.ParkedKey, error) {
		var k outbox.ParkedKey
		var seq string
		if err := r.Scan(&k.Resource, &k.NextAttempt, &seq); err != nil {
			return k, err
		}
		k.MaxSeq, err = strconv.ParseUint(seq, 10, 64)
		return k, err
	})
}

// NextParked returns a resource's oldest parked events by sequence: at most
// limit, and no more payload than maxBytes (but at least one).
func (s *Store) NextParked(ctx context.Context, subscription, resource string, limit, maxBytes int) ([]outbox.ParkedEvent, error) {
	// The head rows by the (subscription, resource_id, sequence, id) index,
	// then as many as fit maxBytes, estimated as payload + 256 per event as
	// in memory.
	rows, err := s.pool.Query(ctx, `SELECT id, event, payload, attempts, since, next_attempt_at FROM (
		  SELECT *, row_number() OVER w AS n, sum(coalesce(octet_length(payload), 0) + 256) OVER w AS bytes
		    FROM (SELECT id, event, payload, attempts, since, next_attempt_at, sequence FROM walhook.deliveries
		           WHERE subscription = $1 AND resource_id = $2 ORDER BY sequence, id LIMIT $3) head
		  WINDOW w AS (ORDER BY sequence, id)) d
		WHERE n = 1 OR bytes <= $4 ORDER BY n`, subscription, resource, limit, maxBytes)
	if err != nil {
		return nil, fmt.Errorf("read parked deliveries: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (outbox.ParkedEvent, error) {
		var e outbox.ParkedEvent
		var ev []byte
		var payload *string
		if err := r.Scan(&e.Row, &ev, &payload, &e.Attempts, &e.Since, &e.NextAttempt); err != nil {
			return e, err
		}
		if err := json.Unmarshal(ev, &e.Event); err != nil {
			return e, err
		}
		if payload != nil { // older rows keep the payload in event
			e.Event.Payload = json.RawMessage(*payload)
		}
		return e, nil
	})
}

// Unpark deletes rows that were delivered or dead-lettered.
func (s *Store) Unpark(ctx context.Context, rows []int64) error {
	return s.fenced(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `DELETE FROM walhook.deliveries WHERE id = ANY($1)`, rows)
		return err
	})
}

// Reschedule records a failed attempt.
func (s *Store) Reschedule(ctx context.Context, rows []int64, attempts int, next time.Time, reason string) error {
	return s.fenced(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `UPDATE walhook.deliveries SET attempts = $2, next_attempt_at = $3, last_error = $4
			WHERE id = ANY($1)`, rows, attempts, next, reason)
		return err
	})
}

// DropParked deletes a subscription's parked events.
func (s *Store) DropParked(ctx context.Context, subscription string) error {
	return s.fenced(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `DELETE FROM walhook.deliveries WHERE subscription = $1`, subscription)
		return err
	})
}

// DeadLetterParked moves a subscription's parked events to the dead letters.
func (s *Store) DeadLetterParked(ctx context.Context, subscription, reason string) error {
	err := s.fenced(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `
			WITH moved AS (DELETE FROM walhook.deliveries WHERE subscription = $1 RETURNING *)
			INSERT INTO walhook.dead_letters (subscription, event_id, event, resource_id, tenant, payload, payload_text,
			       committed_at, webhook_id, reason, attempts, first_attempt_at, last_attempt_at, sequence)
			SELECT subscription, event_id, event->>'Type', nullif(resource_id, ''), nullif(event->>'Tenant', ''),
			       coalesce(walhook.try_jsonb(payload), event->'Payload'),
			       CASE WHEN payload IS NOT NULL AND walhook.try_jsonb(payload) IS NULL THEN payload END,
			       (event->>'CommitTime')::timestamptz, nullif(event->>'WebhookID', ''), $2, attempts, since, now(),
			       coalesce(sequence, (event->>'Seq')::numeric)
			  FROM moved ORDER BY id
			ON CONFLICT DO NOTHING`, subscription, reason)
		return err
	})
	if err != nil {
		return fmt.Errorf("dead-letter parked deliveries: %w", err)
	}
	return nil
}

// PruneMarks deletes the debounce marks below the event sequence below: no
// event under it can come again (Prober.pruneMarks says why).
func (s *Store) PruneMarks(ctx context.Context, below uint64) (int64, error) {
	tag, err := s.pool.Exec(ctx, `DELETE FROM walhook.debounce_marks WHERE sequence < $1::numeric`, strconv.FormatUint(below, 10))
	if err != nil {
		return 0, fmt.Errorf("prune debounce marks: %w", err)
	}
	return tag.RowsAffected(), nil
}

// CheckpointTimeout is the server's checkpoint_timeout: a checkpoint begins
// at least this often.
func (s *Store) CheckpointTimeout(ctx context.Context) (time.Duration, error) {
	var v string
	if err := s.pool.QueryRow(ctx, `SELECT setting || unit FROM pg_settings WHERE name = 'checkpoint_timeout'`).Scan(&v); err != nil {
		return 0, err
	}
	return time.ParseDuration(v)
}

// MarkSent records the newest sequence a debounced request carries per
// resource, before it is sent.
func (s *Store) MarkSent(ctx context.Context, subscription string, marks map[string]uint64) error {
	resources := make([]string, 0, len(marks))
	seqs := make([]string, 0, len(marks))
	for r, seq := range marks {
		resources = append(resources, r)
		seqs = append(seqs, strconv.FormatUint(seq, 10))
	}
	_, err := s.pool.Exec(ctx, `INSERT INTO walhook.debounce_marks (subscription, resource_id, sequence)
		SELECT $1, r, q::numeric FROM unnest($2::text[], $3::text[]) AS m(r, q)
		ON CONFLICT (subscription, resource_id) DO UPDATE SET sequence = greatest(debounce_marks.sequence, EXCLUDED.sequence)`,
		subscription, resources, seqs)
	if err != nil {
		return fmt.Errorf("record debounce marks: %w", err)
	}
	return nil
}

// SentMarks returns a subscription's debounce marks at or above from (no
// event below from is streamed in an epoch that starts there). Older ones are
// kept until PruneMarks: a crash of the server can move the slot's confirmed
// position back to its last checkpoint, and the events they supersede come
// again.
func (s *Store) SentMarks(ctx context.Context, subscription string, from uint64) (map[string]uint64, error) {
	rows, err := s.pool.Query(ctx, `SELECT resource_id, sequence::text FROM walhook.debounce_marks
		WHERE subscription = $1 AND sequence >= $2::numeric`, subscription, strconv.FormatUint(from, 10))
	if err != nil {
		return nil, fmt.Errorf("read debounce marks: %w", err)
	}
	defer rows.Close()
	out := map[string]uint64{}
	for rows.Next() {
		var r, q string
		if err := rows.Scan(&r, &q); err != nil {
			return nil, err
		}
		if out[r], err = strconv.ParseUint(q, 10, 64); err != nil {
			return nil, err
		}
	}
	return out, rows.Err()
}
