package relay

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"

	"github.com/walhook/walhook/outbox"
)

// message is a published delivery: one event for one subscription.
type message struct {
	Subscription string       `json:"s"`
	Event        outbox.Event `json:"e"`
}

// msgID is a delivery's Nats-Msg-Id: the webhook-id it has alone, so the
// same event for the same subscription is the same message across restarts.
// A replayed dead letter keeps its webhook-id, but each replay is a message
// of its own: its id also covers the replay's own place in the stream
// (ReplaySeq; its CommitTime is the original event's, the same for every
// replay of it, so a second replay within the duplicate window was dropped as
// a duplicate of the first).
func msgID(subscription string, ev *outbox.Event) string {
	if ev.WebhookID == "" {
		return outbox.WebhookID(subscription, []outbox.Event{*ev})
	}
	h := sha256.New()
	h.Write([]byte(subscription))
	h.Write([]byte{0})
	h.Write([]byte(ev.ID))
	var t [8]byte
	binary.BigEndian.PutUint64(t[:], ev.ReplaySeq)
	if ev.ReplaySeq == 0 { // not from the stream (tests)
		binary.BigEndian.PutUint64(t[:], uint64(ev.CommitTime.UnixNano()))
	}
	h.Write(t[:])
	return "rpl_" + hex.EncodeToString(h.Sum(nil)[:16])
}

func decodeMessage(data []byte) (message, error) {
	var m message
	if err := json.Unmarshal(data, &m); err != nil {
		return m, fmt.Errorf("relay message: %w", err)
	}
	if m.Subscription == "" || m.Event.ID == "" || len(m.Event.Payload) == 0 {
		return m, fmt.Errorf("relay message: subscription, event id and payload are required")
	}
	return m, nil
}
