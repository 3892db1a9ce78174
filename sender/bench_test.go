package sender

import (
	"encoding/json"
	"strconv"
	"testing"
	"time"

	"github.com/walhook/walhook/outbox"
)

var benchPayload = json.RawMessage(`{"name": "Ada Lovelace", "email": "ada@example.com", "company": "Analytical Engines Ltd", "address": {"street": "12 St James's Square", "city": "London", "country": "GB"}, "tags": ["vip", "math", "poetry"], "notes": "First programmer; wrote notes on the Analytical Engine.", "score": 98.5}`)

func benchEvent(i int) outbox.Event {
	return outbox.Event{ID: strconv.Itoa(i), Type: "contact.updated", ResourceID: "c-" + strconv.Itoa(i%100), Tenant: "acme",
		Payload: benchPayload, CommitTime: time.Now(), Seq: uint64(i), Coalesced: 1}
}

// BenchmarkEnvelope encodes one envelope into a reused buffer.
func BenchmarkEnvelope(b *testing.B) {
	e := benchEvent(1)
	opts := outbox.DefaultDeliveryOptions
	buf := make([]byte, 0, 1024)
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendEnvelope(buf[:0], &e, &opts)
	}
	b.SetBytes(int64(len(buf)))
}

// BenchmarkBatchBodyAndSign builds and signs the body of a batch of 1,000, per event.
func BenchmarkBatchBodyAndSign(b *testing.B) {
	sub := &outbox.Subscription{ID: "crm", Delivery: outbox.DefaultDeliveryOptions}
	sub.Delivery.BatchMax = 1000
	events := make([]outbox.Event, 1000)
	for i := range events {
		events[i] = benchEvent(i)
	}
	batch := outbox.NewBatch(sub, events...)
	key, _ := ParseSecret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
	b.ReportAllocs()
	for b.Loop() {
		body := Body(batch)
		Sign(key, batch.WebhookID, 1700000000, body)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1000, "ns/event")
}
