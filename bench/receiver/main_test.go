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
