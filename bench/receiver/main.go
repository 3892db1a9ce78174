// Command receiver is the benchmark's endpoint, in its own process: it accepts
// hooks (one envelope or an array), answers 204 at once, and counts events and
// commit-to-receipt latencies, which GET /stats reports.
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
	mu        sync.Mutex
	events    int
	requests  int
	latencies []float64 // milliseconds
}

func main() {
	listen := flag.String("listen", "127.0.0.1:9999", "address")
	flag.Parse()
	s := &stats{}
	http.HandleFunc("POST /hooks", func(w http.ResponseWriter, r *http.Request) {
		now := time.Now()
		body, _ := io.ReadAll(r.Body)
		var envs []struct {
			Timestamp time.Time `json:"timestamp"`
		}
		if len(body) > 0 && body[0] == '[' {
			json.Unmarshal(body, &envs)
		} else {
			envs = envs[:0]
			var one struct {
				Timestamp time.Time `json:"timestamp"`
			}
			json.Unmarshal(body, &one)
			envs = append(envs, one)
		}
		s.mu.Lock()
		s.requests++
		s.events += len(envs)
		for _, e := range envs {
			s.latencies = append(s.latencies, float64(now.Sub(e.Timestamp).Microseconds())/1000)
		}
		s.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	})
	http.HandleFunc("GET /stats", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		defer s.mu.Unlock()
		out := map[string]any{"events": s.events, "requests": s.requests}
		if r.URL.Query().Get("latency") != "" && len(s.latencies) > 0 {
			l := append([]float64(nil), s.latencies...)
			sort.Float64s(l)
			q := func(p float64) float64 { return l[min(int(p*float64(len(l))), len(l)-1)] }
			out["p50_ms"], out["p99_ms"], out["max_ms"] = q(0.5), q(0.99), l[len(l)-1]
		}
		json.NewEncoder(w).Encode(out)
	})
	http.HandleFunc("POST /reset", func(w http.ResponseWriter, _ *http.Request) {
		s.mu.Lock()
		s.events, s.requests, s.latencies = 0, 0, nil
		s.mu.Unlock()
	})
	log.Fatal(http.ListenAndServe(*listen, nil))
}
