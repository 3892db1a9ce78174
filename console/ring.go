package console

import (
	"fmt"
	"strings"
	"sync"
	"time"
)

// Sample is one reading of the slot's lag.
type Sample struct {
	At         time.Time
	LagBytes   int64
	LagSeconds float64
}

// Ring keeps the last hour's lag samples in memory (one per probe, every 10 s:
// 360 of them). It is safe for concurrent use.
type Ring struct {
	mu      sync.Mutex
	samples []Sample // oldest first
	keep    time.Duration
}

// NewRing returns a ring that keeps samples for keep (an hour if 0).
func NewRing(keep time.Duration) *Ring {
	if keep <= 0 {
		keep = time.Hour
	}
	return &Ring{keep: keep}
}

// Add records s and forgets samples older than the ring keeps.
func (r *Ring) Add(s Sample) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.samples = append(r.samples, s)
	cut := 0
	for cut < len(r.samples) && s.At.Sub(r.samples[cut].At) > r.keep {
		cut++
	}
	if cut > 0 {
		r.samples = append(r.samples[:0], r.samples[cut:]...)
	}
}

// Samples returns a copy of the samples, oldest first.
func (r *Ring) Samples() []Sample {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Sample(nil), r.samples...)
}

// chart is an SVG polyline of lag bytes over the ring's span, scaled into a
// w × h box; max is the largest value, for the label.
type chart struct {
	W, H   int
	Points string
	Max    int64
	Last   Sample
	Empty  bool
	Span   string
}

func newChart(samples []Sample, now time.Time, span time.Duration, w, h int) chart {
	c := chart{W: w, H: h, Empty: len(samples) == 0, Span: span.String()}
	if c.Empty {
		return c
	}
	c.Last = samples[len(samples)-1]
	for _, s := range samples {
		c.Max = max(c.Max, s.LagBytes)
	}
	var b strings.Builder
	for _, s := range samples {
		x := float64(w) * (1 - now.Sub(s.At).Seconds()/span.Seconds())
		y := float64(h)
		if c.Max > 0 {
			y = float64(h) * (1 - float64(s.LagBytes)/float64(c.Max))
		}
		fmt.Fprintf(&b, "%.1f,%.1f ", max(x, 0), y)
	}
	c.Points = strings.TrimSpace(b.String())
	return c
}
