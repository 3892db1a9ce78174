package pgstore

import (
	"context"
	"net/url"
	"strings"
	"testing"

	"github.com/walhook/walhook/internal/pgtest"
)

// TestConnectCommitsDurably: the test server runs with synchronous_commit
// off, as some production servers do; every connection of walhook's pool
// commits durably all the same, and a stronger setting the URL asks for is
// kept.
func TestConnectCommitsDurably(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := pgtest.New(t)
	var server string
	if err := db.Pool.QueryRow(ctx, `SHOW synchronous_commit`).Scan(&server); err != nil || server != "off" {
		t.Fatalf("the test server's synchronous_commit = %q, %v; want off (else this test proves nothing)", server, err)
	}
	for _, c := range []struct{ options, want string }{
		{"", "on"},
		{"-c synchronous_commit=remote_apply", "remote_apply"},
		{"-c synchronous_commit=local", "local"},
	} {
		u, err := url.Parse(db.URL)
		if err != nil {
			t.Fatal(err)
		}
		if c.options != "" {
			q := u.Query()
			q.Set("options", c.options)
			u.RawQuery = strings.ReplaceAll(q.Encode(), "+", "%20") // pgx reads + as itself
		}
		pool, err := Connect(ctx, u.String())
		if err != nil {
			t.Fatal(err)
		}
		// Hold several connections at once: each one is set, not only the first.
		conns := make([]string, 3)
		held := make([]func(), 0, len(conns))
		for i := range conns {
			conn, err := pool.Acquire(ctx)
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, conn.Release)
			if err := conn.QueryRow(ctx, `SHOW synchronous_commit`).Scan(&conns[i]); err != nil {
				t.Fatal(err)
			}
			if conns[i] != c.want {
				t.Errorf("options %q: connection %d has synchronous_commit = %q, want %q", c.options, i, conns[i], c.want)
			}
		}
		for _, release := range held {
			release()
		}
		pool.Close()
	}
}
