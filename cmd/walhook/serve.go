package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"
	"github.com/walhook/walhook/api"
	"github.com/walhook/walhook/cdc"
	"github.com/walhook/walhook/console"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/outbox/pgstore"
	"github.com/walhook/walhook/sender"
	"golang.org/x/sync/errgroup"
)

// serve is `walhook run`: stream → dispatcher → sender, plus the HTTP endpoint.
func serve(ctx context.Context, cfg *Settings, log zerolog.Logger) error {
	// Listen first: a port in use is found before the database connection.
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	defer ln.Close()
	var metricsLn net.Listener
	if cfg.MetricsListen != "" {
		if metricsLn, err = net.Listen("tcp", cfg.MetricsListen); err != nil {
			return fmt.Errorf("metrics_listen: %w", err)
		}
		defer metricsLn.Close()
	}
	pool, err := connectPool(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	if err := checkControl(ctx, pool, cfg); err != nil {
		return err
	}

	snd := newSender(cfg, log)
	defer snd.Close()
	reg := prometheus.NewRegistry()
	acker := outbox.NewAcker(0)
	metrics := outbox.NewMetrics(reg, acker)
	changes := make(chan outbox.Change, 256)
	cdcCfg := cfg.cdcConfig()
	cdcCfg.Registerer = reg
	stream := cdc.NewStream(cdcCfg, acker, log)
	store := pgstore.New(pool, cfg.Slot)
	prober := pgstore.NewProber(reg, store, metrics, acker, streamHold{stream}, log.With().Str("component", "probe").Logger())
	if cfg.table == cdc.DefaultTable {
		prober.Retention = cfg.retention // other tables are the application's to prune
	}
	attemptLog := newAttemptLog(ctx, pool, cfg, reg, log)
	var attempts outbox.AttemptLog // nil unless there is one (not a nil *AttemptLog)
	if attemptLog != nil {
		attempts = attemptLog
	}
	dcfg := outbox.DispatcherConfig{
		Subscriptions:     cfg.subs,
		Defaults:          cfg.defaults,
		Metrics:           metrics,
		Acker:             acker,
		Budget:            cdcCfg.Budget,
		SubscriptionBytes: cfg.MaxPendingBytesPerSubscription,
		Deliverer:         snd,
		Store:             store,
		Logger:            log.With().Str("component", "outbox").Logger(),
		Attempts:          attempts,
	}
	var rl *relayRun // relay mode: deliveries go to JetStream (relay.go)
	if cfg.relay != nil {
		if rl, err = startRelay(cfg, reg, store, log); err != nil {
			return err
		}
		defer rl.close()
		dcfg.Relay = rl.pub
		prober.MarksFloor = rl.oldestEvent
	}
	dispatcher := outbox.NewDispatcher(dcfg)
	conns := newConnMetrics(reg)
	var gatherer prometheus.Gatherer = reg
	if !cfg.subscriptionLabels {
		gatherer = withoutLabel{g: reg, label: "subscription", maxOf: map[string]bool{"walhook_oldest_pending_seconds": true}}
	}
	metricsHandler := promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{})
	mux := routes()
	if metricsLn == nil {
		mux.Handle("GET /metrics", metricsHandler)
	}
	mux.Handle("GET /readyz", readyz(stream, metrics, cfg.readyMaxLag, rl.health()))
	api.New(api.Config{
		AdminToken: cfg.AdminToken, AuthURL: cfg.AuthURL, Disabled: cfg.apiDisabled(),
		Store: store, Static: cfg.subs, Defaults: cfg.defaults, Guard: cfg.guard, Verifier: snd,
		RotationOverlap: cfg.overlap, Logger: log.With().Str("component", "api").Logger(),
		AuthTimeout: cfg.authTimeout, AuthCacheTTL: cfg.authCacheTTL, UnauthenticatedRate: cfg.unauthRate,
	}).Register(mux)
	if reason := cfg.apiDisabled(); reason != "" {
		log.Warn().Msg(reason)
	}
	if cfg.Console == nil || *cfg.Console {
		lag := console.NewRing(time.Hour)
		prober.OnSample = func(slot pgstore.SlotStats, lagSeconds float64) {
			lag.Add(console.Sample{At: time.Now(), LagBytes: slot.LagBytes, LagSeconds: lagSeconds})
		}
		console.New(console.Config{API: mux, AdminToken: cfg.AdminToken, Slot: cfg.Slot, Source: store, Lag: lag,
			Open:   cfg.AdminToken == "" && cfg.AuthURL == "" && cfg.apiDisabled() == "",
			Logger: log.With().Str("component", "console").Logger()}).Register(mux)
	}
	srv := newServer(cfg, jsonErrors(mux))
	servers := []*http.Server{srv}
	listeners := []net.Listener{limitListen(ln, cfg.maxConnections, conns, "listen")}
	if metricsLn != nil {
		mm := routes()
		mm.Handle("GET /metrics", metricsHandler)
		servers = append(servers, newServer(cfg, jsonErrors(mm)))
		listeners = append(listeners, limitListen(metricsLn, cfg.maxConnections, conns, "metrics_listen"))
	}

	// Shutdown in two steps: a signal (ctx) stops reading and new sends; the
	// sends in flight get shutdown_timeout to finish; then the rest stops and
	// the stream sends its final status update.
	runCtx, stopRun := context.WithCancel(context.WithoutCancel(ctx))
	defer stopRun()
	g, gctx := errgroup.WithContext(runCtx)
	g.Go(func() error { return stream.Run(gctx, changes) })
	g.Go(func() error { return dispatcher.Run(gctx, changes) })
	g.Go(func() error { return prober.Run(gctx) })
	if attemptLog != nil {
		g.Go(func() error { return attemptLog.Run(gctx) })
	}
	if rl != nil {
		rl.run(g, gctx)
	}
	for i, srv := range servers {
		g.Go(func() error {
			if err := srv.Serve(listeners[i]); !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("http: %w", err)
			}
			return nil
		})
	}
	g.Go(func() error {
		select {
		case <-ctx.Done():
			log.Info().Dur("shutdown_timeout", cfg.shutdown).Msg("stopping: finishing deliveries in flight")
			stream.Drain()
			deadline := time.After(cfg.shutdown)
			select {
			case <-dispatcher.Drained():
				rl.drained(deadline) // relay mode: what was handed on is acknowledged
			case <-deadline:
				log.Warn().Msg("shutdown_timeout: abandoning deliveries in flight (they are replayed at the next start)")
			case <-gctx.Done():
			}
		case <-gctx.Done():
		}
		stopRun()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		var errs []error
		for _, srv := range servers {
			errs = append(errs, srv.Shutdown(sctx))
		}
		return errors.Join(errs...)
	})
	started := log.Info().Str("listen", ln.Addr().String()).Int("subscriptions", len(cfg.subs))
	if metricsLn != nil {
		started = started.Str("metrics_listen", metricsLn.Addr().String())
	}
	started.Msg("walhook running")
	err = g.Wait()
	log.Info().Msg("walhook stopped")
	return err
}

// newSender is the Sender of walhook run and walhook deliver.
func newSender(cfg *Settings, log zerolog.Logger) *sender.Sender {
	return sender.New(cfg.guard, sender.Config{MaxInFlightPerHost: cfg.defaults.MaxInFlightPerHost,
		Transport: cfg.HTTPTransport, Logger: log.With().Str("component", "sender").Logger()})
}

// streamHold is the stream as the prober sees it.
type streamHold struct{ *cdc.Stream }

func (s streamHold) Holds() bool { h := s.Health(); return h == cdc.Streaming || h == cdc.Stalled }

// newAttemptLog returns the attempt log attempt_log asks for, or nil for
// none (off, or a database set up before it existed: say so, and go on).
func newAttemptLog(ctx context.Context, pool *pgxpool.Pool, cfg *Settings, reg prometheus.Registerer, log zerolog.Logger) *pgstore.AttemptLog {
	if cfg.attemptLog == pgstore.AttemptLogOff {
		return nil
	}
	var exists bool
	if err := pool.QueryRow(ctx, `SELECT to_regclass('walhook.attempts') IS NOT NULL`).Scan(&exists); err != nil || !exists {
		log.Warn().Msg("attempt_log: walhook.attempts does not exist (set up by an older walhook): run `walhook setup`; attempts are not logged until then")
		return nil
	}
	return pgstore.NewAttemptLog(pool, pgstore.AttemptLogConfig{Mode: cfg.attemptLog, Retention: cfg.attemptKeep,
		Logger: log.With().Str("component", "attempts").Logger(), Registerer: reg})
}

func connectPool(ctx context.Context, cfg *Settings) (*pgxpool.Pool, error) {
	return pgstore.Connect(ctx, cfg.DatabaseURL)
}

// checkControl refuses to run on an install whose publication does not carry
// walhook.control (set up by an older walhook): control changes come only from
// there, so subscription changes and replays would be missed. A missing
// publication is left to the stream, which explains a missing slot.
func checkControl(ctx context.Context, pool *pgxpool.Pool, cfg *Settings) error {
	var pub, control bool
	err := pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1),
		EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)`,
		cfg.Publication, cdc.ControlTable.Schema, cdc.ControlTable.Name).Scan(&pub, &control)
	if err != nil {
		return fmt.Errorf("read publication %q: %w", cfg.Publication, err)
	}
	if pub && !control {
		return fmt.Errorf("publication %q does not publish %s, which carries subscription changes and replays "+
			"since this version: run `walhook setup` (docs/security.md)", cfg.Publication, cdc.ControlTable)
	}
	return nil
}

func routes() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("content-type", "application/json")
		w.Write([]byte(`{"status":"ok"}` + "\n"))
	})
	return mux
}
