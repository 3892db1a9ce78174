package sendertest

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Hostile is a target that misbehaves on purpose: it reads each request like a
// server would, then answers as its Behavior says (huge headers, an endless
// body, one byte at a time, nothing at all). It is a raw TCP listener, so it can
// send what net/http's server never would.
type Hostile struct {
	URL string // http://127.0.0.1:port/hooks

	ln      net.Listener
	behave  Behavior
	done    chan struct{} // closed by Close
	wg      sync.WaitGroup
	written atomic.Int64

	mu      sync.Mutex
	conns   map[net.Conn]bool
	ended   int           // connections that ended, by either side
	changed chan struct{} // closed and replaced when a connection ends
}

// Behavior answers one request on c. It writes through w, which counts the
// bytes, and returns when it is done or a write fails (the client went away).
// A Behavior that waits must also return when stop is closed.
type Behavior func(w io.Writer, c net.Conn, stop <-chan struct{})

// NewHostile starts a hostile target on loopback that stops when t ends.
func NewHostile(t testing.TB, b Behavior) *Hostile {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("sendertest: listen: %v", err)
	}
	h := &Hostile{URL: "http://" + ln.Addr().String() + "/hooks", ln: ln, behave: b,
		done: make(chan struct{}), conns: map[net.Conn]bool{}, changed: make(chan struct{})}
	h.wg.Go(h.accept)
	t.Cleanup(h.Close)
	return h
}

// Addr is the listener's host:port.
func (h *Hostile) Addr() string { return h.ln.Addr().String() }

// Written is how many response bytes the target has written so far, over all
// connections: what the client read, plus what socket buffers hold.
func (h *Hostile) Written() int64 { return h.written.Load() }

// Close stops the target and closes its connections.
func (h *Hostile) Close() {
	select {
	case <-h.done:
		return
	default:
	}
	close(h.done)
	h.ln.Close()
	h.mu.Lock()
	for c := range h.conns {
		c.Close()
	}
	h.mu.Unlock()
	h.wg.Wait()
}

// WaitEnded waits until n connections have ended (the client closed them, or
// the behavior finished), or fails t after timeout.
func (h *Hostile) WaitEnded(t testing.TB, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		h.mu.Lock()
		ended, changed := h.ended, h.changed
		h.mu.Unlock()
		if ended >= n {
			return
		}
		select {
		case <-changed:
		case <-deadline.C:
			t.Fatalf("sendertest: timed out after %s waiting for %d connections to end; %d did", timeout, n, ended)
		}
	}
}

func (h *Hostile) accept() {
	for {
		c, err := h.ln.Accept()
		if err != nil {
			return // closed
		}
		h.mu.Lock()
		h.conns[c] = true
		h.mu.Unlock()
		h.wg.Go(func() { h.serve(c) })
	}
}

func (h *Hostile) serve(c net.Conn) {
	defer func() {
		c.Close()
		h.mu.Lock()
		delete(h.conns, c)
		h.ended++
		close(h.changed)
		h.changed = make(chan struct{})
		h.mu.Unlock()
	}()
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil {
		return
	}
	if _, err := io.Copy(io.Discard, req.Body); err != nil {
		return
	}
	h.behave(countingWriter{c, &h.written}, c, h.done)
}

type countingWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (w countingWriter) Write(p []byte) (int, error) {
	n, err := w.w.Write(p)
	w.n.Add(int64(n))
	return n, err
}

// HugeHeader answers status with about size bytes of header lines, streamed in
// lines of 1 KiB, then an empty body. It stops when the client stops reading
// and closes the connection.
func HugeHeader(status int, size int64) Behavior {
	return func(w io.Writer, _ net.Conn, _ <-chan struct{}) {
		if _, err := fmt.Fprintf(w, "HTTP/1.1 %d %s\r\n", status, http.StatusText(status)); err != nil {
			return
		}
		line := []byte("X-Filler: " + strings.Repeat("a", 1024-len("X-Filler: \r\n")) + "\r\n")
		for n := int64(0); n < size; n += int64(len(line)) {
			if _, err := w.Write(line); err != nil {
				return
			}
		}
		io.WriteString(w, "Content-Length: 0\r\n\r\n")
	}
}

// LongBody answers status with a body of size bytes of 'x', announced by
// Content-Length; it stops when the client closes the connection.
func LongBody(status int, size int64) Behavior {
	return func(w io.Writer, _ net.Conn, _ <-chan struct{}) {
		if _, err := fmt.Fprintf(w, "HTTP/1.1 %d %s\r\nContent-Length: %d\r\n\r\n", status, http.StatusText(status), size); err != nil {
			return
		}
		writeFiller(w, size)
	}
}

// EndlessBody answers status with a chunked body that never ends; it stops when
// the client closes the connection.
func EndlessBody(status int) Behavior {
	return func(w io.Writer, _ net.Conn, _ <-chan struct{}) {
		if _, err := fmt.Fprintf(w, "HTTP/1.1 %d %s\r\nTransfer-Encoding: chunked\r\n\r\n", status, http.StatusText(status)); err != nil {
			return
		}
		chunk := []byte(strconv.FormatInt(16<<10, 16) + "\r\n" + strings.Repeat("x", 16<<10) + "\r\n")
		for {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	}
}

// Trickle writes response one byte every interval: a slow-loris answer. It
// stops when the client closes the connection or the target is closed.
func Trickle(response string, every time.Duration) Behavior {
	return func(w io.Writer, _ net.Conn, stop <-chan struct{}) {
		tick := time.NewTicker(every)
		defer tick.Stop()
		for i := 0; i < len(response); i++ {
			if _, err := w.Write([]byte{response[i]}); err != nil {
				return
			}
			select {
			case <-tick.C:
			case <-stop:
				return
			}
		}
	}
}

// Hang reads the request and never answers; it holds the connection until the
// client closes it or the target is closed.
func Hang() Behavior {
	return func(_ io.Writer, c net.Conn, _ <-chan struct{}) {
		io.Copy(io.Discard, c) // until the client hangs up, or Close closes c
	}
}

// Raw writes response as is, then waits for the client to close the
// connection (or the target to close).
func Raw(response string) Behavior {
	return func(w io.Writer, c net.Conn, stop <-chan struct{}) {
		if _, err := io.WriteString(w, response); err != nil {
			return
		}
		Hang()(w, c, stop)
	}
}

func writeFiller(w io.Writer, size int64) {
	buf := []byte(strings.Repeat("x", 32<<10))
	for size > 0 {
		n := min(size, int64(len(buf)))
		if _, err := w.Write(buf[:n]); err != nil {
			return
		}
		size -= n
	}
}
