package sender_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/sender"
	"github.com/walhook/walhook/sender/sendertest"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

func testSub(url string) *outbox.Subscription {
	return &outbox.Subscription{ID: "crm", Events: []string{"*"}, TargetURL: url, Secret: secret,
		Delivery: outbox.DefaultDeliveryOptions}
}

func testEvent() outbox.Event {
	return outbox.Event{ID: "42", Type: "contact.updated", ResourceID: "c1",
		Payload: json.RawMessage(`{"name":"Ada"}`), CommitTime: time.Date(2026, 1, 2, 3, 4, 5, 0, time.FixedZone("x", 3600))}
}

func TestDeliverSignsAndFollowsContract(t *testing.T) {
	srv := sendertest.NewServer(t, nil)
	s := sender.New()
	b := outbox.NewBatch(testSub(srv.HooksURL()), testEvent())
	if err := s.Deliver(context.Background(), b); err != nil {
		t.Fatalf("Deliver: %v", err)
	}
	r := srv.Requests()[0]
	wh, err := standardwebhooks.NewWebhook(secret)
	if err != nil {
		t.Fatal(err)
	}
	if err := wh.Verify(r.Body, r.Header); err != nil {
		t.Fatalf("signature does not verify: %v", err)
	}
	for k, want := range map[string]string{
		"content-type": "application/json",
		"user-agent":   "walhook/" + sender.Version,
		"webhook-id":   b.WebhookID,
	} {
		if got := r.Header.Get(k); got != want {
			t.Errorf("header %s = %q, want %q", k, got, want)
		}
	}
	ts, _ := strconv.ParseInt(r.Header.Get("webhook-timestamp"), 10, 64)
	if d := time.Since(time.Unix(ts, 0)); d < -time.Minute || d > time.Minute {
		t.Errorf("webhook-timestamp %d is not now", ts)
	}
	want := `{"id":"42","type":"contact.updated","timestamp":"2026-01-02T02:04:05Z","resource_id":"c1","tenant":null,"sequence":0,"coalesced":1,"data":{"name":"Ada"}}`
	if string(r.Body) != want {
		t.Errorf("body\n got %s\nwant %s", r.Body, want)
	}
}

func TestDeliverClassifiesResponses(t *testing.T) {
	tests := []struct {
		status     int
		header     http.Header
		retryable  bool
		retryAfter time.Duration
	}{
		{status: 500, retryable: true},
		{status: 503, header: http.Header{"Retry-After": {"7"}}, retryable: true, retryAfter: 7 * time.Second},
		{status: 429, header: http.Header{"Retry-After": {"2"}}, retryable: true, retryAfter: 2 * time.Second},
		{status: 408, retryable: true},
		{status: 400, retryable: false},
		{status: 404, retryable: false},
		{status: 410, retryable: false},
		{status: 302, header: http.Header{"Location": {"http://127.0.0.1:1/elsewhere"}}, retryable: false},
	}
	for _, tt := range tests {
		t.Run(strconv.Itoa(tt.status), func(t *testing.T) {
			srv := sendertest.NewServer(t, func(int, *sendertest.Request) (int, http.Header) { return tt.status, tt.header })
			err := sender.New().Deliver(context.Background(), outbox.NewBatch(testSub(srv.HooksURL()), testEvent()))
			var de *sender.DeliveryError
			if !errors.As(err, &de) {
				t.Fatalf("err = %v, want *DeliveryError", err)
			}
			if de.StatusCode() != tt.status || de.Retryable() != tt.retryable || de.RetryAfter() != tt.retryAfter {
				t.Errorf("got status %d retryable %v retryAfter %v; want %d %v %v",
					de.StatusCode(), de.Retryable(), de.RetryAfter(), tt.status, tt.retryable, tt.retryAfter)
			}
			if n := len(srv.Requests()); n != 1 {
				t.Errorf("%d requests reached the endpoint, want 1 (redirects are not followed)", n)
			}
		})
	}
}

func TestDeliverNetworkErrorIsRetryableAndHidesURL(t *testing.T) {
	sub := testSub("http://user:hunter2@127.0.0.1:1/hooks?token=s3cret")
	err := sender.New().Deliver(context.Background(), outbox.NewBatch(sub, testEvent()))
	var de *sender.DeliveryError
	if !errors.As(err, &de) || !de.Retryable() || de.StatusCode() != 0 {
		t.Fatalf("err = %v, want a retryable DeliveryError without status", err)
	}
	if msg := err.Error(); strings.Contains(msg, "hunter2") || strings.Contains(msg, "s3cret") {
		t.Errorf("error leaks the URL's credentials: %s", msg)
	}
}

func TestDeliverDeadlineCoversWholeExchange(t *testing.T) {
	release := make(chan struct{})
	srv := sendertest.NewServer(t, func(int, *sendertest.Request) (int, http.Header) {
		<-release
		return 200, nil
	})
	defer close(release)
	sub := testSub(srv.HooksURL())
	sub.Delivery.Timeout = 200 * time.Millisecond
	start := time.Now()
	err := sender.New().Deliver(context.Background(), outbox.NewBatch(sub, testEvent()))
	var de *sender.DeliveryError
	if !errors.As(err, &de) || !de.Retryable() {
		t.Fatalf("err = %v, want retryable timeout", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("attempt took %s with a 200ms deadline", d)
	}
}

func TestParseSecretErrorsDoNotLeak(t *testing.T) {
	for _, s := range []string{"nope", "whsec_!!!notbase64", "whsec_c2hvcnQ="} {
		_, err := sender.ParseSecret(s)
		if err == nil {
			t.Errorf("ParseSecret(%q) accepted", s)
			continue
		}
		if strings.Contains(err.Error(), s) {
			t.Errorf("error %q contains the secret", err)
		}
	}
}
