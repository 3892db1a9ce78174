// Package natstest runs real NATS servers with JetStream in-process for tests:
// one node, or a cluster of nodes with routes on loopback. Each node keeps its
// store in a temp dir of its own and its client port across Restart, so a test
// can stop NATS and bring it back with its data. Everything waits on readiness
// with a deadline; nothing sleeps.
package natstest

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// readyWithin bounds every wait for a server (start, JetStream, a meta leader).
const readyWithin = 30 * time.Second

// Node is one nats-server.
type Node struct {
	mu   sync.Mutex
	srv  *server.Server
	opts server.Options
}

// Cluster is one node or several with routes between them.
type Cluster struct {
	Nodes []*Node
}

// Start runs a single JetStream node until the test ends.
func Start(t testing.TB) *Cluster { return StartCluster(t, 1) }

// StartCluster runs n JetStream nodes (n > 1: a cluster with routes on
// loopback) until the test ends, and waits until JetStream answers.
func StartCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	c, err := start(t.TempDir(), n)
	if err != nil {
		t.Fatalf("natstest: %v", err)
	}
	t.Cleanup(c.Stop)
	return c
}

func start(dir string, n int) (*Cluster, error) {
	clientPorts, err := freePorts(n)
	if err != nil {
		return nil, err
	}
	clusterPorts, err := freePorts(n)
	if err != nil {
		return nil, err
	}
	var routes []string
	for _, p := range clusterPorts {
		routes = append(routes, fmt.Sprintf("nats://127.0.0.1:%d", p))
	}
	c := &Cluster{}
	for i := range n {
		opts := server.Options{
			ServerName: fmt.Sprintf("n%d", i+1),
			Host:       "127.0.0.1",
			Port:       clientPorts[i],
			JetStream:  true,
			StoreDir:   fmt.Sprintf("%s/n%d", dir, i+1),
			MaxPayload: 8 << 20, // events up to a few MiB (the server's default is 1 MiB)
			NoLog:      true,
			NoSigs:     true,
		}
		if n > 1 {
			opts.Cluster = server.ClusterOpts{Name: "walhook", Host: "127.0.0.1", Port: clusterPorts[i]}
			opts.Routes = server.RoutesFromStr(strings.Join(routes, ","))
		}
		node := &Node{opts: opts}
		if err := node.start(); err != nil {
			c.Stop()
			return nil, err
		}
		c.Nodes = append(c.Nodes, node)
	}
	if err := c.WaitReady(); err != nil {
		c.Stop()
		return nil, err
	}
	return c, nil
}

// freePorts asks the kernel for n free loopback ports. They are free when
// returned; a clash with another process would show as a failed start.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func (n *Node) start() error {
	opts := n.opts
	s, err := server.NewServer(&opts)
	if err != nil {
		return fmt.Errorf("new server %s: %w", n.opts.ServerName, err)
	}
	go s.Start()
	if !s.ReadyForConnections(readyWithin) {
		s.Shutdown()
		return fmt.Errorf("server %s not ready within %s", n.opts.ServerName, readyWithin)
	}
	n.mu.Lock()
	n.srv = s
	n.mu.Unlock()
	running.Add(1)
	return nil
}

// running counts nodes of every cluster of the process that are up.
var running atomic.Int64

// URL is the node's client URL (the same across Restart).
func (n *Node) URL() string { return fmt.Sprintf("nats://127.0.0.1:%d", n.opts.Port) }

// Server is the running server, nil while stopped.
func (n *Node) Server() *server.Server {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.srv
}

// Shutdown stops the node (its store stays); Restart brings it back.
func (n *Node) Shutdown() {
	n.mu.Lock()
	s := n.srv
	n.srv = nil
	n.mu.Unlock()
	if s != nil {
		s.Shutdown()
		s.WaitForShutdown()
		if running.Add(-1) == 0 {
			waitServerGoroutines()
		}
	}
}

// waitServerGoroutines waits, once the last node of the process is down,
// until nats-server's own goroutines have exited (some, like a file store's
// state flusher, outlive Shutdown by a moment), for at most 10 s: a leak
// check at the end of a test run must not see them.
func waitServerGoroutines() {
	deadline := time.Now().Add(10 * time.Second)
	buf := make([]byte, 1<<20)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for time.Now().Before(deadline) {
		n := runtime.Stack(buf, true)
		if !bytes.Contains(buf[:n], []byte("nats-server/v2/server")) || running.Load() > 0 {
			return
		}
		<-tick.C
	}
}

// Restart starts a stopped node again, on its port, with its store.
func (n *Node) Restart() error {
	if n.Server() != nil {
		return errors.New("natstest: node is running")
	}
	return n.start()
}

// URL lists every node's client URL, comma-separated (a nats.go server list).
func (c *Cluster) URL() string {
	var urls []string
	for _, n := range c.Nodes {
		urls = append(urls, n.URL())
	}
	return strings.Join(urls, ",")
}

// Stop shuts every node down.
func (c *Cluster) Stop() {
	for _, n := range c.Nodes {
		n.Shutdown()
	}
}

// Shutdown stops node i (0-based).
func (c *Cluster) Shutdown(i int) { c.Nodes[i].Shutdown() }

// Restart starts every stopped node again and waits until JetStream answers.
func (c *Cluster) Restart() error {
	for _, n := range c.Nodes {
		if n.Server() == nil {
			if err := n.Restart(); err != nil {
				return err
			}
		}
	}
	return c.WaitReady()
}

// WaitReady waits until JetStream answers an account info request through a
// running node (in a cluster: a meta leader is elected).
func (c *Cluster) WaitReady() error {
	deadline := time.Now().Add(readyWithin)
	var last error
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for time.Now().Before(deadline) {
		if last = c.ping(); last == nil {
			return nil
		}
		<-tick.C // polling a condition under a deadline
	}
	return fmt.Errorf("jetstream not ready within %s: %w", readyWithin, last)
}

func (c *Cluster) ping() error {
	var urls []string
	for _, n := range c.Nodes {
		if n.Server() != nil {
			urls = append(urls, n.URL())
		}
	}
	if len(urls) == 0 {
		return errors.New("no node running")
	}
	nc, err := nats.Connect(strings.Join(urls, ","), nats.Timeout(time.Second), nats.NoReconnect())
	if err != nil {
		return err
	}
	defer nc.Close()
	msg, err := nc.Request("$JS.API.INFO", nil, time.Second)
	if err != nil {
		return err
	}
	if strings.Contains(string(msg.Data), `"error"`) {
		return fmt.Errorf("jetstream: %s", msg.Data)
	}
	return nil
}
