package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/walhook/walhook/api"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/outbox/pgstore"
	"github.com/walhook/walhook/sender"
)

// subscriptionFlags are the verb and flags of `walhook subscriptions`.
type subscriptionFlags struct {
	verb                   string
	events                 multiFlag
	target, tenant, secret string
	args                   []string
}

func (f *subscriptionFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.target, "target-url", "", "where to POST hooks (add)")
	fs.StringVar(&f.tenant, "tenant", "", "only this tenant's events (add); filter (list)")
	fs.StringVar(&f.secret, "secret", "", "signing secret, whsec_... (add; default: generated)")
	fs.Var(&f.events, "event", "event name or pattern, repeatable (add)")
}

// subscriptionsCommand is `walhook subscriptions list|add|rm`, for operators: it
// works on walhook.subscriptions directly (a running walhook picks changes up
// through the stream). Subscriptions added here skip the X-Hook-Secret handshake.
func subscriptionsCommand(ctx context.Context, cfg *Settings, f subscriptionFlags, out io.Writer) error {
	verb, events, target, tenant, secret := f.verb, f.events, &f.target, &f.tenant, &f.secret
	switch verb {
	case "list", "add", "rm":
	default:
		return usageError("walhook subscriptions list|add|rm (got %q)", verb)
	}
	pool, err := pgstore.Open(ctx, cfg.DatabaseURL)
	if err != nil {
		return err
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
		fmt.Fprintln(tw, "ID\tEVENTS\tTARGET\tTENANT\tSOURCE\tSTATE")
		for _, s := range cfg.subs {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\tconfig\tenabled\n", s.ID, strings.Join(s.Events, ","), s.TargetURL, s.Tenant)
		}
		for _, r := range rows {
			state := "enabled"
			if r.DisabledAt != nil {
				state = "disabled since " + r.DisabledAt.UTC().Format("2006-01-02T15:04:05Z")
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\tapi\t%s\n", r.ID, strings.Join(r.Events, ","), r.TargetURL, deref(r.Tenant), state)
		}
		return tw.Flush()
	case "add":
		if len(events) == 0 || *target == "" {
			return usageError("walhook subscriptions add --event E [--event E2] --target-url URL [--tenant T] [--secret whsec_...]")
		}
		if err := outbox.CheckPatterns("--event", events); err != nil {
			return usageError("%v", err)
		}
		if err := outbox.CheckTargetURL("--target-url", *target); err != nil {
			return usageError("%v", err)
		}
		if *tenant != "" {
			if err := outbox.CheckText("--tenant", *tenant); err != nil {
				return usageError("%v", err)
			}
		}
		if err := cfg.guard.CheckURL(ctx, *target); err != nil {
			return usageError("--target-url: %v (allow_targets can open it)", err)
		}
		row := &outbox.SubscriptionRow{ID: api.NewID(), Events: events, TargetURL: *target, Secret: *secret}
		if row.Secret == "" {
			row.Secret = sender.NewSecret(cfg.defaults.Signature)
		} else if err := sender.CheckSecret(row.Secret, cfg.defaults.Signature); err != nil {
			return usageError("--secret: %v", err)
		}
		if *tenant != "" {
			row.Tenant = tenant
		}
		if err := store.InsertSubscription(ctx, row); err != nil {
			return fmt.Errorf("add subscription: %w", err)
		}
		fmt.Fprintf(out, "id: %s\nsecret: %s\n", row.ID, row.Secret)
		if pk := sender.PublicKey(row.Secret); pk != "" {
			fmt.Fprintf(out, "public_key: %s\n", pk)
		}
		return nil
	case "rm":
		if len(f.args) != 1 {
			return usageError("walhook subscriptions rm ID")
		}
		id := f.args[0]
		err := store.DeleteSubscriptionStrict(ctx, id)
		if errors.Is(err, pgstore.ErrNotFound) {
			return fmt.Errorf("subscription %q not found (config-file subscriptions are removed from the config)", id)
		}
		if err != nil {
			return fmt.Errorf("remove subscription: %w", err)
		}
		fmt.Fprintf(out, "removed %s\n", id)
		return nil
	}
	return nil
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
