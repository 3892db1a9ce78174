package pgtest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// StandbySlot is the physical replication slot a standby of StartPair streams from.
const StandbySlot = "standby1"

// StartPair starts a primary and a physical standby streaming from it through
// the replication slot StandbySlot, with synchronous replication: a commit on
// the primary returns once the standby has flushed it. settings go to both.
// On PostgreSQL 17 and newer the standby synchronises failover slots
// (sync_replication_slots) and the primary's logical walsenders wait for it
// (synchronized_standby_slots), so that a promoted standby has every change a
// logical consumer was sent.
//
// The standby is a cold copy of the primary's data directory (the binaries
// ship no pg_basebackup): the primary is stopped cleanly once, right after
// it was created, copied, and started again.
func StartPair(ctx context.Context, settings ...string) (primary, standby *Cluster, err error) {
	primary, err = Start(ctx, settings...)
	if err != nil {
		return nil, nil, err
	}
	fail := func(err error) (*Cluster, *Cluster, error) {
		primary.Stop()
		if standby != nil {
			standby.Stop()
		}
		return nil, nil, err
	}
	version, err := primary.Version(ctx)
	if err != nil {
		return fail(err)
	}
	conn, err := pgx.Connect(ctx, primary.URL)
	if err != nil {
		return fail(fmt.Errorf("pgtest: connect to the primary: %w", err))
	}
	_, err = conn.Exec(ctx, `SELECT pg_create_physical_replication_slot($1, true)`, StandbySlot)
	conn.Close(ctx)
	if err != nil {
		return fail(fmt.Errorf("pgtest: create the standby's slot: %w", err))
	}
	if err := primary.pgctl(ctx, "-m", "fast", "-w", "stop"); err != nil {
		return fail(err)
	}

	dir, err := os.MkdirTemp("", "walhook-pg-standby-")
	if err != nil {
		return fail(fmt.Errorf("pgtest: temp dir: %w", err))
	}
	standby = &Cluster{BinDir: primary.BinDir, dir: dir, settings: append([]string{"hot_standby_feedback=on"}, settings...)}
	if version >= 170000 {
		standby.settings = append(standby.settings, "sync_replication_slots=on")
	}
	if err := standby.own(); err != nil {
		return fail(err)
	}
	if out, err := standby.command(ctx, "cp", "-a", primary.data(), standby.data()).CombinedOutput(); err != nil {
		return fail(fmt.Errorf("pgtest: copy the data directory: %v: %s", err, out))
	}
	os.Remove(filepath.Join(standby.data(), "postmaster.opts"))
	// primary_conninfo names a database: slot synchronisation needs one.
	conf := fmt.Sprintf("primary_conninfo = 'host=127.0.0.1 port=%d user=postgres dbname=postgres application_name=%s'\n"+
		"primary_slot_name = '%s'\n", primary.port, StandbySlot, StandbySlot)
	if err := standby.appendFile(ctx, "postgresql.auto.conf", conf); err != nil {
		return fail(err)
	}
	if err := standby.appendFile(ctx, "standby.signal", ""); err != nil {
		return fail(err)
	}
	sync := "synchronous_standby_names = '" + StandbySlot + "'\n"
	if version >= 170000 {
		sync += "synchronized_standby_slots = '" + StandbySlot + "'\n"
	}
	if err := primary.appendFile(ctx, "postgresql.auto.conf", sync); err != nil {
		return fail(err)
	}
	if err := primary.start(ctx); err != nil {
		return fail(err)
	}
	if err := standby.start(ctx); err != nil {
		return fail(err)
	}
	// Streaming, and synchronous: the standby confirms what the primary commits.
	if err := primary.waitFor(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_replication WHERE application_name = $1
		AND state = 'streaming' AND sync_state = 'sync')`, StandbySlot); err != nil {
		return fail(fmt.Errorf("pgtest: the standby does not stream: %w", err))
	}
	return primary, standby, nil
}

// Version returns the server's server_version_num (170010 for 17.10).
func (c *Cluster) Version(ctx context.Context) (int, error) {
	conn, err := pgx.Connect(ctx, c.URL)
	if err != nil {
		return 0, fmt.Errorf("pgtest: connect: %w", err)
	}
	defer conn.Close(ctx)
	var v string
	if err := conn.QueryRow(ctx, `SHOW server_version_num`).Scan(&v); err != nil {
		return 0, fmt.Errorf("pgtest: server_version_num: %w", err)
	}
	return strconv.Atoi(v)
}

// Promote ends the standby's recovery: it becomes a primary.
func (c *Cluster) Promote(ctx context.Context) error {
	return c.pgctl(ctx, "-w", "-t", "60", "promote")
}

// Port is the server's TCP port on 127.0.0.1.
func (c *Cluster) Port() int { return c.port }

func (c *Cluster) pgctl(ctx context.Context, args ...string) error {
	args = append([]string{filepath.Join(c.BinDir, "pg_ctl"), "-D", c.data()}, args...)
	if out, err := c.command(ctx, args...).CombinedOutput(); err != nil {
		log, _ := os.ReadFile(c.logFile())
		return fmt.Errorf("pgtest: pg_ctl %s: %v: %s\n%s", strings.Join(args[3:], " "), err, out, log)
	}
	return nil
}

// appendFile appends text to a file of the data directory, as the server's
// OS user.
func (c *Cluster) appendFile(ctx context.Context, name, text string) error {
	cmd := c.command(ctx, "sh", "-c", `cat >> "$1"`, "sh", filepath.Join(c.data(), name))
	cmd.Stdin = strings.NewReader(text)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("pgtest: write %s: %v: %s", name, err, out)
	}
	return nil
}

// waitFor polls a query returning one boolean until it is true.
func (c *Cluster) waitFor(ctx context.Context, q string, args ...any) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.URL)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	for {
		var ok bool
		if err := conn.QueryRow(ctx, q, args...).Scan(&ok); err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond): // poll interval
		}
	}
}
