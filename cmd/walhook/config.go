package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/walhook/walhook/cdc"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/sender"
	"go.yaml.in/yaml/v3"
)

// Config is walhook's configuration file. Top-level scalar keys can also come
// from the environment as WALHOOK_<KEY> (WALHOOK_DATABASE_URL, ...), which wins
// over the file.
type Config struct {
	DatabaseURL   string               `yaml:"database_url"`   // required
	Listen        string               `yaml:"listen"`         // health endpoint address; default 127.0.0.1:8080
	Slot          string               `yaml:"slot"`           // replication slot; default walhook
	Publication   string               `yaml:"publication"`    // publication; default walhook
	OutboxTable   string               `yaml:"outbox_table"`   // schema.table; default walhook.outbox
	OutboxColumns map[string]string    `yaml:"outbox_columns"` // id, event, resource_id, tenant, payload; "" = no such column
	LogLevel      string               `yaml:"log_level"`      // debug, info, warn, error; default info
	Defaults      Delivery             `yaml:"defaults"`
	Subscriptions []SubscriptionConfig `yaml:"subscriptions"`

	// Derived by Validate.
	table   cdc.Table
	columns cdc.Columns
	subs    []*outbox.Subscription
}

// Delivery holds the per-subscription delivery options (defaults in
// outbox.DefaultDeliveryOptions). Unset keys inherit from defaults:.
type Delivery struct {
	Timeout          Duration `yaml:"timeout"`            // default 10s
	RetryInitial     Duration `yaml:"retry_initial"`      // default 1s
	RetryMaxInterval Duration `yaml:"retry_max_interval"` // default 5m
	Debounce         Duration `yaml:"debounce"`           // default 0 = off
	MaxWait          Duration `yaml:"max_wait"`           // default 60s
	BatchMax         *int     `yaml:"batch_max"`          // default 1
	BatchWait        Duration `yaml:"batch_wait"`         // default 50ms
	BatchBytes       *int     `yaml:"batch_bytes"`        // default 1 MiB
	Payload          *string  `yaml:"payload"`            // full (default) or skinny
	ResourceURL      *string  `yaml:"resource_url"`       // template with {resource_id}
	MaxPayloadBytes  *int     `yaml:"max_payload_bytes"`  // default 256 KiB
	MaxInFlight      *int     `yaml:"max_in_flight"`      // default 16
}

// SubscriptionConfig is one static subscription.
type SubscriptionConfig struct {
	ID        string   `yaml:"id"`
	Events    []string `yaml:"events"`
	Tenant    string   `yaml:"tenant"`
	TargetURL string   `yaml:"target_url"`
	Secret    string   `yaml:"secret"`
	Delivery  `yaml:",inline"`
}

// Duration is a YAML duration ("10s", "5m"). It keeps the raw text so that
// Validate can name the key of a malformed one.
type Duration struct {
	raw string
	set bool
}

func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	d.raw, d.set = n.Value, true
	return nil
}

func (d Duration) parse(key string, def time.Duration) (time.Duration, error) {
	if !d.set {
		return def, nil
	}
	v, err := time.ParseDuration(d.raw)
	if err != nil || v <= 0 {
		return 0, fmt.Errorf("%s: %q is not a positive duration (like 10s, 5m)", key, d.raw)
	}
	return v, nil
}

// parseOrZero is parse for durations where 0 means off.
func (d Duration) parseOrZero(key string, def time.Duration) (time.Duration, error) {
	if d.set && (d.raw == "0" || d.raw == "0s") {
		return 0, nil
	}
	return d.parse(key, def)
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
	defaults, err := c.Defaults.options("defaults", outbox.DefaultDeliveryOptions)
	if err != nil {
		errs = append(errs, err)
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

func (d Delivery) options(prefix string, def outbox.DeliveryOptions) (outbox.DeliveryOptions, error) {
	o := def
	var errs []error
	dur := func(dst *time.Duration, v Duration, name string, zeroOK bool) {
		var err error
		if zeroOK {
			*dst, err = v.parseOrZero(prefix+"."+name, *dst)
		} else {
			*dst, err = v.parse(prefix+"."+name, *dst)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	count := func(dst *int, v *int, name string, least int) {
		if v == nil {
			return
		}
		if *v < least {
			errs = append(errs, fmt.Errorf("%s.%s: %d must be at least %d", prefix, name, *v, least))
			return
		}
		*dst = *v
	}
	dur(&o.Timeout, d.Timeout, "timeout", false)
	dur(&o.RetryInitial, d.RetryInitial, "retry_initial", false)
	dur(&o.RetryMaxInterval, d.RetryMaxInterval, "retry_max_interval", false)
	dur(&o.Debounce, d.Debounce, "debounce", true)
	dur(&o.MaxWait, d.MaxWait, "max_wait", false)
	dur(&o.BatchWait, d.BatchWait, "batch_wait", true)
	count(&o.BatchMax, d.BatchMax, "batch_max", 1)
	count(&o.BatchBytes, d.BatchBytes, "batch_bytes", 1024)
	count(&o.MaxPayloadBytes, d.MaxPayloadBytes, "max_payload_bytes", 1)
	count(&o.MaxInFlight, d.MaxInFlight, "max_in_flight", 1)
	if d.Payload != nil {
		switch p := outbox.PayloadMode(*d.Payload); p {
		case outbox.PayloadFull, outbox.PayloadSkinny:
			o.Payload = p
		default:
			errs = append(errs, fmt.Errorf("%s.payload: %q must be full or skinny", prefix, *d.Payload))
		}
	}
	if d.ResourceURL != nil {
		o.ResourceURL = *d.ResourceURL
		if u, err := url.Parse(strings.ReplaceAll(o.ResourceURL, "{resource_id}", "x")); o.ResourceURL != "" &&
			(err != nil || (u.Scheme != "http" && u.Scheme != "https") || !strings.Contains(o.ResourceURL, "{resource_id}")) {
			errs = append(errs, fmt.Errorf("%s.resource_url: must be an http(s) URL template containing {resource_id}", prefix))
		}
	}
	if len(errs) == 0 && o.RetryMaxInterval < o.RetryInitial {
		errs = append(errs, fmt.Errorf("%s.retry_max_interval: must not be less than retry_initial", prefix))
	}
	return o, errors.Join(errs...)
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
	opts, err := sc.Delivery.options(key, defaults)
	if err != nil {
		errs = append(errs, err)
	} else if opts.Payload == outbox.PayloadSkinny && opts.ResourceURL == "" {
		bad("%s.resource_url: required with payload: skinny", key)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return &outbox.Subscription{
		ID: sc.ID, Events: sc.Events, Tenant: sc.Tenant, TargetURL: sc.TargetURL, Secret: sc.Secret,
		Delivery: opts,
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

// cdcConfig is the stream's view of c.
func (c *Config) cdcConfig() cdc.Config {
	return cdc.Config{
		DatabaseURL: c.DatabaseURL, Slot: c.Slot, Publication: c.Publication,
		Table: c.table, Columns: c.columns,
	}
}

// secrets lists what must never reach logs or errors.
func (c *Config) secrets() []string {
	var s []string
	if pc, err := pgconn.ParseConfig(c.DatabaseURL); err == nil && pc.Password != "" {
		s = append(s, pc.Password, url.QueryEscape(pc.Password), url.PathEscape(pc.Password))
	}
	for _, sub := range c.Subscriptions {
		if sub.Secret != "" {
			s = append(s, sub.Secret, strings.TrimPrefix(sub.Secret, sender.SecretPrefix))
		}
	}
	return s
}
