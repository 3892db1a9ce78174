package cdc

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/jackc/pglogrepl"
	"github.com/walhook/walhook/outbox"
)

func outboxRelation(t testing.TB, c Columns, names ...string) *relation {
	m := &pglogrepl.RelationMessage{Namespace: "walhook", RelationName: "outbox"}
	for _, n := range names {
		m.Columns = append(m.Columns, &pglogrepl.RelationMessageColumn{Name: n})
	}
	rel, err := newRelation(m, c)
	if err != nil {
		t.Fatal(err)
	}
	return rel
}

func text(s string) *pglogrepl.TupleDataColumn {
	return &pglogrepl.TupleDataColumn{DataType: pglogrepl.TupleDataTypeText, Length: uint32(len(s)), Data: []byte(s)}
}

var null = &pglogrepl.TupleDataColumn{DataType: pglogrepl.TupleDataTypeNull}

func tuple(cols ...*pglogrepl.TupleDataColumn) []column {
	out := make([]column, len(cols))
	for i, c := range cols {
		out[i] = column{kind: c.DataType, data: c.Data}
	}
	return out
}

func TestDecodeRow(t *testing.T) {
	def := outboxRelation(t, DefaultColumns, "id", "event", "resource_id", "tenant", "payload", "created_at")
	tests := []struct {
		name    string
		rel     *relation
		tuple   []column
		want    outbox.Event
		wantErr string
	}{
		{
			name:  "full row",
			rel:   def,
			tuple: tuple(text("7"), text("contact.updated"), text("c1"), text("acme"), text(`{"a": 1}`), text("now")),
			want:  outbox.Event{ID: "7", Type: "contact.updated", ResourceID: "c1", Tenant: "acme", Payload: json.RawMessage(`{"a": 1}`)},
		},
		{
			name:  "nulls for optional columns",
			rel:   def,
			tuple: tuple(text("8"), text("x"), null, null, text(`{}`), text("now")),
			want:  outbox.Event{ID: "8", Type: "x", Payload: json.RawMessage(`{}`)},
		},
		{
			name: "debezium layout, columns reordered, no tenant",
			rel: outboxRelation(t, Columns{ID: "id", Event: "type", ResourceID: "aggregateid", Payload: "payload"},
				"id", "aggregatetype", "aggregateid", "type", "payload"),
			tuple: tuple(text("9f1c"), text("Order"), text("o-1"), text("OrderCreated"), text(`{"total": 3}`)),
			want:  outbox.Event{ID: "9f1c", Type: "OrderCreated", ResourceID: "o-1", Payload: json.RawMessage(`{"total": 3}`)},
		},
		{name: "null id", rel: def, tuple: tuple(null, text("x"), null, null, text("{}"), null), wantErr: "id is null"},
		{name: "empty event", rel: def, tuple: tuple(text("1"), text(""), null, null, text("{}"), null), wantErr: "event is null"},
		{name: "bad json", rel: def, tuple: tuple(text("1"), text("x"), null, null, text("{nope"), null), wantErr: "not valid JSON"},
		{name: "short tuple", rel: def, tuple: tuple(text("1"), text("x")), wantErr: "missing"},
		{name: "binary column", rel: def, tuple: tuple(text("1"), &pglogrepl.TupleDataColumn{DataType: 'b'}, null, null, text("{}"), null), wantErr: "unexpected"},
		{name: "no tuple", rel: def, wantErr: "missing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodeRow(tt.rel, tt.tuple)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.ID != tt.want.ID || got.Type != tt.want.Type || got.ResourceID != tt.want.ResourceID ||
				got.Tenant != tt.want.Tenant || string(got.Payload) != string(tt.want.Payload) {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestDecodeRowCopiesPayload(t *testing.T) {
	rel := outboxRelation(t, DefaultColumns, "id", "event", "resource_id", "tenant", "payload")
	buf := []byte(`{"a":1}`)
	e, err := decodeRow(rel, tuple(text("1"), text("x"), null, null, &pglogrepl.TupleDataColumn{DataType: 't', Data: buf}))
	if err != nil {
		t.Fatal(err)
	}
	copy(buf, `{"b":2}`) // the connection reuses its read buffer
	if string(e.Payload) != `{"a":1}` {
		t.Errorf("payload aliases the read buffer: %s", e.Payload)
	}
}

func TestNewRelationNamesMissingColumn(t *testing.T) {
	m := &pglogrepl.RelationMessage{Namespace: "app", RelationName: "outbox",
		Columns: []*pglogrepl.RelationMessageColumn{{Name: "id"}, {Name: "event"}}}
	_, err := newRelation(m, DefaultColumns)
	if err == nil || !strings.Contains(err.Error(), `"resource_id"`) {
		t.Fatalf("err = %v, want it to name resource_id", err)
	}
}

func TestDecodeMessage(t *testing.T) {
	e, err := decodeMessage(0x16B3748, []byte(`{"event":"contact.deleted","resource_id":"c1","tenant":null,"payload":{"x":true}}`))
	if err != nil {
		t.Fatal(err)
	}
	if e.ID != "0/16B3748" || e.Type != "contact.deleted" || e.ResourceID != "c1" || e.Tenant != "" || string(e.Payload) != `{"x":true}` {
		t.Errorf("got %+v", e)
	}
	for _, bad := range []string{``, `[]`, `{"event":""}`, `{"event":null}`, `{"event":1}`} {
		if _, err := decodeMessage(1, []byte(bad)); err == nil {
			t.Errorf("decodeMessage(%q) accepted", bad)
		}
	}
}

// FuzzDecodeRow feeds arbitrary column values and kinds: decoding never panics,
// and an accepted row always makes a well-formed event.
func FuzzDecodeRow(f *testing.F) {
	f.Add("1", "contact.updated", "c1", "acme", []byte(`{"a":1}`), uint8(0))
	f.Add("", "", "", "", []byte(`{`), uint8(0xff))
	f.Add("2", "x", "", "", []byte(`null`), uint8(0x0c))
	rel := outboxRelation(f, DefaultColumns, "id", "event", "resource_id", "tenant", "payload")
	f.Fuzz(func(t *testing.T, id, event, resource, tenant string, payload []byte, kinds uint8) {
		vals := [][]byte{[]byte(id), []byte(event), []byte(resource), []byte(tenant), payload}
		var cols []*pglogrepl.TupleDataColumn
		for i, v := range vals {
			switch (kinds >> (i + i/4)) & 3 { // two bits a column (the fifth shares)
			case 1:
				cols = append(cols, null)
			case 2:
				cols = append(cols, &pglogrepl.TupleDataColumn{DataType: 'u'})
			default:
				cols = append(cols, &pglogrepl.TupleDataColumn{DataType: 't', Data: v})
			}
		}
		if kinds&0x80 != 0 {
			cols = cols[:int(kinds)%len(cols)]
		}
		e, err := decodeRow(rel, tuple(cols...))
		if err != nil {
			return
		}
		if e.ID == "" || e.Type == "" || !json.Valid(e.Payload) {
			t.Fatalf("accepted a malformed event: %+v", e)
		}
	})
}

// FuzzDecodeMessage feeds arbitrary walhook message contents.
func FuzzDecodeMessage(f *testing.F) {
	f.Add([]byte(`{"event":"a","resource_id":"r","tenant":"t","payload":{}}`))
	f.Add([]byte(`{"event":"a"}`))
	f.Add([]byte(`{"event":"a","payload":null}`))
	f.Fuzz(func(t *testing.T, content []byte) {
		e, err := decodeMessage(42, content)
		if err != nil {
			return
		}
		if e.Type == "" || !json.Valid(e.Payload) {
			t.Fatalf("accepted a malformed event: %+v", e)
		}
	})
}

// FuzzParseInsert runs raw pgoutput insert messages through pglogrepl's parser and
// our decoder, as the stream does.
func FuzzParseInsert(f *testing.F) {
	f.Add([]byte("I\x00\x00\x40\x00N\x00\x05t\x00\x00\x00\x011t\x00\x00\x00\x01xnnt\x00\x00\x00\x02{}"))
	rel := outboxRelation(f, DefaultColumns, "id", "event", "resource_id", "tenant", "payload")
	f.Fuzz(func(t *testing.T, wal []byte) {
		// Our insert parser, and pglogrepl's for everything else: neither may panic.
		parseWAL(wal)
		_, cols, err := parseInsert(wal, nil)
		if err != nil {
			return
		}
		e, err := decodeRow(rel, cols)
		if err == nil && (e.ID == "" || !json.Valid(e.Payload)) {
			t.Fatalf("accepted a malformed event: %+v", e)
		}
	})
}

func TestParseInsertMatchesPglogrepl(t *testing.T) {
	wal := insertMessage()
	m, err := parseWAL(wal)
	if err != nil {
		t.Fatal(err)
	}
	want := m.(*pglogrepl.InsertMessage)
	rel, cols, err := parseInsert(wal, nil)
	if err != nil || rel != want.RelationID || len(cols) != len(want.Tuple.Columns) {
		t.Fatalf("parseInsert: rel %d, %d cols, %v", rel, len(cols), err)
	}
	for i, c := range want.Tuple.Columns {
		if cols[i].kind != c.DataType || string(cols[i].data) != string(c.Data) {
			t.Errorf("column %d: %q %q, want %q %q", i, cols[i].kind, cols[i].data, c.DataType, c.Data)
		}
	}
	for _, bad := range [][]byte{nil, []byte("I"), wal[:len(wal)-3], []byte("I\x00\x00\x00\x01N\x00\x01x")} {
		if _, _, err := parseInsert(bad, nil); err == nil {
			t.Errorf("parseInsert(%q) accepted", bad)
		}
	}
}

func controlRelation(t testing.TB) *relation {
	m := &pglogrepl.RelationMessage{Namespace: "walhook", RelationName: "control", Columns: []*pglogrepl.RelationMessageColumn{
		{Name: "id"}, {Name: "kind"}, {Name: "body"}, {Name: "created_at"}}}
	rel, err := newControlRelation(m)
	if err != nil {
		t.Fatal(err)
	}
	return rel
}

func TestDecodeControl(t *testing.T) {
	rel := controlRelation(t)
	row := func(kind, body string) []column {
		return tuple(text("7"), text(kind), text(body), text("2026-12-01 09:00:00+00"))
	}
	c, err := decodeControl(rel, row("subscription", `{"op": "upsert", "row": {"id": "s1", "events": ["*"]}}`))
	if err != nil || c.Kind != outbox.ChangeSubscription || c.SubscriptionID != "s1" || !strings.Contains(string(c.Row), `"events"`) {
		t.Errorf("upsert: %+v %v", c, err)
	}
	c, err = decodeControl(rel, row("subscription", `{"op": "delete", "id": "s1"}`))
	if err != nil || c.Kind != outbox.ChangeSubscription || c.SubscriptionID != "s1" || c.Row != nil {
		t.Errorf("delete: %+v %v", c, err)
	}
	c, err = decodeControl(rel, row("replay", `{"subscription": "s1", "webhook_id": "msg_1", "event": {"ID": "5", "Type": "a", "Seq": 123456789012345678}}`))
	if err != nil || c.Kind != outbox.ChangeReplay || c.SubscriptionID != "s1" || c.Event.WebhookID != "msg_1" ||
		c.Event.Seq != 123456789012345678 || string(c.Event.Payload) != `{}` {
		t.Errorf("replay: %+v %v", c, err)
	}
	c, err = decodeControl(rel, row("recover", `{"ID": "9", "Type": "a", "Payload": {"n": 1}}`))
	if err != nil || c.Kind != outbox.ChangeEvent || c.Event.ID != "9" || string(c.Event.Payload) != `{"n": 1}` {
		t.Errorf("recover: %+v %v", c, err)
	}
	if c, err := decodeControl(rel, row("recover", `{"ID": "9"}`)); err == nil || c.Kind != outbox.ChangeEvent || c.Event.ID != "9" {
		t.Errorf("a recovered row without a type: %+v %v (want an event to dead-letter)", c, err)
	}
	for _, bad := range [][]column{
		row("other", `{}`),
		row("subscription", `{"op": "upsert"}`),
		row("replay", `{"subscription": "s1"}`),
		tuple(text("7"), null, text(`{}`), null),
		tuple(text("7"), text("replay")),
	} {
		if c, err := decodeControl(rel, bad); err == nil {
			t.Errorf("decodeControl(%q) accepted: %+v", bad, c)
		}
	}
	_, err = newControlRelation(&pglogrepl.RelationMessage{Namespace: "walhook", RelationName: "control",
		Columns: []*pglogrepl.RelationMessageColumn{{Name: "id"}, {Name: "kind"}}})
	if err == nil || !strings.Contains(err.Error(), "walhook setup") {
		t.Errorf("a control table without body: %v", err)
	}
}

// FuzzDecodeControl feeds arbitrary walhook.control rows: decoding never
// panics, and an accepted row makes a well-formed change.
func FuzzDecodeControl(f *testing.F) {
	f.Add("subscription", []byte(`{"op":"upsert","row":{"id":"s"}}`), false)
	f.Add("subscription", []byte(`{"op":"delete","id":"s"}`), false)
	f.Add("replay", []byte(`{"subscription":"s","webhook_id":"w","event":{"ID":"1","Type":"a","Seq":5}}`), false)
	f.Add("recover", []byte(`{"ID":"1","Type":"a","Payload":null}`), true)
	rel := controlRelation(f)
	f.Fuzz(func(t *testing.T, kind string, body []byte, nullBody bool) {
		b := text(string(body))
		if nullBody {
			b = null
		}
		c, err := decodeControl(rel, tuple(text("1"), text(kind), b, null))
		if err != nil {
			return
		}
		switch c.Kind {
		case outbox.ChangeSubscription:
			if c.SubscriptionID == "" {
				t.Fatalf("accepted a subscription change without an id: %+v", c)
			}
		case outbox.ChangeReplay, outbox.ChangeEvent:
			if c.Event.ID == "" || c.Event.Type == "" || !json.Valid(c.Event.Payload) {
				t.Fatalf("accepted a malformed event: %+v", c)
			}
		default:
			t.Fatalf("unexpected change kind %v", c.Kind)
		}
	})
}
