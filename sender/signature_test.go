package sender_test

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"net/http"
	"strings"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/sender"
	"github.com/walhook/walhook/sender/sendertest"
	"github.com/walhook/walhook/sender/ssrf"
)

// verifyV1a checks a request's v1a signatures as the spec says, with Go's
// crypto/ed25519 and nothing of walhook's: base64 of the raw 32-byte public
// key after whpk_, signatures "v1a,<base64 of 64 bytes>" in a space-separated
// list, over "id.timestamp.body". It returns how many verify under pub.
func verifyV1a(t *testing.T, publicKey string, h http.Header, body []byte) int {
	t.Helper()
	raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(publicKey, "whpk_"))
	if err != nil || !strings.HasPrefix(publicKey, "whpk_") || len(raw) != ed25519.PublicKeySize {
		t.Fatalf("public key %q is not whpk_ and base64 of 32 bytes", publicKey)
	}
	msg := h.Get("webhook-id") + "." + h.Get("webhook-timestamp") + "." + string(body)
	n := 0
	for _, sig := range strings.Split(h.Get("webhook-signature"), " ") {
		enc, ok := strings.CutPrefix(sig, "v1a,")
		if !ok {
			continue
		}
		s, err := base64.StdEncoding.DecodeString(enc)
		if err != nil || len(s) != ed25519.SignatureSize {
			t.Fatalf("v1a signature %q is not base64 of 64 bytes", sig)
		}
		if ed25519.Verify(ed25519.PublicKey(raw), []byte(msg), s) {
			n++
		}
	}
	return n
}

// newKeyPair is an ed25519 pair made without walhook's code: whsk_ is the
// seed, whpk_ the public key, both standard base64.
func newKeyPair(t *testing.T) (whsk, whpk string) {
	pub, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	return "whsk_" + base64.StdEncoding.EncodeToString(priv.Seed()), "whpk_" + base64.StdEncoding.EncodeToString(pub)
}

func deliverOnce(t *testing.T, sub *outbox.Subscription) sendertest.Request {
	t.Helper()
	srv := sendertest.NewServer(t, nil)
	sub.TargetURL = srv.HooksURL()
	if err := sender.New(&ssrf.Guard{}, sender.Config{}).Deliver(context.Background(), outbox.NewBatch(sub, testEvent())); err != nil {
		t.Fatalf("Deliver: %v", err)
	}
	return srv.Requests()[0]
}

func TestV1aSignatureVerifiesWithEd25519(t *testing.T) {
	whsk, whpk := newKeyPair(t)
	sub := testSub("")
	sub.Secret = whsk
	sub.Delivery.Signature = outbox.Schemes{outbox.SchemeV1a}
	r := deliverOnce(t, sub)
	if got := sender.PublicKey(whsk); got != whpk {
		t.Fatalf("PublicKey = %q, want %q", got, whpk)
	}
	if n := verifyV1a(t, whpk, r.Header, r.Body); n != 1 {
		t.Fatalf("%d v1a signatures verify in %q, want 1", n, r.Header.Get("webhook-signature"))
	}
	if sig := r.Header.Get("webhook-signature"); strings.Contains(sig, "v1,") {
		t.Errorf("signature: v1a sent a v1 signature too: %q", sig)
	}
	// A tampered body does not verify.
	if n := verifyV1a(t, whpk, r.Header, append([]byte(" "), r.Body...)); n != 0 {
		t.Error("a changed body still verifies")
	}
}

func TestV1AndV1aTogether(t *testing.T) {
	whsk, whpk := newKeyPair(t)
	sub := testSub("")
	sub.Secret = secret + " " + whsk
	sub.Delivery.Signature = outbox.Schemes{outbox.SchemeV1, outbox.SchemeV1a}
	r := deliverOnce(t, sub)
	if n := verifyV1a(t, whpk, r.Header, r.Body); n != 1 {
		t.Fatalf("%d v1a signatures verify, want 1", n)
	}
	wh, err := standardwebhooks.NewWebhook(secret)
	if err != nil {
		t.Fatal(err)
	}
	if err := wh.Verify(r.Body, r.Header); err != nil {
		t.Fatalf("v1 does not verify with the reference library: %v", err)
	}
}

func TestV1aRotationSignsWithBothKeys(t *testing.T) {
	oldSK, oldPK := newKeyPair(t)
	newSK, newPK := newKeyPair(t)
	sub := testSub("")
	sub.Delivery.Signature = outbox.Schemes{outbox.SchemeV1a}
	sub.Secret, sub.PreviousSecret, sub.PreviousUntil = newSK, oldSK, time.Now().Add(time.Hour)
	r := deliverOnce(t, sub)
	if verifyV1a(t, newPK, r.Header, r.Body) != 1 || verifyV1a(t, oldPK, r.Header, r.Body) != 1 {
		t.Fatalf("during the overlap both keys must sign: %q", r.Header.Get("webhook-signature"))
	}
	sub.PreviousUntil = time.Now().Add(-time.Second)
	r = deliverOnce(t, sub)
	if verifyV1a(t, newPK, r.Header, r.Body) != 1 || verifyV1a(t, oldPK, r.Header, r.Body) != 0 {
		t.Fatalf("after the overlap only the new key signs: %q", r.Header.Get("webhook-signature"))
	}
}

func TestCheckSecretNamesWhatIsWrong(t *testing.T) {
	whsk, _ := newKeyPair(t)
	v1, v1a, both := outbox.Schemes{"v1"}, outbox.Schemes{"v1a"}, outbox.Schemes{"v1", "v1a"}
	for _, tc := range []struct {
		secret  string
		schemes outbox.Schemes
		want    string // "" = valid
	}{
		{secret, v1, ""},
		{whsk, v1a, ""},
		{secret + " " + whsk, both, ""},
		{whsk + " " + secret, both, ""},
		{secret, v1a, "does not use"},
		{secret, both, "no key for signature v1a"},
		{whsk, v1, "does not use"},
		{secret + " " + secret, v1, "two keys"},
		{"whsk_AAAA", v1a, "seed of 32 bytes"},
		{"whpk_AAAA", v1a, `"whsec_" (v1) or "whsk_" (v1a)`},
	} {
		err := sender.CheckSecret(tc.secret, tc.schemes)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("CheckSecret(%v): %v", tc.schemes, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("CheckSecret(%v) = %v, want %q", tc.schemes, err, tc.want)
		case err != nil && strings.Contains(err.Error(), strings.TrimPrefix(whsk, "whsk_")):
			t.Errorf("the error shows the key: %v", err)
		}
	}
	// The 64-byte private key form is accepted and signs like its seed.
	_, priv, _ := ed25519.GenerateKey(nil)
	long := "whsk_" + base64.StdEncoding.EncodeToString(priv)
	short := "whsk_" + base64.StdEncoding.EncodeToString(priv.Seed())
	if err := sender.CheckSecret(long, v1a); err != nil || sender.PublicKey(long) != sender.PublicKey(short) {
		t.Errorf("64-byte whsk_: %v", err)
	}
}
