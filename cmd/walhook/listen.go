package main

import (
	"bytes"
	"encoding/json"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// maxHeaderBytes caps a request's header block on the listen port (a JWT in
// Authorization fits many times over).
const maxHeaderBytes = 64 << 10

// newServer is the HTTP server of the listen port (and of metrics_listen):
// every phase of a connection has a deadline, so that slow or idle clients
// cannot hold connections (slowloris).
func newServer(cfg *Settings, h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: min(5*time.Second, cfg.readTimeout),
		ReadTimeout:       cfg.readTimeout,  // header and body
		WriteTimeout:      cfg.writeTimeout, // from the end of the header to the end of the answer
		IdleTimeout:       cfg.idleTimeout,  // between requests of a keep-alive connection
		MaxHeaderBytes:    maxHeaderBytes,
	}
}

// connMetrics count the listen port's connections.
type connMetrics struct {
	open    *prometheus.GaugeVec
	refused *prometheus.CounterVec
}

func newConnMetrics(reg prometheus.Registerer) *connMetrics {
	m := &connMetrics{
		open: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "walhook_http_connections",
			Help: "Open connections on the HTTP ports (listen, metrics_listen)."}, []string{"port"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "walhook_http_connections_refused_total",
			Help: "Connections closed at once because max_connections were open."}, []string{"port"}),
	}
	reg.MustRegister(m.open, m.refused)
	return m
}

// limitListener holds at most cap(sem) connections open; one over the limit is
// closed as soon as it is accepted, so that it neither waits in the backlog nor
// costs more than an accept.
type limitListener struct {
	net.Listener
	sem     chan struct{}
	open    prometheus.Gauge
	refused prometheus.Counter
}

func limitListen(ln net.Listener, n int, m *connMetrics, port string) net.Listener {
	return &limitListener{Listener: ln, sem: make(chan struct{}, n),
		open: m.open.WithLabelValues(port), refused: m.refused.WithLabelValues(port)}
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		select {
		case l.sem <- struct{}{}:
			l.open.Inc()
			return &limitConn{Conn: c, release: func() { <-l.sem; l.open.Dec() }}, nil
		default:
			l.refused.Inc()
			c.Close()
		}
	}
}

type limitConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// jsonErrors answers unknown routes and methods with JSON bodies, like the API's
// own errors (ServeMux writes text/plain).
func jsonErrors(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h, pattern := mux.Handler(r)
		if pattern != "" {
			mux.ServeHTTP(w, r)
			return
		}
		rec := &recorder{header: http.Header{}, status: http.StatusOK}
		h.ServeHTTP(rec, r)
		msg := "not found: " + r.URL.Path
		if rec.status == http.StatusMethodNotAllowed {
			msg = "method " + r.Method + " not allowed on " + r.URL.Path
			w.Header().Set("Allow", rec.header.Get("Allow"))
		} else if rec.status >= 300 && rec.status < 400 { // a redirect to the cleaned path
			w.Header().Set("Location", rec.header.Get("Location"))
			msg = "see " + rec.header.Get("Location")
		}
		w.Header().Set("content-type", "application/json")
		w.Header().Set("x-content-type-options", "nosniff")
		w.WriteHeader(rec.status)
		json.NewEncoder(w).Encode(map[string]string{"error": msg})
	})
}

// recorder keeps what ServeMux's own 404, 405 and redirect handlers write.
type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header         { return r.header }
func (r *recorder) WriteHeader(status int)      { r.status = status }
func (r *recorder) Write(b []byte) (int, error) { return r.body.Write(b) }

// withoutLabel gathers g with label removed: the series that differed only in
// it are merged (counters and gauges summed; gauges named in maxOf take the
// maximum). metrics_subscription_labels: false uses it for "subscription", so
// that /metrics does not list every tenant's subscription ids.
type withoutLabel struct {
	g     prometheus.Gatherer
	label string
	maxOf map[string]bool
}

func (w withoutLabel) Gather() ([]*dto.MetricFamily, error) {
	mfs, err := w.g.Gather()
	for _, mf := range mfs {
		merged := map[string]*dto.Metric{}
		var order []string
		for _, m := range mf.Metric {
			pairs := m.Label[:0:0]
			for _, lp := range m.Label {
				if lp.GetName() != w.label {
					pairs = append(pairs, lp)
				}
			}
			m.Label = pairs
			key := labelKey(pairs)
			into, ok := merged[key]
			if !ok {
				merged[key] = m
				order = append(order, key)
				continue
			}
			mergeInto(into, m, w.maxOf[mf.GetName()])
		}
		sort.Strings(order)
		mf.Metric = mf.Metric[:0]
		for _, k := range order {
			mf.Metric = append(mf.Metric, merged[k])
		}
	}
	return mfs, err
}

func labelKey(pairs []*dto.LabelPair) string {
	var b strings.Builder
	for _, lp := range pairs {
		b.WriteString(lp.GetName())
		b.WriteByte(0)
		b.WriteString(lp.GetValue())
		b.WriteByte(0)
	}
	return b.String()
}

func mergeInto(into, m *dto.Metric, useMax bool) {
	add := func(a, b float64) float64 {
		if useMax {
			return max(a, b)
		}
		return a + b
	}
	switch {
	case into.Counter != nil && m.Counter != nil:
		v := into.Counter.GetValue() + m.Counter.GetValue()
		into.Counter.Value = &v
	case into.Gauge != nil && m.Gauge != nil:
		v := add(into.Gauge.GetValue(), m.Gauge.GetValue())
		into.Gauge.Value = &v
	case into.Untyped != nil && m.Untyped != nil:
		v := add(into.Untyped.GetValue(), m.Untyped.GetValue())
		into.Untyped.Value = &v
	case into.Histogram != nil && m.Histogram != nil && len(into.Histogram.Bucket) == len(m.Histogram.Bucket):
		n, s := into.Histogram.GetSampleCount()+m.Histogram.GetSampleCount(), into.Histogram.GetSampleSum()+m.Histogram.GetSampleSum()
		into.Histogram.SampleCount, into.Histogram.SampleSum = &n, &s
		for i, b := range m.Histogram.Bucket {
			c := into.Histogram.Bucket[i].GetCumulativeCount() + b.GetCumulativeCount()
			into.Histogram.Bucket[i].CumulativeCount = &c
		}
	}
}
