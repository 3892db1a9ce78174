package outbox

import (
	"strings"
	"testing"
	"time"
)

func TestMatchPattern(t *testing.T) {
	tests := []struct {
		pattern, typ string
		want         bool
	}{
		{"*", "contact.updated", true},
		{"contact.*", "contact.updated", true},
		{"contact.*", "contact.address.changed", true},
		{"contact.*", "contacts.updated", false},
		{"contact.*", "contact", false},
		{"contact.updated", "contact.updated", true},
		{"contact.updated", "contact.created", false},
	}
	for _, tt := range tests {
		if got := MatchPattern(tt.pattern, tt.typ); got != tt.want {
			t.Errorf("MatchPattern(%q, %q) = %v, want %v", tt.pattern, tt.typ, got, tt.want)
		}
	}
}

func TestValidPattern(t *testing.T) {
	for p, want := range map[string]bool{"*": true, "a.*": true, "a.b": true, "": false, "a*": false, ".*": false, "*.b": false} {
		if got := ValidPattern(p); got != want {
			t.Errorf("ValidPattern(%q) = %v, want %v", p, got, want)
		}
	}
}

func TestMatchesTenant(t *testing.T) {
	s := &Subscription{Events: []string{"*"}, Tenant: "acme"}
	if !s.Matches(&Event{Type: "x", Tenant: "acme"}) {
		t.Error("tenant subscription misses its tenant's event")
	}
	if s.Matches(&Event{Type: "x", Tenant: "other"}) || s.Matches(&Event{Type: "x"}) {
		t.Error("tenant subscription receives another tenant's event")
	}
	all := &Subscription{Events: []string{"*"}}
	if !all.Matches(&Event{Type: "x", Tenant: "other"}) {
		t.Error("subscription without tenant misses a tenant's event")
	}
}

func TestWebhookIDIsDerived(t *testing.T) {
	e1, e2 := []Event{{ID: "1"}}, []Event{{ID: "2"}}
	if WebhookID("a", e1) != WebhookID("a", []Event{{ID: "1", Type: "other"}}) {
		t.Error("webhook-id depends on more than subscription and event ids")
	}
	if WebhookID("a", e1) == WebhookID("a", e2) || WebhookID("a", e1) == WebhookID("b", e1) {
		t.Error("webhook-id collides across events or subscriptions")
	}
	if WebhookID("a1", []Event{{ID: "2"}}) == WebhookID("a", []Event{{ID: "12"}}) {
		t.Error("webhook-id is ambiguous at the subscription/event boundary")
	}
}

// A stored subscription from before a ceiling was lowered keeps being
// delivered, within the ceiling, instead of failing to load.
func TestStoredRowIsClampedToTheCeilings(t *testing.T) {
	base := DefaultDeliveryOptions()
	base.MaxTimeout, base.MaxHold = 5*time.Second, time.Minute
	row := &SubscriptionRow{ID: "s", Events: []string{"*"}, TargetURL: "http://x/", Secret: "whsec_" + strings.Repeat("A", 32),
		Options: Options{Timeout: Dur(time.Hour), Debounce: Dur(time.Hour), MaxWait: Dur(time.Hour), ParkAfter: Dur(100 * time.Hour)}}
	sub, err := row.Subscription(base)
	if err != nil {
		t.Fatal(err)
	}
	d := sub.Delivery
	if d.Timeout != 5*time.Second || d.Debounce != time.Minute || d.MaxWait != time.Minute || d.ParkAfter != time.Minute {
		t.Errorf("timeout %s, debounce %s, max_wait %s, park_after %s: want 5s and 1m", d.Timeout, d.Debounce, d.MaxWait, d.ParkAfter)
	}
	if _, err := (Options{ParkAfter: Dur(2 * time.Minute)}).Resolve("", base); err == nil || !strings.Contains(err.Error(), "park_after: 2m0s is more than max_hold") {
		t.Errorf("a new park_after above max_hold: %v", err)
	}
}

// TestCheckSubscriptionNamesEveryBadField: config, API and CLI check a
// subscription's patterns, target and tenant here, and every bad one is named.
func TestCheckSubscriptionNamesEveryBadField(t *testing.T) {
	err := CheckSubscription("subscriptions[crm]", []string{"a..b"}, "ftp://x/"+strings.Repeat("y", 10), "t\x00")
	for _, want := range []string{"subscriptions[crm].events[0]", "subscriptions[crm].target_url: must be an absolute",
		"subscriptions[crm].tenant: holds a control character"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v, want it to name %s", err, want)
		}
	}
	if err := CheckSubscription("", []string{"*"}, "https://x/"+strings.Repeat("y", MostTargetURLLen), ""); err == nil ||
		!strings.HasPrefix(err.Error(), "target_url: longer than 2048 bytes") {
		t.Errorf("a long target: %v", err)
	}
	if err := CheckSubscription("", []string{"contact.*"}, "https://x/hooks", "acme"); err != nil {
		t.Errorf("a good one: %v", err)
	}
}
