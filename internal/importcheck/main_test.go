package main

import "testing"

func TestMatches(t *testing.T) {
	for _, c := range []struct {
		pattern, path string
		want          bool
	}{
		{"outbox", module + "/outbox", true},
		{"outbox", module + "/outbox/pgstore", false},
		{"sender/...", module + "/sender", true},
		{"sender/...", module + "/sender/ssrf", true},
		{"sender/...", module + "/senderx", false},
		{"github.com/jackc/pgx/...", "github.com/jackc/pgx/v5/pgconn", true},
		{"net/http", "net/http", true},
		{"net/http", "net/http/httptest", false},
		{"...", module + "/cmd/walhook", true},
		{"...", "fmt", false},
		{"cmd/...", module + "/cmd/walhook", true},
	} {
		if got := matches(c.pattern, c.path); got != c.want {
			t.Errorf("matches(%q, %q) = %v, want %v", c.pattern, c.path, got, c.want)
		}
	}
}
