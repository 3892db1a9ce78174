package main

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/walhook/walhook/api"
	"github.com/walhook/walhook/cdc"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/outbox/pgstore"
	"github.com/walhook/walhook/relay"
	"github.com/walhook/walhook/sender"
	"github.com/walhook/walhook/sender/ssrf"
	"go.yaml.in/yaml/v3"
)

// Config is walhook's configuration file. Top-level scalar keys can also come
// from the environment as WALHOOK_<KEY> (WALHOOK_DATABASE_URL, ...), which wins
// over the file.
type Config struct {
	DatabaseURL     string            `yaml:"database_url"`      // required
	Listen          string            `yaml:"listen"`            // health endpoint address; default 127.0.0.1:8080
	Slot            string            `yaml:"slot"`              // replication slot; default walhook
	SlotFailover    string            `yaml:"slot_failover"`     // setup makes the slot a failover slot: auto (on PostgreSQL 17+), true (an error before 17), false; default auto
	Publication     string            `yaml:"publication"`       // publication; default walhook
	OutboxTable     string            `yaml:"outbox_table"`      // schema.table; default walhook.outbox
	OutboxColumns   map[string]string `yaml:"outbox_columns"`    // id, event, resource_id, tenant, payload; "" = no such column
	LogLevel        string            `yaml:"log_level"`         // debug, info, warn, error; default info
	AdminToken      string            `yaml:"admin_token"`       // bearer token of the API; required off loopback
	AuthURL         string            `yaml:"auth_url"`          // forward auth for subscribers without the admin token
	AllowTargets    []string          `yaml:"allow_targets"`     // CIDRs or host names API subscriptions may target anyway
	RotationOverlap outbox.Duration   `yaml:"rotation_overlap"`  // how long a rotated-out secret keeps signing; default 24h
	StallTimeout    outbox.Duration   `yaml:"stall_timeout"`     // server silence that counts as a stalled stream; default 30s
	ReadyMaxLag     outbox.Duration   `yaml:"ready_max_lag"`     // /readyz fails when replication lag exceeds it; default 0 = off
	ShutdownTimeout outbox.Duration   `yaml:"shutdown_timeout"`  // on SIGTERM, how long deliveries in flight may finish; default 15s
	OutboxRetention outbox.Duration   `yaml:"outbox_retention"`  // walhook.outbox rows older than this are deleted; default 24h, 0 = keep
	MaxTimeout      outbox.Duration   `yaml:"max_timeout"`       // ceiling of every subscription's timeout (API and file); default 60s
	MaxHold         outbox.Duration   `yaml:"max_hold"`          // ceiling of debounce, max_wait, batch_wait and park_after (API and file); default 15m
	MaxPendingBytes int64             `yaml:"max_pending_bytes"` // bytes of events held in memory before the stream pauses; default 64 MiB
	// bytes a failing subscription holds in memory before it parks at once; default a quarter of max_pending_bytes
	MaxPendingBytesPerSubscription int64                `yaml:"max_pending_bytes_per_subscription"`
	AcceptEmit                     *bool                `yaml:"accept_emit"` // logical messages with prefix walhook (walhook.emit) are events; default true
	EmitRoles                      []string             `yaml:"emit_roles"`  // setup: only these roles may EXECUTE walhook.emit; default none = leave its grants alone
	Defaults                       outbox.Options       `yaml:"defaults"`
	Subscriptions                  []SubscriptionConfig `yaml:"subscriptions"`
	Relay                          *RelayConfig         `yaml:"relay"` // relay mode on NATS JetStream (relayconfig.go); nil = direct mode

	// The listen port (and metrics_listen) against slow, idle and unauthenticated clients.
	ReadTimeout         outbox.Duration `yaml:"read_timeout"`         // a request's header and body; default 15s
	WriteTimeout        outbox.Duration `yaml:"write_timeout"`        // end of header to end of answer; default 30s
	IdleTimeout         outbox.Duration `yaml:"idle_timeout"`         // a keep-alive connection between requests; default 60s
	MaxConnections      *int            `yaml:"max_connections"`      // open connections; more are closed at once; default 4096
	UnauthenticatedRate *float64        `yaml:"unauthenticated_rate"` // failed or token-less API requests per second per client address (burst 4×); default 5, 0 = no limit
	AuthCacheTTL        outbox.Duration `yaml:"auth_cache_ttl"`       // how long an auth_url answer is reused; default 10s, at most 30s, 0 = off
	AuthTimeout         outbox.Duration `yaml:"auth_timeout"`         // one auth_url call, connect to last byte; default 5s

	// The attempt log (docs/attempts.md).
	AttemptLog          string          `yaml:"attempt_log"`           // all, failures or off; default all
	AttemptLogRetention outbox.Duration `yaml:"attempt_log_retention"` // attempts older than this are deleted; default 72h, at least 1m

	Console       *bool  `yaml:"console"`        // the operator console at /console (admin token); default true
	HTTPTransport string `yaml:"http_transport"` // lean (default) or stdlib: how requests to receivers are sent

	// Metrics.
	MetricsListen             string `yaml:"metrics_listen"`              // serve /metrics here instead of on listen; default "" = on listen
	MetricsSubscriptionLabels *bool  `yaml:"metrics_subscription_labels"` // false: no subscription label (series summed); default true

}

// Settings is a Config resolved into the typed values the commands use. Only
// Config.Resolve makes one; it embeds the Config it came from (defaults filled).
type Settings struct {
	*Config

	table       cdc.Table
	columns     cdc.Columns
	subs        []*outbox.Subscription // only when resolved withSubscriptions
	defaults    outbox.DeliveryOptions
	guard       *ssrf.Guard
	overlap     time.Duration
	stall       time.Duration
	readyMaxLag time.Duration
	shutdown    time.Duration
	retention   time.Duration
	attemptLog  string
	attemptKeep time.Duration

	readTimeout, writeTimeout, idleTimeout time.Duration
	authCacheTTL, authTimeout              time.Duration
	maxConnections                         int
	unauthRate                             float64
	subscriptionLabels                     bool
	relay                                  *relay.Config // nil: direct mode
	relayAckWait                           time.Duration
}

// The defaults of the top-level keys that have one; withDefaults fills them
// in, and nothing else knows them.
const (
	listenDefault              = "127.0.0.1:8080"
	logLevelDefault            = "info"
	shutdownTimeoutDefault     = 15 * time.Second
	outboxRetentionDefault     = 24 * time.Hour
	readTimeoutDefault         = 15 * time.Second
	writeTimeoutDefault        = 30 * time.Second
	idleTimeoutDefault         = 60 * time.Second
	authCacheTTLDefault        = 10 * time.Second
	authCacheTTLMost           = 30 * time.Second
	authTimeoutDefault         = 5 * time.Second
	authTimeoutMost            = time.Minute
	attemptLogRetentionDefault = 72 * time.Hour
	attemptLogRetentionLeast   = time.Minute
	maxConnectionsDefault      = 4096
	unauthenticatedRateDefault = 5
)

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
		"database_url":  &c.DatabaseURL,
		"listen":        &c.Listen,
		"slot":          &c.Slot,
		"slot_failover": &c.SlotFailover,
		"publication":   &c.Publication,
		"outbox_table":  &c.OutboxTable,
		"log_level":     &c.LogLevel,
		"admin_token":   &c.AdminToken,
		"auth_url":      &c.AuthURL,

		"metrics_listen": &c.MetricsListen,
	}
}

// loadConfig reads the file at path (none when path is ""), then the environment.
func loadConfig(path string, getenv func(string) string) (*Config, error) {
	var data []byte
	if path != "" {
		var err error
		if data, err = os.ReadFile(path); err != nil {
			return nil, fmt.Errorf("read config: %w", err)
		}
	}
	return parseConfig(path, data, getenv)
}

// parseConfig is loadConfig after the file was read (data is nil without one).
func parseConfig(path string, data []byte, getenv func(string) string) (*Config, error) {
	c := &Config{}
	if data != nil {
		dec := yaml.NewDecoder(bytes.NewReader(data))
		dec.KnownFields(true)
		if err := dec.Decode(c); err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("config %s: %w", path, err)
		}
		// A second document would be ignored silently: refuse it.
		var more yaml.Node
		if err := dec.Decode(&more); !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("config %s: more than one YAML document (a --- line): put every key in one document", path)
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

// withDefaults fills in every top-level key left unset that has a default (the
// …Default constants above, cdc's and api's). It is the only step that changes
// c; Resolve and Validate only read it.
func (c *Config) withDefaults() {
	c.Listen = cmp.Or(c.Listen, listenDefault)
	c.Slot = cmp.Or(c.Slot, cdc.SlotDefault)
	c.Publication = cmp.Or(c.Publication, cdc.PublicationDefault)
	c.SlotFailover = cmp.Or(c.SlotFailover, cdc.FailoverAuto)
	c.OutboxTable = cmp.Or(c.OutboxTable, cdc.DefaultTable.String())
	c.LogLevel = cmp.Or(c.LogLevel, logLevelDefault)
	c.AttemptLog = cmp.Or(c.AttemptLog, pgstore.AttemptLogAll)
	c.HTTPTransport = cmp.Or(c.HTTPTransport, sender.TransportLean)
	for _, d := range []struct {
		v   *outbox.Duration
		def time.Duration
	}{
		{&c.RotationOverlap, api.RotationOverlapDefault},
		{&c.StallTimeout, cdc.StallTimeoutDefault},
		{&c.ShutdownTimeout, shutdownTimeoutDefault},
		{&c.OutboxRetention, outboxRetentionDefault},
		{&c.ReadTimeout, readTimeoutDefault},
		{&c.WriteTimeout, writeTimeoutDefault},
		{&c.IdleTimeout, idleTimeoutDefault},
		{&c.AuthCacheTTL, authCacheTTLDefault},
		{&c.AuthTimeout, authTimeoutDefault},
		{&c.AttemptLogRetention, attemptLogRetentionDefault},
	} {
		if !d.v.Set {
			*d.v = outbox.Dur(d.def)
		}
	}
	if c.MaxConnections == nil {
		n := maxConnectionsDefault
		c.MaxConnections = &n
	}
	if c.UnauthenticatedRate == nil {
		r := float64(unauthenticatedRateDefault)
		c.UnauthenticatedRate = &r
	}
	if c.MetricsSubscriptionLabels == nil {
		on := true
		c.MetricsSubscriptionLabels = &on
	}
}

// Validate checks every key; its error names the bad keys. Subscriptions are
// checked only when withSubscriptions is set (setup and teardown do not need
// them). It changes nothing: Resolve is the same check returning the typed
// settings.
func (c *Config) Validate(withSubscriptions bool) error {
	_, err := c.Resolve(withSubscriptions)
	return err
}

// Resolve checks every key of c (after withDefaults) and returns the typed
// settings, or an error naming every bad key. It does not change c.
func (c *Config) Resolve(withSubscriptions bool) (*Settings, error) {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	s := &Settings{Config: c}

	if c.DatabaseURL == "" {
		bad("database_url: required (or set WALHOOK_DATABASE_URL)")
	} else if _, err := pgconn.ParseConfig(c.DatabaseURL); err != nil {
		bad("database_url: not a valid PostgreSQL connection string")
	}
	if !cdc.ValidName(c.Slot) {
		bad("slot: %q must be lower-case letters, digits and underscores", c.Slot)
	}
	switch c.SlotFailover {
	case cdc.FailoverAuto, cdc.FailoverOn, cdc.FailoverOff:
	default:
		bad("slot_failover: %q must be auto, true or false", c.SlotFailover)
	}
	if !cdc.ValidName(c.Publication) {
		bad("publication: %q must be lower-case letters, digits and underscores", c.Publication)
	}
	var err error
	if s.table, err = cdc.ParseTable(c.OutboxTable); err != nil {
		bad("outbox_table: %v", err)
	} else if s.table == cdc.ControlTable {
		bad("outbox_table: %s is walhook's control table", s.table)
	}
	for i, r := range c.EmitRoles {
		if r == "" || strings.ContainsRune(r, 0) {
			bad("emit_roles[%d]: %q is not a role name", i, r)
		}
	}
	s.columns, err = parseColumns(c.OutboxColumns)
	if err != nil {
		errs = append(errs, err)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad("log_level: %q must be debug, info, warn or error", c.LogLevel)
	}
	base := outbox.DefaultDeliveryOptions()
	if c.MaxTimeout.Set {
		v, err := time.ParseDuration(c.MaxTimeout.Raw)
		if err != nil || v <= 0 {
			bad("max_timeout: %q is not a positive duration (like 60s)", c.MaxTimeout.Raw)
		} else {
			base.MaxTimeout = v
			base.Timeout = min(base.Timeout, v)
		}
	}
	if c.MaxHold.Set {
		v, err := time.ParseDuration(c.MaxHold.Raw)
		if err != nil || v <= 0 {
			bad("max_hold: %q is not a positive duration (like 15m)", c.MaxHold.Raw)
		} else {
			base.MaxHold = v
			base.Debounce, base.MaxWait = min(base.Debounce, v), min(base.MaxWait, v)
			base.BatchWait, base.ParkAfter = min(base.BatchWait, v), min(base.ParkAfter, v)
		}
	}
	defaults, err := c.Defaults.Resolve("defaults.", base)
	if err != nil {
		errs = append(errs, err)
	}
	if err == nil {
		if e := checkDynamicProxy(defaults.ProxyURL); e != nil {
			bad("defaults.proxy_url: %v", e)
		}
		if _, e := sender.LoadTLS(defaults.TLS); !defaults.TLS.IsZero() && e != nil {
			bad("defaults.%v", e)
		}
	}
	if c.Defaults.Headers != nil {
		// Every subscription, API ones of any tenant included, would send them.
		bad("defaults.headers: only per subscription (their values are secrets for one target)")
		defaults.Headers = nil
	}
	s.defaults = defaults
	if s.guard, err = ssrf.New(c.AllowTargets); err != nil {
		for _, e := range unjoin(err) {
			bad("allow_targets: %v", e)
		}
	}
	if err := checkAddr(c.Listen); err != nil {
		bad("listen: %v", err)
	}
	if c.AuthURL != "" {
		if u, err := url.Parse(c.AuthURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			bad("auth_url: must be an absolute http:// or https:// URL")
		}
	}
	if c.RotationOverlap.Set {
		if s.overlap, err = time.ParseDuration(c.RotationOverlap.Raw); err != nil || s.overlap < 0 {
			bad("rotation_overlap: %q is not a duration (like 24h)", c.RotationOverlap.Raw)
		}
	}
	for _, d := range []struct {
		key      string
		v        outbox.Duration
		dst      *time.Duration
		positive bool          // 0 is refused (a timeout of 0 would be none)
		most     time.Duration // 0: no ceiling
	}{
		{key: "stall_timeout", v: c.StallTimeout, dst: &s.stall},
		{key: "ready_max_lag", v: c.ReadyMaxLag, dst: &s.readyMaxLag},
		{key: "shutdown_timeout", v: c.ShutdownTimeout, dst: &s.shutdown},
		{key: "outbox_retention", v: c.OutboxRetention, dst: &s.retention},
		{key: "read_timeout", v: c.ReadTimeout, dst: &s.readTimeout, positive: true},
		{key: "write_timeout", v: c.WriteTimeout, dst: &s.writeTimeout, positive: true},
		{key: "idle_timeout", v: c.IdleTimeout, dst: &s.idleTimeout, positive: true},
		{key: "auth_cache_ttl", v: c.AuthCacheTTL, dst: &s.authCacheTTL, most: authCacheTTLMost},
		{key: "auth_timeout", v: c.AuthTimeout, dst: &s.authTimeout, positive: true, most: authTimeoutMost},
		{key: "attempt_log_retention", v: c.AttemptLogRetention, dst: &s.attemptKeep, positive: true},
	} {
		if !d.v.Set {
			continue
		}
		v, err := time.ParseDuration(d.v.Raw)
		if d.v.Raw == "0" {
			v, err = 0, nil
		}
		switch {
		case err != nil || v < 0 || (v == 0 && d.positive):
			bad("%s: %q is not a positive duration (like 30s)", d.key, d.v.Raw)
		case d.most > 0 && v > d.most:
			bad("%s: %s is more than its ceiling %s", d.key, d.v.Raw, d.most)
		default:
			*d.dst = v
		}
	}
	if s.attemptKeep > 0 && s.attemptKeep < attemptLogRetentionLeast {
		bad("attempt_log_retention: %s is less than 1m", c.AttemptLogRetention.Raw)
	}
	switch c.HTTPTransport {
	case "", sender.TransportLean, sender.TransportStdlib:
	default:
		bad("http_transport: %q is not lean or stdlib", c.HTTPTransport)
	}
	switch s.attemptLog = cmp.Or(c.AttemptLog, pgstore.AttemptLogAll); s.attemptLog {
	case pgstore.AttemptLogAll, pgstore.AttemptLogFailures, pgstore.AttemptLogOff:
	default:
		bad("attempt_log: %q is not one of all, failures, off", c.AttemptLog)
	}
	if c.MaxPendingBytes < 0 || c.MaxPendingBytes > 0 && c.MaxPendingBytes < 1<<20 {
		bad("max_pending_bytes: %d must be at least 1048576 (1 MiB); default %d", c.MaxPendingBytes, outbox.DefaultMaxPendingBytes)
	}
	if total := cmp.Or(c.MaxPendingBytes, outbox.DefaultMaxPendingBytes); c.MaxPendingBytesPerSubscription < 0 ||
		c.MaxPendingBytesPerSubscription > 0 && (c.MaxPendingBytesPerSubscription < 1<<20 || c.MaxPendingBytesPerSubscription > total) {
		bad("max_pending_bytes_per_subscription: %d must be from 1048576 (1 MiB) to max_pending_bytes (%d); default a quarter of it",
			c.MaxPendingBytesPerSubscription, total)
	}
	if c.MaxConnections != nil {
		if s.maxConnections = *c.MaxConnections; s.maxConnections < 1 {
			bad("max_connections: %d must be at least 1", *c.MaxConnections)
		}
	}
	if c.UnauthenticatedRate != nil {
		if s.unauthRate = *c.UnauthenticatedRate; s.unauthRate < 0 || s.unauthRate != s.unauthRate {
			bad("unauthenticated_rate: %v must be 0 (no limit) or more", *c.UnauthenticatedRate)
		}
	}
	s.subscriptionLabels = c.MetricsSubscriptionLabels == nil || *c.MetricsSubscriptionLabels
	if c.MetricsListen != "" {
		if err := checkAddr(c.MetricsListen); err != nil {
			bad("metrics_listen: %v", err)
		} else if _, port, _ := net.SplitHostPort(c.Listen); c.MetricsListen == c.Listen && port != "0" {
			bad("metrics_listen: %q is listen's address too; leave it empty to serve /metrics there", c.MetricsListen)
		}
	}
	var relayErrs []error
	s.relay, s.relayAckWait, relayErrs = c.resolveRelay()
	errs = append(errs, relayErrs...)
	if withSubscriptions {
		seen := map[string]bool{}
		for i, sc := range c.Subscriptions {
			sub, err := sc.subscription(fmt.Sprintf("subscriptions[%d]", i), defaults, seen)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			s.subs = append(s.subs, sub)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return s, nil
}

// unjoin splits an errors.Join into its errors.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// checkAddr checks a listen address (host:port, host optional, port a number)
// before anything connects, so that a typo is a config error, not a failure
// after the database connection.
func checkAddr(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port (like 127.0.0.1:8080 or :8080)", addr)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || strconv.FormatUint(n, 10) != port {
		return fmt.Errorf("%q: the port must be a number from 0 to 65535", addr)
	}
	if host != "" && strings.ContainsAny(host, " \t\r\n/@[]") {
		return fmt.Errorf("%q: %q is not a host name or address", addr, host)
	}
	return nil
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
	if err := outbox.CheckSubscription(key, sc.Events, sc.TargetURL, sc.Tenant); err != nil {
		errs = append(errs, err)
	}
	if sc.MaxInFlightPerHost != nil {
		bad("%s.max_in_flight_per_host: only in defaults (it bounds all subscriptions' requests to a host)", key)
	}
	opts, err := sc.Options.Resolve(key+".", defaults)
	if err != nil {
		errs = append(errs, err)
	} else if sc.TLS != nil {
		if _, err := sender.LoadTLS(opts.TLS); err != nil {
			bad("%s.%v", key, err)
		}
	}
	if sc.Secret == "" {
		bad("%s.secret: required (whsec_ followed by base64 of at least 16 random bytes; whsk_ and an ed25519 seed for signature: v1a)", key)
	} else if err := sender.CheckSecret(sc.Secret, opts.Signature); err != nil {
		bad("%s.secret: %v", key, err)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return &outbox.Subscription{
		ID: sc.ID, Events: sc.Events, Tenant: sc.Tenant, TargetURL: sc.TargetURL, Secret: sc.Secret,
		Delivery: opts, Static: true,
	}, nil
}

// checkDynamicProxy says why API subscriptions cannot go through proxy: a
// socks5 proxy would be handed the target's name, not the checked address
// (docs/security.md).
func checkDynamicProxy(proxy string) error {
	if strings.HasPrefix(proxy, "socks5:") {
		return errors.New("socks5:// is refused where API subscriptions use it (it would be handed the name, not the checked address): use http:// or https://")
	}
	return nil
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
func (c *Settings) cdcConfig() cdc.Config {
	return cdc.Config{
		DatabaseURL: c.DatabaseURL, Slot: c.Slot, Publication: c.Publication,
		Table: c.table, Columns: c.columns, StallTimeout: c.stall, Budget: outbox.NewBudget(c.MaxPendingBytes),
		RejectEmit: c.AcceptEmit != nil && !*c.AcceptEmit, EmitRoles: c.EmitRoles, SlotFailover: c.SlotFailover,
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
	for _, o := range append([]outbox.Options{c.Defaults}, func() (o []outbox.Options) {
		for _, sub := range c.Subscriptions {
			o = append(o, sub.Options)
		}
		return o
	}()...) {
		if o.ProxyURL == nil {
			continue
		}
		if u, err := url.Parse(*o.ProxyURL); err == nil && u.User != nil {
			if p, ok := u.User.Password(); ok && p != "" {
				s = append(s, p, url.QueryEscape(p), url.PathEscape(p))
			}
		}
	}
	s = append(s, c.relaySecrets()...)
	for _, sub := range c.Subscriptions {
		if sub.Secret != "" {
			s = append(s, sub.Secret)
		}
		for _, v := range sub.Headers {
			if len(v) >= 4 { // shorter ones would redact every such string in the logs
				s = append(s, v)
			}
		}
		for key := range strings.FieldsSeq(sub.Secret) {
			s = append(s, key, strings.TrimPrefix(strings.TrimPrefix(key, sender.SecretPrefix), sender.PrivateKeyPrefix))
		}
	}
	return s
}
