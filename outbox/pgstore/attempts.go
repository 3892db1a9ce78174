package pgstore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/walhook/walhook/outbox"
)

// attemptsSQL creates the attempt log's tables (docs/attempts.md).
var attemptsSQL = []string{`CREATE TABLE IF NOT EXISTS walhook.attempts (
  id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  at           timestamptz NOT NULL,
  subscription text        NOT NULL,
  webhook_id   text        NOT NULL,
  attempt      int         NOT NULL,
  event_count  int         NOT NULL,
  event_ids    text[]      NOT NULL,
  outcome      text        NOT NULL,
  status       int,
  class        text        NOT NULL,
  reason       text,
  duration_ms  double precision NOT NULL
)`,
	`CREATE INDEX IF NOT EXISTS attempts_subscription_idx ON walhook.attempts (subscription, id)`,
	// at grows with id: a BRIN index finds what to prune at a fraction of a
	// B-tree's cost per insert.
	`CREATE INDEX IF NOT EXISTS attempts_at_idx ON walhook.attempts USING brin (at)`,
	`CREATE INDEX IF NOT EXISTS attempts_event_idx ON walhook.attempts USING gin (event_ids)`,
	`CREATE TABLE IF NOT EXISTS walhook.attempt_summary (
  subscription        text PRIMARY KEY,
  last_success_at     timestamptz,
  last_failure_at     timestamptz,
  last_failure_status int,
  last_failure_reason text
)`}

// Attempt-log modes (attempt_log).
const (
	AttemptLogAll      = "all"
	AttemptLogFailures = "failures"
	AttemptLogOff      = "off"
)

// Bounds of the attempt log (docs/attempts.md).
const (
	attemptQueueBytes = 4 << 20
	attemptQueueLen   = 16384
	attemptBatch      = 1000
	attemptFlushEvery = 100 * time.Millisecond
	attemptPruneEvery = time.Minute
	attemptPruneChunk = 10000
	maxAttemptReason  = 512
)

// AttemptLogConfig configures an AttemptLog.
type AttemptLogConfig struct {
	Mode       string        // all or failures (off: do not make one)
	Retention  time.Duration // rows older than this are deleted; 0: kept
	Logger     zerolog.Logger
	Registerer prometheus.Registerer // for walhook_attempt_log_dropped_total; nil: nowhere
	QueueBytes int64                 // bytes of entries waiting to be written; default 4 MiB
}

// AttemptLog writes attempts to walhook.attempts off the delivery path: Record
// queues, Run copies the queue into the table in batches. It implements
// outbox.AttemptLog.
type AttemptLog struct {
	pool     *pgxpool.Pool
	cfg      AttemptLogConfig
	queue    chan queuedAttempt
	queued   atomic.Int64 // bytes in queue
	dropped  prometheus.Counter
	failing  bool // the last write failed (logged once); owned by Run
	prunedAt time.Time
}

type queuedAttempt struct {
	a    *outbox.Attempt
	size int64
}

// NewAttemptLog returns an attempt log writing through pool.
func NewAttemptLog(pool *pgxpool.Pool, cfg AttemptLogConfig) *AttemptLog {
	l := &AttemptLog{pool: pool, cfg: cfg, queue: make(chan queuedAttempt, attemptQueueLen),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{Name: "walhook_attempt_log_dropped_total",
			Help: "Attempt-log entries dropped because the database could not keep up (docs/attempts.md)."})}
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(l.dropped)
	}
	if l.cfg.QueueBytes <= 0 {
		l.cfg.QueueBytes = attemptQueueBytes
	}
	return l
}

// Wants reports whether the mode keeps an attempt with this outcome.
func (l *AttemptLog) Wants(delivered bool) bool {
	return l.cfg.Mode == AttemptLogAll || !delivered
}

// Record queues a; it never blocks, and drops a when the queue is full.
func (l *AttemptLog) Record(a *outbox.Attempt) {
	if len(a.Reason) > maxAttemptReason {
		a.Reason = strings.ToValidUTF8(a.Reason[:maxAttemptReason], "")
	}
	size := int64(128 + len(a.Subscription) + len(a.WebhookID) + len(a.Reason))
	for _, id := range a.EventIDs {
		size += int64(16 + len(id))
	}
	if l.queued.Add(size) > l.cfg.QueueBytes {
		l.queued.Add(-size)
		l.dropped.Inc()
		return
	}
	select {
	case l.queue <- queuedAttempt{a, size}:
	default:
		l.queued.Add(-size)
		l.dropped.Inc()
	}
}

// Run writes queued attempts until ctx ends, then what is queued (for up to
// two seconds), and prunes old rows.
func (l *AttemptLog) Run(ctx context.Context) error {
	tick := time.NewTicker(attemptFlushEvery)
	defer tick.Stop()
	batch := make([]*outbox.Attempt, 0, attemptBatch)
	pruned := make(chan struct{}, 1)
	pruned <- struct{}{}
	for {
		select {
		case <-ctx.Done():
			l.drain(batch)
			return nil
		case q := <-l.queue:
			l.queued.Add(-q.size)
			if batch = append(batch, q.a); len(batch) < attemptBatch {
				continue
			}
		case <-tick.C:
			if l.cfg.Retention > 0 && time.Since(l.prunedAt) >= attemptPruneEvery {
				select {
				case <-pruned: // one prune at a time, beside the writes
					l.prunedAt = time.Now()
					go func() {
						defer func() { pruned <- struct{}{} }()
						l.prune(ctx)
					}()
				default:
				}
			}
			if len(batch) == 0 {
				continue
			}
		}
		l.write(ctx, batch)
		batch = batch[:0]
	}
}

// drain writes what is queued at shutdown, within two seconds.
func (l *AttemptLog) drain(batch []*outbox.Attempt) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for {
		select {
		case q := <-l.queue:
			l.queued.Add(-q.size)
			batch = append(batch, q.a)
			if len(batch) < attemptBatch {
				continue
			}
		default:
		}
		if len(batch) == 0 {
			return
		}
		l.write(ctx, batch)
		batch = batch[:0]
		if ctx.Err() != nil {
			l.dropped.Add(float64(len(l.queue))) // out of time: what is left is counted, not written
			return
		}
	}
}

// write copies batch into walhook.attempts and updates the summary, in one
// transaction; on failure the batch is dropped and counted.
func (l *AttemptLog) write(ctx context.Context, batch []*outbox.Attempt) {
	err := pgx.BeginFunc(ctx, l.pool, func(tx pgx.Tx) error {
		_, err := tx.CopyFrom(ctx, pgx.Identifier{"walhook", "attempts"},
			[]string{"at", "subscription", "webhook_id", "attempt", "event_count", "event_ids", "outcome",
				"status", "class", "reason", "duration_ms"},
			pgx.CopyFromSlice(len(batch), func(i int) ([]any, error) {
				a := batch[i]
				outcome := "failed"
				if a.Delivered() {
					outcome = "delivered"
				}
				ids := make([]string, len(a.EventIDs))
				for i, id := range a.EventIDs {
					ids[i] = text(id)
				}
				return []any{a.At, text(a.Subscription), text(a.WebhookID), a.Number, a.Events, ids, outcome,
					nullInt(a.Status), a.Class, null(text(a.Reason)), float64(a.Duration.Microseconds()) / 1000}, nil
			}))
		if err != nil {
			return err
		}
		return l.summarise(ctx, tx, batch)
	})
	if err != nil {
		l.dropped.Add(float64(len(batch)))
		if !l.failing && ctx.Err() == nil {
			l.cfg.Logger.Warn().Err(err).Int("entries", len(batch)).Msg("attempt log: cannot write; dropping entries until it can")
		}
		l.failing = true
		return
	}
	if l.failing {
		l.cfg.Logger.Info().Msg("attempt log: writing again")
		l.failing = false
	}
}

// summarise keeps each subscription's last success and last failure.
func (l *AttemptLog) summarise(ctx context.Context, tx pgx.Tx, batch []*outbox.Attempt) error {
	type last struct {
		success, failure *time.Time
		status           *int32
		reason           *string
	}
	bySub := map[string]*last{}
	var subs []string
	for _, a := range batch {
		id := text(a.Subscription)
		s := bySub[id]
		if s == nil {
			s = &last{}
			bySub[id] = s
			subs = append(subs, id)
		}
		at := a.At
		if a.Delivered() {
			if s.success == nil || at.After(*s.success) {
				s.success = &at
			}
			continue
		}
		if s.failure == nil || !at.Before(*s.failure) {
			status, reason := int32(a.Status), text(a.Reason)
			s.failure, s.status, s.reason = &at, &status, &reason
			if a.Status == 0 {
				s.status = nil
			}
		}
	}
	success := make([]*time.Time, len(subs))
	failure := make([]*time.Time, len(subs))
	status := make([]*int32, len(subs))
	reason := make([]*string, len(subs))
	for i, id := range subs {
		s := bySub[id]
		success[i], failure[i], status[i], reason[i] = s.success, s.failure, s.status, s.reason
	}
	_, err := tx.Exec(ctx, `INSERT INTO walhook.attempt_summary AS s
		  (subscription, last_success_at, last_failure_at, last_failure_status, last_failure_reason)
		SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::int[], $5::text[])
		ON CONFLICT (subscription) DO UPDATE SET
		  last_success_at = greatest(s.last_success_at, excluded.last_success_at),
		  last_failure_at = greatest(s.last_failure_at, excluded.last_failure_at),
		  last_failure_status = CASE WHEN excluded.last_failure_at >= coalesce(s.last_failure_at, '-infinity')
		    THEN excluded.last_failure_status ELSE s.last_failure_status END,
		  last_failure_reason = CASE WHEN excluded.last_failure_at >= coalesce(s.last_failure_at, '-infinity')
		    THEN excluded.last_failure_reason ELSE s.last_failure_reason END`,
		subs, success, failure, status, reason)
	return err
}

// prune deletes rows older than the retention, a chunk at a time.
func (l *AttemptLog) prune(ctx context.Context) {
	cutoff := time.Now().Add(-l.cfg.Retention)
	for ctx.Err() == nil {
		tag, err := l.pool.Exec(ctx, `DELETE FROM walhook.attempts WHERE id IN
			(SELECT id FROM walhook.attempts WHERE at < $1 LIMIT $2)`, cutoff, attemptPruneChunk)
		if err != nil {
			if ctx.Err() == nil {
				l.cfg.Logger.Warn().Err(err).Msg("attempt log: cannot prune")
			}
			return
		}
		if tag.RowsAffected() < attemptPruneChunk {
			break
		}
	}
	if _, err := l.pool.Exec(ctx, `DELETE FROM walhook.attempt_summary
		WHERE coalesce(last_success_at, '-infinity') < $1 AND coalesce(last_failure_at, '-infinity') < $1`, cutoff); err != nil && ctx.Err() == nil {
		l.cfg.Logger.Warn().Err(err).Msg("attempt log: cannot prune the summary")
	}
}

// text is s as a text column can hold it: valid UTF-8 without NUL.
func text(s string) string {
	return strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "\uFFFD")
}

// AttemptFilter and AttemptRow are outbox's (the API reads them without
// knowing the store).
type (
	AttemptFilter = outbox.AttemptFilter
	AttemptRow    = outbox.AttemptRow
)

// ErrNoFilter is ListAttempts' refusal of a filter without a subscription or an event.
var ErrNoFilter = errors.New("pgstore: an attempt filter needs a subscription or an event id")

// ListAttempts returns up to limit attempts, newest first, and the cursor of
// the next page (0 when there is none).
func (s *Store) ListAttempts(ctx context.Context, f AttemptFilter, limit int) ([]AttemptRow, int64, error) {
	if f.Subscription == "" && f.EventID == "" {
		return nil, 0, ErrNoFilter
	}
	var cond []string
	var args []any
	add := func(c string, v any) {
		args = append(args, v)
		cond = append(cond, strings.ReplaceAll(c, "$?", "$"+strconv.Itoa(len(args))))
	}
	if f.Subscription != "" {
		add("subscription = $?", f.Subscription)
	}
	if f.EventID != "" {
		add("event_ids @> ARRAY[$?::text]", f.EventID)
	}
	if f.Owner != nil {
		add("subscription IN (SELECT id FROM walhook.subscriptions WHERE tenant = $?)", *f.Owner)
	}
	if f.Failed != nil {
		add("(outcome = 'failed') = $?", *f.Failed)
	}
	if f.Status != 0 {
		add("status = $?", f.Status)
	}
	if f.Since != nil {
		add("at >= $?", *f.Since)
	}
	if f.Until != nil {
		add("at < $?", *f.Until)
	}
	if f.Before > 0 {
		add("id < $?", f.Before)
	}
	args = append(args, limit+1)
	rows, err := s.pool.Query(ctx, `SELECT id, at, subscription, webhook_id, attempt, event_count, event_ids,
		outcome, status, class, reason, duration_ms FROM walhook.attempts
		WHERE `+strings.Join(cond, " AND ")+` ORDER BY id DESC LIMIT $`+strconv.Itoa(len(args)), args...)
	if pgErr, ok := errors.AsType[*pgconn.PgError](err); ok && pgErr.Code == "42P01" {
		return nil, 0, nil // set up by an older walhook: no attempt log yet
	}
	if err != nil {
		return nil, 0, fmt.Errorf("list attempts: %w", err)
	}
	list, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (AttemptRow, error) {
		var a AttemptRow
		err := r.Scan(&a.ID, &a.At, &a.Subscription, &a.WebhookID, &a.Attempt, &a.EventCount, &a.EventIDs,
			&a.Outcome, &a.Status, &a.Class, &a.Reason, &a.DurationMS)
		return a, err
	})
	if err != nil {
		return nil, 0, fmt.Errorf("list attempts: %w", err)
	}
	var next int64
	if len(list) > limit {
		list = list[:limit]
		next = list[limit-1].ID
	}
	return list, next, nil
}

// AttemptSummary is a subscription's last success and last failure.
type AttemptSummary struct {
	LastSuccess       *time.Time `json:"last_success_at"`
	LastFailure       *time.Time `json:"last_failure_at"`
	LastFailureStatus *int32     `json:"last_failure_status"`
	LastFailureReason *string    `json:"last_failure_reason"`
}

// AttemptSummaries returns the summary of every subscription that has one.
func (s *Store) AttemptSummaries(ctx context.Context) (map[string]AttemptSummary, error) {
	rows, err := s.pool.Query(ctx, `SELECT subscription, last_success_at, last_failure_at, last_failure_status,
		last_failure_reason FROM walhook.attempt_summary`)
	if pgErr, ok := errors.AsType[*pgconn.PgError](err); ok && pgErr.Code == "42P01" {
		return nil, nil // set up by an older walhook: no attempt log yet
	}
	if err != nil {
		return nil, fmt.Errorf("read attempt summaries: %w", err)
	}
	type row struct {
		id string
		AttemptSummary
	}
	list, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
		var x row
		err := r.Scan(&x.id, &x.LastSuccess, &x.LastFailure, &x.LastFailureStatus, &x.LastFailureReason)
		return x, err
	})
	if err != nil {
		return nil, fmt.Errorf("read attempt summaries: %w", err)
	}
	out := make(map[string]AttemptSummary, len(list))
	for _, x := range list {
		out[x.id] = x.AttemptSummary
	}
	return out, nil
}

// Outcomes counts a subscription's recent attempts.
type Outcomes struct {
	Attempts, Delivered int
}

// RecentOutcomes counts the last n attempts of each subscription in ids.
func (s *Store) RecentOutcomes(ctx context.Context, ids []string, n int) (map[string]Outcomes, error) {
	rows, err := s.pool.Query(ctx, `SELECT s.id, x.n, x.ok FROM unnest($1::text[]) s(id), LATERAL (
		  SELECT count(*) n, count(*) FILTER (WHERE outcome = 'delivered') ok
		    FROM (SELECT outcome FROM walhook.attempts WHERE subscription = s.id ORDER BY id DESC LIMIT $2) y) x`, ids, n)
	if pgErr, ok := errors.AsType[*pgconn.PgError](err); ok && pgErr.Code == "42P01" {
		return nil, nil // set up by an older walhook: no attempt log yet
	}
	if err != nil {
		return nil, fmt.Errorf("count recent attempts: %w", err)
	}
	out := map[string]Outcomes{}
	var id string
	var o Outcomes
	_, err = pgx.ForEachRow(rows, []any{&id, &o.Attempts, &o.Delivered}, func() error {
		out[id] = o
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("count recent attempts: %w", err)
	}
	return out, nil
}
