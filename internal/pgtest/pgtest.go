// Package pgtest gives tests a real PostgreSQL with wal_level=logical.
//
// One throwaway cluster serves a whole `go test` run: `make test` starts it with
// pgtmp and passes its URL in WALHOOK_TEST_DATABASE_URL; a package run on its own
// starts one in Main. Each test gets its own database (and so its own walhook
// schema, publication and slot), so tests run in parallel and leave nothing behind.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"
)

// Main runs the tests of a package against the shared cluster. When none was
// given, the first test that needs PostgreSQL starts one for this package, and
// Main stops it at the end (fuzz workers and tests without PostgreSQL start none).
// Main also fails the run if goroutines are left behind. Use it from TestMain.
func Main(m *testing.M) int {
	code := m.Run()
	if own != nil {
		own.Stop()
	}
	if code == 0 {
		if err := goleak.Find(natsServerStrays...); err != nil {
			fmt.Fprintf(os.Stderr, "pgtest: goroutines left behind: %v\n", err)
			code = 1
		}
	}
	return code
}

// natsServerStrays are goroutines nats-server itself can leave behind: a
// stream a client asked for while the server shut down gets a file store
// that nothing stops (its state flusher, and the access-time ticker it keeps
// registered). Seen in CI after a relay test killed a sidecar mid-start;
// natstest shuts every server down and waits for it, so these are the
// server's, not a test's.
var natsServerStrays = []goleak.Option{
	goleak.IgnoreTopFunction("github.com/nats-io/nats-server/v2/server.(*fileStore).flushStreamStateLoop"),
	goleak.IgnoreTopFunction("github.com/nats-io/nats-server/v2/server/ats.Register.func1"),
}

var (
	startOnce sync.Once
	own       *Cluster // started by this package, if any
	ownErr    error
)

// baseURL returns the shared cluster's URL, starting one for this package if needed.
func baseURL() (string, error) {
	if u := os.Getenv(EnvURL); u != "" {
		return u, nil
	}
	startOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		own, ownErr = Start(ctx)
	})
	if ownErr != nil {
		return "", ownErr
	}
	return own.URL, nil
}

// ServerVersion is the shared cluster's server_version_num (170010 for 17.10):
// tests of what only some versions have ask it before they start servers.
func ServerVersion(t testing.TB) int {
	t.Helper()
	base, err := baseURL()
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, base)
	if err != nil {
		t.Fatalf("pgtest: connect: %v", err)
	}
	defer conn.Close(ctx)
	var v string
	if err := conn.QueryRow(ctx, `SHOW server_version_num`).Scan(&v); err != nil {
		t.Fatalf("pgtest: server_version_num: %v", err)
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		t.Fatalf("pgtest: server_version_num %q: %v", v, err)
	}
	return n
}

// DB is one test's database.
type DB struct {
	Name string
	URL  string // superuser URL of this database
	Pool *pgxpool.Pool
}

// New creates a fresh database for t and drops it (and its replication slots) when
// t ends.
func New(t testing.TB) *DB {
	t.Helper()
	base, err := baseURL()
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	admin, err := pgx.Connect(ctx, base)
	if err != nil {
		t.Fatalf("pgtest: connect: %v", err)
	}
	defer admin.Close(ctx)

	var b [6]byte
	rand.Read(b[:])
	name := "t_" + hex.EncodeToString(b[:])
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("pgtest: create database: %v", err)
	}
	u, _ := url.Parse(base)
	u.Path = "/" + name
	db := &DB{Name: name, URL: u.String()}
	db.Pool, err = pgxpool.New(ctx, db.URL)
	if err != nil {
		t.Fatalf("pgtest: pool: %v", err)
	}
	t.Cleanup(func() {
		db.Pool.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		admin, err := pgx.Connect(ctx, base)
		if err != nil {
			t.Errorf("pgtest: cleanup connect: %v", err)
			return
		}
		defer admin.Close(ctx)
		// An inactive slot pins WAL forever: drop this database's slots first.
		if err := dropSlots(ctx, admin, name); err != nil {
			t.Errorf("pgtest: drop slots: %v", err)
		}
		if _, err := admin.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("pgtest: drop database: %v", err)
		}
	})
	return db
}

// dropSlots drops the replication slots of database dbname, terminating walsenders
// that still hold them.
func dropSlots(ctx context.Context, conn *pgx.Conn, dbname string) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := conn.Exec(ctx, `
			SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
			 WHERE database = $1 AND active_pid IS NOT NULL`, dbname)
		if err != nil {
			return err
		}
		_, err = conn.Exec(ctx, `
			SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
			 WHERE database = $1 AND NOT active`, dbname)
		if err == nil {
			var left int
			if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots WHERE database = $1`, dbname).Scan(&left); err != nil {
				return err
			}
			if left == 0 {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("slots of %s still present: %v", dbname, err)
		}
		time.Sleep(50 * time.Millisecond) // poll interval while walsenders exit
	}
}
