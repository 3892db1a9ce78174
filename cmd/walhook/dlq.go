package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/walhook/walhook/outbox/pgstore"
)

// dlqFlags are the verb and filters of `walhook dlq`.
type dlqFlags struct {
	verb         string
	subscription string
	since, until string
	id           int64
	all, asJSON  bool
	limit        int
}

func (f *dlqFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.subscription, "subscription", "", "only this subscription's dead letters")
	fs.StringVar(&f.since, "since", "", "created at or after: RFC 3339 time, or a duration ago (24h)")
	fs.StringVar(&f.until, "until", "", "created before: RFC 3339 time, or a duration ago")
	fs.Int64Var(&f.id, "id", 0, "one dead letter")
	fs.BoolVar(&f.all, "all", false, "every dead letter (replay and purge need a filter or --all)")
	fs.BoolVar(&f.asJSON, "json", false, "print JSON (list)")
	fs.IntVar(&f.limit, "limit", 100, "at most this many (list)")
}

// ParseWhen reads an RFC 3339 time or a duration ago.
func parseWhen(flag, v string, now time.Time) (*time.Time, error) {
	if v == "" {
		return nil, nil
	}
	if t, err := time.Parse(time.RFC3339, v); err == nil {
		return &t, nil
	}
	if d, err := time.ParseDuration(v); err == nil && d >= 0 {
		t := now.Add(-d)
		return &t, nil
	}
	return nil, usageError("--%s: %q is neither an RFC 3339 time nor a duration", flag, v)
}

// dlqCommand is `walhook dlq list|replay|purge`.
func dlqCommand(ctx context.Context, cfg *Settings, f dlqFlags, out io.Writer) error {
	switch f.verb {
	case "list", "replay", "purge":
	default:
		return usageError("walhook dlq list|replay|purge [--subscription S] [--since T] [--until T] [--id N] [--all] (got %q)", f.verb)
	}
	filter := pgstore.DeadLetterFilter{ID: f.id, Subscription: f.subscription, All: f.all || f.verb == "list"}
	var err error
	now := time.Now()
	if filter.Since, err = parseWhen("since", f.since, now); err != nil {
		return err
	}
	if filter.Until, err = parseWhen("until", f.until, now); err != nil {
		return err
	}
	if filter.Empty() {
		return usageError("walhook dlq %s: give a filter (--subscription, --since, --until, --id) or --all", f.verb)
	}
	pool, err := connectPool(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	store := pgstore.New(pool, cfg.Slot)
	switch f.verb {
	case "replay":
		n, err := store.ReplayDeadLetters(ctx, filter)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "replayed %d dead letters (they are delivered again with their original webhook-id)\n", n)
	case "purge":
		n, err := store.PurgeDeadLetters(ctx, filter)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "purged %d dead letters\n", n)
	case "list":
		rows, err := store.ListDeadLetters(ctx, filter, f.limit)
		if err != nil {
			return err
		}
		if f.asJSON {
			enc := json.NewEncoder(out)
			enc.SetIndent("", "  ")
			if rows == nil {
				rows = []pgstore.DeadLetterRow{}
			}
			return enc.Encode(rows)
		}
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tSUBSCRIPTION\tEVENT\tTYPE\tSTATUS\tATTEMPTS\tCREATED\tREASON")
		for _, d := range rows {
			status := "-"
			if d.Status != nil {
				status = fmt.Sprint(*d.Status)
			}
			reason := d.Reason
			if len(reason) > 60 {
				reason = reason[:60] + "…"
			}
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", d.ID, deref(d.Subscription), d.EventID, deref(d.Event),
				status, d.Attempts, d.CreatedAt.UTC().Format(time.RFC3339), strings.ReplaceAll(reason, "\n", " "))
		}
		return tw.Flush()
	}
	return nil
}
