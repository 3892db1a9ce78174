package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/walhook/walhook/api"
	"github.com/walhook/walhook/outbox/pgstore"
)

// attemptFlags are the filters of `walhook attempts`: those of the API's
// attempts endpoints.
type attemptFlags struct {
	subscription, eventID string
	status                string
	since, until          string
	cursor                int64
	limit                 int
	asJSON                bool
}

func (f *attemptFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.subscription, "subscription", "", "this subscription's attempts")
	fs.StringVar(&f.eventID, "event-id", "", "the attempts that carried this event")
	fs.StringVar(&f.status, "status", "", "failed, succeeded, or an HTTP status code")
	fs.StringVar(&f.since, "since", "", "at or after: RFC 3339 time, or a duration ago (1h)")
	fs.StringVar(&f.until, "until", "", "before: RFC 3339 time, or a duration ago")
	fs.Int64Var(&f.cursor, "cursor", 0, "the next page: the cursor the previous page printed")
	fs.IntVar(&f.limit, "limit", 50, "at most this many (1 to 1000)")
	fs.BoolVar(&f.asJSON, "json", false, "print JSON")
}

// attemptsCommand is `walhook attempts`: the attempt log, newest first.
func attemptsCommand(ctx context.Context, cfg *Settings, f attemptFlags, out io.Writer) error {
	if f.subscription == "" && f.eventID == "" {
		return usageError("walhook attempts: give --subscription or --event-id")
	}
	if f.limit < 1 || f.limit > 1000 {
		return usageError("--limit: %d is not between 1 and 1000", f.limit)
	}
	filter := pgstore.AttemptFilter{Subscription: f.subscription, EventID: f.eventID, Before: f.cursor}
	switch f.status {
	case "":
	case "failed", "succeeded":
		failed := f.status == "failed"
		filter.Failed = &failed
	default:
		code, err := strconv.Atoi(f.status)
		if err != nil || code < 100 || code > 599 {
			return usageError("--status: %q is not failed, succeeded or an HTTP status code", f.status)
		}
		filter.Status = code
	}
	var err error
	now := time.Now()
	if filter.Since, err = parseWhen("since", f.since, now); err != nil {
		return err
	}
	if filter.Until, err = parseWhen("until", f.until, now); err != nil {
		return err
	}
	pool, err := connectPool(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	rows, next, err := pgstore.New(pool, cfg.Slot).ListAttempts(ctx, filter, f.limit)
	if err != nil {
		return err
	}
	if f.asJSON {
		page := api.AttemptPage{Attempts: rows}
		if page.Attempts == nil {
			page.Attempts = []pgstore.AttemptRow{}
		}
		if next > 0 {
			cur := strconv.FormatInt(next, 10)
			page.NextCursor = &cur
		}
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(page)
	}
	if cfg.attemptLog == pgstore.AttemptLogOff {
		fmt.Fprintln(out, "(attempt_log is off in this config: nothing new is logged)")
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "AT\tSUBSCRIPTION\tWEBHOOK-ID\tATTEMPT\tEVENTS\tOUTCOME\tSTATUS\tDURATION\tREASON")
	for _, a := range rows {
		status := a.Class
		if a.Status != nil {
			status = strconv.Itoa(int(*a.Status))
		}
		events := strings.Join(a.EventIDs, ",")
		if int(a.EventCount) > len(a.EventIDs) {
			events = fmt.Sprintf("%d (%s … %s)", a.EventCount, a.EventIDs[0], a.EventIDs[len(a.EventIDs)-1])
		}
		reason := strings.ReplaceAll(deref(a.Reason), "\n", " ")
		if len(reason) > 60 {
			reason = reason[:60] + "…"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%.1fms\t%s\n", a.At.UTC().Format(time.RFC3339Nano), a.Subscription,
			a.WebhookID, a.Attempt, events, a.Outcome, status, a.DurationMS, reason)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if next > 0 {
		fmt.Fprintf(out, "more: --cursor %d\n", next)
	}
	return nil
}
