package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/walhook/walhook/internal/natstest"
	"github.com/walhook/walhook/internal/pgtest"
	"github.com/walhook/walhook/relay"
	"github.com/walhook/walhook/sender/sendertest"
)

// TestChaos is the seeded fault-injection suite (docs/development.md,
// "Chaos"). Three replicas of one deployment share a slot on their own
// PostgreSQL; an application keeps committing events on many resources; a
// schedule of faults drawn from the seed kills replicas (-9), freezes the
// walsender, restarts PostgreSQL (fast and immediate), takes endpoints down,
// makes one reject, creates and deletes an API subscription and replays dead
// letters. Then it checks the promise:
//   - nothing is lost: every committed event is delivered (after the dead
//     letters are replayed), debounced subscriptions get each resource's newest;
//   - per subscription and resource, first deliveries come in sequence order
//     and the last delivery is the newest;
//   - every duplicate carries the same envelope (and, unbatched, webhook-id),
//     and a stretch without faults has no duplicates at all;
//   - only the replica holding the slot sends;
//   - at the end walhook.deliveries is empty and the slot confirms the end of WAL.
//
// WALHOOK_CHAOS_SEED=N reruns a schedule; WALHOOK_CHAOS=1 (make test-chaos)
// runs it for WALHOOK_CHAOS_DURATION (default 10m) instead of 40s.
func TestChaos(t *testing.T) { runChaos(t, false) }

// TestChaosRelay is TestChaos in relay mode (docs/scale-out.md): two
// `walhook run` replicas with a relay section share the slot and publish to a
// 3-node JetStream cluster (R3); three `walhook deliver` workers share its
// partitions and send. Besides TestChaos's faults the schedule kills workers,
// stops one NATS node and brings it back, and takes all of NATS down for a
// few seconds. The checks are TestChaos's, with the holder check made per
// partition (a worker sends only for partitions whose lease it holds), plus:
// the sidecars never send, and at the end the stream is drained.
func TestChaosRelay(t *testing.T) { runChaos(t, true) }

func runChaos(t *testing.T, relayMode bool) {
	if testing.Short() {
		t.Skip("chaos test")
	}
	t.Parallel()
	seed := uint64(time.Now().UnixNano())
	if s, err := strconv.ParseUint(os.Getenv("WALHOOK_CHAOS_SEED"), 10, 64); err == nil {
		seed = s
	}
	duration := 40 * time.Second
	if relayMode {
		duration = 30 * time.Second // make test's share: the relay run converges slower
	}
	if os.Getenv("WALHOOK_CHAOS") != "" {
		duration = 10 * time.Minute
		if d, err := time.ParseDuration(os.Getenv("WALHOOK_CHAOS_DURATION")); err == nil {
			duration = d
		}
	}
	t.Logf("chaos seed %d (rerun: WALHOOK_CHAOS_SEED=%d), faults for %s", seed, seed, duration)
	c := newChaos(t, seed, relayMode)
	c.long = duration >= 3*time.Minute // CI's make test-chaos too; not make test's short run
	c.faults(duration)
	c.converge()
	c.quietStretch()
	c.check()
	t.Logf("seed %d: %s", seed, c.summary())
}

var chaosSubs = []string{"plain", "debounced", "batched", "flaky"}

const (
	chaosReplicas  = 3 // walhook run processes in direct mode
	chaosResources = 25
	// Relay mode: two sidecars, three workers, 8 partitions on a 3-node
	// JetStream cluster with R3.
	chaosRelayReplicas = 2
	chaosWorkers       = 3
	chaosPartitions    = 8
	chaosNATSNodes     = 3
	chaosStream        = "CHAOS"
	// chaosMaxOutage bounds, in relay mode, how long an endpoint stays down.
	// A worker does not park yet (docs/scale-out.md, "Not built yet"): a
	// failing resource's messages stay in its memory, unacknowledged, up to
	// max_pending_bytes (64 MiB) and 10,000 per partition's consumer, and a
	// partition at that bound stops fetching. The application commits about
	// 130 events/s routed to every subscription, so 15 s down holds some 2,000
	// messages of about 1 KiB over 8 partitions: far inside both bounds.
	// Longer outages wait for parking in relay mode.
	chaosMaxOutage = 15 * time.Second
)

// Endpoint modes.
const (
	modeUp int32 = iota
	modeDown
	modeReject // 400: dead letters
	modeFlaky  // 503 for a third of the requests
)

type chaos struct {
	t    *testing.T
	rng  *rand.Rand
	seed uint64

	cluster *pgtest.Cluster
	pool    *pgxpool.Pool
	e       *env // e.path is replica 0's config, for CLI commands
	// The walhook run replicas.
	paths []string
	logs  []*syncBuffer
	procs []*exec.Cmd
	// The senders: the replicas in direct mode, the workers in relay mode.
	// Each has an endpoint of its own per subscription, so a request says who
	// sent it.
	senders int
	mode    map[string]*atomic.Int32
	srv     map[string][]*sendertest.Server // per subscription, per sender
	dynSrv  *sendertest.Server              // the API subscription's target is one URL for all senders
	rejects sync.Map                        // "sub/event id" answered 400 at least once

	relay      *chaosRelay // nil in direct mode
	downSince  map[string]time.Time
	samplerEnd chan struct{}

	parseMu  sync.Mutex
	parsedBy map[*sendertest.Server]*parsedRequests

	holderMu sync.Mutex
	holders  map[int][]holderSample // per lease: the slot (0) in direct mode, each partition in relay mode

	stopProducer chan struct{}
	producerDone chan struct{}

	dyn            string // the API subscription's id while it exists
	dynLo, dynHi   int64  // it must get every event in (dynLo, dynHi]
	dynAfter       int64  // and none above dynAfter (committed after its deletion)
	dynRounds      int
	faultsInjected map[string]int
	timeline       []string // faults, with their times
	dups           map[string]int
	frozen         map[*exec.Cmd]time.Time // processes stopped by SIGSTOP, until when
	long           bool                    // a run of 3m or more: freezes past wal_sender_timeout too
	quietFrom      time.Time               // the fault-free stretch
	quietIDs       map[string]bool
	lostBefore     int // sessions lost before it
}

// chaosRelay is relay mode's part: NATS, the workers, and the sidecars'
// endpoints (which must never be called: sidecars publish, workers send).
type chaosRelay struct {
	nats     *natstest.Cluster
	nodeDown int // the NATS node stopped, -1 none
	nc       *nats.Conn
	js       jetstream.JetStream
	paths    []string
	logs     []*syncBuffer
	procs    []*exec.Cmd
	idle     []*sendertest.Server // per sidecar
	pidMu    sync.Mutex
	pids     map[int]int // worker process id → worker index
	reading  atomic.Bool // the leases are being read
}

// holderSample is one reading of a lease's holder, taken at some moment
// between from and to.
type holderSample struct {
	from, to time.Time
	holder   string // "r0".."r2" (the slot) or "w0".."w2" (a partition), "" for nobody, "?" unknown (server down)
}

func newChaos(t *testing.T, seed uint64, relayMode bool) *chaos {
	cluster, pool := ownCluster(t, "wal_sender_timeout=20s")
	c := &chaos{t: t, rng: rand.New(rand.NewPCG(seed, 1)), seed: seed, cluster: cluster, pool: pool,
		mode: map[string]*atomic.Int32{}, srv: map[string][]*sendertest.Server{}, holders: map[int][]holderSample{},
		downSince: map[string]time.Time{}, samplerEnd: make(chan struct{}),
		faultsInjected: map[string]int{}, dups: map[string]int{}, frozen: map[*exec.Cmd]time.Time{},
		stopProducer: make(chan struct{}), producerDone: make(chan struct{})}
	c.e = &env{t: t, db: &pgtest.DB{Name: "chaos", URL: cluster.URL, Pool: pool}, dir: t.TempDir()}
	c.e.path = filepath.Join(c.e.dir, "walhook.yaml")
	replicas := chaosReplicas
	c.senders = chaosReplicas
	if relayMode {
		replicas, c.senders = chaosRelayReplicas, chaosWorkers
		c.relay = newChaosRelay(t)
	}
	for _, s := range append([]string{"dyn"}, chaosSubs...) {
		c.mode[s] = &atomic.Int32{}
	}
	for _, s := range chaosSubs {
		for range c.senders {
			c.srv[s] = append(c.srv[s], sendertest.NewServer(t, c.responder(s)))
		}
	}
	c.dynSrv = sendertest.NewServer(t, c.responder("dyn"))
	// One database role per replica: pg_stat_replication then says which
	// replica holds the slot.
	c.paths, c.logs, c.procs = make([]string, replicas), make([]*syncBuffer, replicas), make([]*exec.Cmd, replicas)
	for i := range replicas {
		name := fmt.Sprintf("r%d", i)
		c.e.exec(fmt.Sprintf(`CREATE ROLE %s SUPERUSER LOGIN`, name))
		target := func(s string) string { return c.srv[s][i].HooksURL() }
		if c.relay != nil {
			idle := sendertest.NewServer(t, nil)
			c.relay.idle = append(c.relay.idle, idle)
			target = func(string) string { return idle.HooksURL() }
		}
		c.paths[i] = c.writeConfig(name, name, target)
		c.logs[i] = &syncBuffer{}
	}
	c.e.path = c.paths[0]
	c.e.setup()
	if r := c.relay; r != nil {
		for i := range chaosWorkers {
			r.paths = append(r.paths, c.writeConfig(fmt.Sprintf("w%d", i), "postgres", func(s string) string { return c.srv[s][i].HooksURL() }))
			r.logs = append(r.logs, &syncBuffer{})
			r.procs = append(r.procs, nil)
		}
	}
	go c.sampleHolders()
	if c.relay != nil {
		// The workers first, and the leases read before the sidecars publish
		// anything: every request must find its partition's readings.
		for i := range chaosWorkers {
			c.startWorker(i)
		}
		c.e.eventually(60*time.Second, "the lease bucket", c.relay.reading.Load)
	}
	go c.produce(seed)
	for i := range replicas {
		c.start(i)
	}
	c.e.eventually(30*time.Second, "a replica to stream", c.e.slotActive)
	t.Cleanup(func() {
		<-c.samplerEnd // t's context ended: it stops reading the leases
		if !t.Failed() {
			return
		}
		dir := os.Getenv("WALHOOK_CHAOS_LOGS") // the whole logs and the fault timeline go there
		logs := map[string]*syncBuffer{}
		for i, l := range c.logs {
			logs[fmt.Sprintf("r%d", i)] = l
		}
		if c.relay != nil {
			for i, l := range c.relay.logs {
				logs[fmt.Sprintf("w%d", i)] = l
			}
		}
		for name, l := range logs {
			t.Logf("%s log (tail):\n%s", name, tail(l.String(), 30))
			if dir != "" {
				os.WriteFile(filepath.Join(dir, name+".log"), []byte(l.String()), 0o644)
			}
		}
		if dir != "" {
			os.WriteFile(filepath.Join(dir, "faults.txt"), []byte(strings.Join(c.timeline, "\n")+"\n"), 0o644)
		}
	})
	return c
}

// newChaosRelay starts the NATS cluster and the test's own connection to it
// (to read the partition leases and the stream).
func newChaosRelay(t *testing.T) *chaosRelay {
	r := &chaosRelay{nats: natstest.StartCluster(t, chaosNATSNodes), nodeDown: -1, pids: map[int]int{}}
	nc, err := nats.Connect(r.nats.URL(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond),
		nats.RetryOnFailedConnect(true), nats.Timeout(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	r.nc = nc
	if r.js, err = jetstream.New(nc); err != nil {
		t.Fatal(err)
	}
	return r
}

func (c *chaos) responder(sub string) sendertest.Responder {
	return func(_ int, r *sendertest.Request) (int, http.Header) {
		if s := r.Header.Get("X-Hook-Secret"); s != "" {
			return 200, http.Header{"X-Hook-Secret": {s}}
		}
		switch c.mode[sub].Load() {
		case modeDown:
			return http.StatusServiceUnavailable, nil
		case modeReject:
			for _, id := range envelopeIDs(r.Body) {
				c.rejects.Store(sub+"/"+id, true)
			}
			return http.StatusBadRequest, nil
		case modeFlaky:
			// A third of the attempts, drawn from the seed and the attempt
			// (its webhook-id and timestamp), so a rerun fails the same ones.
			h := fnv.New64a()
			fmt.Fprint(h, c.seed, r.Header.Get("webhook-id"), r.Header.Get("webhook-timestamp"))
			if h.Sum64()%3 == 0 {
				return http.StatusServiceUnavailable, nil
			}
		}
		return http.StatusNoContent, nil
	}
}

// writeConfig writes the config of process name, connecting as role user,
// with target(subscription) as each subscription's URL.
func (c *chaos) writeConfig(name, user string, target func(sub string) string) string {
	url := strings.Replace(c.cluster.URL, "postgres@", user+"@", 1)
	var b strings.Builder
	level := "info"
	if os.Getenv("WALHOOK_CHAOS_DEBUG") != "" {
		level = "debug"
	}
	fmt.Fprintf(&b, "database_url: %s\nlisten: 127.0.0.1:0\nslot: chaos\npublication: chaos\nlog_level: %s\n", url, level)
	fmt.Fprintf(&b, "admin_token: %s\nallow_targets: [127.0.0.1/32]\nstall_timeout: 2s\nshutdown_timeout: 2s\n", adminToken)
	if c.relay != nil {
		b.WriteString(strings.Replace(relayYAMLStream(c.relay.nats.URL(), chaosStream), "partitions: 8",
			fmt.Sprintf("partitions: %d", chaosPartitions), 1))
		if chaosNATSNodes > 1 {
			s := strings.Replace(b.String(), "replicas: 1", "replicas: 3", 1)
			b.Reset()
			b.WriteString(s)
		}
	}
	b.WriteString("defaults: {park_after: 1s, retry_initial: 50ms, retry_max_interval: 300ms, retry_for: 1h, disable_after: 1h}\nsubscriptions:\n")
	b.WriteString(sub("plain", target("plain"), `["*"]`))
	b.WriteString(sub("debounced", target("debounced"), `["*"]`, "    debounce: 300ms\n    max_wait: 1s\n"))
	b.WriteString(sub("batched", target("batched"), `["*"]`, "    batch_max: 20\n"))
	b.WriteString(sub("flaky", target("flaky"), `["*"]`))
	path := filepath.Join(c.e.dir, name+".yaml")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		c.t.Fatal(err)
	}
	return path
}

func (c *chaos) start(i int) { c.procs[i] = startReplica(c.t, c.paths[i], c.logs[i]) }

func (c *chaos) kill(i int) {
	if p := c.procs[i]; p != nil {
		delete(c.frozen, p) // SIGKILL ends a stopped process too
		p.Process.Signal(syscall.SIGKILL)
		p.Wait()
		c.procs[i] = nil
	}
}

// startWorker starts relay worker i; its process id names it in the leases.
func (c *chaos) startWorker(i int) {
	r := c.relay
	p := startWorker(c.t, r.paths[i], r.logs[i])
	r.pidMu.Lock()
	r.pids[p.Process.Pid] = i
	r.pidMu.Unlock()
	r.procs[i] = p
}

func (c *chaos) killWorker(i int) {
	if p := c.relay.procs[i]; p != nil {
		delete(c.frozen, p)
		p.Process.Signal(syscall.SIGKILL)
		p.Wait()
		c.relay.procs[i] = nil
	}
}

// holder is the replica whose walsender holds the slot now.
func (c *chaos) holder() string {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var who string
	err := c.pool.QueryRow(ctx, `SELECT coalesce((SELECT s.usename::text FROM pg_replication_slots r
		JOIN pg_stat_replication s ON s.pid = r.active_pid WHERE r.slot_name = 'chaos'), '')`).Scan(&who)
	if err != nil {
		return "?"
	}
	return who
}

// leaseHolder is the worker holding partition n's lease now: the lease's
// value is the worker's id, host-pid-random (relay.NewWorker).
func (c *chaos) leaseHolder(kv jetstream.KeyValue, n int) string {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	e, err := kv.Get(ctx, "p."+strconv.Itoa(n))
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		return ""
	case err != nil:
		return "?"
	}
	f := strings.Split(string(e.Value()), "-")
	if len(f) < 3 {
		return "?"
	}
	pid, _ := strconv.Atoi(f[len(f)-2])
	c.relay.pidMu.Lock()
	defer c.relay.pidMu.Unlock()
	if i, ok := c.relay.pids[pid]; ok {
		return fmt.Sprintf("w%d", i)
	}
	return "stranger " + string(e.Value())
}

// sampleHolders reads the leases' holders until the test ends: the slot's
// in direct mode; in relay mode each partition's, one reader per partition
// (a reading can take long while NATS is in trouble).
func (c *chaos) sampleHolders() {
	defer close(c.samplerEnd)
	sample := func(lease int, read func() string) {
		for {
			from := time.Now()
			h := read()
			c.holderMu.Lock()
			c.holders[lease] = append(c.holders[lease], holderSample{from, time.Now(), h})
			c.holderMu.Unlock()
			select {
			case <-c.t.Context().Done():
				return
			case <-time.After(20 * time.Millisecond): // the sampling period
			}
		}
	}
	if c.relay == nil {
		sample(0, c.holder)
		return
	}
	var kv jetstream.KeyValue // the lease bucket, once a worker created it
	for kv == nil {
		ctx, cancel := context.WithTimeout(c.t.Context(), time.Second)
		kv, _ = c.relay.js.KeyValue(ctx, chaosStream+"_owners")
		cancel()
		if c.t.Context().Err() != nil {
			return
		}
	}
	var wg sync.WaitGroup
	for n := range chaosPartitions {
		wg.Add(1)
		go func() { defer wg.Done(); sample(n, func() string { return c.leaseHolder(kv, n) }) }()
	}
	c.relay.reading.Store(true)
	wg.Wait()
}

// produce is the application: small transactions on random resources, until
// stopProducer. Failed commits (a restarting server) are simply retried later:
// the outbox table is the record of what committed.
func (c *chaos) produce(seed uint64) {
	defer close(c.producerDone)
	rng := rand.New(rand.NewPCG(seed, 2))
	tick := time.NewTicker(15 * time.Millisecond) // the application's pace
	defer tick.Stop()
	for {
		select {
		case <-c.stopProducer:
			return
		case <-tick.C:
		}
		resources := make([]string, 1+rng.IntN(3)) // drawn from the seed, as the schedule is
		for i := range resources {
			resources[i] = fmt.Sprint("k", rng.IntN(chaosResources))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c.pool.Exec(ctx, `INSERT INTO walhook.outbox (event, resource_id, payload)
			SELECT 'x', r, jsonb_build_object('g', g) FROM unnest($1::text[]) WITH ORDINALITY AS t(r, g)`, resources)
		cancel()
	}
}

// liveAPI is the API address of a running replica (every replica serves it).
func (c *chaos) liveAPI() (client, bool) {
	for i, p := range c.procs {
		if _, frozen := c.frozen[p]; p == nil || frozen {
			continue
		}
		if m := listenRE.FindAllStringSubmatch(c.logs[i].String(), -1); m != nil { // the last run's
			return client{t: c.t, base: "http://" + m[len(m)-1][1], token: adminToken}, true
		}
	}
	return client{}, false
}

func (c *chaos) maxID() int64 {
	var id int64
	c.e.eventually(60*time.Second, "the database", func() bool {
		return c.pool.QueryRow(context.Background(), `SELECT coalesce(max(id), 0) FROM walhook.outbox`).Scan(&id) == nil
	})
	return id
}

// faults injects a fault every 0.5–2 s for d.
func (c *chaos) faults(d time.Duration) {
	end := time.Now().Add(d)
	stopped := 0 // a frozen walsender's pid
	for time.Now().Before(end) {
		wait := time.NewTimer(time.Duration(500+c.rng.IntN(1500)) * time.Millisecond) // the schedule's pace
		<-wait.C
		if stopped != 0 {
			syscall.Kill(stopped, syscall.SIGCONT)
			stopped = 0
		}
		c.thaw(false)
		k := c.rng.IntN(100)
		if c.relay == nil {
			c.directFault(k, &stopped)
		} else {
			c.relayFault(k, &stopped)
		}
	}
	if stopped != 0 {
		syscall.Kill(stopped, syscall.SIGCONT)
	}
	c.thaw(true)
}

// freeze stops p (SIGSTOP) for d; the schedule thaws it after that. A frozen
// process does not notice: on thaw it finds its deadlines passed, and maybe
// its slot or its partitions taken by another, and must send nothing it no
// longer may (the holder check). It reports whether it stopped p now.
func (c *chaos) freeze(p *exec.Cmd, d time.Duration, what string) bool {
	if _, ok := c.frozen[p]; ok || p.Process.Signal(syscall.SIGSTOP) != nil {
		return false
	}
	c.frozen[p] = time.Now().Add(d)
	c.fault("SIGSTOP " + what)
	return true
}

// thaw resumes the frozen processes whose time is up, or all of them.
func (c *chaos) thaw(all bool) {
	for p, until := range c.frozen {
		if all || time.Now().After(until) {
			p.Process.Signal(syscall.SIGCONT)
			delete(c.frozen, p)
		}
	}
}

// freezeActive freezes the replica holding the slot past stall_timeout (2 s):
// it thaws stale and must end its epoch before it sends. Every other time
// its walsender is also ended while it is stopped (the connection lost, as
// in a network partition), so another replica takes the slot at once and
// this one is a zombie when it thaws; in a long run one freeze in three
// instead outlasts wal_sender_timeout (20 s), which ends the walsender the
// way PostgreSQL does.
func (c *chaos) freezeActive() {
	h := c.holder()
	if !strings.HasPrefix(h, "r") {
		return
	}
	i, _ := strconv.Atoi(h[1:])
	p := c.procs[i]
	if p == nil {
		return
	}
	d, what, endWalsender := time.Duration(3000+c.rng.IntN(3000))*time.Millisecond, "active", c.rng.IntN(2) == 0
	if c.long && c.rng.IntN(3) == 0 {
		d, what, endWalsender = time.Duration(22000+c.rng.IntN(4000))*time.Millisecond, "active past wal_sender_timeout", false
	}
	if endWalsender {
		what = "active, its walsender ended"
	}
	if c.freeze(p, d, what) && endWalsender { // not one frozen before: its fault was another
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c.pool.Exec(ctx, `SELECT pg_terminate_backend(s.pid) FROM pg_stat_replication s WHERE s.usename = $1`, h)
	}
}

// freezeWorker freezes a relay worker past its leases (5 s): its partitions
// go to the others, and it must give them up on thaw before it sends.
func (c *chaos) freezeWorker() {
	for _, i := range c.rng.Perm(chaosWorkers) {
		if p := c.relay.procs[i]; p != nil {
			c.freeze(p, time.Duration(6000+c.rng.IntN(3000))*time.Millisecond, "worker")
			return
		}
	}
}

// directFault is direct mode's schedule: k in [0, 100) picks the fault.
func (c *chaos) directFault(k int, stopped *int) {
	switch {
	case k < 18:
		c.killActive()
	case k < 26:
		c.killStandby()
	case k < 40: // bring dead replicas back
		c.startReplicas()
	case k < 48:
		c.freezeWalsender(stopped)
	case k < 53:
		c.restartPostgres()
	case k < 58:
		c.freezeActive()
	case k < 78:
		c.endpointChange()
	case k < 86:
		c.dynamic()
	default:
		c.replayDeadLetters()
	}
}

// relayFault is relay mode's schedule: the sidecars' faults, rarer, make
// room for the workers' and NATS's.
func (c *chaos) relayFault(k int, stopped *int) {
	// An endpoint is down for chaosMaxOutage at most (its comment says why).
	for _, s := range chaosSubs {
		if c.mode[s].Load() == modeDown && time.Since(c.downSince[s]) > chaosMaxOutage {
			c.mode[s].Store(modeUp)
			c.fault(fmt.Sprintf("endpoint %s mode %d (outage bound)", s, modeUp))
		}
	}
	r := c.relay
	switch {
	case k < 10:
		c.killActive()
	case k < 15:
		c.killStandby()
	case k < 25: // kill -9 a worker
		for _, i := range c.rng.Perm(chaosWorkers) {
			if r.procs[i] != nil {
				c.killWorker(i)
				c.fault("kill worker")
				break
			}
		}
	case k < 37: // bring dead sidecars and workers back
		c.startReplicas()
		for i := range r.procs {
			if r.procs[i] == nil {
				c.startWorker(i)
				c.fault("start worker")
			}
		}
	case k < 43: // one NATS node stops, or the stopped one comes back
		if r.nodeDown < 0 {
			r.nodeDown = c.rng.IntN(chaosNATSNodes)
			r.nats.Shutdown(r.nodeDown)
			c.fault("NATS node stopped")
		} else {
			c.restartNATS("NATS node restarted")
		}
	case k < 46: // all of NATS down for 1–4 s
		for i := range chaosNATSNodes {
			r.nats.Shutdown(i)
		}
		c.fault("NATS down")
		outage := time.NewTimer(time.Duration(1000+c.rng.IntN(3000)) * time.Millisecond) // the outage's length
		<-outage.C
		c.restartNATS("NATS up")
	case k < 52:
		c.freezeWalsender(stopped)
	case k < 56:
		c.restartPostgres()
	case k < 61:
		c.freezeWorker()
	case k < 64:
		c.freezeActive()
	case k < 78:
		c.endpointChange()
	case k < 86:
		c.dynamic()
	default:
		c.replayDeadLetters()
	}
}

func (c *chaos) restartNATS(what string) {
	if err := c.relay.nats.Restart(); err != nil {
		c.t.Fatalf("restart NATS: %v", err)
	}
	c.relay.nodeDown = -1
	c.fault(what)
}

// killActive kills -9 the replica holding the slot.
func (c *chaos) killActive() {
	if h := c.holder(); strings.HasPrefix(h, "r") {
		i, _ := strconv.Atoi(h[1:])
		c.kill(i)
		c.fault("kill active")
	}
}

// killStandby kills -9 a replica not holding the slot.
func (c *chaos) killStandby() {
	h := c.holder()
	for _, i := range c.rng.Perm(len(c.procs)) {
		if c.procs[i] != nil && h != fmt.Sprintf("r%d", i) {
			c.kill(i)
			c.fault("kill standby")
			break
		}
	}
}

func (c *chaos) startReplicas() {
	for i := range c.procs {
		if c.procs[i] == nil {
			c.start(i)
			c.fault("start replica")
		}
	}
}

// freezeWalsender stops the walsender until the next fault.
func (c *chaos) freezeWalsender(stopped *int) {
	var pid int
	c.pool.QueryRow(context.Background(), `SELECT coalesce(active_pid, 0) FROM pg_replication_slots WHERE slot_name = 'chaos'`).Scan(&pid)
	if pid != 0 && syscall.Kill(pid, syscall.SIGSTOP) == nil {
		*stopped = pid
		c.fault("SIGSTOP walsender")
	}
}

func (c *chaos) restartPostgres() {
	mode := []string{"fast", "immediate"}[c.rng.IntN(2)]
	if err := c.cluster.Restart(context.Background(), mode); err != nil {
		c.t.Fatalf("restart PostgreSQL (%s): %v", mode, err)
	}
	c.fault("PostgreSQL restart " + mode)
}

// endpointChange puts an endpoint up, down or flaky, or (flaky only) rejecting.
func (c *chaos) endpointChange() {
	s := chaosSubs[c.rng.IntN(len(chaosSubs))]
	m := []int32{modeUp, modeUp, modeDown, modeFlaky}[c.rng.IntN(4)]
	if s == "flaky" && c.rng.IntN(3) == 0 {
		m = modeReject
	}
	if m == modeDown && c.mode[s].Load() != modeDown {
		c.downSince[s] = time.Now()
	}
	c.mode[s].Store(m)
	c.fault(fmt.Sprintf("endpoint %s mode %d", s, m))
}

func (c *chaos) replayDeadLetters() {
	if code, _, stderr := c.e.walhook("dlq", "replay", "--all"); code == 0 {
		c.fault("dead-letter replay")
	} else {
		c.t.Logf("dlq replay: exit %d: %s", code, stderr)
	}
}

// dynamic creates the API subscription, or deletes it; it records which
// events it must receive.
func (c *chaos) dynamic() {
	api, ok := c.liveAPI()
	if !ok || c.dynRounds > 0 && c.dyn == "" {
		return // one round: create once, delete once
	}
	if c.relay != nil && c.dyn != "" {
		// Relay mode creates it only: a worker that learns of a subscription
		// after its deletion drops the events routed to it before (not built
		// yet, docs/scale-out.md), which this suite would report as lost.
		return
	}
	if c.dyn == "" {
		// All replicas' endpoints answer for it; only the holder sends.
		status, got := api.try("POST", "/v1/subscriptions", map[string]any{"event": "*", "target_url": c.dynSrv.HooksURL(),
			"park_after": "1s", "retry_initial": "50ms", "retry_max_interval": "300ms"})
		if status != http.StatusCreated {
			c.t.Logf("create the API subscription: %d %v", status, got)
			return
		}
		c.dyn = got["id"].(string)
		c.dynLo = c.maxID()
		c.fault("API subscription created")
		return
	}
	c.dynHi = c.maxID()
	if status, _ := api.try("DELETE", "/v1/subscriptions/"+c.dyn, nil); status != http.StatusNoContent {
		return
	}
	c.dynAfter = c.maxID()
	c.dyn = ""
	c.dynRounds++
	c.fault("API subscription deleted")
}

// converge ends the faults: every replica runs, every endpoint answers, the
// application stops, and the dead letters are replayed until everything
// committed has arrived.
func (c *chaos) converge() {
	for i := range c.procs {
		if c.procs[i] == nil {
			c.start(i)
		}
	}
	if r := c.relay; r != nil {
		if r.nodeDown >= 0 {
			c.restartNATS("NATS node restarted")
		}
		for i := range r.procs {
			if r.procs[i] == nil {
				c.startWorker(i)
			}
		}
	}
	for _, m := range c.mode {
		m.Store(modeUp)
	}
	close(c.stopProducer)
	<-c.producerDone
	if c.dyn != "" && c.dynRounds == 0 { // created, never deleted: it owes everything after its creation
		c.dynHi = c.maxID()
		c.dynAfter = 1 << 62
	}
	// A long run leaves a large parked backlog: wait while it shrinks, and
	// fail only when nothing moves for a minute.
	last, progress, fewest := time.Time{}, time.Now(), -1
	for {
		n := len(c.missing(1 << 30))
		if n == 0 {
			break
		}
		if fewest < 0 || n < fewest {
			fewest, progress = n, time.Now()
		}
		if time.Since(progress) > time.Minute {
			c.diagnose()
			c.t.Fatalf("%d deliveries still missing, none arrived for a minute", n)
		}
		if time.Since(last) > 2*time.Second {
			c.e.walhook("dlq", "replay", "--all")
			last = time.Now()
		}
		poll := time.NewTimer(time.Second) // the polling period
		<-poll.C
	}
	c.e.waitCaughtUp()
	c.e.eventually(30*time.Second, "walhook.deliveries to drain", func() bool { return c.e.parked() == 0 })
	if c.relay != nil {
		// Work-queue retention: a message stays until its worker acknowledged it.
		c.e.eventually(60*time.Second, "the stream to drain", func() bool { return c.streamMsgs() == 0 })
	}
}

// streamMsgs is the number of messages in the relay stream, -1 when NATS
// cannot tell.
func (c *chaos) streamMsgs() int64 {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := c.relay.js.Stream(ctx, chaosStream)
	if err != nil {
		return -1
	}
	n, err := relay.Deliveries(ctx, st, relay.Config{Stream: chaosStream})
	if err != nil {
		return -1
	}
	return int64(n)
}

// senderName is sender i's name in the logs: a replica or a worker.
func (c *chaos) senderName(i int) string {
	if c.relay != nil {
		return fmt.Sprintf("w%d", i)
	}
	return fmt.Sprintf("r%d", i)
}

// diagnose logs where the missing events are.
func (c *chaos) diagnose() {
	for _, m := range c.missing(10) {
		sub, id, _ := strings.Cut(m, "/")
		var parked, dead int
		c.pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.deliveries WHERE subscription = $1 AND event_id = $2`, sub, id).Scan(&parked)
		c.pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.dead_letters WHERE subscription = $1 AND event_id = $2`, sub, id).Scan(&dead)
		servers := c.srv[sub]
		if sub == "dyn" {
			servers = []*sendertest.Server{c.dynSrv}
		}
		_, all := c.deliveries(servers)
		var attempts []string
		for _, d := range all {
			if d.id == id {
				attempts = append(attempts, fmt.Sprintf("%s at %s delivered=%v", c.senderName(d.replica), d.at.Format("15:04:05.000"), d.delivered))
			}
		}
		c.t.Logf("missing %s: parked rows %d, dead letters %d, attempts %v", m, parked, dead, attempts)
	}
	var parked, dead int
	var flush, current string
	c.pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.deliveries`).Scan(&parked)
	c.pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.dead_letters`).Scan(&dead)
	c.pool.QueryRow(context.Background(), `SELECT confirmed_flush_lsn::text, pg_current_wal_lsn()::text FROM pg_replication_slots WHERE slot_name = 'chaos'`).Scan(&flush, &current)
	c.t.Logf("walhook.deliveries %d rows, dead letters %d, slot confirmed %s of %s, holder %q, dyn %q (%d, %d], after %d",
		parked, dead, flush, current, c.holder(), c.dyn, c.dynLo, c.dynHi, c.dynAfter)
	if c.relay != nil {
		c.diagnoseRelay()
	}
}

// diagnoseRelay logs the stream and its partitions' consumers.
func (c *chaos) diagnoseRelay() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := c.relay.js.Stream(ctx, chaosStream)
	if err != nil {
		c.t.Logf("relay stream: %v", err)
		return
	}
	info := st.CachedInfo()
	leader := ""
	if info.Cluster != nil {
		leader = info.Cluster.Leader
	}
	c.t.Logf("relay stream: %d messages, sequences %d to %d, leader %q", info.State.Msgs, info.State.FirstSeq, info.State.LastSeq, leader)
	for n := range chaosPartitions {
		ci, err := st.Consumer(ctx, "p"+strconv.Itoa(n))
		if err != nil {
			c.t.Logf("partition %d: consumer: %v", n, err)
			continue
		}
		i := ci.CachedInfo()
		c.t.Logf("partition %d: pending %d, ack pending %d, redelivered %d, delivered %d/%d, ack floor %d, waiting %d",
			n, i.NumPending, i.NumAckPending, i.NumRedelivered, i.Delivered.Consumer, i.Delivered.Stream, i.AckFloor.Stream, i.NumWaiting)
	}
}

// quietStretch writes events with no fault anywhere: none may arrive twice.
func (c *chaos) quietStretch() {
	c.quietFrom = time.Now()
	c.lostBefore = c.sessionsLost()
	first := c.maxID()
	c.e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload)
		SELECT 'x', 'k' || (g % $1), jsonb_build_object('quiet', g) FROM generate_series(1, 200) g`, chaosResources)
	c.quietIDs = map[string]bool{}
	for id := first + 1; id <= c.maxID(); id++ {
		c.quietIDs[strconv.FormatInt(id, 10)] = true
	}
	c.e.eventually(60*time.Second, "the quiet events delivered", func() bool { return len(c.missing(3)) == 0 })
	c.e.waitCaughtUp()
	if lost := c.sessionsLost() - c.lostBefore; lost > 0 {
		// A session lost on a loaded machine is a fault too: duplicates are
		// allowed then, so the stretch proves nothing.
		c.t.Logf("%d sessions lost in the quiet stretch: its no-duplicate check is skipped", lost)
		c.quietIDs = nil
	}
}

// sessionsLost counts the stream sessions the replicas lost so far, and in
// relay mode the workers' epochs that ended and the NATS connections lost.
func (c *chaos) sessionsLost() int {
	n := 0
	logs := c.logs
	if c.relay != nil {
		logs = append(append([]*syncBuffer(nil), logs...), c.relay.logs...)
	}
	for _, l := range logs {
		s := l.String()
		n += strings.Count(s, "stream lost") + strings.Count(s, "epoch ended") + strings.Count(s, "disconnected from nats")
	}
	return n
}

// committedEvent is an outbox row, as the database has it.
type committedEvent struct {
	id       int64
	resource string
}

func (c *chaos) committed() []committedEvent {
	rows, err := c.pool.Query(context.Background(), `SELECT id, resource_id FROM walhook.outbox ORDER BY id`)
	if err != nil {
		c.t.Fatal(err)
	}
	defer rows.Close()
	var out []committedEvent
	for rows.Next() {
		var e committedEvent
		rows.Scan(&e.id, &e.resource)
		out = append(out, e)
	}
	return out
}

// delivery is one event in a 2xx answer.
type delivery struct {
	replica   int
	at        time.Time
	webhookID string
	id        string
	resource  string
	sequence  uint64
	envelope  string // as sent, without coalesced
	batched   bool
	delivered bool // answered 2xx
}

var coalescedRE = regexp.MustCompile(`,"coalesced":\d+`)

func (c *chaos) deliveries(servers []*sendertest.Server) (ok []delivery, all []delivery) {
	for i, srv := range servers {
		if srv == nil {
			continue
		}
		p := c.parsed(srv, i)
		all = append(all, p.all...)
		for _, d := range p.all {
			if d.delivered {
				ok = append(ok, d)
			}
		}
	}
	sort.SliceStable(ok, func(i, j int) bool { return ok[i].at.Before(ok[j].at) })
	sort.SliceStable(all, func(i, j int) bool { return all[i].at.Before(all[j].at) })
	return ok, all
}

// parsedRequests are a server's requests decoded so far: the checks poll
// often, and decoding every body each time would slow the machine under test.
type parsedRequests struct {
	n   int // requests decoded
	all []delivery
}

// parsed decodes srv's new requests (replica i's).
func (c *chaos) parsed(srv *sendertest.Server, replica int) *parsedRequests {
	c.parseMu.Lock()
	defer c.parseMu.Unlock()
	if c.parsedBy == nil {
		c.parsedBy = map[*sendertest.Server]*parsedRequests{}
	}
	p := c.parsedBy[srv]
	if p == nil {
		p = &parsedRequests{}
		c.parsedBy[srv] = p
	}
	reqs := srv.Requests()
	for _, r := range hooksOnly(reqs[p.n:]) {
		var raws []json.RawMessage
		body := bytes.TrimSpace(r.Body)
		batched := len(body) > 0 && body[0] == '['
		if batched {
			json.Unmarshal(body, &raws)
		} else {
			raws = []json.RawMessage{body}
		}
		for _, raw := range raws {
			var env struct {
				ID         string  `json:"id"`
				ResourceID *string `json:"resource_id"`
				Sequence   uint64  `json:"sequence"`
			}
			if err := json.Unmarshal(raw, &env); err != nil {
				c.t.Fatalf("body is not envelopes: %v: %s", err, r.Body)
			}
			p.all = append(p.all, delivery{replica: replica, at: r.At, webhookID: r.Header.Get("webhook-id"), id: env.ID,
				resource: deref(env.ResourceID), sequence: env.Sequence, batched: batched,
				envelope:  coalescedRE.ReplaceAllString(string(raw), ""),
				delivered: r.Status >= 200 && r.Status < 300})
		}
	}
	p.n = len(reqs)
	return p
}

// missing lists up to limit committed events a subscription has not received.
func (c *chaos) missing(limit int) []string {
	events := c.committed()
	newest := map[string]int64{}
	for _, e := range events {
		newest[e.resource] = max(newest[e.resource], e.id)
	}
	var out []string
	for _, s := range append([]string{"dyn"}, chaosSubs...) {
		var got []delivery
		if s == "dyn" {
			if c.dynLo == 0 && c.dynHi == 0 {
				continue
			}
			got, _ = c.deliveries([]*sendertest.Server{c.dynSrv})
		} else {
			got, _ = c.deliveries(c.srv[s])
		}
		seen := map[string]bool{}
		for _, d := range got {
			seen[d.id] = true
		}
		for _, e := range events {
			id := strconv.FormatInt(e.id, 10)
			switch {
			case seen[id]:
			case s == "debounced" && e.id != newest[e.resource]: // superseded by debounce
			case s == "dyn" && (e.id <= c.dynLo || e.id > c.dynHi):
			default:
				out = append(out, s+"/"+id)
				if len(out) >= limit {
					return out
				}
			}
		}
	}
	return out
}

func (c *chaos) check() {
	t := c.t
	if m := c.missing(10); len(m) > 0 {
		t.Errorf("lost: %v", m)
	}
	c.holderMu.Lock()
	leases := map[int][]holderSample{}
	for n, h := range c.holders {
		leases[n] = append([]holderSample(nil), h...)
	}
	c.holderMu.Unlock()
	// Only the holder sends. In direct mode the lease is the slot; in relay
	// mode a worker's lease of the event's partition. A request recorded at t
	// from sender X was sent by X while it held the lease: the newest reading
	// naming a holder that was taken before t names X, or the first one taken
	// just after t does (X took the lease between two readings). A reading of
	// nobody is skipped: right after a server crash nobody holds the slot while
	// the old holder has not heard yet, and no one else can hold it before the
	// server is back; a partition's lease is deleted when its owner hands it
	// over or stops, once its requests are answered or cancelled, and a
	// cancelled request may still be recorded a moment later.
	const recordLag = 100 * time.Millisecond
	heldBy := func(holders []holderSample, want string, at time.Time) bool {
		names := func(h holderSample) bool { return h.holder == want || h.holder == "?" }
		i := sort.Search(len(holders), func(i int) bool { return holders[i].to.After(at) })
		if i < len(holders) && !holders[i].from.After(at) && names(holders[i]) {
			return true // a reading taken around t: the newest before it, or the first after it
		}
	before:
		for j := i - 1; j >= 0 && holders[j].to.After(at.Add(-3*time.Second)); j-- {
			switch {
			case holders[j].holder == "":
			case names(holders[j]):
				return true
			case holders[j].from.After(at.Add(-recordLag)):
				// The endpoint records a request when its handler runs, a
				// moment after the sender wrote it: a holder killed with a
				// request on the wire can be succeeded before that.
			default:
				break before
			}
		}
		for j := i; j < len(holders) && !holders[j].from.After(at.Add(100*time.Millisecond)); j++ {
			if holders[j].from.After(at) && holders[j].holder != "" {
				return names(holders[j])
			}
		}
		return false
	}
	// around lists the readings near t that changed the holder, for the log.
	around := func(holders []holderSample, at time.Time) string {
		var b strings.Builder
		last := "-"
		for _, h := range holders {
			if h.to.Before(at.Add(-3*time.Second)) || h.from.After(at.Add(time.Second)) || h.holder == last {
				continue
			}
			last = h.holder
			fmt.Fprintf(&b, " %s–%s %q;", h.from.Format("15:04:05.000"), h.to.Format("15:04:05.000"), h.holder)
		}
		return b.String()
	}
	lease, what := func(string, delivery) int { return 0 }, "the slot"
	if c.relay != nil {
		lease = func(s string, d delivery) int { return relay.Partition(s, d.resource, chaosPartitions) }
		what = "its partition's lease"
		// The sidecars publish; they never send.
		for i, srv := range c.relay.idle {
			if n := len(srv.Requests()); n > 0 {
				t.Errorf("sidecar r%d sent %d requests", i, n)
			}
		}
	}
	told := map[int]bool{}
	for _, s := range append([]string{"dyn"}, chaosSubs...) {
		servers := c.srv[s]
		if s == "dyn" {
			servers = []*sendertest.Server{c.dynSrv}
		}
		ok, all := c.deliveries(servers)
		for _, d := range all {
			if s == "dyn" { // one endpoint for every sender: who sent is not known
				continue
			}
			holders := leases[lease(s, d)]
			if !heldBy(holders, c.senderName(d.replica), d.at) {
				t.Errorf("%s: %s sent event %s (resource %s) at %s without holding %s", s, c.senderName(d.replica), d.id,
					d.resource, d.at.Format(time.StampMilli), what)
				if !told[d.replica] {
					told[d.replica] = true
					t.Logf("holder readings around it:%s", around(holders, d.at))
				}
			}
		}
		c.checkOrder(s, ok)
		if s == "dyn" {
			for _, d := range ok {
				if id, _ := strconv.ParseInt(d.id, 10, 64); id > c.dynAfter {
					t.Errorf("dyn: event %s, committed after the subscription's deletion, was delivered", d.id)
				}
			}
		}
	}
}

// checkOrder: per resource, first deliveries in sequence order; the last
// delivery is the newest delivered; duplicates identical; none in the quiet
// stretch.
func (c *chaos) checkOrder(s string, ok []delivery) {
	t := c.t
	first := map[string]delivery{}
	newest := map[string]uint64{}
	last := map[string]uint64{}
	toldOrder := false
	for _, d := range ok {
		_, rejected := c.rejects.Load(s + "/" + d.id)
		if prev, dup := first[d.id]; dup {
			c.dups[s]++
			if prev.envelope != d.envelope || !d.batched && prev.webhookID != d.webhookID {
				t.Errorf("%s: event %s delivered again differently:\n%s %s\n%s %s", s, d.id, prev.webhookID, prev.envelope, d.webhookID, d.envelope)
			}
			if c.quietIDs[d.id] {
				t.Errorf("%s: event %s delivered twice in the fault-free stretch", s, d.id)
			}
		} else {
			first[d.id] = d
			// A rejected event comes back through a replay, after newer ones:
			// the operator asked for it (it keeps its sequence).
			if !rejected && d.sequence < newest[d.resource] {
				t.Errorf("%s: resource %s: sequence %d first delivered after %d", s, d.resource, d.sequence, newest[d.resource])
				if !toldOrder { // the resource's deliveries, for the first one only
					toldOrder = true
					c.logResource(s, d.resource, ok)
				}
			}
		}
		if !rejected {
			newest[d.resource] = max(newest[d.resource], d.sequence)
			last[d.resource] = d.sequence
		}
	}
	told := false
	for res, seq := range last {
		if seq != newest[res] {
			t.Errorf("%s: resource %s ends on sequence %d, its newest delivered is %d", s, res, seq, newest[res])
			if !told { // the resource's deliveries, for the first one only
				told = true
				c.logResource(s, res, ok)
			}
		}
	}
}

// logResource logs a resource's deliveries, for a failure's report.
func (c *chaos) logResource(s, res string, ok []delivery) {
	var b strings.Builder
	for _, d := range ok {
		if d.resource == res {
			fmt.Fprintf(&b, "\n  %s %s event %s seq %d %s", d.at.Format("15:04:05.000"), c.senderName(d.replica), d.id, d.sequence, d.webhookID)
		}
	}
	c.t.Logf("%s: resource %s's deliveries:%s", s, res, b.String())
}

// fault counts a fault and keeps when it happened, for a failure's report.
func (c *chaos) fault(what string) {
	c.faultsInjected[what]++
	c.timeline = append(c.timeline, time.Now().Format("15:04:05.000")+" "+what)
}

func (c *chaos) summary() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d committed events", len(c.committed()))
	for _, s := range chaosSubs {
		ok, all := c.deliveries(c.srv[s])
		fmt.Fprintf(&b, "; %s: %d attempts, %d delivered, %d duplicates", s, len(all), len(ok), c.dups[s])
	}
	keys := make([]string, 0, len(c.faultsInjected))
	for k := range c.faultsInjected {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	b.WriteString("; faults:")
	for _, k := range keys {
		fmt.Fprintf(&b, " %s=%d", k, c.faultsInjected[k])
	}
	return b.String()
}

// envelopeIDs are the event ids in a request body (one envelope or an array).
func envelopeIDs(body []byte) []string {
	var raws []json.RawMessage
	if b := bytes.TrimSpace(body); len(b) > 0 && b[0] == '[' {
		json.Unmarshal(b, &raws)
	} else {
		raws = []json.RawMessage{b}
	}
	var ids []string
	for _, r := range raws {
		var env struct {
			ID string `json:"id"`
		}
		json.Unmarshal(r, &env)
		ids = append(ids, env.ID)
	}
	return ids
}

// try is do without failing the test: the API may be down during faults.
func (c client) try(method, path string, body any) (int, map[string]any) {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	req.Header.Set("Authorization", "Bearer "+c.token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil
	}
	defer resp.Body.Close()
	var out map[string]any
	json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&out)
	return resp.StatusCode, out
}
