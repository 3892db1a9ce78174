package outbox

import (
	"strings"
	"testing"
)

func TestCheckHeadersRefusesReservedAndBrokenOnes(t *testing.T) {
	const secretValue = "s3cr3t-value"
	for _, tc := range []struct {
		headers map[string]string
		want    string // "" = valid
	}{
		{map[string]string{"X-Api-Key": secretValue, "Authorization": "Bearer " + secretValue}, ""},
		{map[string]string{"webhook-id": secretValue}, "h.webhook-id: walhook or the connection sets"},
		{map[string]string{"Webhook-Signature": secretValue}, "h.Webhook-Signature: walhook"},
		{map[string]string{"Host": secretValue}, "h.Host: walhook"},
		{map[string]string{"Content-Type": secretValue}, "h.Content-Type: walhook"},
		{map[string]string{"Content-Length": "1"}, "h.Content-Length: walhook"},
		{map[string]string{"Transfer-Encoding": "chunked"}, "h.Transfer-Encoding"},
		{map[string]string{"Connection": "close"}, "h.Connection"},
		{map[string]string{"Keep-Alive": "1"}, "h.Keep-Alive"},
		{map[string]string{"Upgrade": "h2c"}, "h.Upgrade"},
		{map[string]string{"TE": "trailers"}, "h.TE"},
		{map[string]string{"Proxy-Authorization": secretValue}, "h.Proxy-Authorization"},
		{map[string]string{"X-A": secretValue + "\r\nX-Evil: 1"}, "h.X-A: the value contains CR, LF"},
		{map[string]string{"X-A": "a\nb"}, "CR, LF"},
		{map[string]string{"X-A": "a\x00b"}, "control character"},
		{map[string]string{"X A": secretValue}, "is not a header name"},
		{map[string]string{"X-A:": "1"}, "is not a header name"},
		{map[string]string{"": "1"}, "empty header name"},
		{map[string]string{"x-a": "1", "X-A": "2"}, "the same header"},
		{map[string]string{"X-A": strings.Repeat("v", MostHeaderValueLen+1)}, "longer than 4096"},
		{func() map[string]string {
			m := map[string]string{}
			for i := range MostHeaders + 1 {
				m["X-"+string(rune('A'+i))] = "1"
			}
			return m
		}(), "21 headers, at most 20"},
		{map[string]string{"X-A": strings.Repeat("v", 4000), "X-B": strings.Repeat("v", 4000), "X-C": strings.Repeat("v", 400)}, "bytes of names and values, at most 8192"},
	} {
		err := CheckHeaders("h", tc.headers)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%v: %v", tc.headers, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("CheckHeaders = %v, want %q", err, tc.want)
		case err != nil && strings.Contains(err.Error(), secretValue):
			t.Errorf("the error shows the value: %v", err)
		}
	}
}

func TestHeadersAreMaskedAndMaskKeepsTheValue(t *testing.T) {
	o := Options{Headers: map[string]string{"X-Api-Key": "k1", "X-Other": "o1"}}
	d, err := o.Resolve("", DefaultDeliveryOptions())
	if err != nil {
		t.Fatal(err)
	}
	if shown := OptionsOf(d).Headers; shown["X-Api-Key"] != Masked || shown["X-Other"] != Masked {
		t.Fatalf("OptionsOf shows %v, want masked values", shown)
	}
	// A PATCH gives the masked value back for one and a new value for the
	// other, and leaves a third out: the set is replaced, the masked kept.
	m := o.Merge(Options{Headers: map[string]string{"X-Api-Key": Masked, "X-New": "n1"}})
	if len(m.Headers) != 2 || m.Headers["X-Api-Key"] != "k1" || m.Headers["X-New"] != "n1" {
		t.Fatalf("merged headers %v", m.Headers)
	}
}
