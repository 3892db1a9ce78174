// Package pgstore keeps walhook's durable state in PostgreSQL, in the walhook
// schema: dead letters, parked deliveries (walhook.deliveries), the delivery
// lease, API subscriptions and their routing log, debounce marks, the status
// report and high-water mark, and the attempt log. It implements outbox.Store.
// The healthy delivery path writes only the attempt log, off the path
// (attempts.go).
package pgstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/walhook/walhook/outbox"
)

// SchemaSQL creates the walhook schema and walhook's own tables. Idempotent.
func SchemaSQL() []string {
	return append([]string{
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
		// A deleted subscription's last definition, for relay workers: events
		// routed to it before its deletion may still wait in the stream
		// (docs/scale-out.md). Kept 30 days; it holds the secrets, as the
		// row did.
		`CREATE TABLE IF NOT EXISTS walhook.retired_subscriptions (
  id         text        PRIMARY KEY,
  row        jsonb       NOT NULL,
  deleted_at timestamptz NOT NULL DEFAULT now()
)`,
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
    INSERT INTO walhook.retired_subscriptions (id, row) VALUES (OLD.id, to_jsonb(OLD))
      ON CONFLICT (id) DO UPDATE SET row = EXCLUDED.row, deleted_at = now();
    DELETE FROM walhook.retired_subscriptions WHERE deleted_at < now() - interval '30 days';
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
		// Parked rows are ordered by sequence, never by arrival
		// (docs/parking.md); the payload is kept as text, which can hold any
		// JSON (jsonb refuses \u0000 and lone surrogates).
		`ALTER TABLE walhook.deliveries ADD COLUMN IF NOT EXISTS sequence numeric`,
		`ALTER TABLE walhook.deliveries ADD COLUMN IF NOT EXISTS payload text`,
		`UPDATE walhook.deliveries SET sequence = (event->>'Seq')::numeric WHERE sequence IS NULL`,
		`CREATE INDEX IF NOT EXISTS deliveries_sequence_idx ON walhook.deliveries (subscription, resource_id, sequence, id)`,
		// The delivery lease: the epoch of the process that holds the slot;
		// parked-row writes check it (docs/design.md, "Ownership").
		`CREATE TABLE IF NOT EXISTS walhook.lease (
  slot        text        PRIMARY KEY,
  epoch       bigint      NOT NULL,
  owner       text        NOT NULL,
  acquired_at timestamptz NOT NULL
)`,
		`CREATE OR REPLACE FUNCTION walhook.try_jsonb(t text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $fn$
BEGIN
  RETURN t::jsonb;
EXCEPTION WHEN others THEN
  RETURN NULL;
END
$fn$`,
		// Debounced subscriptions: the newest sequence sent per resource, kept
		// until a checkpoint has written a confirmed position past it (docs/scheduler.md).
		`CREATE TABLE IF NOT EXISTS walhook.debounce_marks (
  subscription text    NOT NULL,
  resource_id  text    NOT NULL,
  sequence     numeric NOT NULL,
  PRIMARY KEY (subscription, resource_id)
)`,
		// A payload jsonb cannot hold is kept as text.
		`ALTER TABLE walhook.dead_letters ADD COLUMN IF NOT EXISTS payload_text text`,
		// One dead letter per subscription and event: a row streamed again
		// after a reconnect is not dead-lettered twice.
		`DO $do$ BEGIN
  IF to_regclass('walhook.dead_letters_event_key') IS NULL THEN
    DELETE FROM walhook.dead_letters a USING walhook.dead_letters b
     WHERE a.id > b.id AND coalesce(a.subscription, '') = coalesce(b.subscription, '') AND a.event_id = b.event_id;
    CREATE UNIQUE INDEX dead_letters_event_key ON walhook.dead_letters ((coalesce(subscription, '')), event_id);
  END IF;
END $do$`,
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
	}, attemptsSQL...)
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
	pool  *pgxpool.Pool
	slot  string
	epoch atomic.Int64 // the lease taken by Acquire; 0 before
}

// Connect opens the pool walhook's state is written through. Every commit on
// it is durable before it returns: on a server whose synchronous_commit is
// off, its connections turn it on. walhook acts on what it wrote (it confirms
// the slot past a parked event, sends what a debounce mark or a lease says it
// may), and an asynchronous commit can vanish in a server crash after that
// while the slot's confirmed position, saved apart from the WAL, does not
// (docs/design.md, "Durable before acted on"). A stronger setting (remote_apply,
// say) is left as it is.
func Connect(ctx context.Context, databaseURL string) (*pgxpool.Pool, error) {
	pool, err := Open(ctx, databaseURL)
	if err != nil {
		return nil, err
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("connect to database: %w", err)
	}
	return pool, nil
}

// Open is Connect without the first connection: the pool connects, durably,
// when first used.
func Open(ctx context.Context, databaseURL string) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(databaseURL)
	if err != nil {
		return nil, fmt.Errorf("connect to database: %w", err)
	}
	cfg.AfterConnect = func(ctx context.Context, c *pgx.Conn) error {
		_, err := c.Exec(ctx, `SELECT set_config('synchronous_commit', 'on', false) WHERE current_setting('synchronous_commit') = 'off'`)
		return err
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to database: %w", err)
	}
	return pool, nil
}

// New returns a Store using pool; slot names the stream whose routing it keeps.
func New(pool *pgxpool.Pool, slot string) *Store { return &Store{pool: pool, slot: slot} }

// DeadLetter records d durably, once per subscription and event. A payload
// that jsonb cannot hold is kept as text (payload_text).
func (s *Store) DeadLetter(ctx context.Context, d outbox.DeadLetter) error {
	return insertDeadLetter(ctx, s.pool, d)
}

// DeadLetterRows records dead letters and deletes the parked rows they were,
// in one fenced transaction.
func (s *Store) DeadLetterRows(ctx context.Context, rows []int64, dls []outbox.DeadLetter) error {
	return s.fenced(ctx, func(tx pgx.Tx) error {
		for _, d := range dls {
			if err := insertDeadLetter(ctx, tx, d); err != nil {
				return err
			}
		}
		_, err := tx.Exec(ctx, `DELETE FROM walhook.deliveries WHERE id = ANY($1)`, rows)
		return err
	})
}

type execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

func insertDeadLetter(ctx context.Context, db execer, d outbox.DeadLetter) error {
	e := d.Event
	// Text columns cannot hold NUL: a malformed message may carry one.
	for _, f := range []*string{&e.ID, &e.Type, &e.ResourceID, &e.Tenant, &d.Reason} {
		*f = strings.ReplaceAll(*f, "\x00", "\uFFFD")
	}
	var payload any
	if len(e.Payload) > 0 {
		payload = string(e.Payload)
	}
	_, err := db.Exec(ctx, `
		INSERT INTO walhook.dead_letters
		  (subscription, event_id, event, resource_id, tenant, payload, payload_text, committed_at,
		   webhook_id, status, reason, attempts, first_attempt_at, last_attempt_at, sequence)
		VALUES ($1, $2, $3, $4, $5, walhook.try_jsonb($6::text),
		        CASE WHEN $6::text IS NOT NULL AND walhook.try_jsonb($6::text) IS NULL THEN $6::text END,
		        $7, $8, $9, $10, $11, $12, $13, $14::numeric)
		ON CONFLICT DO NOTHING`,
		null(d.Subscription), e.ID, null(e.Type), null(e.ResourceID), null(e.Tenant), payload,
		nullTime(e.CommitTime), null(d.WebhookID), nullInt(d.Status), d.Reason, d.Attempts,
		nullTime(d.FirstAttempt), nullTime(d.LastAttempt), strconv.FormatUint(e.Seq, 10))
	if err != nil {
		return classify(fmt.Errorf("insert dead letter: %w", err))
	}
	return nil
}

// classify marks errors that retrying cannot fix: the data itself is refused
// (SQLSTATE classes 22, data exception; 23, integrity constraint; 54, program
// limit exceeded, like an index entry too large). Everything else (lost
// connections, serialization failures, shutdowns, but also a missing table
// or privilege an operator can fix) is retried.
func classify(err error) error {
	if pgErr, ok := errors.AsType[*pgconn.PgError](err); ok && (strings.HasPrefix(pgErr.Code, "22") ||
		strings.HasPrefix(pgErr.Code, "23") || strings.HasPrefix(pgErr.Code, "54")) {
		return fmt.Errorf("%w: %w", outbox.ErrPermanent, err)
	}
	return err
}

// Acquire takes the delivery lease of the slot for a new epoch: from now on
// an older epoch's fenced writes, in this process or another, fail. It takes
// it only while the slot is held by the server process holder (the epoch's
// replication session), so a process that lost the slot before it got here
// cannot take the lease from the one that holds it now.
func (s *Store) Acquire(ctx context.Context, holder uint32) error {
	host, _ := os.Hostname()
	var epoch int64
	err := s.pool.QueryRow(ctx, `INSERT INTO walhook.lease (slot, epoch, owner, acquired_at)
		SELECT $1::text, 1, $2::text, now()
		 WHERE $3::int = 0 OR EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name::text = $1::text AND active_pid = $3::int)
		ON CONFLICT (slot) DO UPDATE SET epoch = walhook.lease.epoch + 1, owner = EXCLUDED.owner, acquired_at = now()
		RETURNING epoch`, s.slot, fmt.Sprintf("%s/%d", host, os.Getpid()), int64(holder)).Scan(&epoch)
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("take the delivery lease: the slot is no longer held by this session: %w", outbox.ErrFenced)
	}
	if err != nil {
		return fmt.Errorf("take the delivery lease (run walhook setup after an upgrade): %w", err)
	}
	s.epoch.Store(epoch)
	return nil
}

// fenced runs f in a transaction that holds the lease row shared: it fails
// with outbox.ErrFenced unless this process's epoch is still the newest, and
// a newer Acquire waits until it is done.
func (s *Store) fenced(ctx context.Context, f func(tx pgx.Tx) error) error {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	if err := s.leaseHeld(tx.QueryRow(ctx, `SELECT epoch FROM walhook.lease WHERE slot = $1 FOR SHARE`, s.slot)); err != nil {
		return err
	}
	if err := f(tx); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

// Owns says whether this process's epoch still holds the delivery lease: nil,
// outbox.ErrFenced once a newer Acquire took it, or why it cannot tell. It
// holds nothing: a newer Acquire can follow at once, so it only proves that
// none came before the query (the relay publisher's fence step relies on just
// that, docs/scale-out.md).
func (s *Store) Owns(ctx context.Context) error {
	return s.leaseHeld(s.pool.QueryRow(ctx, `SELECT epoch FROM walhook.lease WHERE slot = $1`, s.slot))
}

// leaseHeld reads the lease row's epoch and compares it with this process's.
func (s *Store) leaseHeld(row pgx.Row) error {
	var epoch int64
	err := row.Scan(&epoch)
	if errors.Is(err, pgx.ErrNoRows) || err == nil && epoch != s.epoch.Load() {
		return outbox.ErrFenced
	}
	return err
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
