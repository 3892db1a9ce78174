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

// SlotStats is the replication slot as PostgreSQL sees it.
type SlotStats struct {
	Exists         bool    `json:"exists"`
	Active         bool    `json:"active"`
	ActivePID      *int32  `json:"active_pid"`
	ActiveClient   *string `json:"active_client"` // the streaming replica's address
	ConfirmedFlush string  `json:"confirmed_flush_lsn"`
	LagBytes       int64   `json:"lag_bytes"`      // WAL written − confirmed flush
	RetainedBytes  int64   `json:"retained_bytes"` // WAL written − restart_lsn: what the slot keeps on disk
	WALStatus      string  `json:"wal_status"`

	// Columns that only some versions have are nil where the server has none:
	// conflicting from PostgreSQL 16, the rest from 17.
	Failover           *bool   `json:"failover"`            // a failover slot: standbys with sync_replication_slots keep a copy
	Synced             *bool   `json:"synced"`              // this copy was synchronised from a primary (true on a standby, and on it after promotion)
	Conflicting        *bool   `json:"conflicting"`         // invalidated by a recovery conflict (logical decoding on a standby)
	InvalidationReason *string `json:"invalidation_reason"` // why the slot can no longer be used; nil while it can
	InactiveSince      *string `json:"inactive_since"`      // since when nobody streams it
	// SynchronizedStandbySlots is the server's synchronized_standby_slots: the
	// physical slots of the standbys a logical walsender waits for, so that a
	// promoted standby has everything walhook was sent. nil before 17.
	SynchronizedStandbySlots *string `json:"synchronized_standby_slots"`
}

// Stats reads the slot and, per subscription, the parked and dead-letter
// counts, in one round trip.
func (s *Store) Stats(ctx context.Context) (SlotStats, map[string]outbox.StoredStats, error) {
	var st SlotStats
	b := &pgx.Batch{}
	// to_jsonb(s) has the columns this server's view has: no column list per version.
	b.Queue(`SELECT s.active, s.active_pid, r.client_addr::text, s.confirmed_flush_lsn::text,
		       coalesce(pg_current_wal_lsn() - s.confirmed_flush_lsn, 0)::bigint,
		       coalesce(pg_current_wal_lsn() - s.restart_lsn, 0)::bigint, coalesce(s.wal_status, ''),
		       (to_jsonb(s) ->> 'failover')::bool, (to_jsonb(s) ->> 'synced')::bool, (to_jsonb(s) ->> 'conflicting')::bool,
		       to_jsonb(s) ->> 'invalidation_reason', to_jsonb(s) ->> 'inactive_since'
		  FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
		 WHERE s.slot_name = $1`, s.slot).QueryRow(func(row pgx.Row) error {
		err := row.Scan(&st.Active, &st.ActivePID, &st.ActiveClient, &st.ConfirmedFlush, &st.LagBytes, &st.RetainedBytes, &st.WALStatus,
			&st.Failover, &st.Synced, &st.Conflicting, &st.InvalidationReason, &st.InactiveSince)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		st.Exists = err == nil
		return err
	})
	b.Queue(`SELECT current_setting('synchronized_standby_slots', true)`).QueryRow(func(row pgx.Row) error {
		return row.Scan(&st.SynchronizedStandbySlots)
	})
	subs := map[string]outbox.StoredStats{}
	b.Queue(`SELECT subscription, count(*), min((event->>'CommitTime')::timestamptz) FROM walhook.deliveries GROUP BY 1`).
		Query(func(rows pgx.Rows) error {
			for rows.Next() {
				var id string
				var n int64
				var oldest *time.Time
				if err := rows.Scan(&id, &n, &oldest); err != nil {
					return err
				}
				x := subs[id]
				x.Parked = n
				if oldest != nil {
					x.ParkedOldest = *oldest
				}
				subs[id] = x
			}
			return rows.Err()
		})
	b.Queue(`SELECT subscription, count(*) FROM walhook.dead_letters WHERE subscription IS NOT NULL GROUP BY 1`).
		Query(func(rows pgx.Rows) error {
			for rows.Next() {
				var id string
				var n int64
				if err := rows.Scan(&id, &n); err != nil {
					return err
				}
				x := subs[id]
				x.Dead = n
				subs[id] = x
			}
			return rows.Err()
		})
	if err := s.pool.SendBatch(ctx, b).Close(); err != nil {
		return st, nil, fmt.Errorf("read stats: %w", err)
	}
	return st, subs, nil
}

// Report is what the streaming replica last said about itself.
type Report struct {
	ReportedAt    time.Time                            `json:"reported_at"`
	Host          string                               `json:"host"`
	LagSeconds    float64                              `json:"lag_seconds"`
	Subscriptions map[string]outbox.SubscriptionReport `json:"subscriptions"`
}

// WriteReport stores the streaming replica's report.
func (s *Store) WriteReport(ctx context.Context, r Report) error {
	body, err := json.Marshal(r)
	if err != nil {
		return err
	}
	_, err = s.pool.Exec(ctx, `INSERT INTO walhook.status (slot, reported_at, host, report) VALUES ($1, $2, $3, $4)
		ON CONFLICT (slot) DO UPDATE SET reported_at = EXCLUDED.reported_at, host = EXCLUDED.host, report = EXCLUDED.report`,
		s.slot, r.ReportedAt, r.Host, body)
	return err
}

// ReadReport reads the last report; nil when there is none.
func (s *Store) ReadReport(ctx context.Context) (*Report, error) {
	var body []byte
	err := s.pool.QueryRow(ctx, `SELECT report FROM walhook.status WHERE slot = $1`, s.slot).Scan(&body)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var r Report
	return &r, json.Unmarshal(body, &r)
}

// PruneOutbox deletes walhook.outbox rows older than retention, in batches of
// limit rows so that no lock is held long; it returns how many went. Rows are
// read from the WAL, never from the table, so deleting them loses nothing.
func (s *Store) PruneOutbox(ctx context.Context, retention time.Duration, limit int) (int64, error) {
	n, err := s.prune(ctx, "walhook.outbox", retention, limit)
	if err != nil {
		return n, fmt.Errorf("prune outbox: %w", err)
	}
	return n, nil
}

// PruneControl deletes walhook.control rows older than retention, like
// PruneOutbox: the stream reads them from the WAL, so once committed they are
// only a record of the control changes made.
func (s *Store) PruneControl(ctx context.Context, retention time.Duration, limit int) (int64, error) {
	n, err := s.prune(ctx, "walhook.control", retention, limit)
	if err != nil {
		return n, fmt.Errorf("prune control rows: %w", err)
	}
	return n, nil
}

// prune deletes rows of table (walhook's own, with id and created_at) older
// than retention, limit rows at a time.
func (s *Store) prune(ctx context.Context, table string, retention time.Duration, limit int) (int64, error) {
	var total int64
	for {
		tag, err := s.pool.Exec(ctx, `DELETE FROM `+table+` WHERE id IN (
			SELECT id FROM `+table+` WHERE created_at < now() - $1::interval ORDER BY id LIMIT $2)`,
			retention.String(), limit)
		if err != nil {
			return total, err
		}
		total += tag.RowsAffected()
		if tag.RowsAffected() < int64(limit) {
			return total, nil
		}
	}
}

// State is the durable high-water mark of a slot (walhook.state): proof that
// walhook delivered on this database, and from where a recovery starts.
type State struct {
	SystemID  string
	Timeline  int32
	Confirmed string // LSN
	HighWater uint64 // highest outbox id of a finished transaction
	UpdatedAt time.Time
}

// StateSQL creates walhook.state.
const StateSQL = `CREATE TABLE IF NOT EXISTS walhook.state (
  slot              text        PRIMARY KEY,
  system_identifier text        NOT NULL,
  timeline          int         NOT NULL,
  confirmed_lsn     pg_lsn      NOT NULL,
  high_water_id     numeric     NOT NULL,
  updated_at        timestamptz NOT NULL
)`

// WriteState records the high-water mark.
func (s *Store) WriteState(ctx context.Context, confirmed string, high uint64) error {
	_, err := s.pool.Exec(ctx, `
		INSERT INTO walhook.state (slot, system_identifier, timeline, confirmed_lsn, high_water_id, updated_at)
		SELECT $1, (SELECT system_identifier::text FROM pg_control_system()), (SELECT timeline_id FROM pg_control_checkpoint()),
		       $2::pg_lsn, $3::numeric, now()
		ON CONFLICT (slot) DO UPDATE SET system_identifier = EXCLUDED.system_identifier, timeline = EXCLUDED.timeline,
		       confirmed_lsn = EXCLUDED.confirmed_lsn,
		       high_water_id = greatest(walhook.state.high_water_id, EXCLUDED.high_water_id), updated_at = now()`,
		s.slot, confirmed, strconv.FormatUint(high, 10))
	return err
}

// ReadState reads the high-water mark; nil when walhook never delivered here.
func (s *Store) ReadState(ctx context.Context) (*State, error) {
	var st State
	var high string
	err := s.pool.QueryRow(ctx, `SELECT system_identifier, timeline, confirmed_lsn::text, high_water_id::text, updated_at
		FROM walhook.state WHERE slot = $1`, s.slot).Scan(&st.SystemID, &st.Timeline, &st.Confirmed, &high, &st.UpdatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	st.HighWater, _ = strconv.ParseUint(high, 10, 64)
	return &st, nil
}
