package outbox

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// Epoch is one hold of the replication slot: it starts when a stream session
// has the slot and ends when that session ends (docs/design.md, "Ownership").
// Everything the pipeline does for the session runs under its context, so
// ending the epoch stops every send, retry and store write it started.
type Epoch struct {
	N          uint64 // increases with every epoch of a process
	Holder     uint32 // the server process of the session's replication connection; 0 when unknown
	ctx        context.Context
	end        context.CancelCauseFunc
	freshUntil atomic.Int64 // monotonic nanos since clockBase; 0: no bound (FreshUntil)
}

// clockBase anchors Epoch freshness to the monotonic clock: a step of the
// wall clock neither lengthens nor ends it.
var clockBase = time.Now()

// sinceBase is t on that clock, never 0 (which means no bound).
func sinceBase(t time.Time) int64 {
	if d := int64(t.Sub(clockBase)); d != 0 {
		return d
	}
	return 1
}

// ErrEpochEnded is the cause of an epoch's end when none is given.
var ErrEpochEnded = errors.New("outbox: the epoch ended")

// ErrStale ends an epoch that was about to act past its FreshUntil: this
// process was frozen or starved for longer than the stall timeout, and
// another may hold the slot by now.
var ErrStale = errors.New("outbox: the session has not heard the server for longer than stall_timeout (a frozen or starved process): the epoch stops before it acts")

// NewEpoch starts epoch n under parent.
func NewEpoch(parent context.Context, n uint64) *Epoch {
	ctx, end := context.WithCancelCause(parent)
	return &Epoch{N: n, ctx: ctx, end: end}
}

// Context is done once the epoch has ended.
func (e *Epoch) Context() context.Context { return e.ctx }

// End ends the epoch; the first cause is kept. The stream ends it when its
// session ends; the pipeline ends it to give the slot up (the stream then
// leaves the slot and reconnects), for example when another replica fenced it.
func (e *Epoch) End(cause error) {
	if cause == nil {
		cause = ErrEpochEnded
	}
	e.end(cause)
}

// FreshUntil bounds the epoch's right to act: the stream moves it on with
// every message from the server, to when it would declare the session
// stalled if the server stayed silent. Until then no other process can hold
// the slot (docs/design.md, "Timing"); later, one may. Stale stays stale: a
// call once the bound has passed ends the epoch instead (a thawed process
// reads what the server wrote while it was frozen, late, and those messages
// must not make it fresh again).
func (e *Epoch) FreshUntil(t time.Time) {
	if u := e.freshUntil.Load(); u != 0 && sinceBase(time.Now()) >= u {
		e.End(ErrStale)
		return
	}
	e.freshUntil.Store(sinceBase(t))
}

// Live is nil while the epoch may act: call it right before anything others
// can see (a delivery attempt, a publish). It is why the epoch ended, or
// ErrStale, ending it, once the epoch is past FreshUntil: a process thawed
// after a freeze longer than the stall timeout would otherwise act on the
// slot's behalf before its stream noticed the stall.
func (e *Epoch) Live() error {
	if err := e.Err(); err != nil {
		return err
	}
	if u := e.freshUntil.Load(); u != 0 && sinceBase(time.Now()) >= u {
		e.End(ErrStale)
		return e.Err()
	}
	return nil
}

// Err is nil while the epoch lasts, and then why it ended.
func (e *Epoch) Err() error {
	if e.ctx.Err() == nil {
		return nil
	}
	return context.Cause(e.ctx)
}

// Budget bounds the bytes of events held in memory, from the stream to the
// senders: the stream stops reading while it is full (docs/design.md,
// "Memory"). Once full it stays full until an eighth of it is free again, so
// that a stream at the limit reads in runs, not an event per release. Holds
// and releases belong to an epoch; Reset starts a new one and forgets the old
// one's, whose late releases are then ignored. Safe for concurrent use.
type Budget struct {
	limit int64
	mu    sync.Mutex
	epoch uint64
	used  int64
	full  bool          // used reached limit, and has not dropped below resume since
	freed chan struct{} // signalled when it stops being full
}

// resume is where a full budget stops being full.
func (b *Budget) resume() int64 { return b.limit - b.limit/8 }

// DefaultMaxPendingBytes is max_pending_bytes' default.
const DefaultMaxPendingBytes = 64 << 20

// NewBudget returns a budget of limit bytes (DefaultMaxPendingBytes if <= 0).
func NewBudget(limit int64) *Budget {
	if limit <= 0 {
		limit = DefaultMaxPendingBytes
	}
	return &Budget{limit: limit, freed: make(chan struct{}, 1)}
}

// Reset starts epoch's accounting at zero.
func (b *Budget) Reset(epoch uint64) {
	b.mu.Lock()
	b.epoch, b.used, b.full = epoch, 0, false
	b.mu.Unlock()
	b.signal()
}

// Hold counts n more bytes of epoch, even beyond the limit: it never blocks;
// whoever reads checks Full.
func (b *Budget) Hold(epoch uint64, n int64) {
	b.mu.Lock()
	if epoch == b.epoch {
		b.used += n
		b.full = b.full || b.used >= b.limit
	}
	b.mu.Unlock()
}

// Release gives back n bytes that epoch held.
func (b *Budget) Release(epoch uint64, n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	if epoch != b.epoch {
		b.mu.Unlock()
		return
	}
	b.used -= n
	free := b.full && b.used < b.resume()
	if free {
		b.full = false
	}
	b.mu.Unlock()
	if free {
		b.signal()
	}
}

// Limit is the budget's size in bytes.
func (b *Budget) Limit() int64 { return b.limit }

// Full reports whether the held bytes reached the limit and have not dropped
// below seven eighths of it since.
func (b *Budget) Full() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.full
}

// Used is the bytes held in the current epoch.
func (b *Budget) Used() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// Freed is signalled when the budget stops being full.
func (b *Budget) Freed() <-chan struct{} { return b.freed }

func (b *Budget) signal() {
	select {
	case b.freed <- struct{}{}:
	default:
	}
}

// EventSize is what an event is charged against the budget: its payload and
// an estimate of the rest.
func EventSize(e *Event) int64 { return int64(len(e.Payload)) + envelopeOverhead }

// freshKey carries an attempt's freshness checks (WithFresh).
type freshKey struct{}

// WithFresh returns ctx carrying check besides the checks ctx already
// carries. The transport calls them all (Fresh) as the last thing before it
// writes the attempt's request: an attempt that started fresh may wait long
// after its start (for a connection, for a request slot to the host, or
// frozen with the process), and whoever holds the slot or the partition by
// then must be the only one sending.
func WithFresh(ctx context.Context, check func() error) context.Context {
	if prev, ok := ctx.Value(freshKey{}).(func() error); ok {
		inner := check
		check = func() error {
			if err := prev(); err != nil {
				return err
			}
			return inner()
		}
	}
	return context.WithValue(ctx, freshKey{}, check)
}

// Fresh is nil when every check ctx carries passes (WithFresh), else the
// first one's error.
func Fresh(ctx context.Context) error {
	if check, ok := ctx.Value(freshKey{}).(func() error); ok {
		return check()
	}
	return nil
}
