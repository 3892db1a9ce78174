package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/walhook/walhook/cdc"
	"github.com/walhook/walhook/console"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/outbox/pgstore"
)

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
	Slot      string            `json:"slot"`
	SlotStats pgstore.SlotStats `json:"slot_stats"`
	Report    *pgstore.Report   `json:"report"` // nil when no walhook has streamed yet
	// Hosts is the slot on every host database_url lists, when it lists more
	// than one: whether a standby has a synchronised copy to fail over to.
	Hosts         []cdc.SlotCopy          `json:"hosts,omitempty"`
	Subscriptions []subscriptionStatusRow `json:"subscriptions"`
	Relay         *relayStatus            `json:"relay,omitempty"` // relay mode only
}

type subscriptionStatusRow struct {
	ID     string `json:"id"`
	Source string `json:"source"` // config or api
	outbox.SubscriptionReport
	pgstore.AttemptSummary // from the attempt log (docs/attempts.md)
}

// status prints the slot and every subscription, from the database alone.
func status(ctx context.Context, cfg *Settings, asJSON bool, out io.Writer) error {
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
		if st, err := store.ReadState(ctx); err == nil && st != nil {
			active = fmt.Sprintf("SLOT MISSING although walhook delivered through it (up to outbox id %d): "+
				"lost in a failover or dropped; run walhook recover", st.HighWater)
		}
	}
	fmt.Fprintf(tw, "slot\t%s\nactive\t%s\nconfirmed flush\t%s\nlag\t%s", cfg.Slot, active, slot.ConfirmedFlush, console.HumanBytes(slot.LagBytes))
	if report != nil {
		fmt.Fprintf(tw, ", %.1fs (reported %s ago by %s)", report.LagSeconds, time.Since(report.ReportedAt).Round(time.Second), report.Host)
	}
	fmt.Fprintf(tw, "\nretained WAL\t%s\n", console.HumanBytes(slot.RetainedBytes))
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
	printRelay(tw, o.Relay)
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
