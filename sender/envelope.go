package sender

import (
	"encoding/json"
	"time"

	"github.com/walhook/walhook/outbox"
)

// Envelope is the JSON body of a hook for one event.
type Envelope struct {
	ID         string          `json:"id"`
	Type       string          `json:"type"`
	Timestamp  string          `json:"timestamp"` // commit time, RFC 3339, UTC
	ResourceID *string         `json:"resource_id"`
	Tenant     *string         `json:"tenant"`
	Data       json.RawMessage `json:"data"`
}

// NewEnvelope builds the envelope of e.
func NewEnvelope(e *outbox.Event) Envelope {
	return Envelope{
		ID:         e.ID,
		Type:       e.Type,
		Timestamp:  e.CommitTime.UTC().Format(time.RFC3339Nano),
		ResourceID: nullable(e.ResourceID),
		Tenant:     nullable(e.Tenant),
		Data:       e.Payload,
	}
}

// Body encodes the request body of b: one envelope (batches of several events
// arrive with the batching options).
func Body(b *outbox.Batch) ([]byte, error) {
	return json.Marshal(NewEnvelope(&b.Events[0]))
}

func nullable(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}
