package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/walhook/walhook/cdc"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/sender"
	"github.com/walhook/walhook/sender/ssrf"
	"go.yaml.in/yaml/v3"
)

// Config is walhook's configuration file. Top-level scalar keys can also come
// from the environment as WALHOOK_<KEY> (WALHOOK_DATABASE_URL, ...), which wins
// over the file.
type Config struct {
	DatabaseURL     string               `yaml:"database_url"`     // required
	Listen          string               `yaml:"listen"`           // health endpoint address; default 127.0.0.1:8080
	Slot            string               `yaml:"slot"`             // replication slot; default walhook
	Publication     string               `yaml:"publication"`      // publication; default walhook
	OutboxTable     string               `yaml:"outbox_table"`     // schema.table; default walhook.outbox
	OutboxColumns   map[string]string    `yaml:"outbox_columns"`   // id, event, resource_id, tenant, payload; "" = no such column
	LogLevel        string               `yaml:"log_level"`        // debug, info, warn, error; default info
	AdminToken      string               `yaml:"admin_token"`      // bearer token of the API; required off loopback
	AuthURL         string               `yaml:"auth_url"`         // forward auth for subscribers without the admin token
	AllowTargets    []string             `yaml:"allow_targets"`    // CIDRs or host names API subscriptions may target anyway
	RotationOverlap outbox.Duration      `yaml:"rotation_overlap"` // how long a rotated-out secret keeps signing; default 24h
	StallTimeout    outbox.Duration      `yaml:"stall_timeout"`    // server silence that counts as a stalled stream; default 30s
	ReadyMaxLag     outbox.Duration      `yaml:"ready_max_lag"`    // /readyz fails when replication lag exceeds it; default 0 = off
	ShutdownTimeout outbox.Duration      `yaml:"shutdown_timeout"` // on SIGTERM, how long deliveries in flight may finish; default 15s
	OutboxRetention outbox.Duration      `yaml:"outbox_retention"` // walhook.outbox rows older than this are deleted; default 24h, 0 = keep
	AcceptEmit      *bool                `yaml:"accept_emit"`      // logical messages with prefix walhook (walhook.emit) are events; default true
	EmitRoles       []string             `yaml:"emit_roles"`       // setup: only these roles may EXECUTE walhook.emit; default none = leave its grants alone
	Defaults        outbox.Options       `yaml:"defaults"`
	Subscriptions   []SubscriptionConfig `yaml:"subscriptions"`

	// Derived by Validate.
	table       cdc.Table
	columns     cdc.Columns
	subs        []*outbox.Subscription
	defaults    outbox.DeliveryOptions
	guard       *ssrf.Guard
	overlap     time.Duration
	stall       time.Duration
	readyMaxLag time.Duration
	shutdown    time.Duration
	retention   time.Duration
}

// SubscriptionConfig is one static subscription.
type SubscriptionConfig struct {
	ID             string   `yaml:"id"`
	Events         []string `yaml:"events"`
	Tenant         string   `yaml:"tenant"`
	TargetURL      string   `yaml:"target_url"`
	Secret         string   `yaml:"secret"`
	outbox.Options `yaml:",inline"`
}

// envKeys are the top-level keys that WALHOOK_<KEY> can set.
func (c *Config) envKeys() map[string]*string {
	return map[string]*string{
		"database_url": &c.DatabaseURL,
		"listen":       &c.Listen,
		"slot":         &c.Slot,
		"publication":  &c.Publication,
		"outbox_table": &c.OutboxTable,
		"log_level":    &c.LogLevel,
		"admin_token":  &c.AdminToken,
		"auth_url":     &c.AuthURL,
	}
}

// loadConfig reads the file at path (none when path is ""), then the environment.
func loadConfig(path string, getenv func(string) string) (*Config, error) {
	c := &Config{}
	if path != "" {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("read config: %w", err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(data))
		dec.KnownFields(true)
		if err := dec.Decode(c); err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("config %s: %w", path, err)
		}
	}
	for key, field := range c.envKeys() {
		if v := getenv("WALHOOK_" + strings.ToUpper(key)); v != "" {
			*field = v
		}
	}
	c.withDefaults()
	return c, nil
}

func (c *Config) withDefaults() {
	if c.Listen == "" {
		c.Listen = "127.0.0.1:8080"
	}
	if c.Slot == "" {
		c.Slot = "walhook"
	}
	if c.Publication == "" {
		c.Publication = "walhook"
	}
	if c.OutboxTable == "" {
		c.OutboxTable = cdc.DefaultTable.String()
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
}

// Validate checks every key and derives the typed settings; its error names the
// bad keys. Subscriptions are checked only when withSubscriptions is set (setup
// and teardown do not need them).
func (c *Config) Validate(withSubscriptions bool) error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	if c.DatabaseURL == "" {
		bad("database_url: required (or set WALHOOK_DATABASE_URL)")
	} else if _, err := pgconn.ParseConfig(c.DatabaseURL); err != nil {
		bad("database_url: not a valid PostgreSQL connection string")
	}
	if !cdc.ValidName(c.Slot) {
		bad("slot: %q must be lower-case letters, digits and underscores", c.Slot)
	}
	if !cdc.ValidName(c.Publication) {
		bad("publication: %q must be lower-case letters, digits and underscores", c.Publication)
	}
	var err error
	if c.table, err = cdc.ParseTable(c.OutboxTable); err != nil {
		bad("outbox_table: %v", err)
	} else if c.table == cdc.ControlTable {
		bad("outbox_table: %s is walhook's control table", c.table)
	}
	for i, r := range c.EmitRoles {
		if r == "" || strings.ContainsRune(r, 0) {
			bad("emit_roles[%d]: %q is not a role name", i, r)
		}
	}
	c.columns, err = parseColumns(c.OutboxColumns)
	if err != nil {
		errs = append(errs, err)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad("log_level: %q must be debug, info, warn or error", c.LogLevel)
	}
	defaults, err := c.Defaults.Resolve("defaults.", outbox.DefaultDeliveryOptions)
	if err != nil {
		errs = append(errs, err)
	}
	c.defaults = defaults
	if c.guard, err = ssrf.New(c.AllowTargets); err != nil {
		bad("allow_targets: %v", err)
	}
	if c.AuthURL != "" {
		if u, err := url.Parse(c.AuthURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			bad("auth_url: must be an absolute http:// or https:// URL")
		}
	}
	overlap := c.RotationOverlap
	if !overlap.Set {
		overlap = outbox.Dur(24 * time.Hour)
	}
	if c.overlap, err = time.ParseDuration(overlap.Raw); err != nil || c.overlap < 0 {
		bad("rotation_overlap: %q is not a duration (like 24h)", overlap.Raw)
	}
	for _, d := range []struct {
		key string
		v   outbox.Duration
		dst *time.Duration
		def time.Duration
	}{
		{"stall_timeout", c.StallTimeout, &c.stall, 30 * time.Second},
		{"ready_max_lag", c.ReadyMaxLag, &c.readyMaxLag, 0},
		{"shutdown_timeout", c.ShutdownTimeout, &c.shutdown, 15 * time.Second},
		{"outbox_retention", c.OutboxRetention, &c.retention, 24 * time.Hour},
	} {
		*d.dst = d.def
		if d.v.Set {
			v, err := time.ParseDuration(d.v.Raw)
			if err != nil || v < 0 {
				bad("%s: %q is not a duration (like 30s)", d.key, d.v.Raw)
			}
			*d.dst = v
		}
	}
	if withSubscriptions {
		c.subs = nil
		seen := map[string]bool{}
		for i, sc := range c.Subscriptions {
			s, err := sc.subscription(fmt.Sprintf("subscriptions[%d]", i), defaults, seen)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			c.subs = append(c.subs, s)
		}
	}
	return errors.Join(errs...)
}

func (sc SubscriptionConfig) subscription(key string, defaults outbox.DeliveryOptions, seen map[string]bool) (*outbox.Subscription, error) {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	switch {
	case sc.ID == "":
		bad("%s.id: required", key)
	case seen[sc.ID]:
		bad("%s.id: %q is used twice", key, sc.ID)
	default:
		seen[sc.ID] = true
		key = fmt.Sprintf("subscriptions[%s]", sc.ID)
	}
	if len(sc.Events) == 0 {
		bad("%s.events: required (an event name, a pattern like contact.*, or *)", key)
	}
	for i, p := range sc.Events {
		if !outbox.ValidPattern(p) {
			bad("%s.events[%d]: %q is not an event name or pattern (contact.updated, contact.*, *)", key, i, p)
		}
	}
	if sc.TargetURL == "" {
		bad("%s.target_url: required", key)
	} else if u, err := url.Parse(sc.TargetURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		bad("%s.target_url: must be an absolute http:// or https:// URL", key)
	}
	if sc.Secret == "" {
		bad("%s.secret: required (whsec_ followed by base64 of at least 16 random bytes)", key)
	} else if _, err := sender.ParseSecret(sc.Secret); err != nil {
		bad("%s.secret: %v", key, err)
	}
	opts, err := sc.Options.Resolve(key+".", defaults)
	if err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return &outbox.Subscription{
		ID: sc.ID, Events: sc.Events, Tenant: sc.Tenant, TargetURL: sc.TargetURL, Secret: sc.Secret,
		Delivery: opts, Static: true,
	}, nil
}

func parseColumns(m map[string]string) (cdc.Columns, error) {
	c := cdc.DefaultColumns
	fields := map[string]*string{
		"id": &c.ID, "event": &c.Event, "resource_id": &c.ResourceID, "tenant": &c.Tenant, "payload": &c.Payload,
	}
	var errs []error
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		f, ok := fields[k]
		if !ok {
			errs = append(errs, fmt.Errorf("outbox_columns.%s: unknown (want id, event, resource_id, tenant, payload)", k))
			continue
		}
		*f = m[k]
	}
	if c.ID == "" {
		errs = append(errs, errors.New("outbox_columns.id: must name a column"))
	}
	if c.Event == "" {
		errs = append(errs, errors.New("outbox_columns.event: must name a column"))
	}
	return c, errors.Join(errs...)
}

// apiDisabled says why the API must not be served: off loopback without a token.
func (c *Config) apiDisabled() string {
	if c.AdminToken != "" {
		return ""
	}
	host, _, err := net.SplitHostPort(c.Listen)
	if err == nil && (host == "localhost" || isLoopback(host)) {
		return ""
	}
	return "the API is off: set admin_token to serve it on a non-loopback address (" + c.Listen + ")"
}

func isLoopback(host string) bool {
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

// cdcConfig is the stream's view of c.
func (c *Config) cdcConfig() cdc.Config {
	return cdc.Config{
		DatabaseURL: c.DatabaseURL, Slot: c.Slot, Publication: c.Publication,
		Table: c.table, Columns: c.columns, StallTimeout: c.stall,
		RejectEmit: c.AcceptEmit != nil && !*c.AcceptEmit, EmitRoles: c.EmitRoles,
	}
}

// secrets lists what must never reach logs or errors.
func (c *Config) secrets() []string {
	var s []string
	if pc, err := pgconn.ParseConfig(c.DatabaseURL); err == nil && pc.Password != "" {
		s = append(s, pc.Password, url.QueryEscape(pc.Password), url.PathEscape(pc.Password))
	}
	if c.AdminToken != "" {
		s = append(s, c.AdminToken)
	}
	for _, sub := range c.Subscriptions {
		if sub.Secret != "" {
			s = append(s, sub.Secret, strings.TrimPrefix(sub.Secret, sender.SecretPrefix))
		}
	}
	return s
}
