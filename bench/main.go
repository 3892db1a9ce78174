// Command bench measures walhook end to end on this machine, next to
// PostgreSQL's own decoding ceiling (pg_recvlogical), and writes the results to
// docs/benchmarks.md. Run it with `make bench` (a throwaway PostgreSQL, its
// URL in WALHOOK_TEST_DATABASE_URL, its binaries in PG_BINDIR).
//
// BENCH_ROWS (default 1000000) rows for the backlog drain, BENCH_UNBATCHED
// (100000) for the unbatched run, BENCH_RUNS (2) runs of each; BENCH_SCENARIOS
// (drain,unbatched,attemptlog,latency,versus,busy, and relay mode's
// relaydrain,relaylatency,relayscale, and resthooks) picks scenarios.
// BENCH_RELAY_ROWS (100000) rows for the drain through JetStream,
// BENCH_SCALE_EVENTS (16000) events for the scale-out, BENCH_RELAY_PARTITIONS
// (64) partitions of the relay streams, BENCH_NATS_STORE the directory natsd
// keeps its store under (default: a temporary one). BENCH_PROFILE_RELAY=dir
// writes a CPU profile of each `walhook run` and `walhook deliver` of the
// relay scenarios there, and one of natsd over all of them (natsd.prof).
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
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/walhook/walhook/internal/procstat"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

var (
	base, bin, tmp string
	recvAddr       string
)

func run() error {
	base = os.Getenv("WALHOOK_TEST_DATABASE_URL")
	if base == "" {
		return fmt.Errorf("WALHOOK_TEST_DATABASE_URL is not set: run `make bench`")
	}
	rows, unbatched, runs := envInt("BENCH_ROWS", 1000000), envInt("BENCH_UNBATCHED", 100000), envInt("BENCH_RUNS", 2)
	var err error
	tmp, err = os.MkdirTemp("", "walhook-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	relayRows, scaleEvents := envInt("BENCH_RELAY_ROWS", 100000), envInt("BENCH_SCALE_EVENTS", 16000)
	for _, p := range []string{"cmd/walhook", "bench/receiver", "bench/relay", "examples/demo/natsd"} {
		if out, err := exec.Command("go", "build", "-o", filepath.Join(tmp, filepath.Base(p)), "./"+p).CombinedOutput(); err != nil {
			return fmt.Errorf("build %s: %v\n%s", p, err, out)
		}
	}
	bin = tmp
	recvAddr = freeAddr()
	recv := exec.Command(filepath.Join(bin, "receiver"), "-listen", recvAddr)
	if err := recv.Start(); err != nil {
		return err
	}
	defer recv.Process.Kill()
	waitHTTP("http://" + recvAddr + "/stats")

	loadAtStart = loadAvg()
	var table [][]string
	add := func(row ...string) { table = append(table, row); fmt.Println(strings.Join(row, " | ")) }
	want := wanted
	if want("relaydrain") || want("relaylatency") || want("relayscale") || want("resthooks") {
		stopNATS, err := startNATS()
		if err != nil {
			return err
		}
		defer stopNATS()
	}
	for r := 1; r <= runs && want("drain"); r++ {
		drain, err := backlogDrain(r, rows)
		if err != nil {
			return err
		}
		add(fmt.Sprintf("backlog drain, %d rows in 100-row txns, run %d", rows, r),
			fmt.Sprintf("pg_recvlogical %.0f rows/s", drain.refRate),
			fmt.Sprintf("walhook (batch_max 1000) %.0f events/s = %.2f× pg_recvlogical", drain.rate, drain.rate/drain.refRate),
			fmt.Sprintf("walhook %.2f CPU-s/100k, peak RSS %d MiB; walsender CPU-busy %.0f%%", drain.cpuPer100k, drain.rssMiB, 100*drain.walsenderBusy))
	}
	for r := 1; r <= runs && want("unbatched"); r++ {
		u, err := unbatchedDrain(r, unbatched)
		if err != nil {
			return err
		}
		floor := httpFloor(unbatched)
		add(fmt.Sprintf("unbatched, %d single-row txns, run %d", unbatched, r),
			fmt.Sprintf("net/http client alone %.0f requests/s, %.2f CPU-s/100k", floor.rate, floor.cpuPer100k),
			fmt.Sprintf("walhook (batch_max 1) %.0f events/s", u.rate),
			fmt.Sprintf("walhook %.2f CPU-s/100k, peak RSS %d MiB", u.cpuPer100k, u.rssMiB))
	}
	// The attempt log's cost (docs/attempts.md): the same drains with it off
	// and with every attempt logged, alternated.
	for r := 1; r <= runs && want("attemptlog"); r++ {
		var rate [2]drainResult
		var urate [2]drainResult
		for i, mode := range []string{"off", "all"} {
			top := "attempt_log: " + mode + "\n"
			if rate[i], err = backlogDrainWith("bench_log_"+mode, r, rows, top); err != nil {
				return err
			}
			if urate[i], err = unbatchedDrainWith("bench_logu_"+mode, r, unbatched, top); err != nil {
				return err
			}
		}
		add(fmt.Sprintf("attempt log, run %d", r),
			fmt.Sprintf("attempt_log: off — drain %.0f events/s, unbatched %.0f events/s (%.2f CPU-s/100k)", rate[0].rate, urate[0].rate, urate[0].cpuPer100k),
			fmt.Sprintf("attempt_log: all — drain %.0f events/s (%+.0f%%), unbatched %.0f events/s (%+.0f%%)", rate[1].rate, 100*(rate[1].rate/rate[0].rate-1),
				urate[1].rate, 100*(urate[1].rate/urate[0].rate-1)),
			fmt.Sprintf("unbatched CPU %.2f CPU-s/100k with the log, peak RSS %d MiB", urate[1].cpuPer100k, urate[1].rssMiB))
	}
	for r := 1; r <= runs && want("latency"); r++ {
		for _, eps := range []int{1000, 5000} {
			f, err := decodingFloor(eps, 10*time.Second)
			if err != nil {
				return err
			}
			l, err := latency(eps, 10*time.Second)
			if err != nil {
				return err
			}
			add(fmt.Sprintf("latency at %d events/s (synchronous_commit=on), 10s, run %d", eps, r),
				fmt.Sprintf("commit → decoded (bare pgoutput consumer) p50 %.2f ms, p99 %.2f ms, max %.2f ms", f["p50_ms"], f["p99_ms"], f["max_ms"]),
				fmt.Sprintf("commit → receipt p50 %.2f ms, p99 %.2f ms, max %.2f ms", l["p50_ms"], l["p99_ms"], l["max_ms"]),
				fmt.Sprintf("%v events received", l["events"]))
		}
	}
	consumers := []struct {
		name, label, top string
		interval         time.Duration
	}{
		{"relay_100ms", "relay every 100ms", "", 100 * time.Millisecond},
		{"relay_1s", "relay every 1s", "", time.Second},
		{"pg_recvlogical", "pg_recvlogical (reference)", "", 0},
		{"walhook", "walhook (attempt_log: all, the default)", "", 0},
		{"walhook_nolog", "walhook, attempt_log: off", "attempt_log: off\n", 0},
	}
	for r := 1; r <= runs && want("versus"); r++ {
		for _, v := range consumers {
			s, err := versus(v.name, v.top, v.interval)
			if err != nil {
				return err
			}
			latency := fmt.Sprintf("latency p50 %.2f ms, p99 %.2f ms", s["p50_ms"], s["p99_ms"])
			if v.name == "pg_recvlogical" {
				latency = "(streams to /dev/null: decoding only, nothing delivered)"
			}
			resources := fmt.Sprintf("database CPU %.2f s/100k events, WAL %.0f B/event, %.1f transactions/s idle",
				s["db_cpu_per_100k"], s["wal_bytes_per_event"], s["idle_tps"])
			if ws, ok := s["walsender_cpu_per_100k"]; ok {
				resources += fmt.Sprintf("; of it the walsender %.2f s/100k", ws)
			}
			add(fmt.Sprintf("versus a polling relay, 1,000 events/s for 10s, run %d: %s", r, v.label), "", latency, resources)
		}
	}
	for r := 1; r <= runs && want("busy"); r++ {
		for _, consumer := range []string{"none", "pg_recvlogical", "walhook"} {
			b, err := busyPrimary(consumer)
			if err != nil {
				return err
			}
			label := map[string]string{"none": "slot not streamed", "pg_recvlogical": "pg_recvlogical (reference)", "walhook": "walhook"}[consumer]
			res := fmt.Sprintf("all postgres processes %.2f CPU-s/100k transactions", b["db_cpu_per_100k"])
			if ws, ok := b["walsender_cpu_per_100k"]; ok {
				res = fmt.Sprintf("walsender %.2f CPU-s/100k transactions, the consumer itself %.2f; ", ws, b["consumer_cpu_per_100k"]) + res
			}
			add(fmt.Sprintf("busy primary: pgbench simple-update at 1,000 txns/s for 10s, no outbox rows, run %d: %s", r, label), "", "", res)
		}
	}
	for r := 1; r <= runs && want("relaydrain"); r++ {
		direct, err := backlogDrainWith("bench_rdrain_direct", r, relayRows, "")
		if err != nil {
			return err
		}
		d, err := relayDrain(r, relayRows, 2)
		if err != nil {
			return err
		}
		add(fmt.Sprintf("relay: backlog drain through JetStream, %d rows in 100-row txns, 2 workers, %d partitions, run %d", relayRows, relayPartitions(), r),
			fmt.Sprintf("walhook direct (batch_max 1000) %.0f events/s", direct.rate),
			fmt.Sprintf("published and confirmed %.0f events/s; end to end %.0f events/s = %.2f× direct", d.publishRate, d.rate, d.rate/direct.rate),
			fmt.Sprintf("CPU-s/100k: sidecar %.2f, workers %.2f, nats-server %.2f; peak RSS sidecar %d MiB, worker %d MiB, nats-server %d MiB",
				d.sidecarCPU, d.workersCPU, d.natsCPU, d.sidecarRSS, d.workerRSS, d.natsRSSMiB))
	}
	for r := 1; r <= runs && want("relaylatency"); r++ {
		const eps = 1000
		direct, err := latency(eps, 10*time.Second)
		if err != nil {
			return err
		}
		l, err := relayLatency(r, eps, 10*time.Second)
		if err != nil {
			return err
		}
		f, err := jetStreamFloor(r, eps, relayPartitions(), 10*time.Second)
		if err != nil {
			return err
		}
		add(fmt.Sprintf("relay: latency at %d events/s (synchronous_commit=on), 10s, 2 workers, %d partitions, run %d", eps, relayPartitions(), r),
			fmt.Sprintf("walhook direct commit → receipt p50 %.2f ms, p99 %.2f ms, max %.2f ms", direct["p50_ms"], direct["p99_ms"], direct["max_ms"]),
			fmt.Sprintf("relay commit → receipt p50 %.2f ms, p99 %.2f ms, max %.2f ms (goal p99 ≤ 10 ms)", l["p50_ms"], l["p99_ms"], l["max_ms"]),
			fmt.Sprintf("%v events received; the sidecar's publish → JetStream ack %.2f ms on average, p99 ≤ %g ms; stored → fetched by a worker %.2f ms on average, p99 ≤ %g ms; %.0f publish errors; CPU-s/100k: %v; "+
				"bare JetStream after it (same server and stream settings, 2 pull consumers): publish → ack p50 %.2f ms, p99 %.2f ms, publish → fetched p50 %.2f ms, p99 %.2f ms, nats-server %.1f CPU-s/100k",
				l["events"], l["publish_ack_ms"], l["publish_ack_p99_ms"], l["fetch_delay_ms"], l["fetch_delay_p99_ms"], l["publish_errors"], l["cpu_per_100k"],
				f["ack_p50_ms"], f["ack_p99_ms"], f["fetched_p50_ms"], f["fetched_p99_ms"], f["nats_cpu_per_100k"]))
	}
	for r := 1; r <= runs && want("relayscale"); r++ {
		var rates []float64
		var cells []string
		for _, n := range []int{1, 2, 4} {
			s, err := relayScale(r, n, scaleEvents)
			if err != nil {
				return err
			}
			rate, _ := s["rate"].(float64)
			rates = append(rates, rate)
			cells = append(cells, fmt.Sprintf("%d worker(s) %.0f events/s (all in %.1f s, workers %.2f CPU-s/100k)", n, rate, s["total_s"], s["workers_cpu_per_100k"]))
		}
		add(fmt.Sprintf("relay: scale-out, %d events, an endpoint answering in 20 ms, max_in_flight 16 per worker, %d partitions, run %d", scaleEvents, relayPartitions(), r),
			"ceiling 16 / 20 ms = 800 events/s per worker",
			strings.Join(cells, "; "),
			fmt.Sprintf("4 workers / 1 worker = %.2f× (goal ≥ 3×)", rates[2]/rates[0]))
	}
	var rest []string
	for r := 1; r <= runs && want("resthooks"); r++ {
		labels := map[string]string{"inline": "inline HTTP calls in the request", "sqlqueue": "SQL queue table + polling worker (bench/relay, every 100ms)",
			"direct": "walhook direct", "relay": "walhook relay (2 workers)"}
		for _, mode := range []string{"inline", "sqlqueue", "direct", "relay"} {
			x, err := restHooks(r, mode)
			if err != nil {
				return err
			}
			row := fmt.Sprintf("| %s, run %d | %.2f | %.2f | %.2f / %.2f | %.2f / %.2f | %d of %d |", labels[mode], r, x.reqP50, x.reqP99,
				x.fast["p50_ms"], x.fast["p99_ms"], x.slow["p50_ms"], x.slow["p99_ms"], x.requests-x.failed, x.requests)
			rest = append(rest, row)
			fmt.Println(row)
		}
	}
	return writeDoc(table, rest, rows, unbatched, runs)
}

type drainResult struct {
	refRate, rate, cpuPer100k, walsenderBusy float64
	rssMiB                                   int
}

func newDB(name string) (string, error) {
	ctx := context.Background()
	c, err := pgx.Connect(ctx, base)
	if err != nil {
		return "", err
	}
	defer c.Close(ctx)
	c.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '`+name+`' AND NOT active`)
	c.Exec(ctx, `DROP DATABASE IF EXISTS `+name+` WITH (FORCE)`)
	if _, err := c.Exec(ctx, `CREATE DATABASE `+name); err != nil {
		return "", err
	}
	u, _ := url.Parse(base)
	u.Path = "/" + name
	return u.String(), nil
}

// prepare makes a fresh database for a scenario, with a config (extra: the
// subscription's options) on which `walhook setup` has run.
func prepare(name, extra string) (db, cfg string, err error) { return prepareWith(name, "", extra) }

// prepareWith is prepare with top-level config lines (top) as well.
func prepareWith(name, top, extra string) (db, cfg string, err error) {
	if db, err = newDB(name); err != nil {
		return "", "", err
	}
	if cfg, err = config(db, top, extra); err != nil {
		return "", "", err
	}
	return db, cfg, walhook("setup", "--config", cfg)
}

func config(db, top, extra string) (string, error) {
	return configSubs(db, top, benchSub("bench", "http://"+recvAddr+"/hooks", extra))
}

// configSubs writes a config with top-level lines top and subscriptions subs
// (benchSub's).
func configSubs(db, top, subs string) (string, error) {
	path := filepath.Join(tmp, "walhook.yaml")
	u, _ := url.Parse(db)
	slot := strings.TrimPrefix(u.Path, "/") // slot names are cluster-wide: one per database
	cfg := fmt.Sprintf("database_url: %s\nlisten: 127.0.0.1:0\nlog_level: warn\nslot: %s\n%ssubscriptions:\n%s", db, slot, top, subs)
	return path, os.WriteFile(path, []byte(cfg), 0o600)
}

// benchSub is one subscription of every event to target, with options extra.
func benchSub(id, target, extra string) string {
	return fmt.Sprintf("  - id: %s\n    events: ['*']\n    target_url: %s\n    secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n%s", id, target, extra)
}

func walhook(args ...string) error {
	out, err := exec.Command(filepath.Join(bin, "walhook"), args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("walhook %v: %v\n%s", args, err, out)
	}
	return nil
}

// backlog writes rows in transactions of per rows, with walhook not running.
func backlog(db string, rows, per int) error {
	ctx := context.Background()
	c, err := pgx.Connect(ctx, db)
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	_, err = c.Exec(ctx, fmt.Sprintf(`DO $$ BEGIN FOR i IN 0..%d LOOP
		INSERT INTO walhook.outbox (event, resource_id, tenant, payload)
		SELECT 'contact.updated', 'c' || (i * %d + g), 'acme', jsonb_build_object('name', 'Ada Lovelace', 'email', 'ada@example.com',
		  'company', 'Analytical Engines Ltd', 'address', jsonb_build_object('street', '12 St James''s Square', 'city', 'London'),
		  'tags', jsonb_build_array('vip', 'math'), 'notes', repeat('x', 120), 'n', i * %d + g)
		FROM generate_series(1, %d) g;
		COMMIT; END LOOP; END $$`, rows/per-1, per, per, per))
	return err
}

func backlogDrain(run, rows int) (drainResult, error) {
	return backlogDrainWith("bench_drain", run, rows, "")
}

// backlogDrainWith is backlogDrain with top-level config lines, in a database
// and slot named name_run.
func backlogDrainWith(name string, run, rows int, top string) (drainResult, error) {
	var r drainResult
	slot := fmt.Sprintf("%s_%d", name, run)
	db, cfg, err := prepareWith(slot, top, "    batch_max: 1000\n")
	if err != nil {
		return r, err
	}
	ctx := context.Background()
	c, err := pgx.Connect(ctx, db)
	if err != nil {
		return r, err
	}
	defer c.Close(ctx)
	if _, err := c.Exec(ctx, `SELECT pg_create_logical_replication_slot('reference', 'pgoutput')`); err != nil {
		return r, err
	}
	if err := backlog(db, rows, 100); err != nil {
		return r, err
	}
	var end string
	c.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&end)

	start := time.Now()
	out, err := recvlogical(db, "reference", "-E", end).CombinedOutput()
	if err != nil {
		return r, fmt.Errorf("pg_recvlogical: %v\n%s", err, out)
	}
	r.refRate = float64(rows) / time.Since(start).Seconds()
	c.Exec(ctx, `SELECT pg_drop_replication_slot('reference')`)

	http.Post("http://"+recvAddr+"/reset", "", nil)
	wh := exec.Command(filepath.Join(bin, "walhook"), "run", "--config", cfg)
	if p := os.Getenv("BENCH_PROFILE"); p != "" {
		wh.Env = append(os.Environ(), "WALHOOK_CPUPROFILE="+p)
	}
	start = time.Now()
	if err := wh.Start(); err != nil {
		return r, err
	}
	defer stop(wh)
	var walsender int
	var wsBefore float64
	for walsender == 0 {
		c.QueryRow(ctx, `SELECT coalesce(active_pid, 0) FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&walsender)
		time.Sleep(5 * time.Millisecond) // poll interval
	}
	wsBefore = procstat.CPUSeconds(walsender)
	if err := waitEvents(rows, 10*time.Minute); err != nil {
		return r, err
	}
	took := time.Since(start).Seconds()
	r.rate = float64(rows) / took
	r.cpuPer100k = procstat.CPUSeconds(wh.Process.Pid) / float64(rows) * 100000
	r.rssMiB = procstat.PeakRSSMiB(wh.Process.Pid)
	r.walsenderBusy = (procstat.CPUSeconds(walsender) - wsBefore) / took
	return r, nil
}

// httpFloor measures Go's HTTP client alone, in this process: n POSTs of a
// 500-byte body to the receiver, 16 in flight, as walhook sends them unbatched.
// It is the floor for one request per event.
func httpFloor(n int) drainResult {
	http.Post("http://"+recvAddr+"/reset", "", nil)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 32}}
	body := []byte(`{"data":"` + strings.Repeat("x", 480) + `"}`)
	jobs := make(chan struct{}, n)
	for range n {
		jobs <- struct{}{}
	}
	close(jobs)
	cpu0, start := selfCPU(), time.Now()
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for range jobs {
				resp, err := client.Post("http://"+recvAddr+"/hooks", "application/json", bytes.NewReader(body))
				if err != nil {
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		})
	}
	wg.Wait()
	client.CloseIdleConnections()
	return drainResult{rate: float64(n) / time.Since(start).Seconds(), cpuPer100k: (selfCPU() - cpu0) / float64(n) * 100000}
}

func selfCPU() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

func unbatchedDrain(run, n int) (drainResult, error) {
	return unbatchedDrainWith("bench_unbatched", run, n, "")
}

// unbatchedDrainWith is unbatchedDrain with top-level config lines.
func unbatchedDrainWith(name string, run, n int, top string) (drainResult, error) {
	var r drainResult
	db, cfg, err := prepareWith(fmt.Sprintf("%s_%d", name, run), top, "    batch_max: 1\n    max_in_flight: 16\n")
	if err != nil {
		return r, err
	}
	if err := backlog(db, n, 1); err != nil {
		return r, err
	}
	http.Post("http://"+recvAddr+"/reset", "", nil)
	wh := exec.Command(filepath.Join(bin, "walhook"), "run", "--config", cfg)
	if p := os.Getenv("BENCH_PROFILE_UNBATCHED"); p != "" {
		wh.Env = append(os.Environ(), "WALHOOK_CPUPROFILE="+p)
	}
	start := time.Now()
	if err := wh.Start(); err != nil {
		return r, err
	}
	defer stop(wh)
	if err := waitEvents(n, 10*time.Minute); err != nil {
		return r, err
	}
	r.rate = float64(n) / time.Since(start).Seconds()
	r.cpuPer100k = procstat.CPUSeconds(wh.Process.Pid) / float64(n) * 100000
	r.rssMiB = procstat.PeakRSSMiB(wh.Process.Pid)
	return r, nil
}

func latency(eps int, d time.Duration) (map[string]any, error) {
	db, cfg, err := prepare(fmt.Sprintf("bench_latency_%d", eps), "    batch_max: 1\n")
	if err != nil {
		return nil, err
	}
	wh := exec.Command(filepath.Join(bin, "walhook"), "run", "--config", cfg)
	if err := wh.Start(); err != nil {
		return nil, err
	}
	defer stop(wh)
	ctx := context.Background()
	// Wait for the stream: one event through.
	http.Post("http://"+recvAddr+"/reset", "", nil)
	c, err := pgx.Connect(ctx, db)
	if err != nil {
		return nil, err
	}
	c.Exec(ctx, `INSERT INTO walhook.outbox (event) VALUES ('warmup')`)
	c.Close(ctx)
	if err := waitEvents(1, time.Minute); err != nil {
		return nil, err
	}
	http.Post("http://"+recvAddr+"/reset", "", nil)
	done := make(chan struct{})
	defer close(done)
	total := produce(db, eps, d, done)
	if err := waitEvents(total, time.Minute); err != nil {
		return nil, err
	}
	return receiverStats(), nil
}

// produce commits single-row transactions at eps for d from 4 connections,
// synchronously; it returns how many, and closes the connections when done is
// closed (so that their CPU can be measured first).
func produce(db string, eps int, d time.Duration, done <-chan struct{}) int {
	ctx := context.Background()
	const producers = 4
	var wg sync.WaitGroup
	total := 0
	for p := range producers {
		per := eps / producers
		total += per * int(d.Seconds())
		wg.Add(1)
		go func() {
			c, err := pgx.Connect(ctx, db)
			if err != nil {
				wg.Done()
				return
			}
			defer c.Close(ctx)
			defer func() { wg.Done(); <-done }() // done producing; the connection stays until measured
			c.Exec(ctx, `SET synchronous_commit = on`)
			tick := time.NewTicker(time.Second / time.Duration(per))
			defer tick.Stop()
			for i := range per * int(d.Seconds()) {
				<-tick.C
				c.Exec(ctx, `INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('x', $1, '{"name": "Ada"}')`, strconv.Itoa(p*1000000+i))
			}
		}()
	}
	wg.Wait()
	return total
}

func receiverStats() map[string]any {
	resp, err := http.Get("http://" + recvAddr + "/stats?latency=1")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	var s map[string]any
	json.NewDecoder(resp.Body).Decode(&s)
	return s
}

// versus runs walhook or the polling relay against the same workload: idle
// transactions per second, then 1,000 events/s for 10s: latency, database CPU
// and WAL per event. top: walhook's top-level config lines.
func versus(name, top string, relayInterval time.Duration) (map[string]any, error) {
	dbName := "bench_vs_" + name
	db, cfg, err := prepareWith(dbName, top, "    batch_max: 1\n")
	if err != nil {
		return nil, err
	}
	ctx := context.Background()
	c, err := pgx.Connect(ctx, db)
	if err != nil {
		return nil, err
	}
	defer c.Close(ctx)
	var consumer *exec.Cmd
	streams := relayInterval == 0 // walhook or pg_recvlogical: a walsender decodes for it
	if name == "pg_recvlogical" {
		consumer = recvlogical(db, dbName, "-s", "1")
	} else if relayInterval > 0 {
		c.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, dbName) // the relay reads the table
		consumer = exec.Command(filepath.Join(bin, "relay"), "-db", db, "-target", "http://"+recvAddr+"/hooks",
			"-interval", relayInterval.String())
	} else {
		consumer = exec.Command(filepath.Join(bin, "walhook"), "run", "--config", cfg)
	}
	if err := consumer.Start(); err != nil {
		return nil, err
	}
	defer stop(consumer)
	http.Post("http://"+recvAddr+"/reset", "", nil)
	c.Exec(ctx, `INSERT INTO walhook.outbox (event) VALUES ('warmup')`)
	if err := consumed(c, dbName, name, 1); err != nil {
		return nil, err
	}
	var walsender int
	if streams {
		c.QueryRow(ctx, `SELECT coalesce(active_pid, 0) FROM pg_replication_slots WHERE slot_name = $1`, dbName).Scan(&walsender)
	}
	xacts := func() float64 {
		var n float64
		c.QueryRow(ctx, `SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1`, dbName).Scan(&n)
		return n
	}
	const idle = 5 * time.Second
	c.Exec(ctx, `SELECT pg_stat_clear_snapshot()`)
	x0 := xacts()
	time.Sleep(idle) // the measurement window
	c.Exec(ctx, `SELECT pg_stat_clear_snapshot()`)
	idleTPS := (xacts() - x0 - 1) / idle.Seconds() // minus our own query

	http.Post("http://"+recvAddr+"/reset", "", nil)
	var wal0 string
	c.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&wal0)
	cpu0, ws0 := postgresCPU(), procstat.CPUSeconds(walsender)
	done := make(chan struct{})
	defer close(done)
	n := produce(db, 1000, 10*time.Second, done)
	if err := consumed(c, dbName, name, n); err != nil {
		return nil, err
	}
	for relayInterval > 0 { // the relay's deletes are part of its cost: wait for them
		var left int
		c.QueryRow(ctx, `SELECT count(*) FROM walhook.outbox`).Scan(&left)
		if left == 0 {
			break
		}
		time.Sleep(50 * time.Millisecond) // poll interval
	}
	cpu := postgresCPU() - cpu0 // before done closes the producers' connections
	var walBytes float64
	c.QueryRow(ctx, `SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::pg_lsn)`, wal0).Scan(&walBytes)
	s := map[string]any{}
	if name != "pg_recvlogical" {
		s = receiverStats()
	}
	if streams {
		s["walsender_cpu_per_100k"] = (procstat.CPUSeconds(walsender) - ws0) / float64(n) * 100000
	}
	s["idle_tps"] = idleTPS
	s["db_cpu_per_100k"] = cpu / float64(n) * 100000
	s["wal_bytes_per_event"] = walBytes / float64(n)
	return s, nil
}

// postgresCPU sums the CPU seconds of the postgres processes on the machine
// (the throwaway cluster's), but autovacuum, which may still be busy with an
// earlier scenario's tables. Only processes alive at both readings count: the
// producers keep their connections open until the second.
// consumed waits until the consumer has taken n events: the receiver counts
// them; pg_recvlogical's walsender has sent everything written so far.
func consumed(c *pgx.Conn, slot, name string, n int) error {
	if name != "pg_recvlogical" {
		return waitEvents(n, time.Minute)
	}
	ctx := context.Background()
	var end string
	c.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&end)
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) { // poll interval
		var done bool
		c.QueryRow(ctx, `SELECT coalesce(bool_or(r.sent_lsn >= $2::pg_lsn), false) FROM pg_stat_replication r
			JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1`, slot, end).Scan(&done)
		if done {
			return nil
		}
	}
	return fmt.Errorf("pg_recvlogical did not catch up with %s", end)
}

// recvlogical is pg_recvlogical streaming slot with pgoutput to /dev/null:
// PostgreSQL's decoding, nothing delivered.
func recvlogical(db, slot string, args ...string) *exec.Cmd {
	args = append([]string{"-d", db, "-S", slot, "--start", "-o", "proto_version=1", "-o", "publication_names=walhook",
		"-f", "/dev/null"}, args...)
	return exec.Command(filepath.Join(os.Getenv("PG_BINDIR"), "pg_recvlogical"), args...)
}

func postgresCPU() float64 {
	dirs, _ := filepath.Glob("/proc/[0-9]*/stat")
	total := 0.0
	for _, d := range dirs {
		b, err := os.ReadFile(d)
		if err != nil || !strings.Contains(string(b), "(postgres)") {
			continue
		}
		if cmd, _ := os.ReadFile(filepath.Join(filepath.Dir(d), "cmdline")); strings.Contains(string(cmd), "autovacuum") {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(d)))
		total += procstat.CPUSeconds(pid)
	}
	return total
}

func waitEvents(n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		resp, err := http.Get("http://" + recvAddr + "/stats")
		if err == nil {
			var s struct{ Events int }
			json.NewDecoder(resp.Body).Decode(&s)
			resp.Body.Close()
			if s.Events >= n {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out waiting for %d events", n)
		}
		time.Sleep(20 * time.Millisecond) // poll interval
	}
}

func stop(c *exec.Cmd) {
	c.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { c.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		c.Process.Kill()
	}
}

func writeDoc(table [][]string, rest []string, rows, unbatched, runs int) error {
	cpu := "unknown"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				cpu = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	pgv, _ := exec.Command(filepath.Join(os.Getenv("PG_BINDIR"), "postgres"), "--version").Output()
	var b strings.Builder
	fmt.Fprintf(&b, "# Benchmarks\n\nMeasured by `make bench` (bench/main.go) on %s: %d CPUs (%s), %s, %s; PostgreSQL on the same machine\n",
		time.Now().UTC().Format("2006-01-02"), runtime.NumCPU(), cpu, runtime.Version(), strings.TrimSpace(string(pgv)))
	fmt.Fprintf(&b, "(throwaway cluster: fsync off, synchronous_commit off except in the latency runs). Receiver: bench/receiver,\n")
	fmt.Fprintf(&b, "a separate process answering 204 at once. BENCH_ROWS=%d BENCH_UNBATCHED=%d BENCH_RUNS=%d. The machine is shared:\n", rows, unbatched, runs)
	fmt.Fprintf(&b, "load average %s at the start of this run, %s at its end.\n\n", loadAtStart, loadAvg())
	old, _ := os.ReadFile("docs/benchmarks.md")
	kept, keptRest := earlierRows(string(old))
	if len(kept) > 0 || (len(rest) == 0 && len(keptRest) > 0) {
		fmt.Fprintf(&b, "This run: BENCH_SCENARIOS=%s; the rows of the other scenarios are from an earlier run.\n\n", os.Getenv("BENCH_SCENARIOS"))
	}
	fmt.Fprintf(&b, "| scenario | reference | walhook | resources |\n|---|---|---|---|\n")
	for _, name := range scenarioOrder {
		if !wanted(name) {
			for _, r := range kept[name] {
				fmt.Fprintln(&b, r)
			}
			continue
		}
		for _, r := range table {
			if scenarioOf(r[0]) == name {
				fmt.Fprintf(&b, "| %s |\n", strings.Join(r, " | "))
			}
		}
	}
	if !wanted("resthooks") {
		rest = keptRest
	}
	if len(rest) > 0 {
		fmt.Fprintf(&b, "\n## REST Hooks: inline HTTP, a SQL queue, a proper queue\n\n")
		fmt.Fprintf(&b, "An application request (POST, insert a contact, commit) triggers an event with 3 subscribers; two answer at once,\n")
		fmt.Fprintf(&b, "one in 200 ms. %d requests/s for %s, each on its own. Latencies in ms.\n\n", restRate, restFor)
		fmt.Fprintf(&b, "| approach | request p50 | request p99 | delivery p50 / p99, fast subscribers | delivery p50 / p99, the 200 ms one | requests answered |\n|---|---|---|---|---|---|\n")
		for _, r := range rest {
			fmt.Fprintln(&b, r)
		}
	}
	b.WriteString(`
The targets, what was profiled where one is missed, and each change measured before and after are in
[performance.md](performance.md). How each figure is taken:

- Backlog drain: ` + "`pg_recvlogical --start -o proto_version=1 -o publication_names=walhook -E <end> -f /dev/null`" + `
  on a second slot holding the same backlog is PostgreSQL's decoding ceiling, nothing delivered. walhook
  (` + "`walhook run`" + `, batch_max 1000) drains into the receiver; rate = events / (start of the process → last
  event received), so it includes start-up. CPU-s from /proc/<pid>/stat; peak RSS is VmHWM; walsender
  CPU-busy = its CPU seconds during walhook's drain / drain seconds.
- Unbatched: one request per event, max_in_flight 16. The reference is Go's net/http client alone, in the
  bench process, posting a 500-byte body with 16 in flight to the same receiver: the cost of a request.
- Latency: 4 producers at the given total rate, synchronous_commit=on; commit time from the envelope's
  timestamp, receipt time at the receiver (same clock). The reference is a bare consumer on a temporary
  pgoutput slot under the same producers, timestamping each insert as it is decoded: PostgreSQL's own floor.
- Busy primary: pgbench simple-update (no outbox rows) at 1,000 transactions/s for 10 s, with the slot not
  streamed, streamed by pg_recvlogical, and by walhook: what streaming costs a database whose transactions
  are mostly not walhook's. The total swings with pgbench's own backends; the walsender's share is steady.
- Versus: the same 10,000 single-row transactions at 1,000/s consumed by bench/relay (poll, deliver,
  DELETE), by pg_recvlogical (-s 1, to /dev/null), and by walhook. Database CPU is every postgres process
  but autovacuum, the producers' backends included; idle transactions/s over 5 s with nothing to do.
- Relay mode (docs/scale-out.md): NATS is a real nats-server (examples/demo/natsd, one node, its own
  process, file store), the stream R1 with 64 partitions; ` + "`walhook run`" + ` with a relay: section publishes,
  ` + "`walhook deliver`" + ` workers send. Drain: BENCH_RELAY_ROWS rows committed with nothing running, two workers
  started and owning their partitions, then the sidecar; published = until the slot confirms everything
  (JetStream acknowledged every delivery), end to end = until the receiver has every event; the reference is
  direct mode draining the same rows in the same run. Latency: as above, batch_max 1, two workers, next to
  direct mode in the same run; the sidecar's publish → ack and the workers' stored → fetched come from their
  histograms (p99 as a bucket bound), and right after, against the same nats-server, a bare asynchronous
  publisher and two bare pull consumers (bench/jsfloor.go, a stream set up like the relay's) are the
  JetStream reference. BENCH_NATS_STORE moves natsd's store (by default on PostgreSQL's disk). Scale-out: BENCH_SCALE_EVENTS events of distinct resources published and
  confirmed first, for an endpoint answering in 20 ms (the receiver's ?delay=), then 1, 2 or 4 workers with
  max_in_flight 16 and batch_max 1 started; the rate is the receiver's between the 10th and the 90th
  percentile of receipts (start-up and the tail left out). Every process shares the 2 cores: 4 workers,
  nats-server, the receiver and PostgreSQL.
- REST Hooks: the application is an HTTP server in the bench process (pgx pool, synchronous_commit on);
  POST /contacts inserts a contact and, but for inline, an outbox row in the same transaction. Inline calls
  the three subscribers one after another after its commit, inside the request. The SQL queue is
  bench/relay (poll every 100 ms, each row to each subscriber in turn, delete). Walhook direct and relay
  (two workers) deliver with batch_max 1, max_in_flight 16. Delivery latency is the receiver's: from the
  event's timestamp (its commit; the row's created_at for the SQL queue; after the commit for inline) to the
  request's arrival, so the 200 ms subscriber's own answer time is not in it, only what it makes others
  wait.

Micro-benchmarks (` + "`go test -run '^$' -bench . -benchmem ./cdc ./outbox ./sender`" + `) cover the hot path with
allocations: decoding a pgoutput insert, routing, envelope encoding, batch body and signing, a batch
delivery.
`)
	return os.WriteFile("docs/benchmarks.md", []byte(b.String()), 0o644)
}

// scenarioOrder is the order of the table; scenarioOf names a row's scenario
// from its first cell.
var scenarioOrder = []string{"drain", "unbatched", "attemptlog", "latency", "versus", "busy", "relaydrain", "relaylatency", "relayscale"}

func scenarioOf(cell string) string {
	for _, p := range []struct{ prefix, name string }{
		{"backlog drain", "drain"}, {"unbatched", "unbatched"}, {"attempt log", "attemptlog"}, {"latency at", "latency"},
		{"versus", "versus"}, {"busy primary", "busy"}, {"relay: backlog", "relaydrain"}, {"relay: latency", "relaylatency"},
		{"relay: scale-out", "relayscale"},
	} {
		if strings.HasPrefix(cell, p.prefix) {
			return p.name
		}
	}
	return ""
}

// wanted reports whether BENCH_SCENARIOS selects scenario name (all when unset).
func wanted(name string) bool {
	list := os.Getenv("BENCH_SCENARIOS")
	return list == "" || strings.Contains(","+list+",", ","+name+",")
}

// earlierRows are the rows of the previous docs/benchmarks.md by scenario,
// and those of its REST Hooks table, kept for the scenarios not run now.
func earlierRows(doc string) (map[string][]string, []string) {
	rows := map[string][]string{}
	var rest []string
	inRest := false
	for _, l := range strings.Split(doc, "\n") {
		if strings.HasPrefix(l, "## REST Hooks") {
			inRest = true
		}
		if !strings.HasPrefix(l, "| ") || strings.HasPrefix(l, "| scenario") || strings.HasPrefix(l, "| approach") {
			continue
		}
		if inRest {
			rest = append(rest, l)
			continue
		}
		first, _, _ := strings.Cut(strings.TrimPrefix(l, "| "), " |")
		if name := scenarioOf(first); name != "" && !wanted(name) {
			rows[name] = append(rows[name], l)
		}
	}
	if wanted("resthooks") {
		rest = nil
	}
	return rows, rest
}

var loadAtStart string

// loadAvg is the 1-minute load average from /proc/loadavg.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) > 0 {
		return f[0]
	}
	return "unknown"
}

func envInt(k string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(k)); err == nil && v > 0 {
		return v
	}
	return def
}

func freeAddr() string {
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	defer l.Close()
	return l.Addr().String()
}

func waitHTTP(u string) {
	for range 200 {
		if resp, err := http.Get(u); err == nil {
			resp.Body.Close()
			return
		}
		time.Sleep(25 * time.Millisecond) // poll interval
	}
}
