package api

import (
	"errors"
	"net/http"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/walhook/walhook/outbox"
)

// FuzzDecodeRequest: any body is a Request or a 4xx error naming a field; a
// Request that decodes and passes the checks holds only valid UTF-8 without
// control characters, and its options resolve or say why not.
func FuzzDecodeRequest(f *testing.F) {
	for _, seed := range []string{
		`{"event": "contact.*", "target_url": "https://example.com/hooks"}`,
		`{"events": ["a", "b.*", "*"], "tenant": "t", "timeout": "5s", "batch_max": 10, "max_in_flight": 4}`,
		`{"event": "a\u0000b"}`, "{\"event\": \"a\xffb\"}", `{"event": "a"} GARBAGE`, `{"event": "a"}{}`,
		`{"batch_max": "5"}`, `{"batch_max": 5.5}`, `{"timeout": 5}`, `{"colour": "red"}`, `[]`, `null`, `"x"`, ``,
		`{"events": [["nested"]], "x": {"y": "\u0001"}}`, `{"tenant": {"a": 1}}`, `{"payload": "skinny"}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var req Request
		err := decodeJSON(data, &req)
		if err != nil {
			var e *Error
			if !errors.As(err, &e) || e.Status < 400 || e.Status > 499 || !strings.Contains(e.Message, ":") {
				t.Fatalf("error %v is not a 4xx naming a field", err)
			}
			return
		}
		if checkRequest(&req) != nil {
			return
		}
		for _, s := range append([]string{req.Event, req.TargetURL, req.Secret, deref(req.Tenant)}, req.Events...) {
			if !utf8.ValidString(s) || outbox.HasControl(s) {
				t.Fatalf("decoded %q from %q", s, data)
			}
		}
		if req.Event != "" && outbox.CheckPattern(req.Event) == nil && !outbox.MatchPattern(req.Event, req.Event) && !strings.HasSuffix(req.Event, "*") {
			t.Fatalf("pattern %q does not match itself", req.Event)
		}
		req.Options.Resolve("", outbox.DefaultDeliveryOptions())
	})
}

func TestCheckContentType(t *testing.T) {
	for ct, ok := range map[string]bool{"application/json": true, "application/json; charset=UTF-8": true, "Application/JSON": true,
		"": false, "text/plain": false, "application/json; charset=latin1": false, "application/jsonx": false, "application/json;;": false} {
		err := checkContentType(ct)
		var e *Error
		if (err == nil) != ok || (err != nil && (!errors.As(err, &e) || e.Status != http.StatusUnsupportedMediaType)) {
			t.Errorf("%q: %v", ct, err)
		}
	}
}
