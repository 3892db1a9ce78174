package main

import (
	"os"
	"strings"
	"testing"
)

// FuzzConfig: any file is a config or an error, never a panic, and a secret
// of the file never shows in the error.
func FuzzConfig(f *testing.F) {
	example, err := os.ReadFile("../../deploy/walhook.example.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(example)
	f.Add([]byte("database_url: postgres://a:pw@h/db\nallow_targets: ['a b', 10.0.0.0/8]\nlisten: ':x'\n"))
	f.Add([]byte("database_url: x\n---\nadmin_token: t\n"))
	f.Add([]byte("subscriptions:\n  - id: a\n    events: ['a..b']\n    timeout: 1000h\n    batch_max: 99999\n"))
	f.Add([]byte("max_timeout: 1s\ndefaults: {timeout: 2s, max_in_flight: -1}\nmetrics_listen: 127.0.0.1:0\n"))
	f.Add([]byte("unauthenticated_rate: .nan\nmax_connections: 0\nauth_cache_ttl: 31s\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := parseConfig("fuzz.yaml", data, noEnv)
		if err != nil {
			return
		}
		err = c.Validate(true)
		if err == nil {
			return
		}
		for _, s := range c.secrets() {
			if len(s) >= 8 && strings.Contains(err.Error(), s) {
				t.Fatalf("the error shows a secret %q: %v", s, err)
			}
		}
	})
}
