package outbox

import "testing"

// TestBudgetFullUntilAnEighthIsFree: a budget that reached its limit stays
// full until an eighth of it is free (so a stream at the limit reads in runs),
// signals once then, and forgets an older epoch's releases.
func TestBudgetFullUntilAnEighthIsFree(t *testing.T) {
	b := NewBudget(800)
	b.Reset(1)
	<-b.Freed() // Reset signals: a stream waiting on the old epoch's budget goes on
	b.Hold(1, 790)
	if b.Full() {
		t.Fatal("full below the limit")
	}
	b.Hold(1, 20) // 810
	if !b.Full() {
		t.Fatal("not full at the limit")
	}
	b.Release(1, 100) // 710: an eighth is 100, so not yet below 700
	if !b.Full() {
		t.Fatal("not full any more with less than an eighth free")
	}
	select {
	case <-b.Freed():
		t.Fatal("freed signalled while still full")
	default:
	}
	b.Release(2, 500) // an older or newer epoch's release changes nothing
	b.Release(1, 20)  // 690
	if b.Full() {
		t.Fatal("still full with more than an eighth free")
	}
	select {
	case <-b.Freed():
	default:
		t.Fatal("no freed signal when it stopped being full")
	}
	b.Hold(1, 50) // 740: below the limit, not full again
	if b.Full() || b.Used() != 740 {
		t.Errorf("full %v, used %d; want not full, 740", b.Full(), b.Used())
	}
	b.Reset(3)
	if b.Full() || b.Used() != 0 {
		t.Errorf("after Reset: full %v, used %d", b.Full(), b.Used())
	}
}
