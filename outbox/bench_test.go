package outbox

import (
	"encoding/json"
	"strconv"
	"testing"
)

// BenchmarkRouting matches an event against 20 subscriptions with patterns.
func BenchmarkRouting(b *testing.B) {
	var subs []*Subscription
	for i := range 20 {
		subs = append(subs, &Subscription{ID: strconv.Itoa(i), Events: []string{"order.*", "invoice.paid", "contact." + strconv.Itoa(i)}})
	}
	subs = append(subs, &Subscription{ID: "all", Events: []string{"*"}, Tenant: "acme"})
	e := Event{ID: "1", Type: "contact.7", Tenant: "acme", Payload: json.RawMessage(`{}`)}
	b.ReportAllocs()
	for b.Loop() {
		n := 0
		for _, s := range subs {
			if s.Matches(&e) {
				n++
			}
		}
		if n != 2 {
			b.Fatal(n)
		}
	}
}

func BenchmarkWebhookID(b *testing.B) {
	events := make([]Event, 1000)
	for i := range events {
		events[i].ID = strconv.Itoa(i)
	}
	b.ReportAllocs()
	for b.Loop() {
		WebhookID("crm", events)
	}
}
