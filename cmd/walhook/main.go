// Command walhook turns outbox rows into webhook deliveries. This package only
// wires: it reads flags, env and files, and runs the parts under one errgroup.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/walhook/walhook/sender"
)

func main() {
	// WALHOOK_CPUPROFILE=file writes a CPU profile until walhook exits (for `go tool pprof`).
	if path := os.Getenv("WALHOOK_CPUPROFILE"); path != "" {
		if f, err := os.Create(path); err == nil {
			pprof.StartCPUProfile(f)
			defer pprof.StopCPUProfile()
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	pprof.StopCPUProfile()
	os.Exit(code)
}

const usage = `walhook turns rows written to an outbox table into signed webhooks.

Usage:
  walhook setup    [--config FILE] [--dry-run]      create or upgrade schema, outbox, emit(), control, publication, slot
  walhook run      [--config FILE] [--log-format F] stream the slot and deliver hooks (with relay: publish them to NATS)
  walhook deliver  [--config FILE] [--log-format F] relay mode: a worker that delivers hooks from NATS JetStream
  walhook teardown [--config FILE] [--drop-schema]  drop the slot and publication (and the schema)
  walhook recover  [--config FILE] [--since D]       after a slot loss: recreate it, redeliver outbox rows above the mark
  walhook status   [--config FILE] [--json]          slot, lag, retained WAL, per subscription backlog (from the database)
  walhook subscriptions list [--tenant T]           API subscriptions in the database, and the config's
  walhook subscriptions add --event E --target-url URL [--tenant T] [--secret S]
  walhook subscriptions rm ID
  walhook dlq list|replay|purge [--subscription S] [--since T] [--until T] [--id N] [--all] [--json]
  walhook attempts [--subscription S | --event-id E] [--status failed|succeeded|CODE] [--since T] [--until T] [--cursor C] [--json]
  walhook healthcheck [--addr HOST:PORT]            exit 0 when /healthz answers (container HEALTHCHECK)
  walhook version

The config file may also be given as WALHOOK_CONFIG; top-level keys as
WALHOOK_<KEY> (for example WALHOOK_DATABASE_URL).
`

// Exit codes.
const (
	exitOK     = 0
	exitFail   = 1 // a runtime failure
	exitConfig = 2 // bad usage or config
)

// run is walhook without the process: tests call it with their own args, env and
// writers.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitConfig
	}
	cmd, args := args[0], args[1:]
	switch cmd {
	case "version", "--version":
		fmt.Fprintln(stdout, "walhook", sender.Version)
		return exitOK
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return exitOK
	}
	var f cliFlags
	if (cmd == "subscriptions" || cmd == "dlq") && len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		f.subs.verb, f.dlq.verb, args = args[0], args[0], args[1:]
	}
	fs := newFlagSet(cmd, getenv, &f)
	if fs == nil {
		fmt.Fprintf(stderr, "walhook: unknown command %q\n\n%s", cmd, usage)
		return exitConfig
	}
	fs.SetOutput(stderr)
	if cmd == "healthcheck" {
		if err := fs.Parse(args); err != nil {
			return exitConfig
		}
		return healthcheck(ctx, f.addr, stderr)
	}
	// Flags may come before or after positional arguments.
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return exitConfig
		}
		if fs.NArg() == 0 {
			break
		}
		positional, args = append(positional, fs.Arg(0)), fs.Args()[1:]
	}
	if len(positional) > 0 && !(cmd == "subscriptions" && f.subs.verb == "rm") {
		fmt.Fprintf(stderr, "walhook %s: unexpected argument %q\n", cmd, positional[0])
		return exitConfig
	}
	if f.logFormat != "json" && f.logFormat != "console" {
		fmt.Fprintf(stderr, "walhook: --log-format: %q must be json or console\n", f.logFormat)
		return exitConfig
	}

	file, err := loadConfig(f.config, getenv)
	if err != nil {
		fmt.Fprintln(stderr, "walhook:", err)
		return exitConfig
	}
	redact := newRedactor(file.secrets())
	stderr = redact.writer(stderr)
	cfg, err := file.Resolve(cmd == "run" || cmd == "deliver" || cmd == "subscriptions" || cmd == "status")
	if err != nil {
		fmt.Fprintf(stderr, "walhook: invalid config:\n  %s\n", strings.ReplaceAll(err.Error(), "\n", "\n  "))
		return exitConfig
	}
	log := newLogger(stderr, f.logFormat, cfg.LogLevel)

	switch cmd {
	case "setup":
		err = setup(ctx, cfg, f.dryRun, stdout)
	case "teardown":
		err = teardown(ctx, cfg, f.dropSchema, stdout)
	case "run":
		err = serve(ctx, cfg, log)
	case "deliver":
		err = deliver(ctx, cfg, log)
	case "status":
		err = status(ctx, cfg, f.asJSON, stdout)
	case "recover":
		err = recoverSlot(ctx, cfg, f.since, stdout)
	case "dlq":
		err = dlqCommand(ctx, cfg, f.dlq, stdout)
	case "attempts":
		err = attemptsCommand(ctx, cfg, f.attempts, stdout)
	case "subscriptions":
		f.subs.args = positional
		err = subscriptionsCommand(ctx, cfg, f.subs, stdout)
	}
	var usage usageErr
	if errors.As(err, &usage) {
		fmt.Fprintf(stderr, "walhook: %v\n", err)
		return exitConfig
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintf(stderr, "walhook %s: %v\n", cmd, err)
		return exitFail
	}
	return exitOK
}

// cliFlags are every command's flags.
type cliFlags struct {
	config, logFormat          string
	dryRun, dropSchema, asJSON bool
	addr                       string
	subs                       subscriptionFlags
	dlq                        dlqFlags
	attempts                   attemptFlags
	since                      time.Duration
}

// newFlagSet defines cmd's flags into f; nil for an unknown command.
func newFlagSet(cmd string, getenv func(string) string, f *cliFlags) *flag.FlagSet {
	fs := flag.NewFlagSet("walhook "+cmd, flag.ContinueOnError)
	if cmd == "healthcheck" {
		addr := getenv("WALHOOK_LISTEN")
		if addr == "" {
			addr = listenDefault
		}
		fs.StringVar(&f.addr, "addr", addr, "address walhook listens on (env WALHOOK_LISTEN)")
		return fs
	}
	fs.StringVar(&f.config, "config", getenv("WALHOOK_CONFIG"), "config file (env WALHOOK_CONFIG)")
	fs.StringVar(&f.logFormat, "log-format", "json", "log format: json or console")
	switch cmd {
	case "setup":
		fs.BoolVar(&f.dryRun, "dry-run", false, "print the SQL instead of running it")
	case "teardown":
		fs.BoolVar(&f.dropSchema, "drop-schema", false, "also drop the walhook schema, with the outbox table if it is walhook.outbox")
	case "run", "deliver":
	case "status":
		fs.BoolVar(&f.asJSON, "json", false, "print JSON")
	case "recover":
		fs.DurationVar(&f.since, "since", 0, "also redeliver rows created this long ago or later (default: from 10m before the high-water mark)")
	case "subscriptions":
		f.subs.register(fs)
	case "dlq":
		f.dlq.register(fs)
	case "attempts":
		f.attempts.register(fs)
	default:
		return nil
	}
	return fs
}

// healthcheck GETs /healthz, for container HEALTHCHECKs (images without curl).
func healthcheck(ctx context.Context, addr string, stderr io.Writer) int {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		fmt.Fprintf(stderr, "walhook healthcheck: --addr %q: %v\n", addr, err)
		return exitConfig
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+net.JoinHostPort(host, port)+"/healthz", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintf(stderr, "walhook healthcheck: %v\n", err)
		return exitFail
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "walhook healthcheck: /healthz answered %d\n", resp.StatusCode)
		return exitFail
	}
	return exitOK
}

// Durations in logs are seconds (zerolog's default is milliseconds without
// saying so): "retry_in":1.5 is a second and a half.
func init() { zerolog.DurationFieldUnit = time.Second }

func newLogger(w io.Writer, format, level string) zerolog.Logger {
	if format == "console" {
		w = zerolog.ConsoleWriter{Out: w}
	}
	lvl, _ := zerolog.ParseLevel(level)
	return zerolog.New(w).Level(lvl).With().Timestamp().Logger()
}

// redactor removes secrets from everything written through it: logs and errors
// can carry a DSN or a header by accident, the output boundary catches them.
type redactor struct{ r *strings.Replacer }

func newRedactor(secrets []string) redactor {
	var pairs []string
	for _, s := range secrets {
		if s != "" {
			pairs = append(pairs, s, "[REDACTED]")
		}
	}
	if len(pairs) == 0 {
		return redactor{}
	}
	return redactor{strings.NewReplacer(pairs...)}
}

func (r redactor) writer(w io.Writer) io.Writer {
	if r.r == nil {
		return w
	}
	return redactWriter{w: w, r: r.r}
}

type redactWriter struct {
	w io.Writer
	r *strings.Replacer
}

func (rw redactWriter) Write(p []byte) (int, error) {
	if _, err := rw.r.WriteString(rw.w, string(p)); err != nil {
		return 0, err
	}
	return len(p), nil
}
