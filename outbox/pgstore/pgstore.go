// Package pgstore keeps walhook's durable state in PostgreSQL, in the walhook
// schema: dead letters now; parked deliveries and the high-water mark later. It
// implements outbox.Store. The healthy delivery path never touches it.
package pgstore

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/walhook/walhook/outbox"
)

// SchemaSQL creates the walhook schema and walhook's own tables. Idempotent.
func SchemaSQL() []string {
	return []string{
		`CREATE SCHEMA IF NOT EXISTS walhook`,
		`CREATE TABLE IF NOT EXISTS walhook.dead_letters (
  id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  subscription     text,
  event_id         text        NOT NULL,
  event            text,
  resource_id      text,
  tenant           text,
  payload          jsonb,
  committed_at     timestamptz,
  webhook_id       text,
  status           int,
  reason           text        NOT NULL,
  attempts         int         NOT NULL DEFAULT 0,
  first_attempt_at timestamptz,
  last_attempt_at  timestamptz,
  created_at       timestamptz NOT NULL DEFAULT now()
)`,
		`CREATE INDEX IF NOT EXISTS dead_letters_subscription_idx ON walhook.dead_letters (subscription, created_at)`,
		`ALTER TABLE walhook.dead_letters ADD COLUMN IF NOT EXISTS sequence numeric`,
		`CREATE TABLE IF NOT EXISTS walhook.subscriptions (
  id                    text        PRIMARY KEY,
  events                text[]      NOT NULL,
  target_url            text        NOT NULL,
  tenant                text,
  secret                text        NOT NULL,
  previous_secret       text,
  previous_secret_until timestamptz,
  options               jsonb       NOT NULL DEFAULT '{}',
  verify_intent         boolean     NOT NULL DEFAULT true,
  created_at            timestamptz NOT NULL DEFAULT now(),
  updated_at            timestamptz NOT NULL DEFAULT now()
)`,
		`CREATE INDEX IF NOT EXISTS subscriptions_tenant_idx ON walhook.subscriptions (tenant)`,
		`ALTER TABLE walhook.subscriptions ADD COLUMN IF NOT EXISTS disabled_at timestamptz`,
		// Every change rides the replication stream, in its transaction, as a
		// walhook.control row (docs/subscriptions.md, docs/security.md). That
		// table is created by cdc.SetupSQL, which runs next; the function is
		// security definer so that whoever may write walhook.subscriptions may
		// change subscriptions, and nobody else.
		`CREATE OR REPLACE FUNCTION walhook.subscription_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
  IF TG_OP = 'DELETE' THEN
    INSERT INTO walhook.control (kind, body) VALUES ('subscription', jsonb_build_object('op', 'delete', 'id', OLD.id));
    RETURN OLD;
  END IF;
  INSERT INTO walhook.control (kind, body) VALUES ('subscription', jsonb_build_object('op', 'upsert', 'row', to_jsonb(NEW)));
  RETURN NEW;
END
$fn$`,
		`CREATE OR REPLACE TRIGGER subscription_changed AFTER INSERT OR UPDATE OR DELETE ON walhook.subscriptions
  FOR EACH ROW EXECUTE FUNCTION walhook.subscription_changed()`,
		// Parked deliveries (docs/parking.md); healthy traffic never writes here.
		`CREATE TABLE IF NOT EXISTS walhook.deliveries (
  id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  subscription    text        NOT NULL,
  resource_id     text        NOT NULL,
  event_id        text        NOT NULL,
  event           jsonb       NOT NULL,
  attempts        int         NOT NULL DEFAULT 0,
  since           timestamptz NOT NULL,
  next_attempt_at timestamptz NOT NULL,
  last_error      text,
  created_at      timestamptz NOT NULL DEFAULT now(),
  UNIQUE (subscription, event_id)
)`,
		`CREATE INDEX IF NOT EXISTS deliveries_resource_idx ON walhook.deliveries (subscription, resource_id, id)`,
		// What the active replica last reported, for `walhook status`.
		`CREATE TABLE IF NOT EXISTS walhook.status (
  slot        text        PRIMARY KEY,
  reported_at timestamptz NOT NULL,
  host        text        NOT NULL,
  report      jsonb       NOT NULL
)`,
		StateSQL,
		`CREATE TABLE IF NOT EXISTS walhook.routing_log (
  slot            text    NOT NULL,
  seq             numeric NOT NULL,
  commit_lsn      pg_lsn  NOT NULL,
  subscription_id text    NOT NULL,
  row             jsonb,
  PRIMARY KEY (slot, seq)
)`,
	}
}

// TeardownSQL forgets what walhook recorded for a slot.
func TeardownSQL(slot string) []string {
	return []string{`DO $do$ BEGIN
  IF to_regclass('walhook.routing_log') IS NOT NULL THEN
    DELETE FROM walhook.routing_log WHERE slot = ` + quoteLiteral(slot) + `;
  END IF;
END $do$`}
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// Store implements outbox.Store on a pool, for one slot.
type Store struct {
	pool *pgxpool.Pool
	slot string
}

// New returns a Store using pool; slot names the stream whose routing it keeps.
func New(pool *pgxpool.Pool, slot string) *Store { return &Store{pool: pool, slot: slot} }

// DeadLetter records d durably.
func (s *Store) DeadLetter(ctx context.Context, d outbox.DeadLetter) error {
	e := d.Event
	var payload any
	if len(e.Payload) > 0 {
		payload = string(e.Payload)
	}
	_, err := s.pool.Exec(ctx, `
		INSERT INTO walhook.dead_letters
		  (subscription, event_id, event, resource_id, tenant, payload, committed_at,
		   webhook_id, status, reason, attempts, first_attempt_at, last_attempt_at, sequence)
		VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11, $12, $13, $14::numeric)`,
		null(d.Subscription), e.ID, null(e.Type), null(e.ResourceID), null(e.Tenant), payload,
		nullTime(e.CommitTime), null(d.WebhookID), nullInt(d.Status), d.Reason, d.Attempts,
		nullTime(d.FirstAttempt), nullTime(d.LastAttempt), strconv.FormatUint(e.Seq, 10))
	if err != nil {
		return fmt.Errorf("insert dead letter: %w", err)
	}
	return nil
}

func null(s string) any {
	if s == "" {
		return nil
	}
	return s
}

func nullInt(n int) any {
	if n == 0 {
		return nil
	}
	return n
}

func nullTime(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t
}
