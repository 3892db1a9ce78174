package sender

import (
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/walhook/walhook/outbox"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	if !json.Valid(got) {
		t.Fatalf("%s: body is not valid JSON: %s", name, got)
	}
	path := filepath.Join("testdata", name+".golden")
	if *update {
		os.MkdirAll("testdata", 0o755)
		if err := os.WriteFile(path, append(got, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./sender -run TestBodies -update)", err)
	}
	if string(got)+"\n" != string(want) {
		t.Errorf("%s:\n got %s\nwant %s", name, got, want)
	}
}

func TestBodies(t *testing.T) {
	commit := time.Date(2026, 11, 29, 8, 5, 44, 55818000, time.FixedZone("CET", 3600))
	ev := func(id, rid string, payload string) outbox.Event {
		return outbox.Event{ID: id, Type: "contact.updated", ResourceID: rid, Tenant: "acme",
			Payload: json.RawMessage(payload), CommitTime: commit, Seq: 0x1D5F0C0<<16 | 3, Coalesced: 1}
	}
	sub := func(mod func(*outbox.DeliveryOptions)) *outbox.Subscription {
		s := &outbox.Subscription{ID: "crm", Delivery: outbox.DefaultDeliveryOptions()}
		mod(&s.Delivery)
		return s
	}
	full := sub(func(*outbox.DeliveryOptions) {})
	coalesced := ev("12", "c1", `{"name": "Ada"}`)
	coalesced.Coalesced = 12
	golden(t, "single", AppendBody(nil, outbox.NewBatch(full, coalesced)))

	skinny := sub(func(o *outbox.DeliveryOptions) {
		o.Payload = outbox.PayloadSkinny
		o.ResourceURL = "https://api.example.com/contacts/{resource_id}"
	})
	golden(t, "skinny", AppendBody(nil, outbox.NewBatch(skinny, ev("7", "c 1/x", `{"secret": 1}`))))

	small := sub(func(o *outbox.DeliveryOptions) {
		o.MaxPayloadBytes = 8
		o.ResourceURL = "https://api.example.com/c/{resource_id}"
	})
	golden(t, "truncated", AppendBody(nil, outbox.NewBatch(small, ev("8", "c1", `{"big": "xxxxxxxx"}`))))

	batched := sub(func(o *outbox.DeliveryOptions) { o.BatchMax = 100 })
	golden(t, "batch", AppendBody(nil, outbox.NewBatch(batched, ev("1", "c1", `{}`), ev("2", "", `[1,2]`))))
	golden(t, "batch_of_one", AppendBody(nil, outbox.NewBatch(batched, ev("3", "c1", `null`))))

	odd := ev("\"quoted\"\\", "line\nbreak\t\x01", `{}`)
	odd.Type = "bad utf8 \xff and é"
	golden(t, "escaping", AppendBody(nil, outbox.NewBatch(full, odd)))
}

// FuzzAppendString checks the hand-written JSON string encoder against
// encoding/json.
func FuzzAppendString(f *testing.F) {
	for _, s := range []string{"", "plain", "q\"b\\", "\x00\x1f\x7f", "é€😀", "\xff\xfe", "<&>", "\u2028"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		enc := appendString(nil, s)
		var back string
		if err := json.Unmarshal(enc, &back); err != nil {
			t.Fatalf("appendString(%q) = %s: %v", s, enc, err)
		}
		var want strings.Builder // each invalid byte becomes U+FFFD
		for _, r := range s {
			want.WriteRune(r)
		}
		if back != want.String() {
			t.Fatalf("appendString(%q) decodes to %q, want %q", s, back, want.String())
		}
	})
}
