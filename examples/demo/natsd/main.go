// Command natsd is a single-node NATS server with JetStream, embedded
// (github.com/nats-io/nats-server/v2), for `make demo-relay` and the relay
// scenarios of `make bench`: no Docker, no download. It prints its client URL
// on stdout once it accepts connections, keeps its store in a temporary
// directory (or -store), and stops on SIGINT or SIGTERM, removing that
// directory. Not for production: run the official NATS chart there
// (deploy/nats/values.yaml).
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime/pprof"
	"strconv"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "client address (port 0: any free port)")
	store := flag.String("store", "", "JetStream store directory (default: a temporary one, removed on exit)")
	maxPayload := flag.Int("max-payload", 8<<20, "largest message in bytes (the server's default is 1 MiB)")
	flag.Parse()
	// NATSD_CPUPROFILE=file writes a CPU profile until natsd exits (for `go tool pprof`).
	if path := os.Getenv("NATSD_CPUPROFILE"); path != "" {
		if f, err := os.Create(path); err == nil {
			pprof.StartCPUProfile(f)
			defer pprof.StopCPUProfile()
		}
	}
	if err := run(*listen, *store, int32(*maxPayload)); err != nil {
		fmt.Fprintln(os.Stderr, "natsd:", err)
		os.Exit(1)
	}
	pprof.StopCPUProfile()
}

func run(listen, store string, maxPayload int32) error {
	host, portStr, err := net.SplitHostPort(listen)
	if err != nil {
		return fmt.Errorf("-listen %q: %w", listen, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return fmt.Errorf("-listen %q: port: %w", listen, err)
	}
	if port == 0 {
		port = server.RANDOM_PORT
	}
	if store == "" {
		if store, err = os.MkdirTemp("", "walhook-natsd-"); err != nil {
			return err
		}
		defer os.RemoveAll(store)
	}
	s, err := server.NewServer(&server.Options{
		ServerName: "natsd",
		Host:       host,
		Port:       port,
		JetStream:  true,
		StoreDir:   store,
		MaxPayload: maxPayload,
		NoLog:      true,
		NoSigs:     true,
	})
	if err != nil {
		return err
	}
	go s.Start()
	if !s.ReadyForConnections(30 * time.Second) {
		s.Shutdown()
		return fmt.Errorf("not ready within 30s")
	}
	fmt.Println(s.ClientURL())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	s.Shutdown()
	s.WaitForShutdown()
	return nil
}
