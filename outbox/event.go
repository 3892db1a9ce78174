package outbox

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"
)

// LSN is a PostgreSQL WAL position.
type LSN uint64

func (l LSN) String() string { return fmt.Sprintf("%X/%X", uint32(l>>32), uint32(l)) }

// Event is one outbox row or walhook logical message.
type Event struct {
	ID         string          // the row's id; for a logical message, its LSN
	Type       string          // event name, e.g. "contact.updated"
	ResourceID string          // "" when the row has none
	Tenant     string          // "" when the row has none
	Payload    json.RawMessage // valid JSON, never empty
	CommitTime time.Time       // commit time of the transaction that wrote it
	Seq        uint64          // increases with commit order; stable across restarts
	Coalesced  int             // how many events this one stands for after debounce; 1 = itself
	WebhookID  string          `json:",omitempty"` // a replayed dead letter: the id it was first sent with
	// ReplaySeq is, for a replayed dead letter, the replay's own place in the
	// stream (Seq keeps the one it was first sent with): each replay of one
	// dead letter is a delivery of its own. 0 otherwise.
	ReplaySeq uint64 `json:",omitempty"`
}

// Batch is what one webhook request carries.
type Batch struct {
	Subscription *Subscription
	Events       []Event
	WebhookID    string
}

// NewBatch builds a batch with its webhook-id.
func NewBatch(s *Subscription, events ...Event) *Batch {
	if len(events) == 1 && events[0].WebhookID != "" {
		return &Batch{Subscription: s, Events: events, WebhookID: events[0].WebhookID}
	}
	return &Batch{Subscription: s, Events: events, WebhookID: WebhookID(s.ID, events)}
}

// WebhookID derives a Standard Webhooks message id from the subscription and the
// event ids: the same events to the same subscription always get the same id,
// across retries, restarts and replicas.
func WebhookID(subscription string, events []Event) string {
	h := sha256.New()
	h.Write([]byte(subscription))
	for _, e := range events {
		h.Write([]byte{0})
		h.Write([]byte(e.ID))
	}
	var sum [sha256.Size]byte
	return "msg_" + hex.EncodeToString(h.Sum(sum[:0])[:16])
}

// ChangeKind says what a Change carries.
type ChangeKind uint8

const (
	ChangeBegin        ChangeKind = iota + 1 // a transaction starts
	ChangeEvent                              // an event of the open transaction
	ChangeMalformed                          // an outbox row that could not be decoded
	ChangeCommit                             // the open transaction commits at LSN
	ChangeIdle                               // the server's WAL end while no transaction is open
	ChangeStart                              // the stream (re)starts at LSN with the slot: a new Epoch
	ChangeSubscription                       // a dynamic subscription changed in the open transaction
	ChangeDrained                            // shutting down: nothing follows; finish what is in flight
	ChangeReplay                             // a dead letter replayed to SubscriptionID (Event.WebhookID set)
	ChangeRouted                             // relay mode: an event already routed to SubscriptionID, a transaction of its own
	ChangeParked                             // relay mode: the Store parked more resources (a partition taken); schedulers load them before what follows
)

// Change is one item of the replication stream, in stream order, as cdc hands it
// to the Dispatcher.
type Change struct {
	Kind   ChangeKind
	Event  Event  // ChangeEvent, ChangeMalformed (as much as could be decoded)
	Reason string // ChangeMalformed: why the row could not be decoded
	LSN    LSN    // ChangeCommit: the transaction's end LSN; ChangeIdle: the WAL end; ChangeStart: the start
	// ChangeSubscription: the new row (JSON SubscriptionRow), or nil for a
	// deletion of SubscriptionID; Event.Seq orders it in the stream.
	Row            []byte
	SubscriptionID string
	Epoch          *Epoch // ChangeStart: the epoch the session starts
	// ChangeRouted, and ChangeReplay in a worker: called once when the
	// delivery is finished (delivered, dead-lettered or dropped).
	Done func()
}
