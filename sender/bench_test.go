package sender

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/sender/ssrf"
)

var benchPayload = json.RawMessage(`{"name": "Ada Lovelace", "email": "ada@example.com", "company": "Analytical Engines Ltd", "address": {"street": "12 St James's Square", "city": "London", "country": "GB"}, "tags": ["vip", "math", "poetry"], "notes": "First programmer; wrote notes on the Analytical Engine.", "score": 98.5}`)

func benchEvent(i int) outbox.Event {
	return outbox.Event{ID: strconv.Itoa(i), Type: "contact.updated", ResourceID: "c-" + strconv.Itoa(i%100), Tenant: "acme",
		Payload: benchPayload, CommitTime: time.Now(), Seq: uint64(i), Coalesced: 1}
}

// BenchmarkEnvelope encodes one envelope into a reused buffer.
func BenchmarkEnvelope(b *testing.B) {
	e := benchEvent(1)
	opts := outbox.DefaultDeliveryOptions()
	buf := make([]byte, 0, 1024)
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendEnvelope(buf[:0], &e, &opts)
	}
	b.SetBytes(int64(len(buf)))
}

// BenchmarkBatchBodyAndSign builds and signs the body of a batch of 1,000, per event.
func BenchmarkBatchBodyAndSign(b *testing.B) {
	sub := &outbox.Subscription{ID: "crm", Delivery: outbox.DefaultDeliveryOptions()}
	sub.Delivery.BatchMax = 1000
	events := make([]outbox.Event, 1000)
	for i := range events {
		events[i] = benchEvent(i)
	}
	batch := outbox.NewBatch(sub, events...)
	key, _ := ParseSecret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
	b.ReportAllocs()
	for b.Loop() {
		body := AppendBody(nil, batch)
		Sign(key, batch.WebhookID, 1700000000, body)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1000, "ns/event")
}

// BenchmarkDeliverBatch sends batches of 1,000 to a local endpoint, per request:
// body, signature and the HTTP round trip, with the body buffer recycled.
func BenchmarkDeliverBatch(b *testing.B) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.WriteHeader(http.StatusNoContent)
	}))
	defer srv.Close()
	sub := &outbox.Subscription{ID: "crm", TargetURL: srv.URL, Secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
		Delivery: outbox.DefaultDeliveryOptions(), Static: true}
	sub.Delivery.BatchMax = 1000
	events := make([]outbox.Event, 1000)
	for i := range events {
		events[i] = benchEvent(i)
	}
	batch := outbox.NewBatch(sub, events...)
	s := New(&ssrf.Guard{}, Config{})
	defer s.Close()
	b.ReportAllocs()
	for b.Loop() {
		if err := s.Deliver(context.Background(), batch); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDeliverOne sends one event per request, as unbatched subscriptions
// do: the transport's cost per request shows here (a batch of 1,000 is over
// maxLeanBody and goes through net/http either way).
func BenchmarkDeliverOne(b *testing.B) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.WriteHeader(http.StatusNoContent)
	}))
	defer srv.Close()
	sub := &outbox.Subscription{ID: "crm", TargetURL: srv.URL, Secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
		Delivery: outbox.DefaultDeliveryOptions(), Static: true}
	batch := outbox.NewBatch(sub, benchEvent(1))
	for _, kind := range []string{TransportLean, TransportStdlib} {
		b.Run(kind, func(b *testing.B) {
			s := New(&ssrf.Guard{}, Config{Transport: kind})
			defer s.Close()
			b.ReportAllocs()
			for b.Loop() {
				if err := s.Deliver(context.Background(), batch); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
