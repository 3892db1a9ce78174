package outbox

import (
	"math/rand/v2"
	"testing"
	"time"
)

func TestAckerContiguousPrefix(t *testing.T) {
	a := NewAcker(0)
	t1, t2, t3 := a.Begin(time.Time{}), a.Begin(time.Time{}), a.Begin(time.Time{})
	a.Add(t1, 1)
	a.Add(t2, 2)
	a.Commit(t1, 100)
	a.Commit(t2, 200)
	a.Commit(t3, 300) // no deliveries: finished as soon as committed
	if got := a.Flush(); got != 0 {
		t.Fatalf("flush = %v before anything finished", got)
	}
	a.Done(t2)
	a.Done(t2)
	if got := a.Flush(); got != 0 {
		t.Fatalf("flush = %v past unfinished t1", got)
	}
	a.Done(t1)
	if got := a.Flush(); got != 300 {
		t.Fatalf("flush = %v, want 300", got)
	}
}

func TestAckerIdleOnlyWhenNothingOpen(t *testing.T) {
	a := NewAcker(0)
	tx := a.Begin(time.Time{})
	a.Add(tx, 1)
	a.Idle(500)
	if got := a.Flush(); got != 0 {
		t.Fatalf("idle moved flush to %v past an open transaction", got)
	}
	a.Commit(tx, 400)
	a.Idle(500)
	if got := a.Flush(); got != 0 {
		t.Fatalf("idle moved flush to %v past an undelivered transaction", got)
	}
	a.Done(tx)
	a.Idle(500)
	if got := a.Flush(); got != 500 {
		t.Fatalf("flush = %v, want the idle WAL end 500", got)
	}
	a.Idle(450) // never backwards
	if got := a.Flush(); got != 500 {
		t.Fatalf("flush went back to %v", got)
	}
}

// TestAckerNeverPastUnfinished finishes deliveries in random order and checks after
// every step that the flush position never passes an unfinished transaction and
// reaches the end once all are done.
func TestAckerNeverPastUnfinished(t *testing.T) {
	for seed := range uint64(200) {
		r := rand.New(rand.NewPCG(seed, 1))
		a := NewAcker(0)
		type tx struct {
			t       *Txn
			end     LSN
			pending int
		}
		var txns []*tx
		var work []int // index into txns, one per outstanding delivery
		for i := range 1 + r.IntN(30) {
			x := &tx{t: a.Begin(time.Time{}), end: LSN(100 * (i + 1)), pending: r.IntN(4)}
			a.Add(x.t, x.pending)
			a.Commit(x.t, x.end)
			for range x.pending {
				work = append(work, i)
			}
			txns = append(txns, x)
		}
		r.Shuffle(len(work), func(i, j int) { work[i], work[j] = work[j], work[i] })
		for _, i := range work {
			txns[i].pending--
			a.Done(txns[i].t)
			flush := a.Flush()
			for _, x := range txns {
				if x.pending > 0 && flush >= x.end {
					t.Fatalf("seed %d: flush %v passes unfinished transaction ending at %v", seed, flush, x.end)
				}
			}
		}
		if got, want := a.Flush(), txns[len(txns)-1].end; got != want {
			t.Fatalf("seed %d: final flush %v, want %v", seed, got, want)
		}
		if n := a.Unfinished(); n != 0 {
			t.Fatalf("seed %d: %d transactions left", seed, n)
		}
	}
}
