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

	onSample func(slot pgstore.SlotStats, lagSeconds float64) // each probe's reading, for the console's chart
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
	if p.onSample != nil {
		p.onSample(slot, p.metrics.LagSeconds())
	}
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
func readyz(stream *cdc.Stream, m *outbox.Metrics, maxLag time.Duration) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		state, lag := stream.Health(), m.LagSeconds()
		ok := state == cdc.Streaming || state == cdc.Standby
		if maxLag > 0 && lag > maxLag.Seconds() {
			ok = false
		}
		status := http.StatusOK
		if !ok {
			status = http.StatusServiceUnavailable
		}
		w.Header().Set("content-type", "application/json")
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(map[string]any{"ready": ok, "state": state, "lag_seconds": lag})
	}
}

// statusOutput is what `walhook status --json` prints.
type statusOutput struct {
	Slot      string            `json:"slot"`
	SlotStats pgstore.SlotStats `json:"slot_stats"`
	Report    *pgstore.Report   `json:"report"` // nil when no walhook has streamed yet
	// Hosts is the slot on every host database_url lists, when it lists more
	// than one: whether a standby has a synchronised copy to fail over to.
	Hosts         []cdc.SlotCopy          `json:"hosts,omitempty"`
	Subscriptions []subscriptionStatusRow `json:"subscriptions"`
}

type subscriptionStatusRow struct {
	ID     string `json:"id"`
	Source string `json:"source"` // config or api
	outbox.SubscriptionReport
	pgstore.AttemptSummary // from the attempt log (docs/attempts.md)
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
	summaries, err := store.AttemptSummaries(ctx)
	if err != nil {
		return err
	}
	o := statusOutput{Slot: cfg.Slot, SlotStats: slot, Report: report, Subscriptions: []subscriptionStatusRow{}}
	if hosts, err := cdc.SlotCopies(ctx, cfg.DatabaseURL, cfg.Slot, 5*time.Second); err == nil && len(hosts) > 1 {
		o.Hosts = hosts
	}
	add := func(id, source string) {
		r := subscriptionStatusRow{ID: id, Source: source, AttemptSummary: summaries[id]}
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
		if st, err := store.ReadState(ctx); err == nil && st != nil {
			active = fmt.Sprintf("SLOT MISSING although walhook delivered through it (up to outbox id %d): "+
				"lost in a failover or dropped; run walhook recover", st.HighWater)
		}
	}
	fmt.Fprintf(tw, "slot\t%s\nactive\t%s\nconfirmed flush\t%s\nlag\t%s", cfg.Slot, active, slot.ConfirmedFlush, humanBytes(slot.LagBytes))
	if report != nil {
		fmt.Fprintf(tw, ", %.1fs (reported %s ago by %s)", report.LagSeconds, time.Since(report.ReportedAt).Round(time.Second), report.Host)
	}
	fmt.Fprintf(tw, "\nretained WAL\t%s\n", humanBytes(slot.RetainedBytes))
	if slot.Exists {
		fmt.Fprintf(tw, "failover\t%s\n", failoverText(slot))
	}
	if reason := invalidated(slot); reason != "" {
		fmt.Fprintf(tw, "INVALIDATED\t%s: the slot cannot be streamed any more; run walhook recover (docs/operations.md, \"Failover\")\n", reason)
	}
	for _, h := range o.Hosts {
		fmt.Fprintf(tw, "host %s\t%s\n", h.Host, hostText(h))
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "SUBSCRIPTION\tSOURCE\tPENDING\tOLDEST PENDING\tPARKED\tDEAD\tLAST SUCCESS\tLAST FAILURE")
	for _, s := range o.Subscriptions {
		failure := ago(s.LastFailure)
		if s.LastFailure != nil {
			if s.LastFailureStatus != nil {
				failure += fmt.Sprintf(" (%d)", *s.LastFailureStatus)
			} else {
				failure += " (no response)"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%.1fs\t%d\t%d\t%s\t%s\n", s.ID, s.Source, s.Pending, s.OldestPendingSeconds,
			s.Parked, s.Dead, ago(s.LastSuccess), failure)
	}
	return tw.Flush()
}

// ago is how long ago t was, "-" for never.
func ago(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return time.Since(*t).Round(time.Second).String() + " ago"
}

// invalidated says why the server invalidated the slot; "" while it is usable.
func invalidated(slot pgstore.SlotStats) string {
	switch {
	case slot.InvalidationReason != nil:
		return *slot.InvalidationReason
	case slot.WALStatus == "lost":
		return "wal_removed"
	case slot.Conflicting != nil && *slot.Conflicting:
		return "conflicting"
	}
	return ""
}

// failoverText says whether the slot is a failover slot and what the primary
// waits for before it sends walhook a change.
func failoverText(slot pgstore.SlotStats) string {
	switch {
	case slot.Failover == nil:
		return "no (failover slots need PostgreSQL 17): a failover loses the slot; `walhook recover` on the new primary"
	case !*slot.Failover:
		return "no: not a failover slot (slot_failover; `walhook setup` makes it one while walhook is stopped)"
	}
	t := "yes"
	if slot.Synced != nil && *slot.Synced {
		t += ", synchronised from a primary (this server was a standby)"
	}
	if w := slot.SynchronizedStandbySlots; w != nil && *w != "" {
		t += "; changes wait for the standby slots " + *w
	} else {
		t += "; synchronized_standby_slots is empty: a promoted standby may lack changes walhook was sent"
	}
	return t
}

// hostText describes the slot on one host of database_url.
func hostText(h cdc.SlotCopy) string {
	switch {
	case h.Error != "":
		return "unreachable: " + h.Error
	case h.Role == "primary" && h.Exists:
		return "primary, has the slot"
	case h.Role == "primary":
		return "primary, SLOT MISSING"
	case !h.Exists:
		return "standby, NO COPY of the slot: a failover to it loses the slot"
	case h.Invalidation != "":
		return "standby, copy invalidated (" + h.Invalidation + "): a failover to it loses the slot"
	case h.Synced == nil || !*h.Synced:
		return "standby, has a slot of that name that is not synchronised from the primary"
	case h.Temporary:
		return "standby, copy not yet persisted (catching up with the primary's slot): a failover now loses the slot"
	}
	return "standby, synchronised copy at " + h.ConfirmedFlush
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
