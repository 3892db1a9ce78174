package main

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/relay"
)

// RelayConfig is the `relay:` section: with it, `walhook run` publishes routed
// deliveries to NATS JetStream and `walhook deliver` workers send them
// (docs/scale-out.md). Without it walhook runs in direct mode and never
// connects to NATS.
type RelayConfig struct {
	URL             string          `yaml:"url"`              // nats://host:4222[,nats://…]; required
	Stream          string          `yaml:"stream"`           // JetStream stream; default WALHOOK
	Partitions      *int            `yaml:"partitions"`       // default 64; 1 to 1024
	Replicas        *int            `yaml:"replicas"`         // default 3; 1 for single-node NATS (1, 3 or 5)
	DuplicateWindow outbox.Duration `yaml:"duplicate_window"` // the stream's duplicate window; default 10m
	CredentialsFile string          `yaml:"credentials_file"` // NATS .creds file
	NkeySeedFile    string          `yaml:"nkey_seed_file"`   // nkey seed file
	TLSCAFile       string          `yaml:"tls_ca_file"`      // CA bundle to verify the servers
	TLSCertFile     string          `yaml:"tls_cert_file"`    // client certificate (with tls_key_file)
	TLSKeyFile      string          `yaml:"tls_key_file"`     // client key
	TLSServerName   string          `yaml:"tls_server_name"`  // server name to verify
	AckWait         outbox.Duration `yaml:"ack_wait"`         // workers: consumers' AckWait (held messages get InProgress); default 30s
}

var streamName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// resolveRelay checks the relay section and returns the relay's settings (nil
// without a relay section, or when the section has errors) and the workers'
// ack_wait (0: the default); errors name the key.
func (c *Config) resolveRelay() (*relay.Config, time.Duration, []error) {
	r := c.Relay
	if r == nil {
		return nil, 0, nil
	}
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	rc := relay.Config{URL: r.URL, Stream: r.Stream, CredentialsFile: r.CredentialsFile, NkeySeedFile: r.NkeySeedFile,
		TLSCA: r.TLSCAFile, TLSCert: r.TLSCertFile, TLSKey: r.TLSKeyFile, TLSServerName: r.TLSServerName}
	if r.URL == "" {
		bad("relay.url: required (nats://host:4222, several comma-separated)")
	}
	for _, u := range strings.Split(r.URL, ",") {
		if r.URL == "" {
			break
		}
		p, err := url.Parse(strings.TrimSpace(u))
		if err != nil || p.Host == "" || (p.Scheme != "nats" && p.Scheme != "tls" && p.Scheme != "ws" && p.Scheme != "wss") {
			bad("relay.url: each server must be nats://, tls://, ws:// or wss:// with a host")
			break
		}
	}
	if r.Stream != "" && !streamName.MatchString(r.Stream) {
		bad("relay.stream: %q must be 1 to 64 letters, digits, - and _", r.Stream)
	}
	if r.Partitions != nil {
		if rc.Partitions = *r.Partitions; rc.Partitions < 1 || rc.Partitions > 1024 {
			bad("relay.partitions: %d must be from 1 to 1024; default %d", *r.Partitions, relay.DefaultPartitions)
		}
	}
	if r.Replicas != nil {
		if rc.Replicas = *r.Replicas; rc.Replicas != 1 && rc.Replicas != 3 && rc.Replicas != 5 {
			bad("relay.replicas: %d must be 1, 3 or 5; default %d", *r.Replicas, relay.DefaultReplicas)
		}
	}
	dur := func(key string, v outbox.Duration, least time.Duration) time.Duration {
		if !v.Set {
			return 0
		}
		d, err := time.ParseDuration(v.Raw)
		if err != nil || d < least {
			bad("relay.%s: %q is not a duration of at least %s", key, v.Raw, least)
			return 0
		}
		return d
	}
	rc.Duplicates = dur("duplicate_window", r.DuplicateWindow, time.Second)
	ackWait := dur("ack_wait", r.AckWait, 3*time.Second)
	for _, f := range []struct{ key, path string }{
		{"credentials_file", r.CredentialsFile}, {"nkey_seed_file", r.NkeySeedFile},
		{"tls_ca_file", r.TLSCAFile}, {"tls_cert_file", r.TLSCertFile}, {"tls_key_file", r.TLSKeyFile},
	} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			bad("relay.%s: %v", f.key, errors.Unwrap(err))
		}
	}
	if r.CredentialsFile != "" && r.NkeySeedFile != "" {
		bad("relay.nkey_seed_file: give credentials_file or nkey_seed_file, not both")
	}
	if (r.TLSCertFile == "") != (r.TLSKeyFile == "") {
		bad("relay.tls_cert_file: tls_cert_file and tls_key_file go together")
	}
	if len(errs) > 0 {
		return nil, 0, errs
	}
	rc = rc.WithDefaults()
	return &rc, ackWait, nil
}

// relaySecrets are the passwords a NATS URL may carry.
func (c *Config) relaySecrets() []string {
	if c.Relay == nil {
		return nil
	}
	var s []string
	for _, u := range strings.Split(c.Relay.URL, ",") {
		if p, err := url.Parse(strings.TrimSpace(u)); err == nil && p.User != nil {
			if pw, ok := p.User.Password(); ok && pw != "" {
				s = append(s, pw, url.QueryEscape(pw), url.PathEscape(pw))
			} else if name := p.User.Username(); name != "" {
				s = append(s, name) // a token in the user part
			}
		}
	}
	return s
}
