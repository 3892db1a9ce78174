// Command receiver is the benchmark's endpoint, in its own process: it accepts
// hooks (one envelope or an array) and answers 204, at once or after the
// request's ?delay= (a slow endpoint's work, for the relay scale-out and the
// REST Hooks comparison). It counts events, commit-to-receipt latencies and
// receipt times, in total and per ?sub=, which GET /stats reports (?sub= for
// one subscriber, ?latency=1 for quantiles, ?rate=1 for the steady rate).
package main

import (
	"encoding/json"
	"flag"
	"io"
	"log"
	"net/http"
	"sort"
	"sync"
	"time"
)

type stats struct {
	events    int
	requests  int
	latencies []float64 // milliseconds
	received  []int64   // receipt times, unix nanoseconds, one per event
}

type receiver struct {
	mu    sync.Mutex
	total *stats
	bySub map[string]*stats
}

func (rc *receiver) add(sub string, now time.Time, stamps []time.Time) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	all := []*stats{rc.total}
	if sub != "" {
		s := rc.bySub[sub]
		if s == nil {
			s = &stats{}
			rc.bySub[sub] = s
		}
		all = append(all, s)
	}
	for _, s := range all {
		s.requests++
		s.events += len(stamps)
		for _, t := range stamps {
			s.latencies = append(s.latencies, float64(now.Sub(t).Microseconds())/1000)
			s.received = append(s.received, now.UnixNano())
		}
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:9999", "address")
	flag.Parse()
	rc := &receiver{total: &stats{}, bySub: map[string]*stats{}}
	http.HandleFunc("POST /hooks", func(w http.ResponseWriter, r *http.Request) {
		now := time.Now()
		body, _ := io.ReadAll(r.Body)
		rc.add(r.URL.Query().Get("sub"), now, timestamps(body))
		if d, err := time.ParseDuration(r.URL.Query().Get("delay")); err == nil && d > 0 {
			time.Sleep(d) // the endpoint's work, not synchronisation
		}
		w.WriteHeader(http.StatusNoContent)
	})
	http.HandleFunc("GET /stats", func(w http.ResponseWriter, r *http.Request) {
		rc.mu.Lock()
		defer rc.mu.Unlock()
		s := rc.total
		if sub := r.URL.Query().Get("sub"); sub != "" {
			if s = rc.bySub[sub]; s == nil {
				s = &stats{}
			}
		}
		json.NewEncoder(w).Encode(s.report(r.URL.Query().Get("latency") != "", r.URL.Query().Get("rate") != ""))
	})
	http.HandleFunc("POST /reset", func(w http.ResponseWriter, _ *http.Request) {
		rc.mu.Lock()
		rc.total, rc.bySub = &stats{}, map[string]*stats{}
		rc.mu.Unlock()
	})
	log.Fatal(http.ListenAndServe(*listen, nil))
}

// report is what /stats answers: events and requests; with latency, the
// commit-to-receipt quantiles; with rate, events per second between the 10th
// and the 90th percentile of receipt times (the steady rate, without start-up
// and the tail).
func (s *stats) report(latency, rate bool) map[string]any {
	out := map[string]any{"events": s.events, "requests": s.requests}
	if latency && len(s.latencies) > 0 {
		l := append([]float64(nil), s.latencies...)
		sort.Float64s(l)
		q := func(p float64) float64 { return l[min(int(p*float64(len(l))), len(l)-1)] }
		out["p50_ms"], out["p99_ms"], out["max_ms"] = q(0.5), q(0.99), l[len(l)-1]
	}
	if rate && len(s.received) >= 10 {
		t := append([]int64(nil), s.received...)
		sort.Slice(t, func(i, j int) bool { return t[i] < t[j] })
		lo, hi := len(t)/10, len(t)*9/10
		if d := time.Duration(t[hi] - t[lo]); d > 0 {
			out["rate"] = float64(hi-lo) / d.Seconds()
		}
		out["span_s"] = time.Duration(t[len(t)-1] - t[0]).Seconds()
	}
	return out
}

// timestamps returns the "timestamp" of each envelope in body (one envelope or
// an array of them). It scans the JSON instead of decoding it: decoding a batch
// of 1,000 took the receiver more CPU than walhook spent sending it, on the
// same two cores.
func timestamps(body []byte) []time.Time {
	envelopeDepth := 1
	if len(body) > 0 && body[0] == '[' {
		envelopeDepth = 2
	}
	var out []time.Time
	depth, wantValue := 0, false
	for i := 0; i < len(body); i++ {
		switch body[i] {
		case '{', '[':
			depth++
		case '}', ']':
			depth--
		case '"':
			end := i + 1
			for end < len(body) && body[end] != '"' {
				if body[end] == '\\' {
					end++
				}
				end++
			}
			str := body[i+1 : min(end, len(body))]
			next := end + 1
			for next < len(body) && (body[next] == ' ' || body[next] == '\n') {
				next++
			}
			isKey := next < len(body) && body[next] == ':'
			switch {
			case isKey:
				wantValue = depth == envelopeDepth && string(str) == "timestamp"
			case wantValue:
				if t, err := time.Parse(time.RFC3339Nano, string(str)); err == nil {
					out = append(out, t)
				}
				wantValue = false
			}
			i = end
		}
	}
	return out
}
