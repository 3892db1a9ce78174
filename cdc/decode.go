package cdc

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/walhook/walhook/outbox"
)

// Columns maps outbox fields to the outbox table's column names. ID and Event are
// required; an empty ResourceID, Tenant or Payload means the table has no such
// column.
type Columns struct {
	ID         string `yaml:"id"`          // default "id"
	Event      string `yaml:"event"`       // default "event"
	ResourceID string `yaml:"resource_id"` // default "resource_id"
	Tenant     string `yaml:"tenant"`      // default "tenant"
	Payload    string `yaml:"payload"`     // default "payload"
}

// DefaultColumns is the layout of the table `walhook setup` creates.
var DefaultColumns = Columns{ID: "id", Event: "event", ResourceID: "resource_id", Tenant: "tenant", Payload: "payload"}

const (
	colID = iota
	colEvent
	colResourceID
	colTenant
	colPayload
	numCols
)

func (c Columns) names() [numCols]string {
	return [numCols]string{c.ID, c.Event, c.ResourceID, c.Tenant, c.Payload}
}

// relation is a table of the publication as the stream last described it: the
// outbox table, with where each outbox field sits in a tuple (-1 when the table
// has no such column), or walhook.control.
type relation struct {
	index [numCols]int
	// jsonPayload: the payload column is json or jsonb, which PostgreSQL has
	// validated already; other types are checked row by row.
	jsonPayload bool
	// control: the table is walhook.control; kind and body index its columns.
	control    bool
	kind, body int
}

// OIDs of PostgreSQL's JSON types.
const (
	oidJSON  = 114
	oidJSONB = 3802
)

// newRelation maps the columns of an outbox table's RelationMessage.
func newRelation(m *pglogrepl.RelationMessage, c Columns) (*relation, error) {
	r := &relation{}
	for i, name := range c.names() {
		r.index[i] = -1
		if name == "" {
			continue
		}
		for j, col := range m.Columns {
			if col.Name == name {
				r.index[i] = j
				break
			}
		}
		if r.index[i] < 0 {
			return nil, fmt.Errorf("outbox table %s.%s has no column %q", m.Namespace, m.RelationName, name)
		}
	}
	if p := r.index[colPayload]; p >= 0 {
		t := m.Columns[p].DataType
		r.jsonPayload = t == oidJSON || t == oidJSONB
	}
	return r, nil
}

// newControlRelation maps the columns of walhook.control's RelationMessage.
func newControlRelation(m *pglogrepl.RelationMessage) (*relation, error) {
	r := &relation{control: true, kind: -1, body: -1}
	for j, col := range m.Columns {
		switch col.Name {
		case "kind":
			r.kind = j
		case "body":
			r.body = j
		}
	}
	if r.kind < 0 || r.body < 0 {
		return nil, fmt.Errorf("control table %s.%s has no kind or body column: run `walhook setup`", m.Namespace, m.RelationName)
	}
	return r, nil
}

var emptyObject = json.RawMessage(`{}`)

// column is one value of a tuple as pgoutput sends it: its kind ('n' null,
// 'u' unchanged TOAST, 't' text, 'b' binary) and its bytes, which point into the
// message (and so into the connection's read buffer).
type column struct {
	kind byte
	data []byte
}

// parseInsert reads an Insert message ('I', relation id, 'N', the new tuple)
// into cols without allocating; cols is reused by the caller.
func parseInsert(wal []byte, cols []column) (uint32, []column, error) {
	if len(wal) < 8 || wal[0] != 'I' || wal[5] != 'N' {
		return 0, cols, errors.New("not an insert message with a new tuple")
	}
	rel := binary.BigEndian.Uint32(wal[1:5])
	n := int(binary.BigEndian.Uint16(wal[6:8]))
	cols = cols[:0]
	p := 8
	for range n {
		if p >= len(wal) {
			return rel, cols, fmt.Errorf("tuple ends after %d of %d columns", len(cols), n)
		}
		c := column{kind: wal[p]}
		p++
		switch c.kind {
		case 't', 'b':
			if p+4 > len(wal) {
				return rel, cols, errors.New("tuple: column length cut off")
			}
			l := int(binary.BigEndian.Uint32(wal[p : p+4]))
			p += 4
			if l < 0 || l > len(wal)-p {
				return rel, cols, fmt.Errorf("tuple: column of %d bytes in %d left", l, len(wal)-p)
			}
			c.data = wal[p : p+l]
			p += l
		case 'n', 'u':
		default:
			return rel, cols, fmt.Errorf("tuple: unknown column kind %q", c.kind)
		}
		cols = append(cols, c)
	}
	return rel, cols, nil
}

// decodeRow turns an inserted outbox row into an event. CommitTime is left for
// the caller. On error the returned event holds whatever could be read (at least
// its ID, when the row has one).
func decodeRow(rel *relation, cols []column) (outbox.Event, error) {
	var e outbox.Event
	var vals [numCols][]byte
	var null [numCols]bool
	for i, idx := range rel.index {
		if idx < 0 {
			null[i] = true
			continue
		}
		if idx >= len(cols) {
			return e, fmt.Errorf("row has %d columns, outbox column %d missing", len(cols), idx)
		}
		switch col := cols[idx]; col.kind {
		case 'n':
			null[i] = true
		case 't':
			vals[i] = col.data
		default:
			return e, fmt.Errorf("column %d: unexpected tuple data type %q", idx, col.kind)
		}
	}
	if null[colID] || len(vals[colID]) == 0 {
		return e, errors.New("id is null or empty")
	}
	e.ID = string(vals[colID])
	if null[colEvent] || len(vals[colEvent]) == 0 {
		return e, errors.New("event is null or empty")
	}
	e.Type = string(vals[colEvent])
	e.ResourceID = string(vals[colResourceID])
	e.Tenant = string(vals[colTenant])
	switch {
	case rel.index[colPayload] < 0:
		e.Payload = emptyObject
	case null[colPayload]:
		e.Payload = json.RawMessage("null")
	case !rel.jsonPayload && !json.Valid(vals[colPayload]):
		return e, errors.New("payload is not valid JSON")
	default:
		// Tuple data points into the connection's read buffer: copy it.
		e.Payload = bytes.Clone(vals[colPayload])
	}
	return e, nil
}

// decodeControl turns an inserted walhook.control row into the change it
// stands for: ChangeSubscription, ChangeReplay, or for a recovered outbox row
// ChangeEvent (whose Event holds what could be read when err is set, to be
// dead-lettered like an outbox row). Event.Seq is the caller's to fill, except
// a replay's: it is the dead letter's original sequence (0 when unknown).
func decodeControl(rel *relation, cols []column) (outbox.Change, error) {
	if rel.kind >= len(cols) || rel.body >= len(cols) {
		return outbox.Change{}, fmt.Errorf("control row has %d columns", len(cols))
	}
	kind, body := cols[rel.kind], cols[rel.body]
	if kind.kind != 't' || body.kind != 't' {
		return outbox.Change{}, errors.New("control row: kind and body must be text values")
	}
	switch string(kind.data) {
	case ControlSubscription:
		return decodeSubscriptionMessage(body.data)
	case ControlReplay:
		return decodeReplayMessage(body.data)
	case ControlRecover:
		e, err := decodeRecoverMessage(body.data)
		return outbox.Change{Kind: outbox.ChangeEvent, Event: e}, err
	default:
		return outbox.Change{}, fmt.Errorf("control row: unknown kind %q", kind.data)
	}
}

// MessagePrefix is the prefix of walhook's logical decoding messages.
const MessagePrefix = "walhook"

// message is the content walhook.emit writes.
type message struct {
	Event      string          `json:"event"`
	ResourceID *string         `json:"resource_id"`
	Tenant     *string         `json:"tenant"`
	Payload    json.RawMessage `json:"payload"`
}

// decodeMessage turns a walhook logical message into an event; its id is its LSN.
func decodeMessage(lsn outbox.LSN, content []byte) (outbox.Event, error) {
	e := outbox.Event{ID: lsn.String()}
	var m message
	if err := json.Unmarshal(content, &m); err != nil {
		return e, fmt.Errorf("message is not a walhook JSON object: %v", err)
	}
	if m.Event == "" {
		return e, errors.New("event is null or empty")
	}
	e.Type = m.Event
	if m.ResourceID != nil {
		e.ResourceID = *m.ResourceID
	}
	if m.Tenant != nil {
		e.Tenant = *m.Tenant
	}
	e.Payload = m.Payload
	if len(e.Payload) == 0 {
		e.Payload = emptyObject
	}
	return e, nil
}

// parseWAL parses one pgoutput message. pglogrepl indexes before checking
// lengths on some malformed inputs; a panic there becomes an error here.
func parseWAL(wal []byte) (m pglogrepl.Message, err error) {
	if len(wal) == 0 {
		return nil, errors.New("empty pgoutput message")
	}
	defer func() {
		if r := recover(); r != nil {
			m, err = nil, fmt.Errorf("malformed pgoutput message %q: %v", wal[0], r)
		}
	}()
	return pglogrepl.Parse(wal)
}

// SubscriptionPrefix, ReplayPrefix and RecoverPrefix are the prefixes of the
// logical messages older versions of walhook wrote for control changes. No
// walhook writes them now (control changes are walhook.control rows), and
// pg_logical_emit_message is open to every role: a message with one of them is
// forged, ignored and counted.
const (
	SubscriptionPrefix = "walhook.subscription"
	ReplayPrefix       = "walhook.replay"
	RecoverPrefix      = "walhook.recover"
)

// decodeSubscriptionMessage reads {"op":"upsert","row":{...}} or
// {"op":"delete","id":"..."}.
func decodeSubscriptionMessage(content []byte) (outbox.Change, error) {
	var m struct {
		Op  string          `json:"op"`
		ID  string          `json:"id"`
		Row json.RawMessage `json:"row"`
	}
	if err := json.Unmarshal(content, &m); err != nil {
		return outbox.Change{}, fmt.Errorf("subscription message: %v", err)
	}
	c := outbox.Change{Kind: outbox.ChangeSubscription, SubscriptionID: m.ID}
	switch m.Op {
	case "upsert":
		var id struct{ ID string }
		if err := json.Unmarshal(m.Row, &id); err != nil || id.ID == "" {
			return c, errors.New("subscription message: upsert without a row id")
		}
		c.SubscriptionID, c.Row = id.ID, m.Row
	case "delete":
		if m.ID == "" {
			return c, errors.New("subscription message: delete without an id")
		}
	default:
		return c, fmt.Errorf("subscription message: unknown op %q", m.Op)
	}
	return c, nil
}

// decodeReplayMessage reads {"subscription", "webhook_id", "event"}.
func decodeReplayMessage(content []byte) (outbox.Change, error) {
	var m struct {
		Subscription string       `json:"subscription"`
		WebhookID    string       `json:"webhook_id"`
		Event        outbox.Event `json:"event"`
		PayloadText  string       `json:"payload_text"` // a payload jsonb cannot hold, as text
	}
	if err := json.Unmarshal(content, &m); err != nil {
		return outbox.Change{}, fmt.Errorf("replay message: %v", err)
	}
	if m.PayloadText != "" {
		m.Event.Payload = json.RawMessage(m.PayloadText)
	}
	if m.Subscription == "" || m.Event.ID == "" || m.Event.Type == "" {
		return outbox.Change{}, errors.New("replay message: subscription, event id and type are required")
	}
	if len(m.Event.Payload) == 0 {
		m.Event.Payload = emptyObject
	}
	m.Event.WebhookID = m.WebhookID
	return outbox.Change{Kind: outbox.ChangeReplay, SubscriptionID: m.Subscription, Event: m.Event}, nil
}

// decodeRecoverMessage reads an outbox row again, with its original id.
func decodeRecoverMessage(content []byte) (outbox.Event, error) {
	var e outbox.Event
	if err := json.Unmarshal(content, &e); err != nil {
		return e, fmt.Errorf("recover message: %v", err)
	}
	if e.ID == "" || e.Type == "" {
		return e, errors.New("recover message: id and type are required")
	}
	if len(e.Payload) == 0 {
		e.Payload = emptyObject
	}
	return e, nil
}

// RecoverSQL returns the statement `walhook recover` runs after recreating the
// slot: every outbox row whose numeric id is above highWater, or (when the
// table has created_at) created since, goes out again as a walhook.control row
// of kind recover with its original id, in id order. It returns the count.
func RecoverSQL(cfg Config, hasCreatedAt bool) string {
	cfg = cfg.WithDefaults()
	col := func(name, fallback string) string {
		if name == "" {
			return fallback
		}
		return pgx.Identifier{name}.Sanitize()
	}
	id := col(cfg.Columns.ID, "")
	cond := "(" + id + "::text ~ '^[0-9]+$' AND " + id + "::text::numeric > $1::numeric)"
	if hasCreatedAt {
		cond += " OR created_at >= $2"
	}
	return `WITH recovered AS (INSERT INTO walhook.control (kind, body) SELECT '` + ControlRecover + `', jsonb_build_object(
	  'ID', ` + id + `::text, 'Type', ` + col(cfg.Columns.Event, "''") + `::text,
	  'ResourceID', coalesce(` + col(cfg.Columns.ResourceID, "NULL") + `::text, ''),
	  'Tenant', coalesce(` + col(cfg.Columns.Tenant, "NULL") + `::text, ''),
	  'Payload', coalesce(` + col(cfg.Columns.Payload, "NULL") + `::jsonb, '{}'::jsonb),
	  'CommitTime', now())
	FROM ` + cfg.Table.Sanitize() + ` WHERE ` + cond + ` ORDER BY ` + id + ` RETURNING 1)
	SELECT count(*) FROM recovered`
}
