package outbox

import (
	"strings"
	"time"
)

// Subscription is one receiver of hooks.
type Subscription struct {
	ID        string
	Events    []string // patterns: "contact.updated", "contact.*", "*"
	Tenant    string   // "" receives every tenant's events; else only this tenant's
	TargetURL string
	Secret    string // "whsec_" + base64 key, used for Standard Webhooks signatures
	Delivery  DeliveryOptions
}

// DeliveryOptions tune how a subscription's hooks are sent.
type DeliveryOptions struct {
	Timeout          time.Duration // deadline of one attempt, whole exchange; default 10s
	RetryInitial     time.Duration // first retry delay; default 1s
	RetryMaxInterval time.Duration // cap of the retry delay and of Retry-After; default 5m
}

// DefaultDeliveryOptions are used where config sets nothing.
var DefaultDeliveryOptions = DeliveryOptions{
	Timeout:          10 * time.Second,
	RetryInitial:     time.Second,
	RetryMaxInterval: 5 * time.Minute,
}

// WithDefaults fills zero fields from def.
func (o DeliveryOptions) WithDefaults(def DeliveryOptions) DeliveryOptions {
	if o.Timeout == 0 {
		o.Timeout = def.Timeout
	}
	if o.RetryInitial == 0 {
		o.RetryInitial = def.RetryInitial
	}
	if o.RetryMaxInterval == 0 {
		o.RetryMaxInterval = def.RetryMaxInterval
	}
	return o
}

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

// ValidPattern reports whether p is a pattern MatchPattern understands: "*",
// "prefix.*", or a name without "*".
func ValidPattern(p string) bool {
	if p == "*" {
		return true
	}
	name := strings.TrimSuffix(p, ".*")
	return name != "" && !strings.Contains(name, "*")
}
