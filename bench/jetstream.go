package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/walhook/walhook/internal/procstat"
)

// Relay mode's scenarios (docs/scale-out.md): walhook run publishes to
// JetStream, walhook deliver workers send. NATS is a real nats-server,
// embedded in examples/demo/natsd, a process of its own on this machine: one
// node, the stream with one replica.

var natsURL string
var natsPid int

// startNATS starts natsd once; stopNATS is what the caller defers.
// BENCH_NATS_STORE is the directory natsd keeps its store under (default: a
// temporary directory, on the same disk as PostgreSQL's).
func startNATS() (stopNATS func(), err error) {
	store := ""
	if dir := os.Getenv("BENCH_NATS_STORE"); dir != "" {
		if store, err = os.MkdirTemp(dir, "walhook-natsd-"); err != nil {
			return nil, err
		}
	}
	stopNATS, err = startNATSd(store)
	if store == "" {
		return stopNATS, err
	}
	if err != nil {
		os.RemoveAll(store)
		return nil, err
	}
	return func() { stopNATS(); os.RemoveAll(store) }, nil
}

func startNATSd(store string) (stopNATS func(), err error) {
	var args []string
	if store != "" {
		args = append(args, "-store", store)
	}
	cmd := exec.Command(filepath.Join(bin, "natsd"), args...)
	if dir := os.Getenv("BENCH_PROFILE_RELAY"); dir != "" {
		cmd.Env = append(os.Environ(), "NATSD_CPUPROFILE="+filepath.Join(dir, "natsd.prof"))
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("natsd: %w", err)
	}
	natsURL, natsPid = strings.TrimSpace(line), cmd.Process.Pid
	return func() { stop(cmd) }, nil
}

// relayTop is the relay section for stream (one per scenario and run: a
// fresh stream, nothing left from another).
func relayTop(stream string, partitions int) string {
	return fmt.Sprintf("relay:\n  url: %s\n  stream: %s\n  replicas: 1\n  partitions: %d\n", natsURL, stream, partitions)
}

// proc is walhook started with its own listen address.
type proc struct {
	cmd  *exec.Cmd
	addr string
}

func startWalhook(verb, cfg string) (*proc, error) {
	p := &proc{addr: freeAddr()}
	p.cmd = exec.Command(filepath.Join(bin, "walhook"), verb, "--config", cfg)
	p.cmd.Env = append(os.Environ(), "WALHOOK_LISTEN="+p.addr)
	if dir := os.Getenv("BENCH_PROFILE_RELAY"); dir != "" { // a CPU profile per process
		p.cmd.Env = append(p.cmd.Env, "WALHOOK_CPUPROFILE="+filepath.Join(dir, verb+"-"+p.addr[strings.LastIndex(p.addr, ":")+1:]+".prof"))
	}
	p.cmd.Stderr = os.Stderr // log_level warn: only what needs a look
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	return p, nil
}

func (p *proc) cpu() float64 { return procstat.CPUSeconds(p.cmd.Process.Pid) }

// metric reads an unlabelled metric from p's /metrics; -1 when it cannot.
func (p *proc) metric(name string) float64 {
	resp, err := http.Get("http://" + p.addr + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return -1
}

func stopAll(ps []*proc) {
	for _, p := range ps {
		stop(p.cmd)
	}
}

// startWorkers starts n workers and waits until they own every partition
// between them, each its share at least (so no rebalance runs during the
// measurement).
func startWorkers(cfg string, n, partitions int) ([]*proc, error) {
	var ws []*proc
	for range n {
		w, err := startWalhook("deliver", cfg)
		if err != nil {
			stopAll(ws)
			return nil, err
		}
		ws = append(ws, w)
	}
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) { // poll interval
		total, least := 0.0, float64(partitions)
		for _, w := range ws {
			o := w.metric("walhook_relay_partitions_owned")
			total += o
			least = min(least, o)
		}
		if total == float64(partitions) && least >= float64(partitions/n) {
			return ws, nil
		}
		if time.Now().After(deadline) {
			stopAll(ws)
			return nil, fmt.Errorf("%d workers own %.0f of %d partitions after a minute", n, total, partitions)
		}
	}
}

// waitConfirmed waits until the slot's confirmed position passes everything
// committed so far: the sidecar has every event acknowledged by JetStream (in
// relay mode) or finished (direct). A non-transactional message nudges the
// stream along when it is idle.
func waitConfirmed(c *pgx.Conn, slot string, timeout time.Duration) error {
	ctx := context.Background()
	var target string
	c.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&target)
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) { // poll interval
		var done bool
		c.QueryRow(ctx, `SELECT coalesce(confirmed_flush_lsn >= $2::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $1`,
			slot, target).Scan(&done)
		if done {
			return nil
		}
		c.Exec(ctx, `SELECT pg_logical_emit_message(false, 'bench-nudge', '')`)
	}
	return fmt.Errorf("the slot did not confirm %s within %s", target, timeout)
}

type relayDrainResult struct {
	publishRate, rate                 float64
	sidecarCPU, workersCPU, natsCPU   float64 // CPU-s per 100k events
	sidecarRSS, workerRSS, natsRSSMiB int
}

// relayDrain is the backlog drain through JetStream: rows committed in
// 100-row transactions with nothing running, then two workers (waiting,
// partitions shared) and the sidecar started. The publish rate counts until
// the slot confirms everything (JetStream acknowledged every delivery), the
// end to end rate until the receiver has every event.
func relayDrain(run, rows, workers int) (relayDrainResult, error) {
	var r relayDrainResult
	name := fmt.Sprintf("bench_rdrain_%d", run)
	partitions := relayPartitions()
	db, cfg, err := prepareWith(name, relayTop(fmt.Sprintf("RDRAIN%d", run), partitions), "    batch_max: 1000\n")
	if err != nil {
		return r, err
	}
	ctx := context.Background()
	c, err := pgx.Connect(ctx, db)
	if err != nil {
		return r, err
	}
	defer c.Close(ctx)
	if err := backlog(db, rows, 100); err != nil {
		return r, err
	}
	http.Post("http://"+recvAddr+"/reset", "", nil)
	ws, err := startWorkers(cfg, workers, partitions)
	if err != nil {
		return r, err
	}
	defer stopAll(ws)
	nats0 := procstat.CPUSeconds(natsPid)
	var w0 float64
	for _, w := range ws {
		w0 += w.cpu()
	}
	start := time.Now()
	sc, err := startWalhook("run", cfg)
	if err != nil {
		return r, err
	}
	defer stop(sc.cmd)
	if err := waitConfirmed(c, name, 10*time.Minute); err != nil {
		return r, err
	}
	r.publishRate = float64(rows) / time.Since(start).Seconds()
	if err := waitEvents(rows, 10*time.Minute); err != nil {
		return r, err
	}
	r.rate = float64(rows) / time.Since(start).Seconds()
	per := 100000 / float64(rows)
	r.sidecarCPU = sc.cpu() * per
	for _, w := range ws {
		r.workersCPU += w.cpu()
		r.workerRSS = max(r.workerRSS, procstat.PeakRSSMiB(w.cmd.Process.Pid))
	}
	r.workersCPU = (r.workersCPU - w0) * per
	r.natsCPU = (procstat.CPUSeconds(natsPid) - nats0) * per
	r.sidecarRSS = procstat.PeakRSSMiB(sc.cmd.Process.Pid)
	r.natsRSSMiB = procstat.PeakRSSMiB(natsPid)
	return r, nil
}

// relayLatency is latency() in relay mode: commit → receipt at eps events/s,
// batch_max 1, two workers.
func relayLatency(run, eps int, d time.Duration) (map[string]any, error) {
	partitions := relayPartitions()
	db, cfg, err := prepareWith(fmt.Sprintf("bench_rlatency_%d", run), relayTop(fmt.Sprintf("RLAT%d", run), partitions), "    batch_max: 1\n")
	if err != nil {
		return nil, err
	}
	ws, err := startWorkers(cfg, 2, partitions)
	if err != nil {
		return nil, err
	}
	defer stopAll(ws)
	sc, err := startWalhook("run", cfg)
	if err != nil {
		return nil, err
	}
	defer stop(sc.cmd)
	if err := warmUp(db, 1); err != nil {
		return nil, err
	}
	done := make(chan struct{})
	defer close(done)
	nats0, sc0 := procstat.CPUSeconds(natsPid), sc.cpu()
	var w0 float64
	for _, w := range ws {
		w0 += w.cpu()
	}
	total := produce(db, eps, d, done)
	if err := waitEvents(total, time.Minute); err != nil {
		return nil, err
	}
	s := receiverStats()
	var w1 float64
	for _, w := range ws {
		w1 += w.cpu()
	}
	per := 100000 / float64(total)
	s["cpu_per_100k"] = fmt.Sprintf("sidecar %.2f, workers %.2f, nats-server %.2f", (sc.cpu()-sc0)*per, (w1-w0)*per, (procstat.CPUSeconds(natsPid)-nats0)*per)
	if n := sc.metric("walhook_relay_publish_ack_seconds_count"); n > 0 {
		s["publish_ack_ms"] = sc.metric("walhook_relay_publish_ack_seconds_sum") / n * 1000
		s["publish_ack_p99_ms"] = sc.bucketQuantile("walhook_relay_publish_ack_seconds", 0.99) * 1000
	}
	s["publish_errors"] = sc.metric("walhook_relay_publish_errors_total")
	var fn, fsum float64
	s["fetch_delay_p99_ms"] = -1.0
	for _, w := range ws {
		fn += w.metric("walhook_relay_fetch_delay_seconds_count")
		fsum += w.metric("walhook_relay_fetch_delay_seconds_sum")
		s["fetch_delay_p99_ms"] = max(s["fetch_delay_p99_ms"].(float64), w.bucketQuantile("walhook_relay_fetch_delay_seconds", 0.99)*1000)
	}
	if fn > 0 {
		s["fetch_delay_ms"] = fsum / fn * 1000
	}
	return s, nil
}

// bucketQuantile is the upper bound of the histogram bucket that holds the
// q-quantile of name's observations (-1 when p serves none).
func (p *proc) bucketQuantile(name string, q float64) float64 {
	resp, err := http.Get("http://" + p.addr + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	type bucket struct{ le, n float64 }
	var bs []bucket
	for _, l := range strings.Split(string(b), "\n") {
		rest, ok := strings.CutPrefix(l, name+`_bucket{le="`)
		if !ok {
			continue
		}
		le, count, _ := strings.Cut(rest, `"} `)
		x, err1 := strconv.ParseFloat(le, 64)
		n, err2 := strconv.ParseFloat(count, 64)
		if err1 == nil && err2 == nil {
			bs = append(bs, bucket{x, n})
		}
	}
	if len(bs) == 0 || bs[len(bs)-1].n == 0 {
		return -1
	}
	for _, x := range bs { // cumulative, in order of le
		if x.n >= q*bs[len(bs)-1].n {
			return x.le
		}
	}
	return -1
}

// warmUp commits one event and waits until the receiver has n requests of
// it (one per subscription), then resets the receiver.
func warmUp(db string, n int) error {
	ctx := context.Background()
	http.Post("http://"+recvAddr+"/reset", "", nil)
	c, err := pgx.Connect(ctx, db)
	if err != nil {
		return err
	}
	c.Exec(ctx, `INSERT INTO walhook.outbox (event) VALUES ('warmup')`)
	c.Close(ctx)
	if err := waitEvents(n, time.Minute); err != nil {
		return err
	}
	http.Post("http://"+recvAddr+"/reset", "", nil)
	return nil
}

// relayScale is the scale-out scenario: events for distinct resources wait in
// the stream (published and confirmed first), for an endpoint that takes
// 20 ms to answer; then n workers with max_in_flight 16 each deliver them.
// The rate is the receiver's steady one (between 10% and 90% of the events).
func relayScale(run, n, events int) (map[string]any, error) {
	partitions := relayPartitions()
	name := fmt.Sprintf("bench_rscale_%d_%d", run, n)
	db, cfg, err := prepareWith(name, relayTop(fmt.Sprintf("RSCALE%d_%d", run, n), partitions),
		"    batch_max: 1\n    max_in_flight: 16\n")
	if err != nil {
		return nil, err
	}
	b, _ := os.ReadFile(cfg) // the slow endpoint
	os.WriteFile(cfg, []byte(strings.Replace(string(b), "/hooks\n", "/hooks?delay=20ms\n", 1)), 0o600)
	ctx := context.Background()
	c, err := pgx.Connect(ctx, db)
	if err != nil {
		return nil, err
	}
	defer c.Close(ctx)
	if err := backlog(db, events, 100); err != nil {
		return nil, err
	}
	sc, err := startWalhook("run", cfg)
	if err != nil {
		return nil, err
	}
	defer stop(sc.cmd)
	if err := waitConfirmed(c, name, 10*time.Minute); err != nil {
		return nil, err
	}
	http.Post("http://"+recvAddr+"/reset", "", nil)
	start := time.Now()
	var ws []*proc
	for range n {
		w, err := startWalhook("deliver", cfg)
		if err != nil {
			return nil, err
		}
		ws = append(ws, w)
	}
	defer stopAll(ws)
	if err := waitEvents(events, 10*time.Minute); err != nil {
		return nil, err
	}
	s := statsOf("", true)
	s["total_s"] = time.Since(start).Seconds()
	cpu := 0.0
	for _, w := range ws {
		cpu += w.cpu()
	}
	s["workers_cpu_per_100k"] = cpu / float64(events) * 100000
	return s, nil
}

// relayPartitions is the streams' partition count: BENCH_RELAY_PARTITIONS,
// default 64 (relay's default).
func relayPartitions() int { return envInt("BENCH_RELAY_PARTITIONS", 64) }
