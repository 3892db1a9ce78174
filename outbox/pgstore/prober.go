package pgstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"reflect"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/walhook/walhook/outbox"
)

// probeInterval is how often the database is asked about the slot (the one
// query an idle walhook makes) and the status report is refreshed.
const probeInterval = 10 * time.Second

// pruneInterval is how often old walhook.outbox and walhook.control rows are deleted.
const pruneInterval = 10 * time.Minute

// controlRetention is how long walhook.control rows are kept: the stream reads
// them from the WAL, so they are only a record of recent control changes.
const controlRetention = 24 * time.Hour

// Prober keeps the database-side gauges and the status report current: every
// probeInterval it reads the slot and the parked and dead counts (the one
// query an idle walhook makes); on the replica that streams it also writes
// the high-water mark (slot-loss detection, `walhook recover`), prunes old
// outbox and control rows, and writes the status report when it changed. A
// server that says it is shutting down makes the stream leave the slot.
type Prober struct {
	store    *Store
	metrics  *outbox.Metrics
	stream   Stream
	log      zerolog.Logger
	lag      prometheus.Gauge
	retained prometheus.Gauge
	lastSent *Report

	// Retention: prune walhook.outbox rows older than this; 0 = never.
	Retention time.Duration
	pruned    time.Time

	acker     *outbox.Acker
	lastState string   // confirmed LSN and high-water mark last written
	confirmed []sample // the slot's confirmed position at each prune, oldest first (PruneMarks)

	// OnSample gets each probe's reading (the console's chart); nil: nobody.
	OnSample func(slot SlotStats, lagSeconds float64)

	// MarksFloor, in relay mode, returns the sequence of the oldest event
	// that may still reach a worker (the oldest message in the relay
	// stream), or false when there is none: debounce marks at or above it
	// are kept whatever the slot has confirmed. nil in direct mode.
	MarksFloor func(ctx context.Context) (seq uint64, ok bool, err error)
}

// sample is the slot's confirmed flush position when it was read.
type sample struct {
	at  time.Time
	lsn string
}

// Stream is what the prober needs of the replication stream.
type Stream interface {
	Holds() bool // this replica streams the slot (a stalled session still holds it)
	Yield()      // leave the slot for a while
}

// NewProber returns a prober of store's slot, registering its gauges on reg.
func NewProber(reg prometheus.Registerer, store *Store, m *outbox.Metrics, acker *outbox.Acker, stream Stream, log zerolog.Logger) *Prober {
	p := &Prober{store: store, metrics: m, acker: acker, stream: stream, log: log,
		lag: prometheus.NewGauge(prometheus.GaugeOpts{Name: "walhook_replication_lag_bytes",
			Help: "WAL written on the server minus the slot's confirmed flush position."}),
		retained: prometheus.NewGauge(prometheus.GaugeOpts{Name: "walhook_slot_retained_wal_bytes",
			Help: "WAL the slot keeps on the server's disk (written minus restart_lsn)."}),
	}
	reg.MustRegister(p.lag, p.retained)
	return p
}

// Run probes until ctx ends.
func (p *Prober) Run(ctx context.Context) error {
	t := time.NewTicker(probeInterval)
	defer t.Stop()
	failing := false
	for {
		err := p.probe(ctx)
		switch {
		case err != nil && ctx.Err() == nil && !failing:
			p.log.Warn().Err(err).Msg("lag probe failed")
			failing = true
		case err == nil && failing:
			p.log.Info().Msg("lag probe recovered")
			failing = false
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func (p *Prober) probe(ctx context.Context) error {
	slot, subs, err := p.store.Stats(ctx)
	if err != nil {
		if pgErr, ok := errors.AsType[*pgconn.PgError](err); ok && (pgErr.Code == "57P03" || pgErr.Code == "57P01") {
			p.stream.Yield() // cannot_connect_now, admin_shutdown: let the server shut down
		}
		return err
	}
	p.lag.Set(float64(slot.LagBytes))
	p.retained.Set(float64(slot.RetainedBytes))
	if p.OnSample != nil {
		p.OnSample(slot, p.metrics.LagSeconds())
	}
	p.metrics.SetStored(subs)
	if !p.stream.Holds() {
		return nil // only the replica holding the slot reports and prunes
	}
	// The high-water mark: proof that walhook delivered here, for slot-loss
	// detection and `walhook recover`. Written only when it moved.
	if high := p.acker.HighWater(); slot.Exists && high > 0 {
		if st := fmt.Sprint(slot.ConfirmedFlush, high); st != p.lastState {
			if err := p.store.WriteState(ctx, slot.ConfirmedFlush, high); err != nil {
				return err
			}
			p.lastState = st
		}
	}
	if time.Since(p.pruned) >= pruneInterval {
		p.pruned = time.Now()
		if p.Retention > 0 {
			n, err := p.store.PruneOutbox(ctx, p.Retention, 1000)
			if err != nil {
				return err
			}
			if n > 0 {
				p.log.Info().Int64("rows", n).Dur("older_than", p.Retention).Msg("outbox pruned")
			}
		}
		n, err := p.store.PruneControl(ctx, controlRetention, 1000)
		if err != nil {
			return err
		}
		if n > 0 {
			p.log.Debug().Int64("rows", n).Dur("older_than", controlRetention).Msg("control rows pruned")
		}
		if err := p.pruneMarks(ctx, slot); err != nil {
			return err
		}
	}
	host, _ := os.Hostname()
	r := Report{Host: host, LagSeconds: p.metrics.LagSeconds(), Subscriptions: p.metrics.Snapshot()}
	if p.lastSent != nil && sameReport(*p.lastSent, r) && time.Since(p.lastSent.ReportedAt) < time.Minute {
		return nil // unchanged: an idle walhook does not write
	}
	r.ReportedAt = time.Now().UTC()
	if err := p.store.WriteReport(ctx, r); err != nil {
		return err
	}
	p.lastSent = &r
	return nil
}

// pruneMarks deletes the debounce marks below a confirmed position read more
// than two checkpoint_timeouts ago: a checkpoint has begun since, so the
// server wrote that position to disk, and no crash moves the slot back
// before it (docs/scheduler.md, "Debounce across restarts"). In relay mode
// the slot is confirmed once JetStream has an event, long before a worker
// delivers it: a mark is also kept while an older event is still in the
// relay stream (MarksFloor), which a worker taking over its partition may
// receive again after the newer one was sent.
func (p *Prober) pruneMarks(ctx context.Context, slot SlotStats) error {
	if !slot.Exists || slot.ConfirmedFlush == "" {
		return nil
	}
	now := time.Now()
	p.confirmed = append(p.confirmed, sample{now, slot.ConfirmedFlush})
	every, err := p.store.CheckpointTimeout(ctx)
	if err != nil {
		return err
	}
	safe := ""
	for len(p.confirmed) > 0 && now.Sub(p.confirmed[0].at) > 2*every {
		safe = p.confirmed[0].lsn
		p.confirmed = p.confirmed[1:]
	}
	if safe == "" {
		return nil
	}
	lsn, err := pglogrepl.ParseLSN(safe)
	if err != nil {
		return err
	}
	below := uint64(lsn) << 16
	if p.MarksFloor != nil {
		floor, ok, err := p.MarksFloor(ctx)
		if err != nil { // keep them all until it can tell
			p.log.Debug().Err(err).Msg("debounce marks not pruned: cannot read the relay's oldest event")
			return nil
		}
		if ok {
			below = min(below, floor)
		}
	}
	n, err := p.store.PruneMarks(ctx, below)
	if n > 0 {
		p.log.Debug().Int64("rows", n).Uint64("below", below).Msg("debounce marks pruned")
	}
	return err
}

func sameReport(a, b Report) bool {
	a.ReportedAt, b.ReportedAt = time.Time{}, time.Time{}
	return reflect.DeepEqual(a, b)
}
