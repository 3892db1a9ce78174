package outbox

import (
	"sync"
	"time"
)

// Acker turns per-delivery completion into the flush LSN: the commit end LSN of
// the newest transaction with every transaction up to it finished, or the server's
// WAL end when nothing was open when it arrived.
//
// One goroutine (the Dispatcher, in stream order) calls Begin, Add, Commit and
// Idle; delivery workers call Done; the stream reads Flush. All methods are safe
// for concurrent use.
type Acker struct {
	mu    sync.Mutex
	open  []*Txn // transactions not yet finished, in stream order
	flush LSN
	high  uint64 // highest numeric outbox id in a finished transaction (the high-water mark)
}

// Txn tracks one transaction's outstanding deliveries.
type Txn struct {
	pending   int
	committed bool
	end       LSN
	time      time.Time // commit time
	maxID     uint64    // highest numeric outbox id among its events
	finished  func()    // BeginFunc's: called once when it is committed with nothing pending
}

// NewAcker starts at the slot's confirmed flush position.
func NewAcker(start LSN) *Acker { return &Acker{flush: start} }

// Begin registers a new transaction, after every earlier one; commit is its
// commit time.
func (a *Acker) Begin(commit time.Time) *Txn {
	t := &Txn{time: commit}
	a.mu.Lock()
	a.open = append(a.open, t)
	a.mu.Unlock()
	return t
}

// BeginFunc starts a transaction outside the flush position: finished is
// called once, outside the Acker's lock, when it is committed and all its
// deliveries are done, whatever the others (a relay worker acks each
// message on its own).
func (a *Acker) BeginFunc(commit time.Time, finished func()) *Txn {
	return &Txn{time: commit, finished: finished}
}

// Reset forgets every transaction: a new epoch starts at start, the slot's
// confirmed position, and the stream brings the unfinished ones again. The
// flush position never moves back: what was finished stays finished.
func (a *Acker) Reset(start LSN) {
	a.mu.Lock()
	clear(a.open)
	a.open = a.open[:0]
	a.flush = max(a.flush, start)
	a.mu.Unlock()
}

// Abort forgets a transaction that will never commit in this stream (the
// connection was lost inside it; the stream replays it whole as a new one).
func (a *Acker) Abort(t *Txn) {
	a.mu.Lock()
	for i, x := range a.open {
		if x == t {
			a.open = append(a.open[:i], a.open[i+1:]...)
			break
		}
	}
	a.advance()
	a.mu.Unlock()
}

// Add records n more deliveries of t that must finish before t is acked.
func (a *Acker) Add(t *Txn, n int) {
	a.mu.Lock()
	t.pending += n
	a.mu.Unlock()
}

// SawID records a numeric outbox row id of t, for the high-water mark.
func (a *Acker) SawID(t *Txn, id uint64) {
	a.mu.Lock()
	t.maxID = max(t.maxID, id)
	a.mu.Unlock()
}

// HighWater is the highest numeric outbox id of a finished transaction.
func (a *Acker) HighWater() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.high
}

// Commit records t's end LSN; t finishes once its deliveries are done.
func (a *Acker) Commit(t *Txn, end LSN) {
	a.mu.Lock()
	t.committed, t.end = true, end
	a.advance()
	f := t.takeFinished()
	a.mu.Unlock()
	if f != nil {
		f()
	}
}

// Done records that one delivery of t finished (delivered or dead-lettered).
func (a *Acker) Done(t *Txn) {
	a.mu.Lock()
	t.pending--
	a.advance()
	f := t.takeFinished()
	a.mu.Unlock()
	if f != nil {
		f()
	}
}

// takeFinished returns t's finished callback once t is finished, only once.
// The Acker's lock is held.
func (t *Txn) takeFinished() func() {
	if t.finished == nil || !t.committed || t.pending > 0 {
		return nil
	}
	f := t.finished
	t.finished = nil
	return f
}

// Idle records the server's WAL end, received after everything before it in the
// stream. It moves the flush position only when no transaction is unfinished.
func (a *Acker) Idle(walEnd LSN) {
	a.mu.Lock()
	if len(a.open) == 0 && walEnd > a.flush {
		a.flush = walEnd
	}
	a.mu.Unlock()
}

// Flush is the position that is safe to confirm to PostgreSQL.
func (a *Acker) Flush() LSN {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.flush
}

// Oldest is the commit time of the oldest unfinished transaction; zero when none.
func (a *Acker) Oldest() time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.open) == 0 {
		return time.Time{}
	}
	return a.open[0].time
}

// Unfinished counts transactions still open or waiting for deliveries.
func (a *Acker) Unfinished() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.open)
}

func (a *Acker) advance() {
	i := 0
	for ; i < len(a.open); i++ {
		t := a.open[i]
		if !t.committed || t.pending > 0 {
			break
		}
		if t.end > a.flush {
			a.flush = t.end
		}
		a.high = max(a.high, t.maxID)
	}
	clear(a.open[:i]) // let finished transactions be collected; append reallocates as the slice moves on
	a.open = a.open[i:]
}
