package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os/exec"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// The comparison of the REST Hooks performance guide (inline HTTP, a SQL-based
// queue, a proper queue): an application request that changes a row and
// triggers an event with three subscribers, one of which takes 200 ms to
// answer. The application is an HTTP server in this process; a client calls
// it restRate times a second for restFor, each request on its own, and times
// it. Delivery latency is the receiver's: from the event's timestamp (the
// commit, or for the inline calls the moment after it) to the request's
// arrival.

const (
	restRate = 10
	restFor  = 20 * time.Second
)

// restTargets are the three subscribers: a and b answer at once, c after 200 ms.
func restTargets() []string {
	base := "http://" + recvAddr + "/hooks?sub="
	return []string{base + "a", base + "b", base + "c&delay=200ms"}
}

type restResult struct {
	reqP50, reqP99   float64 // the application request's latency, ms
	fast, slow       map[string]any
	requests, failed int
}

// restHooks runs mode: "inline" (the request POSTs to each subscriber in
// turn, after its commit), "sqlqueue" (an outbox row in the transaction;
// bench/relay polls, delivers row by row, deletes), "direct" (walhook run),
// "relay" (walhook run with relay, two walhook deliver workers).
func restHooks(run int, mode string) (restResult, error) {
	var res restResult
	name := fmt.Sprintf("bench_rest_%s_%d", mode, run)
	partitions := relayPartitions()
	top := ""
	if mode == "relay" {
		top = relayTop(fmt.Sprintf("REST%d", run), partitions)
	}
	t := restTargets()
	db, err := newDB(name)
	if err != nil {
		return res, err
	}
	cfg, err := configSubs(db, top, benchSub("a", t[0], "")+benchSub("b", t[1], "")+benchSub("c", t[2], ""))
	if err != nil {
		return res, err
	}
	if err := walhook("setup", "--config", cfg); err != nil {
		return res, err
	}
	ctx := context.Background()
	pcfg, err := pgxpool.ParseConfig(db)
	if err != nil {
		return res, err
	}
	pcfg.ConnConfig.RuntimeParams["synchronous_commit"] = "on"
	pcfg.MaxConns = 32
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return res, err
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, `CREATE TABLE contacts (id bigserial PRIMARY KEY, name text NOT NULL)`); err != nil {
		return res, err
	}

	var stopConsumers []func()
	defer func() {
		for _, s := range stopConsumers {
			s()
		}
	}()
	switch mode {
	case "sqlqueue":
		pool.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, name) // the relay reads the table
		r := exec.Command(filepath.Join(bin, "relay"), "-db", db, "-target", t[0]+","+t[1]+","+t[2], "-interval", "100ms")
		if err := r.Start(); err != nil {
			return res, err
		}
		stopConsumers = append(stopConsumers, func() { stop(r) })
	case "direct", "relay":
		if mode == "relay" {
			ws, err := startWorkers(cfg, 2, partitions)
			if err != nil {
				return res, err
			}
			stopConsumers = append(stopConsumers, func() { stopAll(ws) })
		}
		sc, err := startWalhook("run", cfg)
		if err != nil {
			return res, err
		}
		stopConsumers = append(stopConsumers, func() { stop(sc.cmd) })
		if err := warmUp(db, 3); err != nil { // one event, to each of the three
			return res, err
		}
	}

	app := &restApp{pool: pool, inline: mode == "inline", targets: t,
		client: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 32}}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return res, err
	}
	srv := &http.Server{Handler: app}
	go srv.Serve(ln)
	defer srv.Close()

	http.Post("http://"+recvAddr+"/reset", "", nil)
	lat, failed := drive("http://"+ln.Addr().String()+"/contacts", restRate, restFor)
	res.requests, res.failed = len(lat)+failed, failed
	if len(lat) == 0 {
		return res, fmt.Errorf("%s: every request failed", mode)
	}
	sort.Float64s(lat)
	q := func(p float64) float64 { return lat[min(int(p*float64(len(lat))), len(lat)-1)] }
	res.reqP50, res.reqP99 = q(0.5), q(0.99)
	if err := waitEvents(3*len(lat), 5*time.Minute); err != nil {
		return res, err
	}
	res.fast, res.slow = mergeFast(statsOf("a", false), statsOf("b", false)), statsOf("c", false)
	return res, nil
}

// restApp is the application: POST /contacts inserts a contact and, but for
// inline, an outbox row in the same transaction.
type restApp struct {
	pool    *pgxpool.Pool
	inline  bool
	targets []string
	client  *http.Client
}

func (a *restApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	tx, err := a.pool.Begin(ctx)
	if err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	defer tx.Rollback(ctx)
	var id int64
	if err := tx.QueryRow(ctx, `INSERT INTO contacts (name) VALUES ('Ada Lovelace') RETURNING id`).Scan(&id); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	payload := fmt.Sprintf(`{"id": %d, "name": "Ada Lovelace"}`, id)
	if !a.inline {
		if _, err := tx.Exec(ctx, `INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.created', $1, $2)`,
			fmt.Sprint(id), payload); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
	}
	if err := tx.Commit(ctx); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	if a.inline { // the hooks inside the request, one subscriber after another
		body, _ := json.Marshal(map[string]any{"type": "contact.created", "timestamp": time.Now().UTC().Format(time.RFC3339Nano),
			"data": json.RawMessage(payload)})
		for _, t := range a.targets {
			resp, err := a.client.Post(t, "application/json", bytes.NewReader(body))
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadGateway)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}
	w.WriteHeader(http.StatusCreated)
}

// drive calls u rate times a second for d, each call in its own goroutine,
// and returns the latencies (ms) of those that succeeded and how many failed.
func drive(u string, rate int, d time.Duration) ([]float64, int) {
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	defer client.CloseIdleConnections()
	var mu sync.Mutex
	var lat []float64
	failed := 0
	var wg sync.WaitGroup
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	for range rate * int(d.Seconds()) {
		<-tick.C
		wg.Go(func() {
			start := time.Now()
			resp, err := client.Post(u, "application/json", nil)
			ok := err == nil && resp.StatusCode == http.StatusCreated
			if err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			mu.Lock()
			defer mu.Unlock()
			if !ok {
				failed++
				return
			}
			lat = append(lat, float64(time.Since(start).Microseconds())/1000)
		})
	}
	wg.Wait()
	return lat, failed
}

// statsOf is the receiver's /stats for subscriber sub ("" for all), with
// latency quantiles and, with rate, the steady rate.
func statsOf(sub string, rate bool) map[string]any {
	q := url.Values{"sub": {sub}, "latency": {"1"}}
	if rate {
		q.Set("rate", "1")
	}
	resp, err := http.Get("http://" + recvAddr + "/stats?" + q.Encode())
	if err != nil {
		return map[string]any{}
	}
	defer resp.Body.Close()
	s := map[string]any{}
	json.NewDecoder(resp.Body).Decode(&s)
	return s
}

// mergeFast reports the worse of the two fast subscribers' quantiles.
func mergeFast(a, b map[string]any) map[string]any {
	out := map[string]any{}
	for _, k := range []string{"p50_ms", "p99_ms", "max_ms"} {
		x, _ := a[k].(float64)
		y, _ := b[k].(float64)
		out[k] = max(x, y)
	}
	return out
}
