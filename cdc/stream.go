package cdc

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/walhook/walhook/outbox"
)

// Config configures a Stream.
type Config struct {
	DatabaseURL    string
	Slot           string                // replication slot; default "walhook"
	Publication    string                // publication; default "walhook"
	Table          Table                 // outbox table; default walhook.outbox
	Columns        Columns               // outbox column names; default DefaultColumns
	StatusInterval time.Duration         // how often the flush position is checked and sent when it moved; default 1s
	StatusMaxAge   time.Duration         // a status update is sent at least this often; default 10s, or a third of the server's wal_sender_timeout if less
	StallTimeout   time.Duration         // silence from the server that ends a session; default 30s, at most half the server's wal_sender_timeout
	Registerer     prometheus.Registerer // for walhook_active and walhook_forged_messages_total; default none
	Budget         *outbox.Budget        // bytes of events held downstream: reading pauses while it is full; default unbounded
	// RejectEmit ignores logical messages with the walhook prefix (walhook.emit
	// and raw pg_logical_emit_message alike) and counts them as forged; default
	// false: they are events.
	RejectEmit bool
	EmitRoles  []string // setup: only these roles may EXECUTE walhook.emit; none = leave its grants alone
	// SlotFailover is how setup creates the slot: FailoverAuto (the default)
	// makes it a failover slot on PostgreSQL 17+, FailoverOn insists (an error
	// before 17), FailoverOff never does.
	SlotFailover string
}

// Defaults of Config, in one place (config reads them too).
const (
	SlotDefault           = "walhook"
	PublicationDefault    = "walhook"
	StallTimeoutDefault   = 30 * time.Second
	StatusIntervalDefault = time.Second
	StatusMaxAgeDefault   = 10 * time.Second
)

// WithDefaults returns c with its zero fields set to their defaults; it checks
// nothing (the caller validated c: cmd/walhook's Config.Resolve).
func (c Config) WithDefaults() Config {
	if c.Slot == "" {
		c.Slot = SlotDefault
	}
	if c.Publication == "" {
		c.Publication = PublicationDefault
	}
	if c.Table == (Table{}) {
		c.Table = DefaultTable
	}
	if c.Columns == (Columns{}) {
		c.Columns = DefaultColumns
	}
	if c.StatusInterval == 0 {
		c.StatusInterval = StatusIntervalDefault
	}
	if c.StatusMaxAge == 0 {
		c.StatusMaxAge = StatusMaxAgeDefault
	}
	if c.StallTimeout == 0 {
		c.StallTimeout = StallTimeoutDefault
	}
	if c.SlotFailover == "" {
		c.SlotFailover = FailoverAuto
	}
	if c.Budget == nil {
		c.Budget = outbox.NewBudget(math.MaxInt64)
	}
	return c
}

// Stream reads the slot and hands changes to the pipeline.
type Stream struct {
	cfg    Config
	acker  *outbox.Acker
	log    zerolog.Logger
	active prometheus.Gauge
	forged *forgeries // owned by Run's goroutine

	// Read by Health from other goroutines.
	state     atomic.Value  // State
	lastHeard atomic.Int64  // unix nanos of the last message from the server
	paused    atomic.Bool   // waiting for the pipeline (backpressure)
	drain     chan struct{} // closed by Drain: stop reading, keep confirming
	drained   bool          // the Drained change is queued
	yield     atomic.Bool   // drop the connection: the server is shutting down
	stalled   atomic.Bool   // the stream saw the server silent for StallTimeout (and logged it)

	// Owned by Run's goroutine.
	conn         *pgconn.PgConn
	start        outbox.LSN // the slot's confirmed flush position at start
	received     outbox.LSN // the newest WAL position received
	sentFlush    outbox.LSN
	sentAt       time.Time
	maxAge       time.Duration // StatusMaxAge fitted to the server's wal_sender_timeout
	stall        time.Duration // StallTimeout fitted to the server's wal_sender_timeout
	epoch        *outbox.Epoch // the session's hold of the slot
	epochs       uint64        // epochs started
	drainSent    bool          // the Drained change was handed on
	readDeadline time.Time     // when the current read deadline expires
	cols         []column      // reused by parseInsert
	relations    map[uint32]*relation
	commitTime   time.Time  // of the open transaction
	commitLSN    outbox.LSN // of the open transaction: the base of its events' sequence
	txnIndex     uint64     // events so far in the open transaction
	inTxn        bool
	txnEvents    bool            // the open transaction has produced a change
	pending      []outbox.Change // changes waiting for room in out (at most two)
}

// NewStream returns a Stream that confirms what acker says is finished.
func NewStream(cfg Config, acker *outbox.Acker, log zerolog.Logger) *Stream {
	cfg = cfg.WithDefaults()
	s := &Stream{cfg: cfg, acker: acker, maxAge: cfg.StatusMaxAge, stall: cfg.StallTimeout, log: log.With().Str("component", "cdc").Logger(),
		active: prometheus.NewGauge(prometheus.GaugeOpts{Name: "walhook_active",
			Help: "1 on the replica that holds the slot and streams; 0 on a standby."})}
	s.forged = newForgeries(s.log)
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(s.active, s.forged.total)
	}
	s.state.Store(Connecting)
	s.drain = make(chan struct{})
	return s
}

// Drain stops reading from the server at the next transaction boundary, hands
// on what it decoded and then a ChangeDrained; status updates go on until Run's
// context ends, so deliveries finishing meanwhile are confirmed. Call once.
func (s *Stream) Drain() { close(s.drain) }

// Yield drops the replication connection (the session reconnects with
// backoff). A PostgreSQL fast shutdown waits until walhook confirms everything
// it was sent; when walhook cannot (a write it needs is refused because the
// server is shutting down), leaving lets the shutdown finish, and what was not
// confirmed is replayed after the restart.
func (s *Stream) Yield() { s.yield.Store(true) }

func (s *Stream) draining() bool {
	select {
	case <-s.drain:
		return true
	default:
		return false
	}
}

// State is where the stream is.
type State string

const (
	Connecting State = "connecting" // not connected (yet, or again)
	Standby    State = "standby"    // connected; another process holds the slot
	Streaming  State = "streaming"  // holds the slot and hears from the server
	Stalled    State = "stalled"    // holds the slot, but the server has been silent for stall_timeout
)

// Health reports the stream's state; safe from any goroutine. Streaming and
// Standby are healthy. A pause for backpressure is not a stall: the pipeline,
// not the server, is slow.
func (s *Stream) Health() State {
	st := s.state.Load().(State)
	// The stream declares a stall itself, so that /readyz and the log agree;
	// should the stream's goroutine hang, the silence shows a while later.
	if st == Streaming && (s.stalled.Load() || s.quiet() > 2*s.cfg.StallTimeout) {
		return Stalled
	}
	return st
}

// Run streams until ctx ends (returning nil) or the stream fails.
// A lost connection (a PostgreSQL restart, a network cut) or a stall is
// followed by a reconnect with backoff; each new session starts with a
// ChangeStart so the pipeline can drop the transaction it was cut off in.
// Errors that a reconnect cannot fix (no slot, a config that does not fit the
// outbox table) end Run.
func (s *Stream) Run(ctx context.Context, out chan<- outbox.Change) error {
	wait := backoff.NewExponentialBackOff(backoff.WithInitialInterval(200*time.Millisecond),
		backoff.WithMaxInterval(10*time.Second), backoff.WithMaxElapsedTime(0))
	lost := false
	for {
		var streamed bool
		var err error
		if !s.draining() {
			streamed, err = s.session(ctx, out, lost)
		}
		if ctx.Err() != nil {
			return nil
		}
		if s.draining() {
			// Stopping, and the session (so its epoch) ended: nothing is in
			// flight any more. The pipeline still hears that the drain is over.
			if !s.drainSent {
				select {
				case out <- outbox.Change{Kind: outbox.ChangeDrained}:
				case <-ctx.Done():
				}
			}
			return nil
		}
		if _, ok := errors.AsType[*permanentError](err); ok {
			return err
		}
		if streamed { // a failure after streaming is news; one while reconnecting is not
			wait.Reset()
			s.log.Error().Err(err).Msg("stream lost; reconnecting")
		}
		lost = true
		t := time.NewTimer(wait.NextBackOff())
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-s.drain: // stopping: no new session
			t.Stop()
		case <-t.C:
		}
	}
}

// permanentError is a stream failure that reconnecting does not fix.
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

func permanent(err error) error { return &permanentError{err} }

// session streams over one connection until it fails or ctx ends.
func (s *Stream) session(ctx context.Context, out chan<- outbox.Change, reconnecting bool) (streamed bool, err error) {
	if err := s.connectWhenFree(ctx); err != nil {
		return false, err
	}
	defer s.conn.Close(context.Background())
	// Runs before the close: the epoch's sends stop before the slot is free.
	defer func() { s.epoch.End(fmt.Errorf("session ended: %w", err)) }()
	s.heard(time.Now())
	s.state.Store(Streaming)
	s.active.Set(1)
	defer func() {
		s.state.Store(Connecting)
		s.active.Set(0)
	}()
	if reconnecting {
		s.log.Info().Str("slot", s.cfg.Slot).Stringer("start_lsn", s.start).Msg("stream reconnected")
	} else {
		s.log.Info().Str("slot", s.cfg.Slot).Stringer("start_lsn", s.start).Msg("streaming")
	}

	tick := time.NewTicker(s.cfg.StatusInterval)
	defer tick.Stop()
	alive := time.NewTicker(pausedProbeEvery) // read only while paused: a tick nobody reads wakes nobody
	defer alive.Stop()
	for {
		if ctx.Err() != nil {
			return true, s.stop()
		}
		if err := s.epoch.Err(); err != nil { // the pipeline gave the slot up
			s.stop()
			return true, err
		}
		if s.yield.Swap(false) {
			s.stop() // confirm what is finished, then leave
			return true, errYield
		}
		var err error
		switch {
		case len(s.pending) > 0:
			if s.handOn(out) {
				continue
			}
			// Backpressure: stop reading, keep answering.
			s.paused.Store(true)
			select {
			case out <- s.pending[0]:
				s.handedOn()
			case <-tick.C:
				err = s.heartbeat(ctx)
			case <-alive.C:
				err = s.sendStatus(ctx, true)
			case <-ctx.Done():
			case <-s.epoch.Context().Done():
			}
			s.paused.Store(false)
		case s.drained || (!s.inTxn && s.draining()):
			// Shutting down: everything decoded is handed on; only confirm.
			if !s.drained {
				s.drained = true
				s.pending = append(s.pending, outbox.Change{Kind: outbox.ChangeDrained})
				continue
			}
			select {
			case <-tick.C:
				err = s.heartbeat(ctx) // keep hearing the server: a quiet drain is no stall
			case <-alive.C:
				err = s.sendStatus(ctx, true)
			case <-ctx.Done():
			case <-s.epoch.Context().Done():
			}
		case s.cfg.Budget.Full():
			// The events held downstream fill the memory budget.
			s.paused.Store(true)
			select {
			case <-s.cfg.Budget.Freed():
			case <-tick.C:
				err = s.heartbeat(ctx)
			case <-alive.C:
				err = s.sendStatus(ctx, true)
			case <-ctx.Done():
			case <-s.epoch.Context().Done():
			}
			s.paused.Store(false)
		default:
			select {
			case <-tick.C:
				err = s.sendStatus(ctx, false)
			default:
				err = s.receive(ctx) // while draining, to the end of the open transaction
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return true, s.stop()
			}
			return true, err
		}
	}
}

// handOn passes the first pending change on if the pipeline has room.
func (s *Stream) handOn(out chan<- outbox.Change) bool {
	select {
	case out <- s.pending[0]:
		s.handedOn()
		return true
	default:
		return false
	}
}

func (s *Stream) handedOn() {
	if s.pending[0].Kind == outbox.ChangeDrained {
		s.drainSent = true
	}
	s.pending = s.pending[1:]
}

// heartbeat keeps a paused stream's lease: it confirms, and when the server
// has been quiet for a third of the stall timeout it asks for a reply and
// reads one message, so a dead server is noticed while paused too (the
// epoch must end before the server can give the slot to another process;
// docs/design.md, "Ownership"). A paused stream so reads at most one message
// per third of the stall timeout.
func (s *Stream) heartbeat(ctx context.Context) error {
	if err := s.sendStatus(ctx, false); err != nil {
		return err
	}
	if s.quiet() > s.stall/3 {
		return s.receive(ctx)
	}
	return nil
}

// pausedProbeEvery is how often a stream that does not read (backpressure,
// a full budget, a drain) writes a status update anyway: a server that went
// away (a restart) answers a write with a reset, so the next write fails and
// the epoch ends within two of these, before a restarted server can give
// the slot to another replica (docs/design.md, "Ownership"). Reading would
// notice at once, but a paused stream must not read.
const pausedProbeEvery = 100 * time.Millisecond

var (
	errStalled  = errors.New("stream stalled: reconnecting")
	errYield    = errors.New("the server is shutting down: left the slot so that it can")
	errDraining = errors.New("stopping")
)

// ErrSlotActive means another process streams the slot.
var ErrSlotActive = errors.New("replication slot is in use by another process")

// connectWhenFree connects, waiting while another process holds the slot: a
// previous walhook that was just killed (its walsender exits a moment later), or
// the old pod of a rolling deploy.
func (s *Stream) connectWhenFree(ctx context.Context) error {
	wait := backoff.NewExponentialBackOff(backoff.WithInitialInterval(200*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second), backoff.WithMaxElapsedTime(0))
	logged := false
	for {
		err := s.connect(ctx)
		if !errors.Is(err, ErrSlotActive) {
			return err
		}
		s.state.Store(Standby)
		if !logged {
			s.log.Info().Str("slot", s.cfg.Slot).Msg("slot in use by another process; waiting for it")
			logged = true
		}
		t := time.NewTimer(wait.NextBackOff())
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-s.drain: // stopping: a standby does not take the slot now
			t.Stop()
			return errDraining
		case <-t.C:
		}
	}
}

func (s *Stream) connect(ctx context.Context) error {
	pc, err := pgconn.ParseConfig(s.cfg.DatabaseURL)
	if err != nil {
		return permanent(fmt.Errorf("parse database_url: %w", err))
	}
	pc.RuntimeParams["replication"] = "database"
	pc.RuntimeParams["application_name"] = "walhook"
	s.conn, err = pgconn.ConnectConfig(ctx, pc)
	if err != nil {
		return fmt.Errorf("connect for replication: %w", err)
	}
	version, err := s.serverVersion(ctx)
	if err != nil {
		s.conn.Close(context.Background())
		return err
	}
	args, err := pluginArgs(version, s.cfg.Publication)
	if err != nil {
		s.conn.Close(context.Background())
		return permanent(err)
	}
	s.start, err = s.slotPosition(ctx)
	if err != nil {
		s.conn.Close(context.Background())
		return err
	}
	if err := s.fitStatusMaxAge(ctx); err != nil {
		s.conn.Close(context.Background())
		return err
	}
	s.sentFlush, s.received = s.start, s.start
	s.relations = map[uint32]*relation{}
	s.inTxn, s.txnEvents = false, false
	s.stalled.Store(false)
	s.readDeadline = time.Time{}
	err = pglogrepl.StartReplication(ctx, s.conn, s.cfg.Slot, pglogrepl.LSN(s.start), pglogrepl.StartReplicationOptions{
		PluginArgs: args,
	})
	if err != nil {
		s.conn.Close(context.Background())
		if pgErr, ok := errors.AsType[*pgconn.PgError](err); ok && pgErr.Code == "55006" { // object_in_use
			return fmt.Errorf("slot %q: %w", s.cfg.Slot, ErrSlotActive)
		}
		return fmt.Errorf("start replication on slot %q: %w", s.cfg.Slot, err)
	}
	s.sentAt = time.Now()
	// The slot is ours: a new epoch. The pipeline starts it from the
	// database's state at the start position.
	s.epochs++
	s.epoch = outbox.NewEpoch(ctx, s.epochs)
	s.epoch.Holder = s.conn.PID()
	s.cfg.Budget.Reset(s.epochs)
	s.pending = append(s.pending[:0], outbox.Change{Kind: outbox.ChangeStart, LSN: s.start, Epoch: s.epoch})
	return nil
}

// missingSlot explains a missing slot: never created (run setup), or lost
// after walhook delivered here (recover).
func (s *Stream) missingSlot(ctx context.Context) error {
	res, err := s.conn.Exec(ctx, "SELECT high_water_id::text, updated_at::text FROM walhook.state WHERE slot = "+quoteLiteral(s.cfg.Slot)).ReadAll()
	if err == nil && len(res) == 1 && len(res[0].Rows) == 1 {
		row := res[0].Rows[0]
		return &SlotMissingError{Slot: s.cfg.Slot, HighWater: string(row[0]), At: string(row[1])}
	}
	return &SlotMissingError{Slot: s.cfg.Slot}
}

// invalidSlot explains a slot the server invalidated: as good as lost.
func (s *Stream) invalidSlot(ctx context.Context, reason string) error {
	err := s.missingSlot(ctx)
	if sm, ok := errors.AsType[*SlotMissingError](err); ok {
		sm.Invalidated = reason
	}
	return err
}

// serverVersion reads the server's server_version_num.
func (s *Stream) serverVersion(ctx context.Context) (int, error) {
	res, err := s.conn.Exec(ctx, "SHOW server_version_num").ReadAll()
	if err != nil {
		return 0, fmt.Errorf("read server_version_num: %w", err)
	}
	if len(res) != 1 || len(res[0].Rows) != 1 {
		return 0, errors.New("read server_version_num: no value")
	}
	return ParseServerVersion(string(res[0].Rows[0][0]))
}

// fitStatusMaxAge keeps status updates well inside the server's
// wal_sender_timeout, so that the server never drops walhook while the stream is
// paused for backpressure and does not see its keepalive requests; and the
// stall timeout within half of it, so that a session whose server went silent
// ends before the server would let another process take the slot.
func (s *Stream) fitStatusMaxAge(ctx context.Context) error {
	res, err := s.conn.Exec(ctx, "SHOW wal_sender_timeout").ReadAll()
	if err != nil {
		return fmt.Errorf("read wal_sender_timeout: %w", err)
	}
	if len(res) != 1 || len(res[0].Rows) != 1 {
		return errors.New("read wal_sender_timeout: no value")
	}
	timeout, err := parsePGDuration(string(res[0].Rows[0][0]))
	if err != nil {
		return fmt.Errorf("read wal_sender_timeout: %w", err)
	}
	s.maxAge, s.stall = s.cfg.StatusMaxAge, s.cfg.StallTimeout
	if timeout > 0 && timeout/3 < s.maxAge {
		s.maxAge = timeout / 3
	}
	if timeout > 0 && timeout/2 < s.stall {
		s.stall = timeout / 2
	}
	return nil
}

// parsePGDuration reads a time setting as SHOW prints it: "60s", "500ms", "1min", "0".
func parsePGDuration(v string) (time.Duration, error) {
	units := []struct {
		suffix string
		unit   time.Duration
	}{{"ms", time.Millisecond}, {"min", time.Minute}, {"s", time.Second}, {"h", time.Hour}, {"d", 24 * time.Hour}}
	for _, u := range units {
		if n, ok := strings.CutSuffix(v, u.suffix); ok {
			i, err := strconv.Atoi(n)
			if err != nil {
				return 0, fmt.Errorf("unexpected duration %q", v)
			}
			return time.Duration(i) * u.unit, nil
		}
	}
	i, err := strconv.Atoi(v) // no unit: milliseconds
	if err != nil {
		return 0, fmt.Errorf("unexpected duration %q", v)
	}
	return time.Duration(i) * time.Millisecond, nil
}

// slotPosition checks the slot and returns its confirmed flush position.
func (s *Stream) slotPosition(ctx context.Context) (outbox.LSN, error) {
	q := "SELECT plugin, confirmed_flush_lsn, active, " + invalidationSQL + " FROM pg_replication_slots s WHERE slot_name = " +
		quoteLiteral(s.cfg.Slot) + " AND database = current_database()"
	res, err := s.conn.Exec(ctx, q).ReadAll()
	if err != nil {
		return 0, fmt.Errorf("look up replication slot: %w", err)
	}
	if len(res) != 1 || len(res[0].Rows) == 0 {
		return 0, permanent(s.missingSlot(ctx))
	}
	row := res[0].Rows[0]
	if plugin := string(row[0]); plugin != "pgoutput" {
		return 0, permanent(fmt.Errorf("replication slot %q uses plugin %q, walhook needs pgoutput", s.cfg.Slot, plugin))
	}
	if reason := string(row[3]); reason != "" {
		// Nothing reconnecting could fix: the server will not decode from it again.
		return 0, permanent(s.invalidSlot(ctx, reason))
	}
	if string(row[2]) == "t" {
		return 0, fmt.Errorf("slot %q: %w", s.cfg.Slot, ErrSlotActive)
	}
	lsn, err := pglogrepl.ParseLSN(string(row[1]))
	if err != nil {
		return 0, fmt.Errorf("replication slot %q: confirmed_flush_lsn: %w", s.cfg.Slot, err)
	}
	return outbox.LSN(lsn), nil
}

// receive reads one message, waiting at most one status interval.
//
// A read deadline, moved about once per status interval, bounds the wait; a
// per-message context would cost pgconn a watcher goroutine per message. The
// clock is read once per message: on this path it is a measurable cost.
func (s *Stream) receive(ctx context.Context) error {
	if s.readDeadline.IsZero() {
		now := time.Now()
		s.readDeadline = now.Add(s.cfg.StatusInterval)
		// Wake when the silence becomes a stall, to declare it on time.
		if stall := now.Add(s.stall - s.quiet() + time.Millisecond); stall.After(now) && stall.Before(s.readDeadline) {
			s.readDeadline = stall
		}
		s.conn.Conn().SetReadDeadline(s.readDeadline)
	}
	msg, err := s.conn.ReceiveMessage(context.Background())
	if err != nil {
		if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() && ctx.Err() == nil {
			s.readDeadline = time.Time{} // set afresh for the next read
			if s.noticeStall(s.quiet()) {
				return errStalled // the epoch ends now: a late message does not revive it
			}
			return nil
		}
		return fmt.Errorf("receive replication message: %w", err)
	}
	now := time.Now()
	s.heard(now)
	if s.readDeadline.Sub(now) < s.cfg.StatusInterval/2 {
		s.readDeadline = time.Time{} // moved before the next read
	}
	switch msg := msg.(type) {
	case *pgproto3.CopyData:
		return s.handleCopyData(ctx, msg.Data)
	case *pgproto3.ErrorResponse:
		return fmt.Errorf("replication stream: %w", pgconn.ErrorResponseToPgError(msg))
	case *pgproto3.CopyDone:
		return errors.New("replication stream ended by the server")
	default:
		return nil
	}
}

func (s *Stream) handleCopyData(ctx context.Context, data []byte) error {
	if len(data) == 0 {
		return nil
	}
	switch data[0] {
	case pglogrepl.PrimaryKeepaliveMessageByteID:
		k, err := pglogrepl.ParsePrimaryKeepaliveMessage(data[1:])
		if err != nil {
			return fmt.Errorf("parse keepalive: %w", err)
		}
		s.received = max(s.received, outbox.LSN(k.ServerWALEnd))
		if !s.inTxn {
			// Everything before WAL end is in the stream already: once the
			// pipeline has finished it, that position is safe to confirm.
			s.pending = append(s.pending, outbox.Change{Kind: outbox.ChangeIdle, LSN: outbox.LSN(k.ServerWALEnd)})
		}
		if k.ReplyRequested {
			return s.sendStatus(ctx, true)
		}
	case pglogrepl.XLogDataByteID:
		x, err := pglogrepl.ParseXLogData(data[1:])
		if err != nil {
			return fmt.Errorf("parse xlog data: %w", err)
		}
		s.received = max(s.received, outbox.LSN(x.WALStart)+outbox.LSN(len(x.WALData)))
		return s.handleWAL(outbox.LSN(x.WALStart), x.WALData)
	}
	return nil
}

// handleWAL decodes one pgoutput message and queues the change it makes, if any.
func (s *Stream) handleWAL(at outbox.LSN, wal []byte) error {
	if len(wal) > 0 && wal[0] == 'I' { // the hot path: outbox rows, decoded without allocating per column
		relID, cols, err := parseInsert(wal, s.cols)
		s.cols = cols
		if err != nil {
			return permanent(fmt.Errorf("parse pgoutput insert at %s: %w", at, err))
		}
		rel := s.relations[relID]
		if rel == nil {
			return nil // a table of the publication that is neither the outbox nor walhook.control
		}
		if rel.control {
			s.handleControl(at, rel, cols)
			return nil
		}
		e, err := decodeRow(rel, cols)
		s.queueEvent(at, e, err)
		return nil
	}
	m, err := parseWAL(wal)
	if err != nil {
		return fmt.Errorf("parse pgoutput message at %s: %w", at, err)
	}
	switch m := m.(type) {
	case *pglogrepl.BeginMessage:
		// The Begin change waits for the transaction's first event: most
		// transactions in the stream have none for walhook.
		s.inTxn, s.txnEvents, s.commitTime = true, false, m.CommitTime
		s.commitLSN, s.txnIndex = outbox.LSN(m.FinalLSN), 0
	case *pglogrepl.CommitMessage:
		end := outbox.LSN(m.TransactionEndLSN)
		if s.txnEvents {
			s.pending = append(s.pending, outbox.Change{Kind: outbox.ChangeCommit, LSN: end})
		} else {
			// Nothing for walhook: like a keepalive, safe once all before it is done.
			s.pending = append(s.pending, outbox.Change{Kind: outbox.ChangeIdle, LSN: end})
		}
		s.inTxn, s.txnEvents = false, false
	case *pglogrepl.RelationMessage:
		if m.Namespace == ControlTable.Schema && m.RelationName == ControlTable.Name {
			rel, err := newControlRelation(m)
			if err != nil {
				return permanent(err)
			}
			s.relations[m.RelationID] = rel
			return nil
		}
		if m.Namespace != s.cfg.Table.Schema || m.RelationName != s.cfg.Table.Name {
			delete(s.relations, m.RelationID)
			return nil
		}
		rel, err := newRelation(m, s.cfg.Columns)
		if err != nil {
			return permanent(err) // the table no longer has a configured column: stop rather than dead-letter every row
		}
		s.relations[m.RelationID] = rel
	case *pglogrepl.LogicalDecodingMessage:
		switch m.Prefix {
		case MessagePrefix:
			if s.cfg.RejectEmit {
				s.forged.note(m.Prefix, outbox.LSN(m.LSN))
				return nil
			}
			if !m.Transactional {
				return nil
			}
			e, err := decodeMessage(outbox.LSN(m.LSN), m.Content)
			s.queueEvent(at, e, err)
		case SubscriptionPrefix, ReplayPrefix, RecoverPrefix:
			// Control changes come only from walhook.control: any role may
			// emit a message (docs/security.md).
			s.forged.note(m.Prefix, outbox.LSN(m.LSN))
		}
	}
	return nil
}

// handleControl queues the change a walhook.control row stands for, in its
// place in the stream.
func (s *Stream) handleControl(at outbox.LSN, rel *relation, cols []column) {
	c, err := decodeControl(rel, cols)
	if c.Kind == outbox.ChangeEvent { // a recovered outbox row: an unreadable one is dead-lettered like a row
		s.queueEvent(at, c.Event, err)
		return
	}
	if err != nil {
		s.log.Error().Err(err).Stringer("lsn", at).Msg("unreadable control row ignored")
		return
	}
	s.beginLazily()
	seq := sequence(s.commitLSN, s.txnIndex)
	s.txnIndex++
	// A subscription change is ordered by the stream (the routing log keys on
	// it); a replayed dead letter keeps the sequence it was first sent with, so
	// that a receiver ordering by sequence does not take it for the newest.
	// Dead letters from before walhook recorded sequences have none: they get
	// the stream's.
	if c.Kind != outbox.ChangeReplay || c.Event.Seq == 0 {
		c.Event.Seq = seq
	}
	if c.Kind == outbox.ChangeReplay {
		c.Event.ReplaySeq = seq
		s.cfg.Budget.Hold(s.epoch.N, outbox.EventSize(&c.Event)) // released downstream, when the event is finished
	}
	s.pending = append(s.pending, c)
}

// beginLazily sends the open transaction's Begin before its first change.
func (s *Stream) beginLazily() {
	if !s.txnEvents {
		s.txnEvents = true
		s.pending = append(s.pending, outbox.Change{Kind: outbox.ChangeBegin, Event: outbox.Event{CommitTime: s.commitTime}})
	}
}

func (s *Stream) queueEvent(at outbox.LSN, e outbox.Event, err error) {
	if err == nil && (hasNUL(e.ID) || hasNUL(e.Type) || hasNUL(e.ResourceID) || hasNUL(e.Tenant)) {
		// Only a message can carry one (text columns cannot): PostgreSQL
		// could store neither a parked row nor a dead letter of it as it is.
		err = errors.New("id, event, resource_id or tenant contains a NUL character")
	}
	if err == nil && max(len(e.ID), len(e.Type), len(e.ResourceID), len(e.Tenant)) > MaxKeyBytes {
		// Indexed where it is parked or dead-lettered: a btree entry larger
		// than a third of a page is refused, and the event would wedge.
		err = fmt.Errorf("id, event, resource_id or tenant is longer than %d bytes", MaxKeyBytes)
	}
	s.beginLazily()
	s.cfg.Budget.Hold(s.epoch.N, outbox.EventSize(&e)) // released downstream, when the event is finished
	e.CommitTime = s.commitTime
	e.Seq = sequence(s.commitLSN, s.txnIndex)
	s.txnIndex++
	if err != nil {
		if e.ID == "" {
			e.ID = "lsn:" + at.String()
		}
		if len(e.ID) > MaxKeyBytes { // the dead letter's key: cut, and marked so
			e.ID = strings.ToValidUTF8(e.ID[:MaxKeyBytes], "") + "…"
		}
		s.pending = append(s.pending, outbox.Change{Kind: outbox.ChangeMalformed, Event: e, Reason: err.Error()})
		return
	}
	s.pending = append(s.pending, outbox.Change{Kind: outbox.ChangeEvent, Event: e})
}

// MaxKeyBytes bounds an event's id, type, resource_id and tenant: a longer
// one makes the row malformed (dead-lettered with the reason).
const MaxKeyBytes = 1024

func hasNUL(s string) bool { return strings.IndexByte(s, 0) >= 0 }

// sequence orders events by commit: the transaction's commit LSN, then the
// event's index in it (saturating at 65535; see docs/scheduler.md).
func sequence(commit outbox.LSN, index uint64) uint64 {
	return uint64(commit)<<16 | min(index, 0xffff)
}

// heard notes a message from the server at now: the session's epoch may act
// until the stall timeout has passed without another (Epoch.Live), unless it
// already went stale before this (late) read.
func (s *Stream) heard(now time.Time) {
	s.lastHeard.Store(now.UnixNano())
	s.epoch.FreshUntil(now.Add(s.stall))
}

// quiet is how long the server has been silent.
func (s *Stream) quiet() time.Duration { return time.Since(time.Unix(0, s.lastHeard.Load())) }

// noticeStall declares a stall, once, when the server has been silent for the
// stall timeout (a paused stream still reads now and then: heartbeat), and
// reports whether the stream has stalled: a stalled session ends.
func (s *Stream) noticeStall(quiet time.Duration) bool {
	if quiet > s.stall && !s.stalled.Swap(true) {
		s.log.Error().Dur("silent_for", quiet).Msg("stream stalled: the server does not answer")
	}
	return s.stalled.Load()
}

// sendStatus confirms the finished position. Unless forced, it only sends when the
// position moved or the last update is StatusMaxAge old.
func (s *Stream) sendStatus(ctx context.Context, force bool) error {
	flush := max(s.acker.Flush(), s.start)
	// A quiet server is asked for a reply: a live walsender answers at once, a
	// frozen one or a half-open connection does not (stall detection).
	quiet := s.quiet()
	askReply := quiet > s.stall/3
	s.noticeStall(quiet)
	if s.stalled.Load() {
		return errStalled // end the epoch and reconnect
	}
	if !force && !askReply && flush == s.sentFlush && time.Since(s.sentAt) < s.maxAge {
		return nil
	}
	// Fill every field ourselves: pglogrepl replaces a zero flush with the write position.
	err := pglogrepl.SendStandbyStatusUpdate(ctx, s.conn, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: pglogrepl.LSN(max(s.received, flush)),
		WALFlushPosition: pglogrepl.LSN(flush),
		WALApplyPosition: pglogrepl.LSN(flush),
		ClientTime:       time.Now(),
		ReplyRequested:   askReply,
	})
	if err != nil {
		return fmt.Errorf("send standby status: %w", err)
	}
	if flush != s.sentFlush {
		s.log.Debug().Stringer("flush_lsn", flush).Msg("confirmed")
	}
	s.sentFlush, s.sentAt = flush, time.Now()
	return nil
}

// stop sends a last status update with a fresh deadline, so work finished before
// shutdown is not redone after it.
func (s *Stream) stop() error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(context.Background()), 5*time.Second)
	defer cancel()
	if err := s.sendStatus(ctx, true); err != nil {
		s.log.Warn().Err(err).Msg("final status update failed")
	}
	return nil
}
