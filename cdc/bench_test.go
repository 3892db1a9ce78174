package cdc

import "testing"

// insertMessage builds a pgoutput Insert of an outbox row with a ~300-byte payload.
func insertMessage() []byte {
	payload := `{"name": "Ada Lovelace", "email": "ada@example.com", "company": "Analytical Engines Ltd", "address": {"street": "12 St James's Square", "city": "London", "country": "GB"}, "tags": ["vip", "math", "poetry"], "notes": "First programmer; wrote notes on the Analytical Engine.", "score": 98.5}`
	cols := []string{"123456", "contact.updated", "c-42", "acme", payload, "2026-11-29 08:00:00+00"}
	msg := []byte{'I', 0, 0, 0x40, 0, 'N', 0, byte(len(cols))}
	for _, c := range cols {
		n := len(c)
		msg = append(msg, 't', byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
		msg = append(msg, c...)
	}
	return msg
}

// BenchmarkDecodeInsert: pgoutput bytes → outbox.Event, as the stream does per row.
func BenchmarkDecodeInsert(b *testing.B) {
	rel := outboxRelation(b, DefaultColumns, "id", "event", "resource_id", "tenant", "payload", "created_at")
	rel.jsonPayload = true // walhook.outbox.payload is jsonb
	wal := insertMessage()
	b.ReportAllocs()
	b.SetBytes(int64(len(wal)))
	var cols []column
	for b.Loop() {
		var err error
		_, cols, err = parseInsert(wal, cols)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := decodeRow(rel, cols); err != nil {
			b.Fatal(err)
		}
	}
}
