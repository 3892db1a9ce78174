package main

import (
	"testing"
	"time"
)

func TestTimestamps(t *testing.T) {
	one := `{"id":"1","type":"timestamp","timestamp":"2026-01-02T03:04:05.123456Z","data":{"timestamp":"nested \"quoted\""}}`
	if got := timestamps([]byte(one)); len(got) != 1 || !got[0].Equal(time.Date(2026, 1, 2, 3, 4, 5, 123456000, time.UTC)) {
		t.Fatalf("one envelope: %v", got)
	}
	batch := `[` + one + `, {"id":"2","timestamp":"2026-01-02T03:04:06Z","data":[{"timestamp":"x"}]}]`
	if got := timestamps([]byte(batch)); len(got) != 2 || got[1].Second() != 6 {
		t.Fatalf("batch: %v", got)
	}
}

func TestReport(t *testing.T) {
	rc := &receiver{total: &stats{}, bySub: map[string]*stats{}}
	start := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for i := range 1000 { // one event a millisecond, each 2 ms after its commit
		now := start.Add(time.Duration(i) * time.Millisecond)
		sub := "a"
		if i%2 == 1 {
			sub = "b"
		}
		rc.add(sub, now, []time.Time{now.Add(-2 * time.Millisecond)})
	}
	all := rc.total.report(true, true)
	if all["events"] != 1000 || all["p99_ms"] != 2.0 {
		t.Errorf("total: %v", all)
	}
	if r := all["rate"].(float64); r < 999 || r > 1001 {
		t.Errorf("rate %v, want 1000/s", r)
	}
	if a := rc.bySub["a"].report(false, true); a["events"] != 500 || a["rate"].(float64) < 499 || a["rate"].(float64) > 501 {
		t.Errorf("sub a: %v", a)
	}
}
