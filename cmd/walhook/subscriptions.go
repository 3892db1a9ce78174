package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/walhook/walhook/api"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/outbox/pgstore"
	"github.com/walhook/walhook/sender"
)

// subscriptionsCommand is `walhook subscriptions list|add|rm`, for operators: it
// works on walhook.subscriptions directly (a running walhook picks changes up
// through the stream).
func subscriptionsCommand(ctx context.Context, cfg *Config, args []string, out io.Writer) error {
	if len(args) == 0 {
		return usageError("walhook subscriptions list|add|rm")
	}
	verb, args := args[0], args[1:]
	fs := flag.NewFlagSet("walhook subscriptions "+verb, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var events multiFlag
	target := fs.String("target-url", "", "where to POST hooks (add)")
	tenant := fs.String("tenant", "", "only this tenant's events (add); filter (list)")
	secret := fs.String("secret", "", "signing secret, whsec_... (add; default: generated)")
	fs.Var(&events, "event", "event name or pattern, repeatable (add)")
	if err := fs.Parse(args); err != nil {
		return usageError("walhook subscriptions %s: %v", verb, err)
	}
	pool, err := pgxpool.New(ctx, cfg.DatabaseURL)
	if err != nil {
		return fmt.Errorf("connect to database: %w", err)
	}
	defer pool.Close()
	store := pgstore.New(pool, cfg.Slot)

	switch verb {
	case "list":
		var t *string
		if *tenant != "" {
			t = tenant
		}
		rows, err := store.ListSubscriptions(ctx, t)
		if err != nil {
			return fmt.Errorf("list subscriptions: %w", err)
		}
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tEVENTS\tTARGET\tTENANT\tSOURCE")
		for _, s := range cfg.subs {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\tconfig\n", s.ID, strings.Join(s.Events, ","), s.TargetURL, s.Tenant)
		}
		for _, r := range rows {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\tapi\n", r.ID, strings.Join(r.Events, ","), r.TargetURL, deref(r.Tenant))
		}
		return tw.Flush()
	case "add":
		if len(events) == 0 || *target == "" {
			return usageError("walhook subscriptions add --event E [--event E2] --target-url URL [--tenant T] [--secret whsec_...]")
		}
		for _, p := range events {
			if !outbox.ValidPattern(p) {
				return usageError("--event: %q is not an event name or pattern (contact.updated, contact.*, *)", p)
			}
		}
		if err := cfg.guard.CheckURL(ctx, *target); err != nil {
			return usageError("--target-url: %v (allow_targets can open it)", err)
		}
		row := &outbox.SubscriptionRow{ID: api.NewID(), Events: events, TargetURL: *target, Secret: *secret}
		if row.Secret == "" {
			row.Secret = api.NewSecret()
		} else if _, err := sender.ParseSecret(row.Secret); err != nil {
			return usageError("--secret: %v", err)
		}
		if *tenant != "" {
			row.Tenant = tenant
		}
		if err := store.InsertSubscription(ctx, row); err != nil {
			return fmt.Errorf("add subscription: %w", err)
		}
		fmt.Fprintf(out, "id: %s\nsecret: %s\n", row.ID, row.Secret)
		return nil
	case "rm":
		if fs.NArg() != 1 {
			return usageError("walhook subscriptions rm ID")
		}
		err := store.DeleteSubscriptionStrict(ctx, fs.Arg(0))
		if errors.Is(err, pgstore.ErrNotFound) {
			return fmt.Errorf("subscription %q not found (config-file subscriptions are removed from the config)", fs.Arg(0))
		}
		if err != nil {
			return fmt.Errorf("remove subscription: %w", err)
		}
		fmt.Fprintf(out, "removed %s\n", fs.Arg(0))
		return nil
	}
	return usageError("walhook subscriptions: unknown verb %q (list, add, rm)", verb)
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// usageError is a mistake in the command line: exit code 2.
type usageErr struct{ msg string }

func (e usageErr) Error() string { return e.msg }

func usageError(format string, args ...any) error { return usageErr{fmt.Sprintf(format, args...)} }

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
