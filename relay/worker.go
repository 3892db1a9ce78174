package relay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/walhook/walhook/outbox"
)

// Worker limits and timings.
const (
	fetchBatch     = 256
	fetchWait      = time.Second
	maxAckPending  = 10_000 // per partition consumer
	defaultAckWait = 30 * time.Second
	// An owner that has not renewed its lease for loseAfter stops (guard):
	// the lease lasts leaseTTL from the last renewal the server stored,
	// which was sent no earlier than the one measured here.
	loseAfter = 3 * time.Second
	// releaseWithin bounds a graceful hand-over: the partition's held
	// messages finish, or the epoch ends (its sends are cancelled).
	releaseWithin = 10 * time.Second
	// windDownWithin bounds how long the other partitions' attempts in
	// flight may finish when a partition is lost (lose) before the epoch
	// ends.
	windDownWithin = 2 * time.Second
	// A worker takes no partition until it has been a member for joinGrace:
	// workers started together (a Deployment's replicas) then see each other
	// and divide the partitions at once, instead of the first one taking them
	// all, fetching deep into their backlog, and handing most of them over,
	// which cannot finish within releaseWithin under a backlog and ends its
	// epoch. Workers already running take a dead one's partitions at once.
	joinGrace    = leaseRenew + leaseRenew/2 // the second tick after the first membership write
	refreshEvery = 2 * time.Second           // subscription rows
	// A deleted subscription keeps delivering what was routed to it until
	// no message of it came for retiredIdle and nothing of it is held or
	// parked.
	retiredIdle = 10 * time.Minute
)

// WorkerConfig configures a Worker.
type WorkerConfig struct {
	Relay           Config
	JetStream       jetstream.JetStream
	ID              string                 // the worker's name among members, unique per process (a lease holding it is this process's: stillMine); default host-pid-random
	Subscriptions   []*outbox.Subscription // static, from the config file
	Defaults        outbox.DeliveryOptions
	Deliverer       outbox.Deliverer
	Store           WorkerStore
	Logger          zerolog.Logger
	Registerer      prometheus.Registerer // default: registered nowhere
	MaxPendingBytes int64                 // message bytes held at once before fetching pauses; default 64 MiB
	AckWait         time.Duration         // consumers' AckWait (held messages get InProgress); default 30s
	ShutdownTimeout time.Duration         // when Run's ctx ends, how long held messages may finish; default 15s
	Attempts        outbox.AttemptLog     // where attempts are recorded (docs/attempts.md); nil: nowhere
}

// Worker is `walhook deliver`: it owns a fair share of the partitions and
// delivers their messages through a Dispatcher with direct mode's
// schedulers (docs/scale-out.md).
type Worker struct {
	cfg     WorkerConfig
	kv      jetstream.KeyValue
	store   *workerStore
	changes chan outbox.Change
	disp    *outbox.Dispatcher
	budget  *outbox.Budget
	log     zerolog.Logger
	m       *workerMetrics
	park    *parkStore

	heldBytes atomic.Int64
	freed     chan struct{} // signalled when heldBytes drops below the limit

	mu       sync.Mutex
	draining bool      // shutting down: fetch nothing more, take nothing more
	member   time.Time // when this worker's membership was first written
	owned    map[int]*partition
	epoch    *outbox.Epoch  // the current one; nil between epochs
	fetch    sync.WaitGroup // the current epoch's fetchers
	nEpoch   uint64
	winding  bool         // the epoch winds down (windDown): nothing new is fetched or sent
	lost     []*partition // lost in the current epoch: forgotten at its end

	attempts atomic.Int64 // attempts in flight (deliver), not those waiting for the epoch's end

	subsMu sync.Mutex
	known  map[string]string // dynamic subscriptions fed to the Dispatcher: id → row JSON
	gone   map[string]bool   // not found by a refresh after a message for it came: deleted since it was routed
	// verMu guards what schedulers read (endpoint health), never held
	// while waiting: subsMu is held while changes wait for the Dispatcher,
	// which may wait for a scheduler.
	verMu    sync.Mutex
	versions map[string]time.Time // dynamic subscriptions' updated_at as last read
	// Disabled by this worker's endpoint health, its disabled row not seen
	// by a refresh yet.
	selfDisabled map[string]bool
	// Deleted subscriptions still fed to the Dispatcher with their last
	// definition (a row of walhook.retired_subscriptions): when a message of
	// each last came.
	retired map[string]time.Time
}

// partition is an owned partition. The lease fields belong to the lease
// loop; held and high to the partition's fetcher and the finish callbacks.
type partition struct {
	n         int
	rev       uint64    // the lease's revision
	renewedAt time.Time // when the last renewal that succeeded was sent
	releasing time.Time // non-zero: handing over since then
	stop      context.CancelFunc
	// send ends when the partition is cut from its epoch (lose, cut): its
	// attempts then stop, and no new one starts (deliver). Set per epoch.
	send context.Context
	cut  context.CancelFunc

	mu      sync.Mutex
	held    map[uint64]heldMsg // by stream sequence: handed to the Dispatcher, not finished
	high    uint64             // highest stream sequence handed on in this epoch
	highSeq uint64             // highest event sequence handed on in this epoch (replays aside)

	park *parkIndex // its parked resources (park.go)
}

type heldMsg struct {
	msg  jetstream.Msg
	size int64
	sub  string // its subscription, once decoded
}

var errPartitionLost = errors.New("relay: a partition lease was lost")

// NewWorker returns a Worker; Run starts it.
func NewWorker(cfg WorkerConfig) *Worker {
	cfg.Relay = cfg.Relay.WithDefaults()
	if cfg.ID == "" {
		host, _ := os.Hostname()
		cfg.ID = fmt.Sprintf("%s-%d-%s", host, os.Getpid(), nuid.Next()[:6])
	}
	cfg.ID = strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' {
			return r
		}
		return '_'
	}, cfg.ID)
	if cfg.Registerer == nil {
		cfg.Registerer = prometheus.NewRegistry()
	}
	if cfg.MaxPendingBytes <= 0 {
		cfg.MaxPendingBytes = outbox.DefaultMaxPendingBytes
	}
	if cfg.AckWait <= 0 {
		cfg.AckWait = defaultAckWait
	}
	if cfg.ShutdownTimeout <= 0 {
		cfg.ShutdownTimeout = 15 * time.Second
	}
	w := &Worker{cfg: cfg, store: &workerStore{WorkerStore: cfg.Store}, changes: make(chan outbox.Change, 256),
		log: cfg.Logger, owned: map[int]*partition{}, known: map[string]string{}, gone: map[string]bool{}, selfDisabled: map[string]bool{}, versions: map[string]time.Time{}, retired: map[string]time.Time{}, freed: make(chan struct{}, 1),
		budget: outbox.NewBudget(math.MaxInt64 / 2)} // the worker bounds bytes itself (heldBytes)
	w.m = newWorkerMetrics(cfg.Registerer, w)
	w.park = &parkStore{w: w, rows: map[uint64]rowRef{}, deletes: make(chan uint64, deleteQueue), finished: map[uint64]bool{}}
	w.store.park, w.store.w = w.park, w
	acker := outbox.NewAcker(0)
	w.disp = outbox.NewDispatcher(outbox.DispatcherConfig{
		Subscriptions: cfg.Subscriptions, Defaults: cfg.Defaults, Acker: acker, Deliverer: deliverer{w},
		Store: w.store, Logger: cfg.Logger, Metrics: outbox.NewMetrics(cfg.Registerer, acker), Budget: w.budget,
		Attempts: cfg.Attempts,
	})
	return w
}

// ID is the worker's name in the lease bucket.
func (w *Worker) ID() string { return w.cfg.ID }

// Owned lists the partitions this worker owns.
func (w *Worker) Owned() []int {
	w.mu.Lock()
	defer w.mu.Unlock()
	var ps []int
	for n := range w.owned {
		ps = append(ps, n)
	}
	slices.Sort(ps)
	return ps
}

// Run delivers until ctx ends. Then it drains: it fetches nothing more,
// lets what it holds finish (up to ShutdownTimeout, its leases renewed
// meanwhile), cancels the rest and gives its leases back.
func (w *Worker) Run(ctx context.Context) error {
	if err := w.setup(ctx); err != nil {
		return err
	}
	if ctx.Err() != nil {
		return nil // stopped before JetStream answered: nothing was started
	}
	runCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	defer stop()
	var wg sync.WaitGroup
	errc := make(chan error, 1)
	dctx, stopDisp := context.WithCancel(context.WithoutCancel(ctx))
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := w.disp.Run(dctx, w.changes); err != nil {
			errc <- err
			stop()
		}
	}()
	for _, f := range []func(context.Context){w.leases, w.guard, w.progress, w.refreshLoop, w.park.deleter} {
		wg.Add(1)
		go func() { defer wg.Done(); f(runCtx) }()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		select {
		case <-ctx.Done():
			w.drain(runCtx)
			stop()
		case <-runCtx.Done():
		}
	}()
	for runCtx.Err() == nil {
		w.runEpoch(runCtx)
	}
	stopDisp()
	wg.Wait()
	w.releaseAll()
	select {
	case err := <-errc:
		return err
	default:
		return nil
	}
}

// drain stops fetching and waits until nothing fetched is unfinished, or
// ShutdownTimeout.
func (w *Worker) drain(ctx context.Context) {
	w.mu.Lock()
	w.draining = true
	for _, p := range w.owned {
		if p.stop != nil {
			p.stop()
		}
	}
	w.mu.Unlock()
	w.log.Info().Dur("shutdown_timeout", w.cfg.ShutdownTimeout).Msg("stopping: finishing deliveries in flight")
	deadline := time.NewTimer(w.cfg.ShutdownTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for w.heldBytes.Load() > 0 {
		select {
		case <-ctx.Done():
			return
		case <-deadline.C:
			w.log.Warn().Msg("shutdown_timeout: abandoning deliveries in flight (their messages come again)")
			return
		case <-tick.C:
		}
	}
}

// setup creates the stream and the lease bucket if they are missing.
func (w *Worker) setup(ctx context.Context) error {
	for {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := EnsureStream(sctx, w.cfg.JetStream, w.cfg.Relay)
		if err == nil {
			w.kv, err = ensureBucket(sctx, w.cfg.JetStream, w.cfg.Relay)
		}
		if err == nil {
			w.park.stream, err = ensureParkStream(sctx, w.cfg.JetStream, w.cfg.Relay)
		}
		cancel()
		if err == nil {
			return nil
		}
		if errors.Is(err, ErrPartitions) {
			return err
		}
		w.log.Error().Err(err).Msg("cannot reach jetstream; retrying")
		if sleep(ctx, time.Second) != nil {
			return nil
		}
	}
}

// runEpoch is one epoch: the Dispatcher starts from the subscriptions as
// they are, every owned partition is reset to what is unacknowledged and
// fetched, until a partition is lost (or ctx ends). Then every send of the
// epoch is cancelled and its held messages are forgotten unacknowledged.
func (w *Worker) runEpoch(ctx context.Context) {
	w.mu.Lock()
	w.nEpoch++
	e := outbox.NewEpoch(withEpoch(ctx, w.nEpoch), w.nEpoch) // the park store tells epochs apart (park.go)
	w.mu.Unlock()
	w.budget.Reset(e.N)
	if err := w.startSubscriptions(e); err != nil {
		e.End(err)
		return
	}
	w.mu.Lock()
	w.epoch, w.winding = e, false
	for _, p := range w.owned {
		if p.releasing.IsZero() && !w.draining {
			w.startFetch(e, p)
		}
	}
	w.mu.Unlock()
	w.log.Info().Uint64("epoch", e.N).Ints("partitions", w.Owned()).Msg("delivering")
	<-e.Context().Done()
	w.mu.Lock()
	w.epoch = nil
	w.mu.Unlock()
	w.fetch.Wait()
	w.mu.Lock()
	for _, p := range append(slices.Collect(maps.Values(w.owned)), w.lost...) {
		p.forget(w)
		w.park.forget(p)
	}
	w.lost = nil
	w.mu.Unlock()
	if ctx.Err() == nil {
		w.log.Warn().Err(e.Err()).Msg("epoch ended: what was not finished comes again")
	}
}

// startSubscriptions loads the dynamic subscriptions and starts the
// Dispatcher's epoch with them.
func (w *Worker) startSubscriptions(e *outbox.Epoch) error {
	w.subsMu.Lock()
	defer w.subsMu.Unlock()
	var rows []outbox.SubscriptionRow
	for {
		lctx, cancel := context.WithTimeout(e.Context(), 10*time.Second)
		var err error
		rows, err = w.cfg.Store.ListSubscriptions(lctx, nil)
		cancel()
		if err == nil {
			break
		}
		w.log.Error().Err(err).Msg("cannot read subscriptions; retrying")
		if sleep(e.Context(), time.Second) != nil {
			return err
		}
	}
	clear(w.known)
	w.verMu.Lock()
	clear(w.selfDisabled) // the new epoch's schedulers start from the rows as they are
	clear(w.versions)
	for i := range rows {
		w.versions[rows[i].ID] = rows[i].UpdatedAt
	}
	w.verMu.Unlock()
	clear(w.retired) // deleted ones come back with their next message
	for i := range rows {
		b, _ := json.Marshal(&rows[i])
		w.known[rows[i].ID] = string(b)
	}
	w.store.rows.Store(&rows)
	select {
	case w.changes <- outbox.Change{Kind: outbox.ChangeStart, Epoch: e}:
		return nil
	case <-e.Context().Done():
		return e.Err()
	}
}

func (w *Worker) refreshLoop(ctx context.Context) {
	t := time.NewTicker(refreshEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			w.mu.Lock()
			e := w.epoch
			w.mu.Unlock()
			if e != nil {
				w.refresh(e)
			}
		}
	}
}

// refresh feeds the Dispatcher the subscription rows that changed since it
// last looked: new, updated (secrets, options, disabled) and deleted ones.
func (w *Worker) refresh(e *outbox.Epoch) error {
	w.subsMu.Lock()
	defer w.subsMu.Unlock()
	lctx, cancel := context.WithTimeout(e.Context(), 10*time.Second)
	rows, err := w.cfg.Store.ListSubscriptions(lctx, nil)
	cancel()
	if err != nil {
		return err
	}
	seen := map[string]bool{}
	var changes []outbox.Change
	for i := range rows {
		r := &rows[i]
		b, _ := json.Marshal(r)
		seen[r.ID] = true
		if w.known[r.ID] == string(b) {
			continue
		}
		w.known[r.ID] = string(b)
		w.setVersion(r.ID, r.UpdatedAt)
		if w.tookDisabled(r.ID) {
			if r.DisabledAt == nil {
				// Enabled again before a refresh saw it disabled: the
				// scheduler learns both, in order, so that it enables.
				off := *r
				off.DisabledAt = &r.UpdatedAt
				ob, _ := json.Marshal(&off)
				changes = append(changes, outbox.Change{Kind: outbox.ChangeSubscription, SubscriptionID: r.ID, Row: ob})
			}
		}
		changes = append(changes, outbox.Change{Kind: outbox.ChangeSubscription, SubscriptionID: r.ID, Row: b})
	}
	now := time.Now()
	for id := range w.known {
		if seen[id] {
			continue
		}
		last, ok := w.retired[id]
		if !ok {
			// Deleted: what was routed to it before still comes, and is
			// delivered, as direct mode delivers what was committed before
			// the deletion. It stops once idle.
			w.retired[id] = now
			w.log.Info().Str("subscription", id).Msg("subscription deleted: delivering what was routed to it before")
			continue
		}
		if now.Sub(last) >= retiredIdle && !w.holds(id) && !w.park.hasParked(id, e.N) {
			delete(w.known, id)
			delete(w.retired, id)
			changes = append(changes, outbox.Change{Kind: outbox.ChangeSubscription, SubscriptionID: id})
		}
	}
	for _, c := range changes {
		select {
		case w.changes <- c:
		case <-e.Context().Done():
			return e.Err()
		}
	}
	return nil
}

// version is the updated_at of a dynamic subscription's row as this worker
// last read it.
func (w *Worker) version(id string) (time.Time, bool) {
	w.verMu.Lock()
	defer w.verMu.Unlock()
	v, ok := w.versions[id]
	return v, ok
}

func (w *Worker) setVersion(id string, v time.Time) {
	w.verMu.Lock()
	w.versions[id] = v
	w.verMu.Unlock()
}

// disabledHere notes that endpoint health disabled id in this worker.
func (w *Worker) disabledHere(id string) {
	w.verMu.Lock()
	w.selfDisabled[id] = true
	w.verMu.Unlock()
}

// tookDisabled says whether this worker disabled id and no refresh has
// seen it since, and forgets it.
func (w *Worker) tookDisabled(id string) bool {
	w.verMu.Lock()
	defer w.verMu.Unlock()
	was := w.selfDisabled[id]
	delete(w.selfDisabled, id)
	return was
}

// holds says whether a message of sub is held. w.subsMu is held.
func (w *Worker) holds(sub string) bool {
	w.mu.Lock()
	parts := make([]*partition, 0, len(w.owned))
	for _, p := range w.owned {
		parts = append(parts, p)
	}
	w.mu.Unlock()
	for _, p := range parts {
		p.mu.Lock()
		for _, h := range p.held {
			if h.sub == sub {
				p.mu.Unlock()
				return true
			}
		}
		p.mu.Unlock()
	}
	return false
}

// retire feeds the Dispatcher a deleted subscription's last definition, so
// that the messages routed to it before its deletion are delivered; false
// if there is none (deleted over 30 days ago, or never a dynamic one).
//
// Like refresh, under subsMu until the change is handed on: another
// partition's fetcher that finds it known hands its message on after it.
func (w *Worker) retire(ctx context.Context, id string) (bool, error) {
	w.subsMu.Lock()
	defer w.subsMu.Unlock()
	if _, ok := w.known[id]; ok {
		return true, nil
	}
	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	row, err := w.cfg.Store.RetiredSubscription(lctx, id)
	cancel()
	if err != nil || row == nil {
		return false, err
	}
	b, _ := json.Marshal(row)
	w.known[id] = string(b)
	w.retired[id] = time.Now()
	w.setVersion(id, row.UpdatedAt)
	select {
	case w.changes <- outbox.Change{Kind: outbox.ChangeSubscription, SubscriptionID: id, Row: b}:
		w.log.Info().Str("subscription", id).Msg("deleted subscription loaded: delivering what was routed to it before")
		return true, nil
	case <-ctx.Done():
		// Not handed on (a fetcher stopped, say): not known either, or
		// other partitions' messages of it would reach a Dispatcher that
		// does not have it, which finishes them unsent.
		delete(w.known, id)
		delete(w.retired, id)
		return false, ctx.Err()
	}
}

// used notes that a message of sub came.
func (w *Worker) used(sub string) {
	w.subsMu.Lock()
	if _, ok := w.retired[sub]; ok {
		w.retired[sub] = time.Now()
	}
	w.subsMu.Unlock()
}

// knows says whether a subscription is static or fed to the Dispatcher.
func (w *Worker) knows(id string) bool {
	for _, s := range w.cfg.Subscriptions {
		if s.ID == id {
			return true
		}
	}
	w.subsMu.Lock()
	defer w.subsMu.Unlock()
	_, ok := w.known[id]
	return ok || w.gone[id]
}

// isGone says whether markGone marked id.
func (w *Worker) isGone(id string) bool {
	w.subsMu.Lock()
	defer w.subsMu.Unlock()
	return w.gone[id]
}

// markGone remembers a subscription that a refresh after its message came
// did not find: it was deleted after the event was routed to it (ids are
// not reused), so its later messages are dropped without another look.
func (w *Worker) markGone(id string) {
	w.subsMu.Lock()
	defer w.subsMu.Unlock()
	if _, ok := w.known[id]; !ok && !w.gone[id] {
		w.gone[id] = true
		w.log.Warn().Str("subscription", id).Msg("messages for a subscription that no longer exists are dropped")
	}
}

// startFetch starts p's fetcher in epoch e. w.mu is held.
func (w *Worker) startFetch(e *outbox.Epoch, p *partition) {
	ctx, cancel := context.WithCancel(e.Context())
	p.stop = cancel
	p.send, p.cut = context.WithCancel(e.Context())
	w.fetch.Add(1)
	go func() {
		defer w.fetch.Done()
		defer cancel()
		w.fetchLoop(ctx, e, p)
	}()
}

// fetchLoop resets p's consumer to what is unacknowledged, then hands its
// messages to the Dispatcher in stream order.
func (w *Worker) fetchLoop(ctx context.Context, e *outbox.Epoch, p *partition) {
	// Its parked resources first, fenced: the schedulers mark them parked
	// (ChangeParked) before any message of the partition reaches them.
	for {
		err := w.park.load(ctx, p)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return
		}
		w.log.Error().Err(err).Int("partition", p.n).Msg("cannot load parked deliveries; retrying")
		if sleep(ctx, time.Second) != nil {
			return
		}
	}
	for {
		err := w.adoptParked(ctx, e, p)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return
		}
		w.log.Error().Err(err).Int("partition", p.n).Msg("cannot look up the subscriptions of parked deliveries; retrying")
		if sleep(ctx, time.Second) != nil {
			return
		}
	}
	select {
	case w.changes <- outbox.Change{Kind: outbox.ChangeParked}:
	case <-ctx.Done():
		return
	}
	var cons jetstream.Consumer
	for cons == nil {
		var err error
		if cons, err = w.resetConsumer(ctx, p.n); err != nil {
			if ctx.Err() != nil {
				return
			}
			w.log.Error().Err(err).Int("partition", p.n).Msg("cannot reset the partition's consumer; retrying")
			if sleep(ctx, time.Second) != nil {
				return
			}
		}
	}
	var delivered uint64 // the consumer's delivery sequence last seen: a fresh consumer counts from 1
	for ctx.Err() == nil {
		if !w.waitRoom(ctx) {
			return
		}
		batch, err := cons.Fetch(fetchBatch, jetstream.FetchMaxWait(fetchWait))
		if err == nil {
			for msg := range batch.Messages() {
				if err := w.handleMsg(ctx, e, p, msg, &delivered); err != nil {
					return
				}
			}
			err = batch.Error()
		}
		switch {
		case err == nil || errors.Is(err, jetstream.ErrNoMessages) || errors.Is(err, nats.ErrTimeout):
		case ctx.Err() != nil:
			return
		case errors.Is(err, jetstream.ErrConsumerNotFound) || errors.Is(err, jetstream.ErrConsumerDeleted):
			// Someone else reset it: only a new owner does that.
			w.lose(fmt.Errorf("partition %d: its consumer was reset by another worker: %w", p.n, errPartitionLost), p)
			return
		case errors.Is(err, nats.ErrNoResponders) && w.consumerGone(ctx, cons):
			// Its state is kept in memory (resetConsumer): a restarted
			// nats-server forgot it. Like a delivery gap, the epoch ends and
			// the reset that follows delivers what is unacknowledged.
			w.m.gaps.Inc()
			w.cut(fmt.Errorf("partition %d: nats-server no longer has its consumer (restarted?)", p.n), p)
			return
		default:
			w.log.Debug().Err(err).Int("partition", p.n).Msg("fetch failed")
			if sleep(ctx, 250*time.Millisecond) != nil {
				return
			}
		}
	}
}

// adoptParked finds a scheduler for every subscription with parked
// resources in p. A refresh lists only the subscriptions that exist, so one
// deleted before this worker loaded it would have none, and its parked
// events would stay in the park stream for good: like a message for it, it
// gets its last definition (retire), and its parked events go out as
// direct mode delivers what was routed before a deletion. One without a
// definition here (a config-file subscription this worker's config lacks,
// or one deleted over 30 days ago) has its parked events left where they
// are, and logged: nothing proves it gone (during a rolling change of the
// config file another worker may still have it), and a purge cannot be
// undone.
func (w *Worker) adoptParked(ctx context.Context, e *outbox.Epoch, p *partition) error {
	var orphans []string
	for _, sub := range p.park.subscriptions() {
		if !w.knows(sub) || w.isGone(sub) {
			orphans = append(orphans, sub)
		}
	}
	if len(orphans) == 0 {
		return nil
	}
	if err := w.refresh(e); err != nil { // created since the last one?
		return err
	}
	for _, sub := range orphans {
		if !w.isGone(sub) && w.knows(sub) {
			continue
		}
		if !w.isGone(sub) {
			found, err := w.retire(ctx, sub)
			if err != nil {
				return err
			}
			if found {
				continue
			}
		}
		w.log.Warn().Str("subscription", sub).Int("partition", p.n).
			Msg("parked deliveries of a subscription this worker does not know are left in the park stream")
	}
	return nil
}

// consumerGone says whether the server answers that cons does not exist.
func (w *Worker) consumerGone(ctx context.Context, cons jetstream.Consumer) bool {
	ictx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := cons.Info(ictx)
	return errors.Is(err, jetstream.ErrConsumerNotFound)
}

// resetConsumer recreates partition n's consumer: it then delivers from the
// oldest message not acknowledged (work-queue retention keeps only those), so
// what the previous owner held comes first, in order, before anything newer.
//
// Its state lives in memory (MemoryStorage), not in files: it is only a
// cursor over messages the stream itself keeps durably until acknowledged,
// and every owner resets it anyway. Kept in files, nats-server rewrote each
// consumer's state file (a new file renamed over the old one) up to ten
// times a second per partition, which made it the machine's largest CPU user
// and the tail of commit → receipt (docs/performance.md). A nats-server that
// restarts forgets it (one node) or starts it afresh (a cluster): the
// fetcher sees the consumer gone or a delivery gap, and the epoch ends.
func (w *Worker) resetConsumer(ctx context.Context, n int) (jetstream.Consumer, error) {
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	name := w.cfg.Relay.consumer(n)
	if err := w.cfg.JetStream.DeleteConsumer(rctx, w.cfg.Relay.Stream, name); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		return nil, fmt.Errorf("delete consumer %s: %w", name, err)
	}
	c, err := w.cfg.JetStream.CreateConsumer(rctx, w.cfg.Relay.Stream, jetstream.ConsumerConfig{
		Durable: name, FilterSubject: w.cfg.Relay.subject(n), AckPolicy: jetstream.AckExplicitPolicy,
		DeliverPolicy: jetstream.DeliverAllPolicy, AckWait: w.cfg.AckWait, MaxAckPending: maxAckPending, MaxDeliver: -1,
		Replicas: 0, MemoryStorage: true, // the stream's replicas
	})
	if err != nil {
		return nil, fmt.Errorf("create consumer %s: %w", name, err)
	}
	w.m.resets.Inc()
	return c, nil
}

// handleMsg hands one message to the Dispatcher, once per epoch and in
// stream order: a redelivery of a message it holds is ignored, one it
// finished is acknowledged again. A delivery lost on the way (its
// consumer sequence skipped, say across a reconnect) would be redelivered
// after later ones: the epoch ends instead, and the reset that follows
// delivers from the oldest unacknowledged message again.
func (w *Worker) handleMsg(ctx context.Context, e *outbox.Epoch, p *partition, msg jetstream.Msg, delivered *uint64) error {
	meta, err := msg.Metadata()
	if err != nil {
		return nil
	}
	if meta.Sequence.Consumer != *delivered+1 {
		w.m.gaps.Inc()
		err := fmt.Errorf("partition %d: deliveries %d to %d never arrived", p.n, *delivered+1, meta.Sequence.Consumer-1)
		w.cut(err, p)
		return err
	}
	*delivered = meta.Sequence.Consumer
	seq := meta.Sequence.Stream
	if meta.NumDelivered > 1 {
		w.m.redeliveries.Inc()
	} else {
		w.m.fetchDelay.Observe(max(0, time.Since(meta.Timestamp).Seconds()))
	}
	size := int64(len(msg.Data()) + 256)
	p.mu.Lock()
	if err := ctx.Err(); err != nil {
		// Stopped (a hand-over, a cut): held only while it was not, under
		// p.mu, so a hand-over that saw nothing held sees nothing come.
		p.mu.Unlock()
		return err
	}
	if _, ok := p.held[seq]; ok {
		p.mu.Unlock()
		return nil
	}
	if seq <= p.high {
		p.mu.Unlock()
		msg.Ack() // finished before; its acknowledgement was lost
		return nil
	}
	p.high = seq
	p.held[seq] = heldMsg{msg: msg, size: size}
	p.mu.Unlock()
	w.heldBytes.Add(size)
	done := func() { w.finish(p, seq) }
	m, err := decodeMessage(msg.Data())
	if err != nil {
		w.log.Error().Err(err).Int("partition", p.n).Uint64("stream_seq", seq).Msg("unreadable relay message dropped")
		done()
		return nil
	}
	if m.Event.WebhookID == "" {
		// A partition's messages come in commit order, so an older event
		// after a newer one is a copy stored again: JetStream forgets the ids
		// of removed messages when it restarts, and a sidecar streaming from
		// an older LSN republishes them. Its first copy was finished (else
		// it would still be stored, and this one a duplicate): sent again
		// now it would overtake nothing but arrive after newer events.
		p.mu.Lock()
		stale := m.Event.Seq < p.highSeq
		p.highSeq = max(p.highSeq, m.Event.Seq)
		p.mu.Unlock()
		if stale {
			w.log.Debug().Int("partition", p.n).Uint64("stream_seq", seq).Str("event_id", m.Event.ID).
				Msg("older event stored again after a newer one: dropped")
			done()
			return nil
		}
	}
	p.mu.Lock()
	if h, ok := p.held[seq]; ok {
		h.sub = m.Subscription
		p.held[seq] = h
	}
	p.mu.Unlock()
	if !w.knows(m.Subscription) {
		// Not loaded: created since the last refresh, or deleted after the
		// event was routed to it (then its last definition delivers it).
		for {
			err := w.refresh(e)
			if err == nil && !w.knows(m.Subscription) {
				var found bool
				if found, err = w.retire(ctx, m.Subscription); err == nil && !found {
					w.markGone(m.Subscription)
				}
			}
			if err == nil {
				break
			}
			if ctx.Err() == nil {
				w.log.Error().Err(err).Msg("cannot read subscriptions; retrying")
				_ = sleep(ctx, time.Second) // ctx is checked below
			}
			if ctx.Err() != nil {
				w.unhold(p, seq)
				return ctx.Err()
			}
		}
	}
	w.used(m.Subscription)
	kind := outbox.ChangeRouted
	if m.Event.WebhookID != "" {
		kind = outbox.ChangeReplay
	}
	select {
	case w.changes <- outbox.Change{Kind: kind, Event: m.Event, SubscriptionID: m.Subscription, LSN: outbox.LSN(seq), Done: done}:
		return nil
	case <-ctx.Done():
		w.unhold(p, seq)
		return ctx.Err()
	}
}

// unhold forgets a message that was not handed on (it stays
// unacknowledged and comes again).
func (w *Worker) unhold(p *partition, seq uint64) {
	p.mu.Lock()
	h, ok := p.held[seq]
	delete(p.held, seq)
	p.mu.Unlock()
	if ok {
		w.release(h.size)
	}
}

// finish acknowledges a finished message.
func (w *Worker) finish(p *partition, seq uint64) {
	p.mu.Lock()
	h, ok := p.held[seq]
	delete(p.held, seq)
	p.mu.Unlock()
	if !ok {
		return // its epoch ended: forgotten
	}
	if err := h.msg.Ack(); err != nil {
		w.log.Debug().Err(err).Uint64("stream_seq", seq).Msg("ack failed: the message comes again, as a duplicate")
	}
	w.m.finished.Inc()
	w.release(h.size)
}

func (w *Worker) release(n int64) {
	if w.heldBytes.Add(-n) < w.cfg.MaxPendingBytes {
		select {
		case w.freed <- struct{}{}:
		default:
		}
	}
}

// forget drops what p holds at the end of an epoch (unacknowledged: it comes
// again). w.mu is held.
func (p *partition) forget(w *Worker) {
	p.mu.Lock()
	var n int64
	for _, h := range p.held {
		n += h.size
	}
	clear(p.held)
	p.high, p.highSeq = 0, 0
	p.mu.Unlock()
	w.release(n)
}

// waitRoom waits while the worker holds max_pending_bytes.
func (w *Worker) waitRoom(ctx context.Context) bool {
	for w.heldBytes.Load() >= w.cfg.MaxPendingBytes {
		select {
		case <-ctx.Done():
			return false
		case <-w.freed:
		case <-time.After(time.Second): // a release signal may have gone to another fetcher
		}
	}
	return true
}

// progress tells JetStream every AckWait/3 that held messages are still
// being worked on, so that none is redelivered while its owner holds it.
func (w *Worker) progress(ctx context.Context) {
	t := time.NewTicker(w.cfg.AckWait / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		w.mu.Lock()
		parts := make([]*partition, 0, len(w.owned))
		for _, p := range w.owned {
			parts = append(parts, p)
		}
		w.mu.Unlock()
		for _, p := range parts {
			p.mu.Lock()
			msgs := make([]jetstream.Msg, 0, len(p.held))
			for _, h := range p.held {
				msgs = append(msgs, h.msg)
			}
			p.mu.Unlock()
			for _, m := range msgs {
				m.InProgress()
			}
		}
	}
}

// leases keeps this worker's membership and partition leases, every
// leaseRenew: renew what it owns (stopping what it could not renew in time),
// take free partitions up to its fair share, hand extras over.
func (w *Worker) leases(ctx context.Context) {
	t := time.NewTicker(leaseRenew)
	defer t.Stop()
	for {
		w.leaseTick(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// errLeaseStale is why a partition whose lease was not renewed for
// loseAfter is given up.
var errLeaseStale = fmt.Errorf("the lease could not be renewed for %s: %w", loseAfter, errPartitionLost)

// leaseStale says whether p's lease was not renewed for loseAfter: someone
// else may take it soon. w.mu is held.
func (p *partition) leaseStale() bool { return time.Since(p.renewedAt) > loseAfter }

// guard gives up, every quarter second, the partitions whose lease was not
// renewed for loseAfter, whatever the lease loop is waiting for: the lease
// lasts leaseTTL from a renewal sent no earlier than the last one that
// succeeded, so this stops the partition's deliveries at least
// leaseTTL - loseAfter - 250ms before anyone else can take it.
func (w *Worker) guard(ctx context.Context) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var stale []*partition
		w.mu.Lock()
		for _, p := range w.owned {
			if p.leaseStale() {
				stale = append(stale, p)
			}
		}
		w.mu.Unlock()
		if len(stale) > 0 {
			w.lose(errLeaseStale, stale...)
		}
	}
}

func (w *Worker) leaseTick(ctx context.Context) {
	op := func(f func(context.Context) error) error {
		octx, cancel := context.WithTimeout(ctx, leaseRenew)
		defer cancel()
		return f(octx)
	}
	joined := op(func(c context.Context) error { _, err := w.kv.Put(c, "m."+w.cfg.ID, []byte("1")); return err }) == nil
	w.mu.Lock()
	if joined && w.member.IsZero() {
		w.member = time.Now()
	}
	parts := make([]*partition, 0, len(w.owned))
	for _, p := range w.owned {
		parts = append(parts, p)
	}
	w.mu.Unlock()
	// All at once: one slow renewal must not delay the others past their TTL.
	errs := make([]error, len(parts))
	var wg sync.WaitGroup
	for i, p := range parts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sent := time.Now()
			var rev uint64
			errs[i] = op(func(c context.Context) error {
				var err error
				rev, err = w.kv.Update(c, leaseKey(p.n), []byte(w.cfg.ID), p.rev)
				return err
			})
			if errs[i] == nil {
				w.mu.Lock()
				p.rev, p.renewedAt = rev, sent
				w.mu.Unlock()
			}
		}()
	}
	wg.Wait()
	var lost []*partition
	for i, p := range parts {
		switch {
		case isWrongRevision(errs[i]) && !w.stillMine(op, p):
			lost = append(lost, p)
		case errs[i] == nil && !p.releasing.IsZero():
			w.handOver(ctx, p)
		}
	}
	if len(lost) > 0 {
		w.lose(fmt.Errorf("the lease was taken: %w", errPartitionLost), lost...)
	}
	w.mu.Lock()
	draining, member := w.draining, w.member
	w.mu.Unlock()
	if draining || member.IsZero() || time.Since(member) < joinGrace {
		return // renew, take nothing
	}
	members := 1
	if err := op(func(c context.Context) error {
		keys, err := w.kv.ListKeysFiltered(c, "m.*")
		if err != nil {
			return err
		}
		n := 0
		for range keys.Keys() {
			n++
		}
		members = max(n, 1)
		return nil
	}); err != nil {
		return // cannot see the others: take nothing more
	}
	share := (w.cfg.Relay.Partitions + members - 1) / members
	mine := w.active()
	order := w.preference()
	if mine < share {
		for _, n := range order {
			if mine >= share || ctx.Err() != nil {
				break
			}
			w.mu.Lock()
			_, have := w.owned[n]
			w.mu.Unlock()
			if have {
				continue
			}
			sent := time.Now()
			var rev uint64
			if op(func(c context.Context) error {
				var err error
				rev, err = w.kv.Create(c, leaseKey(n), []byte(w.cfg.ID))
				return err
			}) != nil {
				continue // owned by someone, or unreachable
			}
			w.take(n, rev, sent)
			mine++
		}
	} else if mine > share {
		// Hand over the ones this worker likes least.
		for i := len(order) - 1; i >= 0 && mine > share; i-- {
			w.mu.Lock()
			p := w.owned[order[i]]
			if p != nil && p.releasing.IsZero() {
				p.releasing = time.Now()
				if p.stop != nil {
					p.stop() // fetch no more of it
				}
				mine--
			}
			w.mu.Unlock()
		}
	}
}

// stillMine says, after a renewal of p found another revision, whether the
// lease still holds this worker's id: an earlier renewal whose answer timed
// out (a slow server) was stored after all. Then p takes that revision and
// is renewed at the next tick; renewedAt stays (the guard counts from the
// last renewal known to be stored). Only this process writes its id, and
// a taker writes its own, so the id proves the lease was never taken.
func (w *Worker) stillMine(op func(func(context.Context) error) error, p *partition) bool {
	var e jetstream.KeyValueEntry
	if op(func(c context.Context) error {
		var err error
		e, err = w.kv.Get(c, leaseKey(p.n))
		return err
	}) != nil || string(e.Value()) != w.cfg.ID {
		return false
	}
	w.mu.Lock()
	p.rev = e.Revision()
	w.mu.Unlock()
	return true
}

// active counts owned partitions not being handed over.
func (w *Worker) active() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, p := range w.owned {
		if p.releasing.IsZero() {
			n++
		}
	}
	return n
}

// preference orders partitions by rendezvous hash for this worker, so that
// workers prefer different partitions and a rebalance moves few.
func (w *Worker) preference() []int {
	type scored struct {
		n     int
		score uint64
	}
	s := make([]scored, w.cfg.Relay.Partitions)
	for n := range s {
		h := fnv.New64a()
		h.Write([]byte(w.cfg.ID))
		h.Write([]byte{0})
		h.Write([]byte(strconv.Itoa(n)))
		s[n] = scored{n, h.Sum64()}
	}
	slices.SortFunc(s, func(a, b scored) int {
		if a.score > b.score {
			return -1
		}
		if a.score < b.score {
			return 1
		}
		return 0
	})
	out := make([]int, len(s))
	for i, x := range s {
		out[i] = x.n
	}
	return out
}

// take starts owning partition n.
func (w *Worker) take(n int, rev uint64, sent time.Time) {
	p := &partition{n: n, rev: rev, renewedAt: sent, held: map[uint64]heldMsg{},
		park: &parkIndex{keys: map[string]*parkedKey{}, flight: map[uint64]bool{}}}
	w.mu.Lock()
	w.owned[n] = p
	if w.epoch != nil && w.epoch.Err() == nil && !w.winding { // winding down: the next epoch fetches it
		w.startFetch(w.epoch, p)
	}
	w.mu.Unlock()
	w.m.takes.Inc()
	w.log.Info().Int("partition", n).Msg("partition taken")
}

// lose stops owning ps at once: their attempts are cancelled and none of
// theirs starts again (deliver), and the epoch winds down (windDown), so the
// other partitions start again from what is unacknowledged.
//
// A scheduler that finds one gone (NextParked) may forget its parked
// resources: nothing of the partition is sent any more in this epoch, and
// the next owner loads them.
func (w *Worker) lose(cause error, ps ...*partition) {
	w.mu.Lock()
	w.loseLocked(cause, ps...)
	w.mu.Unlock()
}

// loseLocked is lose with w.mu held.
func (w *Worker) loseLocked(cause error, ps ...*partition) {
	var ns []int
	for _, p := range ps {
		if w.owned[p.n] == p {
			ns = append(ns, p.n)
			delete(w.owned, p.n)
			w.lost = append(w.lost, p)
		}
	}
	if len(ns) == 0 {
		return
	}
	w.cutLocked(cause, ps...)
	slices.Sort(ns)
	w.log.Warn().Err(cause).Ints("partitions", ns).Msg("partitions lost: stopping their deliveries")
}

// cut stops the sends of ps, which stay owned (a delivery gap), and winds
// the epoch down: the next epoch starts them from what is unacknowledged.
func (w *Worker) cut(cause error, ps ...*partition) {
	w.mu.Lock()
	w.cutLocked(cause, ps...)
	w.mu.Unlock()
}

// cutLocked cancels the attempts of ps, and starts winding the epoch down
// unless it already does. w.mu is held: no attempt of ps starts after it
// (deliver looks under w.mu).
func (w *Worker) cutLocked(cause error, ps ...*partition) {
	for _, p := range ps {
		if p.stop != nil {
			p.stop()
		}
		if p.cut != nil {
			p.cut()
		}
	}
	e := w.epoch
	if e == nil || e.Err() != nil || w.winding {
		return
	}
	w.winding = true
	for _, p := range w.owned {
		if p.stop != nil {
			p.stop() // fetch no more
		}
	}
	go w.windDown(e, cause)
}

// windDown ends e once the attempts in flight have finished (for at most
// windDownWithin): since the epoch began winding down nothing was fetched
// and no attempt started (they wait, unsent, for the epoch's end), so what
// is in flight can only drain. What finished is acknowledged; what waited
// comes again in the next epoch, in order, and was never sent. Before, a
// lost partition ended the epoch at once, and every attempt in flight of
// every partition came again: duplicates, their requests having mostly
// reached the endpoint.
func (w *Worker) windDown(e *outbox.Epoch, cause error) {
	deadline := time.Now().Add(windDownWithin)
	idle, held := 0, w.heldBytes.Load()
	for idle < 5 && time.Now().Before(deadline) && e.Err() == nil {
		// Five polls with no attempt in flight and nothing finished: the
		// results of the last ones have reached their schedulers, which
		// acknowledged them.
		if h := w.heldBytes.Load(); w.attempts.Load() == 0 && h == held {
			idle++
		} else {
			idle, held = 0, h
		}
		if sleep(e.Context(), 10*time.Millisecond) != nil {
			break
		}
	}
	// The acknowledgements on the wire before the consumers' reset.
	if nc := w.cfg.JetStream.Conn(); nc != nil && e.Err() == nil {
		nc.FlushTimeout(time.Second)
	}
	e.End(cause)
}

// deliverer is the Worker as its Dispatcher's Deliverer.
type deliverer struct{ w *Worker }

func (d deliverer) Deliver(ctx context.Context, b *outbox.Batch) error { return d.w.deliver(ctx, b) }

// deliver is the configured Deliverer's attempt, unless a partition of the
// batch is cut or gone, or the epoch winds down: then the attempt waits,
// unsent, for the epoch's end, and its scheduler takes it for nothing (its
// context ended). An attempt cut while in flight (its context ends: the
// transport writes nothing more) also waits.
func (w *Worker) deliver(ctx context.Context, b *outbox.Batch) error {
	sends, parts, e := w.sends(ctx, b)
	if e == nil { // not the current epoch's: an ended one's (its context is done)
		return w.cfg.Deliverer.Deliver(ctx, b)
	}
	if sends == nil {
		return waitEnd(ctx, e)
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for _, send := range sends {
		stop := context.AfterFunc(send, cancel)
		defer stop()
	}
	// sends' rule once more as the transport writes the request: the
	// attempt may have waited (for a connection, a request slot to the host,
	// or frozen with the process) since.
	sctx = outbox.WithFresh(sctx, func() error { return w.fresh(sends, parts) })
	w.attempts.Add(1)
	err := w.cfg.Deliverer.Deliver(sctx, b)
	w.attempts.Add(-1)
	for _, send := range sends {
		if send.Err() != nil {
			return waitEnd(ctx, e)
		}
	}
	return err
}

// sends returns the send contexts of b's partitions and the partitions,
// none when one of them is cut or not owned or the epoch winds down; and the
// epoch, nil if the attempt (ctx) is not of the current one.
func (w *Worker) sends(ctx context.Context, b *outbox.Batch) ([]context.Context, []*partition, *outbox.Epoch) {
	w.mu.Lock()
	defer w.mu.Unlock()
	e := w.epoch
	if e == nil || epochOf(ctx) != e.N {
		return nil, nil, nil
	}
	if w.winding {
		return nil, nil, e
	}
	var out []context.Context
	var parts []*partition
	seen := -1
	for i := range b.Events {
		n := Partition(b.Subscription.ID, b.Events[i].ResourceID, w.cfg.Relay.Partitions)
		if n == seen {
			continue
		}
		seen = n
		p := w.owned[n]
		if p == nil || p.send == nil || p.send.Err() != nil {
			// Its attempt waits for the epoch's end: make sure that comes
			// (a cut already winds down; a partition handed over holds
			// nothing, so this is not expected otherwise).
			w.cutLocked(fmt.Errorf("an attempt for partition %d, which this epoch does not send for", n))
			return nil, nil, e
		}
		if p.leaseStale() {
			// The guard's rule, at the attempt's start: a worker frozen past
			// its lease thaws with attempts due before the guard runs again,
			// and another may own the partition by now.
			w.loseLocked(errLeaseStale, p)
			return nil, nil, e
		}
		if !slices.Contains(out, p.send) {
			out, parts = append(out, p.send), append(parts, p)
		}
	}
	return out, parts, e
}

// fresh is nil while the partitions of an attempt may still send: their
// sends go on and no lease of them went stale (sends).
func (w *Worker) fresh(sends []context.Context, parts []*partition) error {
	for _, send := range sends {
		if send.Err() != nil {
			return fmt.Errorf("its partition stopped sending: %w", errPartitionLost)
		}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, p := range parts {
		if p.leaseStale() {
			w.loseLocked(errLeaseStale, p)
			return errLeaseStale
		}
	}
	return nil
}

// waitEnd waits for the end of e, the attempt's epoch, whose context ctx
// derives from (past the attempt's own deadline, if it has one: it has not
// started).
func waitEnd(ctx context.Context, e *outbox.Epoch) error {
	<-e.Context().Done()
	<-ctx.Done()
	return ctx.Err()
}

// handOver gives a partition being released back once nothing of it is held
// (or after releaseWithin, by ending the epoch first).
func (w *Worker) handOver(ctx context.Context, p *partition) {
	p.mu.Lock()
	held := len(p.held)
	p.mu.Unlock()
	if held == 0 && !p.park.detach() {
		held = 1 // a parked batch of it is being sent
	}
	if held > 0 {
		if time.Since(p.releasing) < releaseWithin {
			return
		}
		w.mu.Lock()
		e := w.epoch
		w.mu.Unlock()
		if e != nil {
			e.End(fmt.Errorf("partition %d: its deliveries did not finish within %s of its hand-over", p.n, releaseWithin))
		}
		return // the epoch's end forgets what it held: the next tick hands it over
	}
	dctx, cancel := context.WithTimeout(ctx, leaseRenew)
	defer cancel()
	if err := w.kv.Delete(dctx, leaseKey(p.n), jetstream.LastRevision(p.rev)); err != nil {
		return // next tick; the lease stays ours meanwhile
	}
	w.mu.Lock()
	delete(w.owned, p.n)
	w.mu.Unlock()
	w.log.Info().Int("partition", p.n).Msg("partition handed over")
}

// handingOver says whether p is being handed over and holds nothing: no
// message of it is held any more, and none will be (handleMsg holds one only
// while its fetch is not stopped).
func (w *Worker) handingOver(p *partition) bool {
	w.mu.Lock()
	releasing := !p.releasing.IsZero()
	w.mu.Unlock()
	if !releasing {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.held) == 0
}

// releaseAll gives every lease back at shutdown, after the epoch ended: the
// next owner need not wait for them to expire.
func (w *Worker) releaseAll() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	w.mu.Lock()
	defer w.mu.Unlock()
	for n, p := range w.owned {
		w.kv.Delete(ctx, leaseKey(n), jetstream.LastRevision(p.rev))
		delete(w.owned, n)
	}
	w.kv.Delete(ctx, "m."+w.cfg.ID)
}

func leaseKey(n int) string { return "p." + strconv.Itoa(n) }

// isWrongRevision says whether a compare-and-set found another revision or
// sequence than expected: someone else wrote (a lease taken, a partition
// marked by a newer owner).
func isWrongRevision(err error) bool {
	var apiErr *jetstream.APIError
	if isCASConflict(err) {
		return false
	}
	return errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence
}

// isCASConflict says whether a replicated stream refused an expectation
// because another write to the same subject was being proposed (10164): a
// transient conflict, not a verdict (the real one, 10071, names the sequence
// found). Retried.
func isCASConflict(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
