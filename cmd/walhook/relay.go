package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"
	"github.com/walhook/walhook/console"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/outbox/pgstore"
	"github.com/walhook/walhook/relay"
	"golang.org/x/sync/errgroup"
)

// relayRun is `walhook run` in relay mode: the publisher the Dispatcher hands
// deliveries to. Its methods do nothing on nil (direct mode).
type relayRun struct {
	nc  *nats.Conn
	js  jetstream.JetStream
	pub *relay.Publisher
	cfg relay.Config
	reg prometheus.Registerer
}

func startRelay(cfg *Settings, reg prometheus.Registerer, store *pgstore.Store, log zerolog.Logger) (*relayRun, error) {
	nc, js, err := connectRelay(cfg, "walhook run", log)
	if err != nil {
		return nil, err
	}
	pub := relay.NewPublisher(relay.PublisherConfig{Relay: *cfg.relay, JetStream: js, Conn: nc, Registerer: reg,
		Logger: log.With().Str("component", "relay").Logger(), DeadLetter: store.DeadLetter, Owns: store.Owns})
	return &relayRun{nc: nc, js: js, pub: pub, cfg: *cfg.relay, reg: reg}, nil
}

// oldestEvent is the prober's MarksFloor: debounce marks stay while an
// older event is in the stream.
func (r *relayRun) oldestEvent(ctx context.Context) (uint64, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return relay.OldestEvent(ctx, r.js, r.cfg)
}

// connectRelay connects to NATS; it does not wait for a server to answer
// (the connection retries on its own and the parts say when they cannot
// publish or fetch).
func connectRelay(cfg *Settings, name string, log zerolog.Logger) (*nats.Conn, jetstream.JetStream, error) {
	log = log.With().Str("component", "nats").Logger()
	nc, err := cfg.relay.Connect(name,
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) { log.Warn().Err(err).Msg("disconnected from nats") }),
		nats.ReconnectHandler(func(c *nats.Conn) { log.Info().Str("server", c.ConnectedUrlRedacted()).Msg("reconnected to nats") }),
		nats.ClosedHandler(func(*nats.Conn) { log.Info().Msg("nats connection closed") }))
	if err != nil {
		return nil, nil, err
	}
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(8192), jetstream.WithPublishAsyncTimeout(10*time.Second))
	if err != nil {
		nc.Close()
		return nil, nil, fmt.Errorf("jetstream: %w", err)
	}
	return nc, js, nil
}

func (r *relayRun) run(g *errgroup.Group, ctx context.Context) {
	g.Go(func() error { return r.pub.Run(ctx) })
	g.Go(func() error { return relay.PollStream(ctx, r.js, r.cfg, r.reg, 5*time.Second) })
}

func (r *relayRun) health() func() (bool, string) {
	if r == nil {
		return nil
	}
	return r.pub.Health
}

// drained waits, at shutdown, until JetStream acknowledged what was handed
// on, or deadline: then the final status update confirms it.
func (r *relayRun) drained(deadline <-chan time.Time) {
	if r == nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-deadline:
			cancel()
		case <-ctx.Done():
		}
	}()
	r.pub.Drained(ctx)
}

func (r *relayRun) close() {
	if r != nil {
		r.nc.Close()
	}
}

// deliver is `walhook deliver`: a relay worker. It owns a share of the
// partitions and delivers them with direct mode's semantics; /healthz,
// /readyz and /metrics on listen.
func deliver(ctx context.Context, cfg *Settings, log zerolog.Logger) error {
	if cfg.relay == nil {
		return usageError("deliver: the config has no relay section (relay.url is required)")
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	defer ln.Close()
	pool, err := connectPool(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	nc, js, err := connectRelay(cfg, "walhook deliver", log)
	if err != nil {
		return err
	}
	defer nc.Close()
	snd := newSender(cfg, log)
	defer snd.Close()
	reg := prometheus.NewRegistry()
	attemptLog := newAttemptLog(ctx, pool, cfg, reg, log)
	var attempts outbox.AttemptLog // nil unless there is one (not a nil *AttemptLog)
	if attemptLog != nil {
		attempts = attemptLog
	}
	w := relay.NewWorker(relay.WorkerConfig{
		Relay: *cfg.relay, JetStream: js, Subscriptions: cfg.subs, Defaults: cfg.defaults, Deliverer: snd,
		Store: pgstore.New(pool, cfg.Slot), Logger: log.With().Str("component", "worker").Logger(), Registerer: reg,
		MaxPendingBytes: cfg.MaxPendingBytes, AckWait: cfg.relayAckWait, ShutdownTimeout: cfg.shutdown,
		Attempts: attempts,
	})
	mux := routes()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /readyz", func(rw http.ResponseWriter, _ *http.Request) {
		ok := nc.Status() == nats.CONNECTED
		rw.Header().Set("content-type", "application/json")
		if !ok {
			rw.WriteHeader(http.StatusServiceUnavailable)
		}
		fmt.Fprintf(rw, `{"ready":%t,"nats":%q,"partitions":%d}`+"\n", ok, nc.Status().String(), len(w.Owned()))
	})
	srv := newServer(cfg, jsonErrors(mux))
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return w.Run(gctx) })
	if attemptLog != nil {
		g.Go(func() error { return attemptLog.Run(gctx) })
	}
	g.Go(func() error { return relay.PollStream(gctx, js, *cfg.relay, reg, 5*time.Second) })
	g.Go(func() error {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("http: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		return srv.Shutdown(sctx)
	})
	log.Info().Str("listen", ln.Addr().String()).Str("worker", w.ID()).Msg("walhook deliver running")
	err = g.Wait()
	log.Info().Msg("walhook deliver stopped")
	return err
}

// relayStatus is `walhook status`'s relay part: the stream and its
// partitions, or why NATS could not tell.
type relayStatus struct {
	*relay.Status
	Error string `json:"error,omitempty"`
}

func inspectRelay(ctx context.Context, cfg *Settings) *relayStatus {
	if cfg.relay == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	nc, js, err := connectRelay(cfg, "walhook status", zerolog.Nop())
	if err != nil {
		return &relayStatus{Error: err.Error()}
	}
	defer nc.Close()
	st, err := relay.Inspect(ctx, js, *cfg.relay)
	if err != nil {
		return &relayStatus{Error: "cannot read the relay from NATS: " + err.Error()}
	}
	return &relayStatus{Status: st}
}

func printRelay(w io.Writer, r *relayStatus) {
	if r == nil {
		return
	}
	if r.Error != "" {
		fmt.Fprintf(w, "\nrelay\t%s\n", r.Error)
		return
	}
	fmt.Fprintf(w, "\nrelay stream\t%s\nbacklog\t%d messages, %s\nparked\t%d events\nworkers\t%d %s\n\n", r.Stream, r.Messages,
		console.HumanBytes(int64(r.Bytes)), r.Parked, len(r.Workers), strings.Join(r.Workers, " "))
	fmt.Fprintln(w, "PARTITION\tOWNER\tBACKLOG\tPARKED")
	for _, p := range r.Partitions {
		owner := p.Owner
		if owner == "" {
			owner = "(none)"
		}
		fmt.Fprintf(w, "%d\t%s\t%d\t%d\n", p.Partition, owner, p.Messages, p.Parked)
	}
}
