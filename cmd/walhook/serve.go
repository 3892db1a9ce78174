package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"
	"github.com/walhook/walhook/api"
	"github.com/walhook/walhook/cdc"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/outbox/pgstore"
	"github.com/walhook/walhook/sender"
	"golang.org/x/sync/errgroup"
)

// serve is `walhook run`: stream → dispatcher → sender, plus the HTTP endpoint.
func serve(ctx context.Context, cfg *Config, log zerolog.Logger) error {
	pool, err := pgxpool.New(ctx, cfg.DatabaseURL)
	if err != nil {
		return fmt.Errorf("connect to database: %w", err)
	}
	defer pool.Close()
	if err := pool.Ping(ctx); err != nil {
		return fmt.Errorf("connect to database: %w", err)
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}

	snd := sender.New(cfg.guard)
	defer snd.Close()
	acker := outbox.NewAcker(0)
	changes := make(chan outbox.Change, 256)
	stream := cdc.NewStream(cfg.cdcConfig(), acker, log)
	store := pgstore.New(pool, cfg.Slot)
	dispatcher := outbox.NewDispatcher(outbox.DispatcherConfig{
		Subscriptions: cfg.subs,
		Defaults:      cfg.defaults,
		Acker:         acker,
		Deliverer:     snd,
		Store:         store,
		Logger:        log.With().Str("component", "outbox").Logger(),
	})
	mux := routes()
	api.New(api.Config{
		AdminToken: cfg.AdminToken, AuthURL: cfg.AuthURL, Disabled: cfg.apiDisabled(),
		Store: store, Static: cfg.subs, Defaults: cfg.defaults, Guard: cfg.guard, Verifier: snd,
		RotationOverlap: cfg.overlap, Logger: log.With().Str("component", "api").Logger(),
	}).Register(mux)
	if reason := cfg.apiDisabled(); reason != "" {
		log.Warn().Msg(reason)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}

	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return stream.Run(ctx, changes) })
	g.Go(func() error { return dispatcher.Run(ctx, changes) })
	g.Go(func() error {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("http: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		return srv.Shutdown(sctx)
	})
	log.Info().Str("listen", ln.Addr().String()).Int("subscriptions", len(cfg.subs)).Msg("walhook running")
	err = g.Wait()
	log.Info().Msg("walhook stopped")
	return err
}

func routes() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("content-type", "application/json")
		w.Write([]byte(`{"status":"ok"}` + "\n"))
	})
	return mux
}
