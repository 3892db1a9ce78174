package main

import (
	"context"
	"net/http"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/walhook/walhook/internal/pgtest"
	"github.com/walhook/walhook/sender/sendertest"
)

// TestPostgresRestartsUnderLoad restarts PostgreSQL (immediate, fast,
// immediate) while an application commits events: walhook reconnects by itself
// and every committed event is delivered.
// ownCluster starts a PostgreSQL of the test's own (restarts would disturb the
// other tests), committing synchronously: an immediate stop may lose
// asynchronous commits.
func ownCluster(t *testing.T, settings ...string) (*pgtest.Cluster, *pgxpool.Pool) {
	cluster, err := pgtest.Start(context.Background(), append([]string{"synchronous_commit=on"}, settings...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cluster.Stop() })
	pool, err := pgxpool.New(context.Background(), cluster.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return cluster, pool
}

func TestPostgresRestartsUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos test")
	}
	t.Parallel()
	ctx := context.Background()
	cluster, pool := ownCluster(t)
	srv := sendertest.NewServer(t, func(int, *sendertest.Request) (int, http.Header) { return http.StatusNoContent, nil })
	e := &env{t: t, db: &pgtest.DB{Name: "restart_test", URL: cluster.URL, Pool: pool}, dir: t.TempDir()}
	e.path = filepath.Join(e.dir, "walhook.yaml")
	e.writeConfig("subscriptions:\n" + sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	r := e.start()

	var mu sync.Mutex
	committed := map[string]bool{}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { // the application: commits, and retries while the server is down
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			var id string
			err := pool.QueryRow(ctx, `INSERT INTO walhook.outbox (event, resource_id) VALUES ('x', 'r' || ($1::int % 7)) RETURNING id::text`, i).Scan(&id)
			if err != nil {
				time.Sleep(20 * time.Millisecond) // the server restarts: the application retries
				continue
			}
			mu.Lock()
			committed[id] = true
			mu.Unlock()
		}
	}()
	count := func() int { mu.Lock(); defer mu.Unlock(); return len(committed) }
	for _, mode := range []string{"immediate", "fast", "immediate"} {
		n := count()
		e.eventually(30*time.Second, "the application to commit more", func() bool { return count() > n+200 })
		if err := cluster.Restart(ctx, mode); err != nil {
			t.Fatal(err)
		}
	}
	n := count()
	e.eventually(30*time.Second, "commits after the last restart", func() bool { return count() > n+200 })
	close(stop)
	<-done
	srv.Wait(t, 120*time.Second, "every committed event", func(reqs []sendertest.Request) bool {
		seen := map[string]bool{}
		for _, q := range reqs {
			seen[decode(t, q.Body).ID] = true
		}
		mu.Lock()
		defer mu.Unlock()
		for id := range committed {
			if !seen[id] {
				return false
			}
		}
		return true
	})
	if r.exited() {
		t.Fatalf("walhook exited instead of reconnecting:\n%s", r.log.String())
	}
	t.Logf("%d committed events delivered across 3 restarts (%d requests)", count(), len(srv.Requests()))
}
