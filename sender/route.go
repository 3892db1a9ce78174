package sender

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"sync"
	"time"

	"github.com/walhook/walhook/outbox"
)

// A route is how the requests of subscriptions that share a proxy_url and
// TLS settings leave: its own transports (so connections made with one
// client certificate or through one proxy never carry another
// subscription's requests). Subscriptions with neither use the Sender's two
// shared transports, as before routes existed.
//
// A route with TLS files checks them at most once per tlsCheckEvery; when
// one has changed (cert-manager rotating a certificate) it reads them again
// and later connections use the new ones; kept-alive connections finish
// with the old. Files that cannot be read keep the last good settings (and
// are tried again at the next check); without any, requests fail (retried).
type route struct {
	key routeKey

	mu      sync.Mutex
	t       *transport
	stamps  [3]fileStamp // cert, key, ca as last read
	checked time.Time
	err     error // why the files could not be read at the last check; nil when they could
}

type routeKey struct {
	static bool
	proxy  string
	tls    outbox.TLSOptions
}

const (
	tlsCheckEvery = time.Second
	maxTLSFile    = 1 << 20 // PEM files are read this far
)

type fileStamp struct {
	mod  time.Time
	size int64
	ok   bool
}

func stamp(name string) fileStamp {
	if name == "" {
		return fileStamp{}
	}
	fi, err := os.Stat(name)
	if err != nil {
		return fileStamp{}
	}
	return fileStamp{mod: fi.ModTime(), size: fi.Size(), ok: true}
}

// transportFor returns the transport of sub's route.
func (s *Sender) transportFor(sub *outbox.Subscription) (*transport, error) {
	d := &sub.Delivery
	if d.ProxyURL == "" && d.TLS.IsZero() {
		if sub.Static {
			return s.trusted, nil
		}
		return s.guarded, nil
	}
	key := routeKey{static: sub.Static, proxy: d.ProxyURL, tls: d.TLS}
	s.mu.Lock()
	r := s.routes[key]
	if r == nil {
		if s.routes == nil {
			s.routes = map[routeKey]*route{}
		}
		r = &route{key: key}
		s.routes[key] = r
	}
	s.mu.Unlock()
	return r.transport(s)
}

func (r *route) transport(s *Sender) (*transport, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	if r.t != nil && (r.key.tls.IsZero() || now.Sub(r.checked) < tlsCheckEvery) {
		return r.t, nil
	}
	if r.t == nil && r.err != nil && now.Sub(r.checked) < tlsCheckEvery { // no good files yet
		return nil, r.err
	}
	r.checked = now
	o := r.key.tls
	stamps := [3]fileStamp{stamp(o.ClientCertFile), stamp(o.ClientKeyFile), stamp(o.CAFile)}
	if r.t != nil && stamps == r.stamps {
		return r.t, nil
	}
	cfg, err := LoadTLS(o)
	if err != nil {
		if r.err == nil || r.err.Error() != err.Error() { // once per distinct failure
			s.log.Error().Err(err).Bool("keeping_last_good", r.t != nil).Msg("tls files cannot be read")
		}
		r.err = err
		if r.t != nil {
			return r.t, nil // keep the last good files; tried again at the next check
		}
		return nil, err
	}
	old := r.t
	r.t, r.stamps = s.newTransports(r.key.static, r.key.proxy, cfg), stamps
	if old != nil {
		old.CloseIdleConnections() // in-flight requests finish on their connections
		s.log.Info().Str("client_cert_file", o.ClientCertFile).Str("ca_file", o.CAFile).Msg("tls files read again")
	} else if r.err != nil {
		s.log.Info().Str("client_cert_file", o.ClientCertFile).Str("ca_file", o.CAFile).Msg("tls files readable again")
	}
	r.err = nil
	return r.t, nil
}

// newTransports builds a transport for static (any target) or dynamic
// (guarded) subscriptions, through proxy ("": the environment's) with cfg
// (nil: the system's roots).
func (s *Sender) newTransports(static bool, proxy string, cfg *tls.Config) *transport {
	proxyFunc := s.proxyEnv
	if proxy != "" {
		u, err := url.Parse(proxy) // checked by outbox.Options.Resolve
		if err != nil {
			proxyFunc = func(*http.Request) (*url.URL, error) { return nil, errors.New("proxy_url: not a URL") }
		} else {
			proxyFunc = http.ProxyURL(u) // NO_PROXY does not apply: the subscription asked for it
		}
	}
	if static {
		t := newTransport(s.dialer.DialContext, proxyFunc, cfg)
		t.stdlib = s.stdlib
		return t
	}
	t := newTransport(s.guard.DialContext(s.dialer), proxyFunc, cfg)
	t.stdlib = s.stdlib
	t.pinned = newPinnedProxy(s.guard.Pin, proxyFunc, s.dialer.DialContext, cfg)
	t.fallback.(*http.Transport).Proxy = nil // proxied requests all go to pinned
	return t
}

// LoadTLS reads o's files into a client TLS configuration: TLS 1.2 at
// least, the client certificate, the CAs instead of the system's roots, the
// server name to verify and send instead of the target's host. Errors name
// the key, never a key's bytes.
func LoadTLS(o outbox.TLSOptions) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: o.ServerName}
	if o.ClientCertFile != "" || o.ClientKeyFile != "" {
		certPEM, err := readPEM("tls.client_cert_file", o.ClientCertFile)
		if err != nil {
			return nil, err
		}
		keyPEM, err := readPEM("tls.client_key_file", o.ClientKeyFile)
		if err != nil {
			return nil, err
		}
		cert, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return nil, fmt.Errorf("tls.client_cert_file, tls.client_key_file: not a certificate and its key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	if o.CAFile != "" {
		caPEM, err := readPEM("tls.ca_file", o.CAFile)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(caPEM) {
			return nil, fmt.Errorf("tls.ca_file: %s holds no PEM certificate", o.CAFile)
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}

func readPEM(key, name string) ([]byte, error) {
	if name == "" {
		return nil, fmt.Errorf("%s: required", key)
	}
	f, err := os.Open(name)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxTLSFile+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	if len(b) > maxTLSFile {
		return nil, fmt.Errorf("%s: %s is larger than 1 MiB", key, name)
	}
	return b, nil
}

func (s *Sender) closeRoutes() {
	s.mu.Lock()
	routes := make([]*route, 0, len(s.routes))
	for _, r := range s.routes {
		routes = append(routes, r)
	}
	s.mu.Unlock()
	for _, r := range routes {
		r.mu.Lock()
		if r.t != nil {
			r.t.CloseIdleConnections()
		}
		r.mu.Unlock()
	}
}
