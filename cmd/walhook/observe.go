package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"reflect"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/walhook/walhook/cdc"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/outbox/pgstore"
)

// probeInterval is how often the database is asked about the slot (the one
// query an idle walhook makes) and the status report is refreshed.
const probeInterval = 10 * time.Second

// pruneInterval is how often old walhook.outbox and walhook.control rows are deleted.
const pruneInterval = 10 * time.Minute

// controlRetention is how long walhook.control rows are kept: the stream reads
// them from the WAL, so they are only a record of recent control changes.
const controlRetention = 24 * time.Hour

// prober keeps the database-side gauges and the status report current.
type prober struct {
	store    *pgstore.Store
	metrics  *outbox.Metrics
	stream   *cdc.Stream
	log      zerolog.Logger
	lag      prometheus.Gauge
	retained prometheus.Gauge
	lastSent *pgstore.Report

	retention time.Duration // prune walhook.outbox rows older than this; 0 = never
	pruned    time.Time

	acker     *outbox.Acker
	lastState string // confirmed LSN and high-water mark last written
}

func newProber(reg prometheus.Registerer, store *pgstore.Store, m *outbox.Metrics, acker *outbox.Acker, stream *cdc.Stream, log zerolog.Logger) *prober {
	p := &prober{store: store, metrics: m, acker: acker, stream: stream, log: log,
		lag: prometheus.NewGauge(prometheus.GaugeOpts{Name: "walhook_replication_lag_bytes",
			Help: "WAL written on the server minus the slot's confirmed flush position."}),
		retained: prometheus.NewGauge(prometheus.GaugeOpts{Name: "walhook_slot_retained_wal_bytes",
			Help: "WAL the slot keeps on the server's disk (written minus restart_lsn)."}),
	}
	reg.MustRegister(p.lag, p.retained)
	return p
}

func (p *prober) Run(ctx context.Context) error {
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

func (p *prober) probe(ctx context.Context) error {
	slot, subs, err := p.store.Stats(ctx)
	if err != nil {
		if pgErr, ok := errors.AsType[*pgconn.PgError](err); ok && (pgErr.Code == "57P03" || pgErr.Code == "57P01") {
			p.stream.Yield() // cannot_connect_now, admin_shutdown: let the server shut down
		}
		return err
	}
	p.lag.Set(float64(slot.LagBytes))
	p.retained.Set(float64(slot.RetainedBytes))
	p.metrics.SetStored(subs)
	if h := p.stream.Health(); h != cdc.Streaming && h != cdc.Stalled {
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
		if p.retention > 0 {
			n, err := p.store.PruneOutbox(ctx, p.retention, 1000)
			if err != nil {
				return err
			}
			if n > 0 {
				p.log.Info().Int64("rows", n).Dur("older_than", p.retention).Msg("outbox pruned")
			}
		}
		n, err := p.store.PruneControl(ctx, controlRetention, 1000)
		if err != nil {
			return err
		}
		if n > 0 {
			p.log.Debug().Int64("rows", n).Dur("older_than", controlRetention).Msg("control rows pruned")
		}
	}
	host, _ := os.Hostname()
	r := pgstore.Report{Host: host, LagSeconds: p.metrics.LagSeconds(), Subscriptions: p.metrics.Snapshot()}
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

func sameReport(a, b pgstore.Report) bool {
	a.ReportedAt, b.ReportedAt = time.Time{}, time.Time{}
	return reflect.DeepEqual(a, b)
}

// readyz is 200 while the stream streams (or this replica is a healthy
// standby) and lag is within ready_max_lag.
// In relay mode relayHealth says whether JetStream takes the deliveries.
func readyz(stream *cdc.Stream, m *outbox.Metrics, maxLag time.Duration, relayHealth func() (bool, string)) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		state, lag := stream.Health(), m.LagSeconds()
		ok := state == cdc.Streaming || state == cdc.Standby
		if maxLag > 0 && lag > maxLag.Seconds() {
			ok = false
		}
		answer := map[string]any{"state": state, "lag_seconds": lag}
		if relayHealth != nil {
			rok, reason := relayHealth()
			ok = ok && rok
			answer["relay"] = map[string]any{"ok": rok, "reason": reason}
		}
		answer["ready"] = ok
		status := http.StatusOK
		if !ok {
			status = http.StatusServiceUnavailable
		}
		w.Header().Set("content-type", "application/json")
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(answer)
	}
}

// statusOutput is what `walhook status --json` prints.
type statusOutput struct {
	Slot          string                  `json:"slot"`
	SlotStats     pgstore.SlotStats       `json:"slot_stats"`
	Report        *pgstore.Report         `json:"report"` // nil when no walhook has streamed yet
	Subscriptions []subscriptionStatusRow `json:"subscriptions"`
	Relay         *relayStatus            `json:"relay,omitempty"` // relay mode only
}

type subscriptionStatusRow struct {
	ID     string `json:"id"`
	Source string `json:"source"` // config or api
	outbox.SubscriptionReport
}

// status prints the slot and every subscription, from the database alone.
func status(ctx context.Context, cfg *Config, asJSON bool, out io.Writer) error {
	pool, err := connectPool(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	store := pgstore.New(pool, cfg.Slot)
	slot, stored, err := store.Stats(ctx)
	if err != nil {
		return err
	}
	report, err := store.ReadReport(ctx)
	if err != nil {
		return fmt.Errorf("read status report: %w", err)
	}
	rows, err := store.ListSubscriptions(ctx, nil)
	if err != nil {
		return fmt.Errorf("list subscriptions: %w", err)
	}
	o := statusOutput{Slot: cfg.Slot, SlotStats: slot, Report: report, Subscriptions: []subscriptionStatusRow{}}
	add := func(id, source string) {
		r := subscriptionStatusRow{ID: id, Source: source}
		if report != nil {
			r.SubscriptionReport = report.Subscriptions[id]
		}
		r.Parked, r.Dead = stored[id].Parked, stored[id].Dead
		o.Subscriptions = append(o.Subscriptions, r)
	}
	for _, s := range cfg.subs {
		add(s.ID, "config")
	}
	for _, r := range rows {
		add(r.ID, "api")
	}
	sort.SliceStable(o.Subscriptions, func(i, j int) bool { return o.Subscriptions[i].ID < o.Subscriptions[j].ID })
	o.Relay = inspectRelay(ctx, cfg)
	if asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(o)
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	active := "no"
	if slot.Active {
		active = fmt.Sprintf("yes (pid %d", deref32(slot.ActivePID))
		if slot.ActiveClient != nil {
			active += ", " + *slot.ActiveClient
		}
		active += ")"
	}
	if !slot.Exists {
		active = "SLOT MISSING: run walhook setup"
	}
	fmt.Fprintf(tw, "slot\t%s\nactive\t%s\nconfirmed flush\t%s\nlag\t%s", cfg.Slot, active, slot.ConfirmedFlush, humanBytes(slot.LagBytes))
	if report != nil {
		fmt.Fprintf(tw, ", %.1fs (reported %s ago by %s)", report.LagSeconds, time.Since(report.ReportedAt).Round(time.Second), report.Host)
	}
	fmt.Fprintf(tw, "\nretained WAL\t%s\n\n", humanBytes(slot.RetainedBytes))
	fmt.Fprintln(tw, "SUBSCRIPTION\tSOURCE\tPENDING\tOLDEST PENDING\tPARKED\tDEAD")
	for _, s := range o.Subscriptions {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%.1fs\t%d\t%d\n", s.ID, s.Source, s.Pending, s.OldestPendingSeconds, s.Parked, s.Dead)
	}
	printRelay(tw, o.Relay)
	return tw.Flush()
}

func deref32(p *int32) int32 {
	if p == nil {
		return 0
	}
	return *p
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
