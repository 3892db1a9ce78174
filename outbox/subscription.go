package outbox

import (
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Subscription is one receiver of hooks.
type Subscription struct {
	ID        string
	Events    []string // patterns: "contact.updated", "contact.*", "*"
	Tenant    string   // "" receives every tenant's events; else only this tenant's
	TargetURL string
	// Secret holds the signing keys, one per scheme of Delivery.Signature,
	// space-separated: "whsec_" + base64 (v1), "whsk_" + base64 ed25519 seed (v1a).
	Secret   string
	Delivery DeliveryOptions

	// PreviousSecret also signs deliveries until PreviousUntil (secret rotation).
	PreviousSecret string
	PreviousUntil  time.Time

	// Static subscriptions come from the config file: trusted targets,
	// read-only, and a 410 from them is a dead letter.
	Static bool

	// Disabled subscriptions dead-letter their events (endpoint health).
	Disabled bool
}

// Secrets returns the secrets that sign a delivery at now: the current one, and
// the previous one during a rotation's overlap.
func (s *Subscription) Secrets(now time.Time) []string {
	if s.PreviousSecret != "" && now.Before(s.PreviousUntil) {
		return []string{s.Secret, s.PreviousSecret}
	}
	return []string{s.Secret}
}

// PayloadMode says whether envelopes carry the row's payload.
type PayloadMode string

const (
	PayloadFull   PayloadMode = "full"   // envelopes carry data
	PayloadSkinny PayloadMode = "skinny" // envelopes carry resource_url instead
)

// DeliveryOptions tune how a subscription's hooks are sent. Every field must be
// set (DefaultDeliveryOptions has the defaults); config fills them.
type DeliveryOptions struct {
	Timeout          time.Duration // deadline of one attempt, whole exchange; default 10s
	RetryInitial     time.Duration // first retry delay; default 1s
	RetryMaxInterval time.Duration // cap of the retry delay and of Retry-After; default 5m

	Debounce time.Duration // quiet time before sending a resource's newest event; default 0 = off
	MaxWait  time.Duration // with debounce, send at most this long after the first merged event; default 60s

	BatchMax   int           // events per request; default 1 (a single object body); > 1 sends arrays
	BatchWait  time.Duration // how long to gather a batch; default 50ms
	BatchBytes int           // estimated body size that closes a batch; default 1 MiB

	Payload         PayloadMode // full (default) or skinny
	ResourceURL     string      // template with {resource_id}, for skinny and truncated envelopes
	MaxPayloadBytes int         // larger payloads are sent skinny with "truncated": true; default 256 KiB

	MaxInFlight int // concurrent requests (so resources in flight); default 16

	ParkAfter time.Duration // failing this long, a resource's events move to walhook.deliveries; default 30s
	RetryFor  time.Duration // parked events failing this long become dead letters; default 72h

	DisableAfter time.Duration // failing this long without one success disables the subscription; default 24h

	Signature Schemes // signature schemes, v1 and/or v1a; default [v1]

	Headers map[string]string // custom headers, per subscription only; values are secrets; default none

	ProxyURL string     // forward proxy of every request; default "" = the one the environment names (HTTPS_PROXY, ...)
	TLS      TLSOptions // client certificate, CAs, server name; default none (the system's roots)

	RateLimit Rate // attempts (retries included) per second or minute, for the whole subscription; default 0 = none

	// MaxInFlightPerHost bounds the requests in flight to one host across all
	// subscriptions (defaults only; the Sender applies it); default 0 = none.
	MaxInFlightPerHost int

	// MaxTimeout is the operator's ceiling of Timeout (max_timeout): Resolve
	// refuses a higher one; default 60s, 0 = none. It is a bound, not an option.
	MaxTimeout time.Duration
	// MaxHold is the operator's ceiling of the options that keep an event in
	// memory, and so hold the slot's confirmed position back: debounce,
	// max_wait, batch_wait and park_after (max_hold). Resolve refuses higher
	// ones; default 15m, 0 = none. A bound, not an option.
	MaxHold time.Duration
}

// DefaultDeliveryOptions are used where config sets nothing: a fresh copy
// each call (its slices are the caller's to change).
func DefaultDeliveryOptions() DeliveryOptions {
	return DeliveryOptions{
		Timeout:          10 * time.Second,
		RetryInitial:     time.Second,
		RetryMaxInterval: 5 * time.Minute,
		MaxWait:          60 * time.Second,
		BatchMax:         1,
		BatchWait:        50 * time.Millisecond,
		BatchBytes:       1 << 20,
		Payload:          PayloadFull,
		MaxPayloadBytes:  256 << 10,
		MaxInFlight:      16,
		ParkAfter:        30 * time.Second,
		RetryFor:         72 * time.Hour,
		DisableAfter:     24 * time.Hour,
		Signature:        Schemes{SchemeV1},
		MaxTimeout:       60 * time.Second,
		MaxHold:          15 * time.Minute,
	}
}

// Batched reports whether request bodies are arrays.
func (o *DeliveryOptions) Batched() bool { return o.BatchMax > 1 }

// Matches reports whether the subscription wants e.
func (s *Subscription) Matches(e *Event) bool {
	if s.Tenant != "" && s.Tenant != e.Tenant {
		return false
	}
	for _, p := range s.Events {
		if MatchPattern(p, e.Type) {
			return true
		}
	}
	return false
}

// MatchPattern matches an event type against a pattern: "*" matches all,
// "contact.*" matches every type that starts with "contact.", anything else
// matches itself.
func MatchPattern(pattern, typ string) bool {
	switch {
	case pattern == "*":
		return true
	case strings.HasSuffix(pattern, ".*"):
		return strings.HasPrefix(typ, pattern[:len(pattern)-1])
	default:
		return pattern == typ
	}
}

// Bounds of a subscription's fields, wherever it comes from (config, API, CLI).
const (
	MostPatterns     = 50   // patterns per subscription
	MostPatternLen   = 256  // bytes per pattern
	MostTargetURLLen = 2048 // bytes of target_url
	MostTextLen      = 256  // bytes of a tenant or an id
)

// CheckSubscription checks what every subscription has, whoever makes it:
// its patterns, its target URL and its tenant ("" is none). Errors name each
// bad field under key ("" for none, like the API's fields).
func CheckSubscription(key string, events []string, targetURL, tenant string) error {
	if key != "" {
		key += "."
	}
	var errs []error
	if err := CheckPatterns(key+"events", events); err != nil {
		errs = append(errs, err)
	}
	if err := CheckTargetURL(key+"target_url", targetURL); err != nil {
		errs = append(errs, err)
	}
	if tenant != "" {
		if err := CheckText(key+"tenant", tenant); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// CheckTargetURL says why u cannot be a target: it must be an absolute
// http:// or https:// URL of at most MostTargetURLLen bytes. (Whether it is a
// safe one is the SSRF guard's to say.)
func CheckTargetURL(key, u string) error {
	if u == "" {
		return fmt.Errorf("%s: required", key)
	}
	if len(u) > MostTargetURLLen {
		return fmt.Errorf("%s: longer than %d bytes", key, MostTargetURLLen)
	}
	if p, err := url.Parse(u); err != nil || (p.Scheme != "http" && p.Scheme != "https") || p.Host == "" {
		return fmt.Errorf("%s: must be an absolute http:// or https:// URL", key)
	}
	return nil
}

// CheckText checks a tenant, an id or a value like them: valid UTF-8, no
// control character (NUL included), at most MostTextLen bytes.
func CheckText(key, v string) error {
	switch {
	case !utf8.ValidString(v):
		return fmt.Errorf("%s: not valid UTF-8", key)
	case HasControl(v):
		return fmt.Errorf("%s: holds a control character", key)
	case len(v) > MostTextLen:
		return fmt.Errorf("%s: longer than %d bytes", key, MostTextLen)
	}
	return nil
}

// HasControl reports a control character: C0 (NUL, newline, tab, ...), DEL or C1.
func HasControl(s string) bool {
	return strings.IndexFunc(s, func(r rune) bool { return r < 0x20 || (r >= 0x7f && r < 0xa0) }) >= 0
}

// ValidPattern reports whether p is a pattern MatchPattern understands (see
// CheckPattern).
func ValidPattern(p string) bool { return CheckPattern(p) == nil }

// CheckPattern says why p is not a pattern: it must be "*", a name, or a
// name followed by ".*"; a name is dot-separated non-empty parts of valid
// UTF-8 without "*", whitespace or control characters, at most
// MostPatternLen bytes in all. Every place that takes patterns (config, API,
// CLI) checks them here.
func CheckPattern(p string) error {
	switch {
	case p == "":
		return errors.New("empty (want an event name, a pattern like contact.*, or *)")
	case len(p) > MostPatternLen:
		return fmt.Errorf("longer than %d bytes", MostPatternLen)
	case !utf8.ValidString(p):
		return errors.New("not valid UTF-8")
	case strings.IndexFunc(p, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }) >= 0:
		return errors.New("contains whitespace or a control character")
	case p == "*":
		return nil
	}
	name := strings.TrimSuffix(p, ".*")
	if strings.Contains(name, "*") {
		return errors.New(`"*" only as the whole pattern or as a last ".*" part (contact.*, *)`)
	}
	if slices.Contains(strings.Split(name, "."), "") {
		return errors.New(`an empty part between dots (like a..b, .a or a.)`)
	}
	return nil
}

// CheckPatterns checks a subscription's patterns: 1 to MostPatterns, each
// one a pattern; the error names the index of a bad one under key.
func CheckPatterns(key string, patterns []string) error {
	if len(patterns) == 0 {
		return fmt.Errorf("%s: required (an event name, a pattern like contact.*, or *)", key)
	}
	if len(patterns) > MostPatterns {
		return fmt.Errorf("%s: %d patterns, at most %d", key, len(patterns), MostPatterns)
	}
	var errs []error
	for i, p := range patterns {
		if err := CheckPattern(p); err != nil {
			errs = append(errs, fmt.Errorf("%s[%d]: %q: %w", key, i, p, err))
		}
	}
	return errors.Join(errs...)
}

// SubscriptionRow is a dynamic subscription as stored in walhook.subscriptions
// and carried by its change messages (JSON with the table's column names).
type SubscriptionRow struct {
	ID                  string     `json:"id"`
	Events              []string   `json:"events"`
	TargetURL           string     `json:"target_url"`
	Tenant              *string    `json:"tenant"`
	Secret              string     `json:"secret"`
	PreviousSecret      *string    `json:"previous_secret"`
	PreviousSecretUntil *time.Time `json:"previous_secret_until"`
	Options             Options    `json:"options"`
	VerifyIntent        bool       `json:"verify_intent"`
	DisabledAt          *time.Time `json:"disabled_at"`
	CreatedAt           time.Time  `json:"created_at"`
	UpdatedAt           time.Time  `json:"updated_at"`

	// SecretChanged makes an update write Secret (a changed signature);
	// otherwise it leaves the stored secret alone, so that a concurrent
	// rotate-secret is not undone.
	SecretChanged bool `json:"-"`
}

// Cursor is where a list of subscriptions goes on after this row (they are
// listed by creation time, then id): opaque to callers.
func (r *SubscriptionRow) Cursor() string {
	return strconv.FormatInt(r.CreatedAt.UnixMicro(), 10) + "." + r.ID
}

// ParseSubscriptionCursor reads a Cursor back.
func ParseSubscriptionCursor(c string) (time.Time, string, error) {
	us, id, ok := strings.Cut(c, ".")
	n, err := strconv.ParseInt(us, 10, 64)
	if !ok || err != nil || id == "" {
		return time.Time{}, "", fmt.Errorf("cursor: %q is not a cursor this API returned", c)
	}
	return time.UnixMicro(n), id, nil
}

// Subscription resolves the row's options over defaults.
func (r *SubscriptionRow) Subscription(defaults DeliveryOptions) (*Subscription, error) {
	opts, err := r.Options.clamped(defaults).Resolve("", defaults)
	if err != nil {
		return nil, err
	}
	s := &Subscription{ID: r.ID, Events: r.Events, TargetURL: r.TargetURL, Secret: r.Secret, Delivery: opts,
		Disabled: r.DisabledAt != nil}
	if r.Tenant != nil {
		s.Tenant = *r.Tenant
	}
	if r.PreviousSecret != nil && r.PreviousSecretUntil != nil {
		s.PreviousSecret, s.PreviousUntil = *r.PreviousSecret, *r.PreviousSecretUntil
	}
	return s, nil
}
