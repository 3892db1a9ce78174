package sender_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/sender"
	"github.com/walhook/walhook/sender/sendertest"
	"github.com/walhook/walhook/sender/ssrf"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	sender.SetTestTransport(os.Getenv("WALHOOK_TEST_HTTP_TRANSPORT"))
	goleak.VerifyTestMain(m)
}

const secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

func testSub(url string) *outbox.Subscription {
	return &outbox.Subscription{ID: "crm", Events: []string{"*"}, TargetURL: url, Secret: secret,
		Delivery: outbox.DefaultDeliveryOptions(), Static: true}
}

func testEvent() outbox.Event {
	return outbox.Event{ID: "42", Type: "contact.updated", ResourceID: "c1",
		Payload: json.RawMessage(`{"name":"Ada"}`), CommitTime: time.Date(2026, 1, 2, 3, 4, 5, 0, time.FixedZone("x", 3600))}
}

func TestDeliverSignsAndFollowsContract(t *testing.T) {
	srv := sendertest.NewServer(t, nil)
	s := sender.New(&ssrf.Guard{}, sender.Config{})
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
			err := sender.New(&ssrf.Guard{}, sender.Config{}).Deliver(context.Background(), outbox.NewBatch(testSub(srv.HooksURL()), testEvent()))
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
	err := sender.New(&ssrf.Guard{}, sender.Config{}).Deliver(context.Background(), outbox.NewBatch(sub, testEvent()))
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
	err := sender.New(&ssrf.Guard{}, sender.Config{}).Deliver(context.Background(), outbox.NewBatch(sub, testEvent()))
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

func TestRotationSignsWithBothSecretsDuringOverlap(t *testing.T) {
	const old = "whsec_T2xkT2xkT2xkT2xkT2xkT2xkT2xkT2xk"
	srv := sendertest.NewServer(t, nil)
	sub := testSub(srv.HooksURL())
	sub.PreviousSecret, sub.PreviousUntil = old, time.Now().Add(time.Hour)
	snd := sender.New(&ssrf.Guard{}, sender.Config{})
	if err := snd.Deliver(context.Background(), outbox.NewBatch(sub, testEvent())); err != nil {
		t.Fatal(err)
	}
	sub.PreviousUntil = time.Now().Add(-time.Second) // the overlap is over
	if err := snd.Deliver(context.Background(), outbox.NewBatch(sub, testEvent())); err != nil {
		t.Fatal(err)
	}
	reqs := srv.Requests()
	if n := len(strings.Fields(reqs[0].Header.Get("webhook-signature"))); n != 2 {
		t.Errorf("%d signatures during the overlap, want 2", n)
	}
	for i, secret := range []string{secret, old} {
		wh, _ := standardwebhooks.NewWebhook(secret)
		if err := wh.Verify(reqs[0].Body, reqs[0].Header); err != nil {
			t.Errorf("secret %d does not verify during the overlap: %v", i, err)
		}
	}
	wh, _ := standardwebhooks.NewWebhook(old)
	if err := wh.Verify(reqs[1].Body, reqs[1].Header); err == nil {
		t.Error("the old secret still verifies after the overlap")
	}
}

func TestDynamicTargetsAreGuardedAtDial(t *testing.T) {
	srv := sendertest.NewServer(t, nil)
	sub := testSub(srv.HooksURL())
	sub.Static = false
	err := sender.New(&ssrf.Guard{}, sender.Config{}).Deliver(context.Background(), outbox.NewBatch(sub, testEvent()))
	if !errors.Is(err, ssrf.ErrForbidden) || len(srv.Requests()) != 0 {
		t.Fatalf("err = %v, %d requests: a dynamic subscription reached loopback", err, len(srv.Requests()))
	}
}

func TestVerifyIntent(t *testing.T) {
	echo := sendertest.NewServer(t, func(_ int, r *sendertest.Request) (int, http.Header) {
		return 200, http.Header{"X-Hook-Secret": {r.Header.Get("X-Hook-Secret")}}
	})
	mute := sendertest.NewServer(t, func(int, *sendertest.Request) (int, http.Header) { return 200, nil })
	guard, _ := ssrf.New([]string{"127.0.0.0/8"})
	snd := sender.New(guard, sender.Config{})
	if err := snd.VerifyIntent(context.Background(), echo.HooksURL(), 5*time.Second); err != nil {
		t.Errorf("echoing target: %v", err)
	}
	if err := snd.VerifyIntent(context.Background(), mute.HooksURL(), 5*time.Second); err == nil || !strings.Contains(err.Error(), "echo") {
		t.Errorf("non-echoing target: err = %v", err)
	}
	if h := echo.Requests()[0].Header.Get("X-Hook-Secret"); len(h) < 16 {
		t.Errorf("X-Hook-Secret %q is not random enough", h)
	}
}

// Request bodies are recycled: concurrent deliveries of different batches must
// each arrive whole and signed.
func TestRecycledBodiesStayIntact(t *testing.T) {
	srv := sendertest.NewServer(t, nil)
	s := sender.New(&ssrf.Guard{}, sender.Config{})
	defer s.Close()
	sub := testSub(srv.HooksURL())
	sub.Delivery.BatchMax = 100
	const n = 40
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			events := make([]outbox.Event, 50)
			for j := range events {
				events[j] = testEvent()
				events[j].ID = strconv.Itoa(i*100 + j)
				events[j].Payload = json.RawMessage(`"` + strings.Repeat(strconv.Itoa(i%10), 2000) + `"`)
			}
			if err := s.Deliver(context.Background(), outbox.NewBatch(sub, events...)); err != nil {
				t.Errorf("Deliver: %v", err)
			}
		})
	}
	wg.Wait()
	wh, _ := standardwebhooks.NewWebhook(secret)
	reqs := srv.Requests()
	if len(reqs) != n {
		t.Fatalf("%d requests recorded, want %d", len(reqs), n)
	}
	for _, r := range reqs {
		if err := wh.Verify(r.Body, r.Header); err != nil {
			t.Fatalf("body changed under its signature: %v", err)
		}
		var envs []struct{ ID string }
		if err := json.Unmarshal(r.Body, &envs); err != nil || len(envs) != 50 {
			t.Fatalf("body is not the 50-event batch: %v", err)
		}
	}
}

// A target that answers at once without reading a large body (413, say) is
// heard, not waited out until the attempt's deadline.
func TestEarlyAnswerToALargeBody(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusRequestEntityTooLarge) // without reading the body
	}))
	defer srv.Close()
	s := sender.New(&ssrf.Guard{}, sender.Config{})
	defer s.Close()
	sub := testSub(srv.URL)
	sub.Delivery.BatchMax = 1000
	sub.Delivery.Timeout = 20 * time.Second
	// More than the socket buffers on this path hold: 16 MB.
	events := make([]outbox.Event, 256)
	payload := json.RawMessage(`"` + strings.Repeat("x", 64<<10) + `"`)
	for i := range events {
		events[i] = testEvent()
		events[i].ID = strconv.Itoa(i)
		events[i].Payload = payload
	}
	start := time.Now()
	err := s.Deliver(context.Background(), outbox.NewBatch(sub, events...))
	var de *sender.DeliveryError
	if !errors.As(err, &de) || de.Status != http.StatusRequestEntityTooLarge {
		t.Fatalf("err = %v, want the 413", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("the answer took %s: the attempt waited for its deadline", d)
	}
}
