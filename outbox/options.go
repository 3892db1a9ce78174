package outbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Options are delivery options as a person writes them (config file, API):
// every field optional, durations as text. Resolve turns them into
// DeliveryOptions over a base.
type Options struct {
	Timeout          Duration `yaml:"timeout" json:"timeout,omitzero"`
	RetryInitial     Duration `yaml:"retry_initial" json:"retry_initial,omitzero"`
	RetryMaxInterval Duration `yaml:"retry_max_interval" json:"retry_max_interval,omitzero"`
	Debounce         Duration `yaml:"debounce" json:"debounce,omitzero"`
	MaxWait          Duration `yaml:"max_wait" json:"max_wait,omitzero"`
	BatchMax         *int     `yaml:"batch_max" json:"batch_max,omitzero"`
	BatchWait        Duration `yaml:"batch_wait" json:"batch_wait,omitzero"`
	BatchBytes       *int     `yaml:"batch_bytes" json:"batch_bytes,omitzero"`
	Payload          *string  `yaml:"payload" json:"payload,omitzero"`
	ResourceURL      *string  `yaml:"resource_url" json:"resource_url,omitzero"`
	MaxPayloadBytes  *int     `yaml:"max_payload_bytes" json:"max_payload_bytes,omitzero"`
	MaxInFlight      *int     `yaml:"max_in_flight" json:"max_in_flight,omitzero"`
	ParkAfter        Duration `yaml:"park_after" json:"park_after,omitzero"`
	RetryFor         Duration `yaml:"retry_for" json:"retry_for,omitzero"`
	DisableAfter     Duration `yaml:"disable_after" json:"disable_after,omitzero"`
	Signature        Schemes  `yaml:"signature" json:"signature,omitzero"`

	// Headers are sent with every request of the subscription. Their values
	// are secrets (an API key, a token): never logged, masked in API answers.
	Headers map[string]string `yaml:"headers" json:"headers,omitzero"`

	// ProxyURL sends the requests through this forward proxy instead of the
	// one HTTPS_PROXY/HTTP_PROXY/NO_PROXY choose; TLS sets client
	// certificates and trust.
	ProxyURL *string     `yaml:"proxy_url" json:"proxy_url,omitzero"`
	TLS      *TLSOptions `yaml:"tls" json:"tls,omitzero"`

	RateLimit          *string `yaml:"rate_limit" json:"rate_limit,omitzero"`                         // "50/s", "100/m"; "0" = none
	MaxInFlightPerHost *int    `yaml:"max_in_flight_per_host" json:"max_in_flight_per_host,omitzero"` // defaults only
}

// Rate is a rate limit: N attempts per Per (a second or a minute).
type Rate struct {
	N   float64
	Per time.Duration
}

// PerSecond is the rate in attempts per second; 0 = no limit.
func (r Rate) PerSecond() float64 {
	if r.N <= 0 || r.Per <= 0 {
		return 0
	}
	return r.N / r.Per.Seconds()
}

func (r Rate) String() string {
	if r.PerSecond() == 0 {
		return "0"
	}
	unit := "s"
	if r.Per == time.Minute {
		unit = "m"
	}
	return strconv.FormatFloat(r.N, 'f', -1, 64) + "/" + unit
}

// Bounds of rate_limit.
const MostRatePerSecond = 10000

// ParseRate reads "N/s" or "N/m" (N > 0, at most MostRatePerSecond, at least 1/m), or
// "0" for no limit.
func ParseRate(raw string) (Rate, error) {
	if raw == "0" || raw == "" {
		return Rate{}, nil
	}
	num, unit, ok := strings.Cut(raw, "/")
	per := map[string]time.Duration{"s": time.Second, "m": time.Minute}[unit]
	n, err := strconv.ParseFloat(num, 64)
	if !ok || per == 0 || err != nil || n <= 0 || n != n || strings.ContainsAny(num, "eE+-xXpP_") {
		return Rate{}, fmt.Errorf("%q is not a rate (like 50/s or 100/m; 0 = no limit)", raw)
	}
	r := Rate{N: n, Per: per}
	switch {
	case r.PerSecond() > MostRatePerSecond:
		return Rate{}, fmt.Errorf("%s is more than %d/s", raw, MostRatePerSecond)
	case r.PerSecond() < 1.0/60:
		return Rate{}, fmt.Errorf("%s is less than 1/m", raw)
	}
	return r, nil
}

// TLSOptions are the TLS settings of a subscription's connections: a client
// certificate (mTLS), the CAs that sign the target's certificate instead of
// the system's, and the name it must carry. Files are PEM; they are read
// again when they change. Each field set per subscription overrides the one
// in defaults.
type TLSOptions struct {
	ClientCertFile string `yaml:"client_cert_file" json:"client_cert_file,omitempty"`
	ClientKeyFile  string `yaml:"client_key_file" json:"client_key_file,omitempty"`
	CAFile         string `yaml:"ca_file" json:"ca_file,omitempty"`
	ServerName     string `yaml:"server_name" json:"server_name,omitempty"`
}

// IsZero reports whether no TLS setting is made.
func (t TLSOptions) IsZero() bool { return t == TLSOptions{} }

func (t TLSOptions) merge(p TLSOptions) TLSOptions {
	for _, f := range []struct{ dst, v *string }{
		{&t.ClientCertFile, &p.ClientCertFile}, {&t.ClientKeyFile, &p.ClientKeyFile},
		{&t.CAFile, &p.CAFile}, {&t.ServerName, &p.ServerName},
	} {
		if *f.v != "" {
			*f.dst = *f.v
		}
	}
	return t
}

// checkProxyURL says why raw cannot be a proxy_url: an http, https or
// socks5 URL with a host and nothing after it.
func checkProxyURL(raw string) error {
	if len(raw) > 2048 {
		return errors.New("longer than 2048 bytes")
	}
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https" && u.Scheme != "socks5") ||
		u.Path != "" && u.Path != "/" || u.RawQuery != "" || u.Fragment != "" {
		return errors.New("must be a proxy's URL: http://, https:// or socks5:// and host:port (like http://proxy:3128)")
	}
	return nil
}

// MaskURL is raw with its password Masked.
func MaskURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.User == nil {
		return raw
	}
	if _, ok := u.User.Password(); ok {
		u.User = url.UserPassword(u.User.Username(), Masked)
	}
	return strings.Replace(u.String(), url.QueryEscape(Masked), Masked, 1)
}

// Masked stands for a secret value in API answers; given back in a PATCH, it
// keeps the stored value.
const Masked = "********"

// Bounds of a subscription's custom headers.
const (
	MostHeaders         = 20
	MostHeaderNameLen   = 256
	MostHeaderValueLen  = 4096
	MostHeaderBytes     = 8192 // names and values of all of them
	headerNameCharsDesc = "letters, digits and !#$%&'*+-.^_`|~"
)

// CheckHeaders says why headers cannot be a subscription's custom headers:
// at most MostHeaders, names that are HTTP tokens and not walhook's or the
// connection's (webhook-*, Host, Content-*, Transfer-Encoding, Connection and
// the other hop-by-hop headers, Expect), values without CR, LF or other
// control characters. Errors name the header under key, never its value.
func CheckHeaders(key string, headers map[string]string) error {
	if len(headers) > MostHeaders {
		return fmt.Errorf("%s: %d headers, at most %d", key, len(headers), MostHeaders)
	}
	names := make([]string, 0, len(headers))
	for name := range headers {
		names = append(names, name)
	}
	slices.Sort(names)
	var errs []error
	total, seen := 0, map[string]string{}
	for _, name := range names {
		value := headers[name]
		total += len(name) + len(value)
		lower := strings.ToLower(name)
		switch {
		case name == "":
			errs = append(errs, fmt.Errorf("%s: an empty header name", key))
			continue
		case len(name) > MostHeaderNameLen || !isToken(name):
			errs = append(errs, fmt.Errorf("%s: %.64q is not a header name (%s, at most %d bytes)", key, name, headerNameCharsDesc, MostHeaderNameLen))
			continue
		case seen[lower] != "":
			errs = append(errs, fmt.Errorf("%s.%s: the same header as %s", key, name, seen[lower]))
		case reservedHeader(lower):
			errs = append(errs, fmt.Errorf("%s.%s: walhook or the connection sets this header; it cannot be a custom header", key, name))
		case len(value) > MostHeaderValueLen:
			errs = append(errs, fmt.Errorf("%s.%s: the value is longer than %d bytes", key, name, MostHeaderValueLen))
		case strings.IndexFunc(value, func(r rune) bool { return r < ' ' && r != '\t' || r == 0x7f }) >= 0:
			errs = append(errs, fmt.Errorf("%s.%s: the value contains CR, LF or another control character", key, name))
		}
		seen[lower] = name
	}
	if total > MostHeaderBytes {
		errs = append(errs, fmt.Errorf("%s: %d bytes of names and values, at most %d", key, total, MostHeaderBytes))
	}
	return errors.Join(errs...)
}

// reservedHeader: walhook's own headers, the body's framing, and the
// hop-by-hop headers of RFC 9110 §7.6.1 (and their older kin).
func reservedHeader(lower string) bool {
	switch lower {
	case "host", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade",
		"proxy-connection", "proxy-authorization", "proxy-authenticate", "expect", "user-agent":
		return true
	}
	return strings.HasPrefix(lower, "webhook-") || strings.HasPrefix(lower, "content-")
}

func isToken(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

// Signature schemes of Standard Webhooks.
const (
	SchemeV1  = "v1"  // HMAC-SHA256 under a whsec_ secret
	SchemeV1a = "v1a" // ed25519 under a whsk_ private key; receivers verify with its whpk_ public key
)

// Schemes are the signature schemes a subscription signs with: one name
// (signature: v1a) or a list (signature: [v1, v1a]).
type Schemes []string

// UnmarshalYAML takes a name or a list of names.
func (s *Schemes) UnmarshalYAML(unmarshal func(any) error) error {
	var one string
	if err := unmarshal(&one); err == nil {
		*s = Schemes{one}
		return nil
	}
	var list []string
	if err := unmarshal(&list); err != nil {
		return errors.New("signature: want v1, v1a or a list of them")
	}
	*s = list
	return nil
}

// UnmarshalJSON takes a name or a list of names.
func (s *Schemes) UnmarshalJSON(b []byte) error {
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		*s = Schemes{one}
		return nil
	}
	var list []string
	if err := json.Unmarshal(b, &list); err != nil {
		return errors.New("want v1, v1a or a list of them")
	}
	*s = list
	return nil
}

// MarshalJSON writes one name as a string, several as a list.
func (s Schemes) MarshalJSON() ([]byte, error) {
	if len(s) == 1 {
		return json.Marshal(s[0])
	}
	return json.Marshal([]string(s))
}

// Has reports whether scheme is among s.
func (s Schemes) Has(scheme string) bool { return slices.Contains(s, scheme) }

func checkSchemes(key string, s Schemes) error {
	if len(s) == 0 {
		return fmt.Errorf("%s: want v1, v1a or [v1, v1a]", key)
	}
	for i, v := range s {
		if v != SchemeV1 && v != SchemeV1a {
			return fmt.Errorf("%s: %q is not a signature scheme (want v1 or v1a)", key, v)
		}
		if slices.Contains(s[:i], v) {
			return fmt.Errorf("%s: %q is listed twice", key, v)
		}
	}
	return nil
}

// Duration is a duration as text ("10s", "5m"). It keeps the text, so that
// Resolve can name the key of a malformed one.
type Duration struct {
	Raw string
	Set bool
}

// UnmarshalText keeps the text; Resolve checks it.
func (d *Duration) UnmarshalText(b []byte) error {
	d.Raw, d.Set = string(b), len(b) > 0
	return nil
}

// MarshalJSON writes the text back.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.Raw) }

// IsZero lets omitempty drop an unset Duration.
func (d Duration) IsZero() bool { return !d.Set }

// Dur makes a set Duration.
func Dur(d time.Duration) Duration { return Duration{Raw: d.String(), Set: true} }

func (d Duration) parse(key string, def time.Duration, zeroOK bool) (time.Duration, error) {
	if !d.Set {
		return def, nil
	}
	v, err := time.ParseDuration(d.Raw)
	if zeroOK && d.Raw == "0" {
		v, err = 0, nil
	}
	if err != nil || v < 0 || (v == 0 && !zeroOK) {
		return 0, fmt.Errorf("%s: %q is not a positive duration (like 10s, 5m)", key, d.Raw)
	}
	return v, nil
}

// Bounds of the options, whoever sets them (config file, API).
const (
	MostBatchMax = 10000 // batch_max
	MostInFlight = 1024  // max_in_flight
)

// Resolve applies o over base; errors name each bad key under prefix. A
// timeout above base.MaxTimeout is refused, and so are a debounce, max_wait,
// batch_wait or park_after above base.MaxHold.
func (o Options) Resolve(prefix string, base DeliveryOptions) (DeliveryOptions, error) {
	r := base
	var errs []error
	dur := func(dst *time.Duration, v Duration, name string, zeroOK bool) {
		var err error
		if *dst, err = v.parse(prefix+name, *dst, zeroOK); err != nil {
			errs = append(errs, err)
		}
	}
	count := func(dst *int, v *int, name string, least, most int) {
		if v == nil {
			return
		}
		switch {
		case *v < least:
			errs = append(errs, fmt.Errorf("%s%s: %d must be at least %d", prefix, name, *v, least))
			return
		case most > 0 && *v > most:
			errs = append(errs, fmt.Errorf("%s%s: %d must be at most %d", prefix, name, *v, most))
			return
		}
		*dst = *v
	}
	dur(&r.Timeout, o.Timeout, "timeout", false)
	if o.Timeout.Set && base.MaxTimeout > 0 && r.Timeout > base.MaxTimeout {
		errs = append(errs, fmt.Errorf("%stimeout: %s is more than max_timeout (%s)", prefix, o.Timeout.Raw, base.MaxTimeout))
	}
	dur(&r.RetryInitial, o.RetryInitial, "retry_initial", false)
	dur(&r.RetryMaxInterval, o.RetryMaxInterval, "retry_max_interval", false)
	dur(&r.Debounce, o.Debounce, "debounce", true)
	dur(&r.MaxWait, o.MaxWait, "max_wait", false)
	dur(&r.BatchWait, o.BatchWait, "batch_wait", true)
	dur(&r.ParkAfter, o.ParkAfter, "park_after", false)
	for _, h := range o.holds(&r) {
		if h.v.Set && base.MaxHold > 0 && *h.dst > base.MaxHold {
			errs = append(errs, fmt.Errorf("%s%s: %s is more than max_hold (%s): it would hold the slot's WAL that long", prefix, h.name, h.v.Raw, base.MaxHold))
		}
	}
	dur(&r.RetryFor, o.RetryFor, "retry_for", false)
	dur(&r.DisableAfter, o.DisableAfter, "disable_after", false)
	count(&r.BatchMax, o.BatchMax, "batch_max", 1, MostBatchMax)
	count(&r.BatchBytes, o.BatchBytes, "batch_bytes", 1024, 0)
	count(&r.MaxPayloadBytes, o.MaxPayloadBytes, "max_payload_bytes", 1, 0)
	count(&r.MaxInFlight, o.MaxInFlight, "max_in_flight", 1, MostInFlight)
	if o.Payload != nil {
		switch p := PayloadMode(*o.Payload); p {
		case PayloadFull, PayloadSkinny:
			r.Payload = p
		default:
			errs = append(errs, fmt.Errorf("%spayload: %q must be full or skinny", prefix, *o.Payload))
		}
	}
	if o.ResourceURL != nil {
		r.ResourceURL = *o.ResourceURL
		if r.ResourceURL != "" && !validResourceURL(r.ResourceURL) {
			errs = append(errs, fmt.Errorf("%sresource_url: must be an http(s) URL template containing {resource_id}", prefix))
		}
	}
	if o.Signature != nil {
		if err := checkSchemes(prefix+"signature", o.Signature); err != nil {
			errs = append(errs, err)
		} else {
			r.Signature = slices.Clone(o.Signature)
		}
	}
	if o.Headers != nil {
		if err := CheckHeaders(prefix+"headers", o.Headers); err != nil {
			errs = append(errs, err)
		} else {
			r.Headers = maps.Clone(o.Headers)
		}
	}
	if o.ProxyURL != nil {
		if *o.ProxyURL != "" {
			if err := checkProxyURL(*o.ProxyURL); err != nil {
				errs = append(errs, fmt.Errorf("%sproxy_url: %w", prefix, err))
			}
		}
		r.ProxyURL = *o.ProxyURL
	}
	if o.TLS != nil {
		r.TLS = r.TLS.merge(*o.TLS)
		for _, f := range []struct{ name, v string }{
			{"client_cert_file", o.TLS.ClientCertFile}, {"client_key_file", o.TLS.ClientKeyFile},
			{"ca_file", o.TLS.CAFile}, {"server_name", o.TLS.ServerName},
		} {
			if len(f.v) > 4096 || strings.ContainsFunc(f.v, func(r rune) bool { return r < ' ' || r == 0x7f }) {
				errs = append(errs, fmt.Errorf("%stls.%s: not a file name (control characters, or longer than 4096 bytes)", prefix, f.name))
			}
		}
		if (r.TLS.ClientCertFile == "") != (r.TLS.ClientKeyFile == "") {
			errs = append(errs, fmt.Errorf("%stls: client_cert_file and client_key_file go together", prefix))
		}
	}
	if o.RateLimit != nil {
		rate, err := ParseRate(*o.RateLimit)
		if err != nil {
			errs = append(errs, fmt.Errorf("%srate_limit: %w", prefix, err))
		}
		r.RateLimit = rate
	}
	count(&r.MaxInFlightPerHost, o.MaxInFlightPerHost, "max_in_flight_per_host", 0, MostInFlight*16)
	if len(errs) == 0 && r.RetryMaxInterval < r.RetryInitial {
		errs = append(errs, fmt.Errorf("%sretry_max_interval: must not be less than retry_initial", prefix))
	}
	if len(errs) == 0 && r.Payload == PayloadSkinny && r.ResourceURL == "" {
		errs = append(errs, fmt.Errorf("%sresource_url: required with payload: skinny", prefix))
	}
	return r, errors.Join(errs...)
}

func validResourceURL(t string) bool {
	u, err := url.Parse(strings.ReplaceAll(t, "{resource_id}", "x"))
	return err == nil && (u.Scheme == "http" || u.Scheme == "https") && u.Host != "" && strings.Contains(t, "{resource_id}")
}

// Merge returns o with every field that p sets taken from p.
func (o Options) Merge(p Options) Options {
	setDur := func(dst *Duration, v Duration) {
		if v.Set {
			*dst = v
		}
	}
	setDur(&o.Timeout, p.Timeout)
	setDur(&o.RetryInitial, p.RetryInitial)
	setDur(&o.RetryMaxInterval, p.RetryMaxInterval)
	setDur(&o.Debounce, p.Debounce)
	setDur(&o.MaxWait, p.MaxWait)
	setDur(&o.BatchWait, p.BatchWait)
	setDur(&o.ParkAfter, p.ParkAfter)
	setDur(&o.RetryFor, p.RetryFor)
	setDur(&o.DisableAfter, p.DisableAfter)
	for _, f := range []struct{ dst, v **int }{
		{&o.BatchMax, &p.BatchMax}, {&o.BatchBytes, &p.BatchBytes},
		{&o.MaxPayloadBytes, &p.MaxPayloadBytes}, {&o.MaxInFlight, &p.MaxInFlight},
	} {
		if *f.v != nil {
			*f.dst = *f.v
		}
	}
	if p.Payload != nil {
		o.Payload = p.Payload
	}
	if p.ResourceURL != nil {
		o.ResourceURL = p.ResourceURL
	}
	if p.Signature != nil {
		o.Signature = p.Signature
	}
	if p.RateLimit != nil {
		o.RateLimit = p.RateLimit
	}
	if p.MaxInFlightPerHost != nil {
		o.MaxInFlightPerHost = p.MaxInFlightPerHost
	}
	if p.ProxyURL != nil {
		if *p.ProxyURL == MaskURL(deref(o.ProxyURL)) {
			p.ProxyURL = o.ProxyURL // given back as the API showed it: unchanged
		}
		o.ProxyURL = p.ProxyURL
	}
	if p.TLS != nil {
		t := p.TLS.merge(TLSOptions{})
		if o.TLS != nil {
			t = o.TLS.merge(*p.TLS)
		}
		o.TLS = &t
	}
	if p.Headers != nil { // the whole set: a header left out goes
		old := o.Headers
		o.Headers = make(map[string]string, len(p.Headers))
		for name, v := range p.Headers {
			if v == Masked {
				if prev, ok := old[name]; ok {
					v = prev // given back as the API showed it: unchanged
				}
			}
			o.Headers[name] = v
		}
	}
	return o
}

// OptionsOf spells resolved options out, every field set, for people to
// read: secret values (header values, a proxy's password) are Masked.
func OptionsOf(d DeliveryOptions) Options {
	payload, url := string(d.Payload), d.ResourceURL
	o := Options{
		Timeout: Dur(d.Timeout), RetryInitial: Dur(d.RetryInitial), RetryMaxInterval: Dur(d.RetryMaxInterval),
		Debounce: Dur(d.Debounce), MaxWait: Dur(d.MaxWait), BatchWait: Dur(d.BatchWait),
		BatchMax: &d.BatchMax, BatchBytes: &d.BatchBytes, MaxPayloadBytes: &d.MaxPayloadBytes, MaxInFlight: &d.MaxInFlight,
		Payload: &payload, ResourceURL: &url, ParkAfter: Dur(d.ParkAfter), RetryFor: Dur(d.RetryFor), DisableAfter: Dur(d.DisableAfter),
		Signature: slices.Clone(d.Signature), Headers: masked(d.Headers),
	}
	if d.RateLimit.PerSecond() > 0 {
		r := d.RateLimit.String()
		o.RateLimit = &r
	}
	if d.ProxyURL != "" {
		p := MaskURL(d.ProxyURL)
		o.ProxyURL = &p
	}
	if !d.TLS.IsZero() {
		t := d.TLS
		o.TLS = &t
	}
	return o
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func masked(headers map[string]string) map[string]string {
	if headers == nil {
		return nil
	}
	m := make(map[string]string, len(headers))
	for name := range headers {
		m[name] = Masked
	}
	return m
}

// hold is an option that keeps events in memory: at most MaxHold.
type hold struct {
	name string
	v    Duration       // as o sets it
	dst  *time.Duration // as resolved into r
}

// holds lists o's options that MaxHold bounds, with their places in r.
func (o *Options) holds(r *DeliveryOptions) []hold {
	return []hold{
		{"debounce", o.Debounce, &r.Debounce},
		{"max_wait", o.MaxWait, &r.MaxWait},
		{"batch_wait", o.BatchWait, &r.BatchWait},
		{"park_after", o.ParkAfter, &r.ParkAfter},
	}
}

// clamped is o with the values that are out of bounds now brought inside
// them: a stored subscription from before a bound, or from before the operator
// lowered max_timeout or max_hold, keeps being delivered, within the bounds.
func (o Options) clamped(base DeliveryOptions) Options {
	ceil := func(v *Duration, most time.Duration) {
		if v.Set && most > 0 {
			if d, err := time.ParseDuration(v.Raw); err == nil && d > most {
				*v = Dur(most)
			}
		}
	}
	ceil(&o.Timeout, base.MaxTimeout)
	ceil(&o.Debounce, base.MaxHold)
	ceil(&o.MaxWait, base.MaxHold)
	ceil(&o.BatchWait, base.MaxHold)
	ceil(&o.ParkAfter, base.MaxHold)
	clamp := func(v **int, most int) {
		if *v != nil && **v > most {
			m := most
			*v = &m
		}
	}
	clamp(&o.BatchMax, MostBatchMax)
	clamp(&o.MaxInFlight, MostInFlight)
	return o
}
