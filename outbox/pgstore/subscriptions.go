package pgstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/walhook/walhook/outbox"
)

// ErrNotFound is returned for a subscription that does not exist.
var ErrNotFound = outbox.ErrNotFound

const subscriptionColumns = `id, events, target_url, tenant, secret, previous_secret, previous_secret_until,
	options, verify_intent, created_at, updated_at, disabled_at`

func scanRow(row pgx.Row) (*outbox.SubscriptionRow, error) {
	var r outbox.SubscriptionRow
	var opts []byte
	err := row.Scan(&r.ID, &r.Events, &r.TargetURL, &r.Tenant, &r.Secret, &r.PreviousSecret, &r.PreviousSecretUntil,
		&opts, &r.VerifyIntent, &r.CreatedAt, &r.UpdatedAt, &r.DisabledAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(opts, &r.Options); err != nil {
		return nil, fmt.Errorf("subscription %s: options: %w", r.ID, err)
	}
	return &r, nil
}

// InsertSubscription stores a new dynamic subscription; it fills the times.
func (s *Store) InsertSubscription(ctx context.Context, r *outbox.SubscriptionRow) error {
	opts, err := json.Marshal(r.Options)
	if err != nil {
		return err
	}
	return s.pool.QueryRow(ctx, `
		INSERT INTO walhook.subscriptions (id, events, target_url, tenant, secret, options, verify_intent)
		VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING created_at, updated_at`,
		r.ID, r.Events, r.TargetURL, r.Tenant, r.Secret, opts, r.VerifyIntent).Scan(&r.CreatedAt, &r.UpdatedAt)
}

// GetSubscription reads one subscription.
func (s *Store) GetSubscription(ctx context.Context, id string) (*outbox.SubscriptionRow, error) {
	return scanRow(s.pool.QueryRow(ctx, `SELECT `+subscriptionColumns+` FROM walhook.subscriptions WHERE id = $1`, id))
}

// ListSubscriptions reads the subscriptions, of one tenant when tenant is set.
func (s *Store) ListSubscriptions(ctx context.Context, tenant *string) ([]outbox.SubscriptionRow, error) {
	return s.ListSubscriptionsAfter(ctx, tenant, "", 0)
}

// ListSubscriptionsAfter reads up to limit subscriptions (of one tenant when
// tenant is set) in the order ListSubscriptions gives, after the one whose
// Cursor is after ("" = from the first); limit 0 = all of them.
func (s *Store) ListSubscriptionsAfter(ctx context.Context, tenant *string, after string, limit int) ([]outbox.SubscriptionRow, error) {
	var at *time.Time
	var id string
	if after != "" {
		t, rest, err := outbox.ParseSubscriptionCursor(after)
		if err != nil {
			return nil, err
		}
		at, id = &t, rest
	}
	rows, err := s.pool.Query(ctx, `SELECT `+subscriptionColumns+` FROM walhook.subscriptions
		WHERE ($1::text IS NULL OR tenant = $1) AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
		ORDER BY created_at, id LIMIT $4`, tenant, at, id, nullInt(limit))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []outbox.SubscriptionRow
	for rows.Next() {
		r, err := scanRow(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, *r)
	}
	return out, rows.Err()
}

// UpdateSubscription replaces a subscription's events, target, tenant and options, and its secret when
// r.SecretChanged.
func (s *Store) UpdateSubscription(ctx context.Context, r *outbox.SubscriptionRow) error {
	opts, err := json.Marshal(r.Options)
	if err != nil {
		return err
	}
	err = s.pool.QueryRow(ctx, `
		UPDATE walhook.subscriptions SET events = $2, target_url = $3, tenant = $4, options = $5,
		       verify_intent = $6, secret = CASE WHEN $8 THEN $7 ELSE secret END, updated_at = now()
		 WHERE id = $1 RETURNING updated_at`,
		r.ID, r.Events, r.TargetURL, r.Tenant, opts, r.VerifyIntent, r.Secret, r.SecretChanged).Scan(&r.UpdatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return ErrNotFound
	}
	return err
}

// RotateSecret makes secret current; the old one keeps signing until until.
func (s *Store) RotateSecret(ctx context.Context, id, secret string, until time.Time) error {
	tag, err := s.pool.Exec(ctx, `
		UPDATE walhook.subscriptions SET previous_secret = secret, previous_secret_until = $3,
		       secret = $2, updated_at = now() WHERE id = $1`, id, secret, until)
	if err == nil && tag.RowsAffected() == 0 {
		return ErrNotFound
	}
	return err
}

// DeleteSubscription removes a subscription; deleting a missing one is not an error.
func (s *Store) DeleteSubscription(ctx context.Context, id string) error {
	_, err := s.pool.Exec(ctx, `DELETE FROM walhook.subscriptions WHERE id = $1`, id)
	return err
}

// DeleteSubscriptionStrict removes a subscription, or says it was not there.
func (s *Store) DeleteSubscriptionStrict(ctx context.Context, id string) error {
	tag, err := s.pool.Exec(ctx, `DELETE FROM walhook.subscriptions WHERE id = $1`, id)
	if err == nil && tag.RowsAffected() == 0 {
		return ErrNotFound
	}
	return err
}

// RecordRouting stores an applied change; replays overwrite it.
func (s *Store) RecordRouting(ctx context.Context, c outbox.RoutingChange) error {
	var row any
	if c.Row != nil {
		row = string(c.Row)
	}
	_, err := s.pool.Exec(ctx, `
		INSERT INTO walhook.routing_log (slot, seq, commit_lsn, subscription_id, row)
		VALUES ($1, $2::numeric, $3::pg_lsn, $4, $5::jsonb)
		ON CONFLICT (slot, seq) DO UPDATE SET row = EXCLUDED.row, subscription_id = EXCLUDED.subscription_id`,
		s.slot, strconv.FormatUint(c.Seq, 10), c.Commit.String(), c.ID, row)
	if err != nil {
		return fmt.Errorf("record subscription change: %w", err)
	}
	return nil
}

// SeedRoutingSQL records the subscriptions in the table as in force from the
// slot's start, unless the slot's log has entries already. Setup runs it right
// after it creates the slot, before any walhook streams it: a subscription
// created later reaches the log through the stream, at its place. (Seeding at
// the first start instead, as LoadRouting still does for a slot set up by an
// older walhook, would take in subscriptions created after the start position
// and route earlier events to them.)
//
// The log's entry of sequence 0 (no subscription, no row) says it was seeded,
// also when there was nothing to seed; compaction keeps it.
func SeedRoutingSQL(slot string) string {
	q := quoteLiteral(slot)
	return `INSERT INTO walhook.routing_log (slot, seq, commit_lsn, subscription_id, row)
SELECT ` + q + `, 0, '0/0'::pg_lsn, '', NULL::jsonb WHERE NOT EXISTS (SELECT 1 FROM walhook.routing_log WHERE slot = ` + q + `)
UNION ALL
SELECT ` + q + `, row_number() OVER (ORDER BY created_at, id), '0/0'::pg_lsn, id, to_jsonb(s) FROM walhook.subscriptions s
 WHERE NOT EXISTS (SELECT 1 FROM walhook.routing_log WHERE slot = ` + q + `)`
}

// LoadRouting folds the recorded changes committed before at. On a slot's
// first start without a seeded log it seeds it from the table. It compacts
// what it folded.
func (s *Store) LoadRouting(ctx context.Context, at outbox.LSN) ([]outbox.SubscriptionRow, error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('walhook routing ' || $1))`, s.slot); err != nil {
		return nil, err
	}
	_, err = tx.Exec(ctx, SeedRoutingSQL(s.slot))
	if err != nil {
		return nil, fmt.Errorf("seed subscriptions: %w", err)
	}
	// Keep only the newest change per subscription before at; a deletion needs no entry.
	_, err = tx.Exec(ctx, `
		DELETE FROM walhook.routing_log l WHERE slot = $1 AND commit_lsn < $2::pg_lsn AND seq > 0
		   AND (row IS NULL OR seq < (SELECT max(seq) FROM walhook.routing_log m
		                              WHERE m.slot = $1 AND m.subscription_id = l.subscription_id AND m.commit_lsn < $2::pg_lsn))`,
		s.slot, at.String())
	if err != nil {
		return nil, fmt.Errorf("compact subscription log: %w", err)
	}
	rows, err := tx.Query(ctx, `SELECT row FROM walhook.routing_log
		WHERE slot = $1 AND commit_lsn < $2::pg_lsn AND row IS NOT NULL ORDER BY seq`, s.slot, at.String())
	if err != nil {
		return nil, err
	}
	raws, err := pgx.CollectRows(rows, pgx.RowTo[[]byte])
	if err != nil {
		return nil, err
	}
	// A row that cannot be read is left out and reported (ErrPermanent):
	// one bad row must not stop every other subscription.
	out := make([]outbox.SubscriptionRow, 0, len(raws))
	var bad []error
	for _, raw := range raws {
		var r outbox.SubscriptionRow
		if err := json.Unmarshal(raw, &r); err != nil {
			bad = append(bad, fmt.Errorf("subscription log: %w", err))
			continue
		}
		out = append(out, r)
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, err
	}
	if len(bad) > 0 {
		return out, fmt.Errorf("%w: unreadable subscriptions left out: %w", outbox.ErrPermanent, errors.Join(bad...))
	}
	return out, nil
}

// DisableSubscription marks a subscription disabled; the change reaches the
// pipeline through the stream.
func (s *Store) DisableSubscription(ctx context.Context, id string) error {
	return s.fenced(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `UPDATE walhook.subscriptions SET disabled_at = now(), updated_at = now()
			WHERE id = $1 AND disabled_at IS NULL`, id)
		return err
	})
}

// DisableSubscriptionSeen marks a dynamic subscription disabled for a relay
// worker (docs/scale-out.md, "Endpoint health across workers"): not fenced by
// the slot's lease, which workers do not hold, but by the version the worker
// judged: only if the row is still the one last updated at seen, so a
// decision from before an enable or an update changes nothing.
func (s *Store) DisableSubscriptionSeen(ctx context.Context, id string, seen time.Time) error {
	_, err := s.pool.Exec(ctx, `UPDATE walhook.subscriptions SET disabled_at = now(), updated_at = now()
		WHERE id = $1 AND disabled_at IS NULL AND updated_at = $2`, id, seen)
	return err
}

// RetiredSubscription returns a deleted subscription's last definition
// (deleted within 30 days), or nil.
func (s *Store) RetiredSubscription(ctx context.Context, id string) (*outbox.SubscriptionRow, error) {
	r, err := scanRow(s.pool.QueryRow(ctx, `SELECT `+subscriptionColumns+`
		FROM jsonb_populate_record(NULL::walhook.subscriptions,
		     (SELECT row FROM walhook.retired_subscriptions WHERE id = $1)) r
		WHERE r.id IS NOT NULL`, id))
	if errors.Is(err, ErrNotFound) {
		return nil, nil
	}
	return r, err
}

// EnableSubscription turns a disabled subscription back on.
func (s *Store) EnableSubscription(ctx context.Context, id string) error {
	tag, err := s.pool.Exec(ctx, `UPDATE walhook.subscriptions SET disabled_at = NULL, updated_at = now() WHERE id = $1`, id)
	if err == nil && tag.RowsAffected() == 0 {
		return ErrNotFound
	}
	return err
}
