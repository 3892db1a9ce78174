package outbox

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the core's Prometheus metrics. Labels are subscription ids only.
type Metrics struct {
	events      prometheus.Counter
	deliveries  *prometheus.CounterVec // subscription, outcome: delivered, dead_lettered, dropped, parked
	attempts    *prometheus.CounterVec // subscription, status_class: 2xx, 3xx, 4xx, 5xx, network
	latency     prometheus.Histogram   // commit → 2xx
	coalesced   *prometheus.CounterVec
	lagSeconds  prometheus.GaugeFunc
	pending     *prometheus.Desc
	bytes       *prometheus.Desc
	oldest      *prometheus.Desc
	parked      *prometheus.Desc
	dead        *prometheus.Desc
	acker       *Acker
	now         func() time.Time
	mu          sync.Mutex
	subs        map[string]*subStats
	parkedStats map[string]StoredStats // from the database, refreshed by a probe
}

type subStats struct {
	pending int64
	bytes   int64     // held in memory
	oldest  time.Time // commit time of the oldest in-memory event; zero when none
}

// StoredStats is what the database knows of a subscription.
type StoredStats struct {
	Parked       int64
	ParkedOldest time.Time // commit time of the oldest parked event
	Dead         int64
}

// NewMetrics registers the core's metrics on reg.
func NewMetrics(reg prometheus.Registerer, acker *Acker) *Metrics {
	m := &Metrics{
		events: prometheus.NewCounter(prometheus.CounterOpts{Name: "walhook_events_total",
			Help: "Events read from the replication stream."}),
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "walhook_deliveries_total",
			Help: "Events finished per subscription, by outcome (delivered, dead_lettered, dropped, parked)."},
			[]string{"subscription", "outcome"}),
		attempts: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "walhook_delivery_attempts_total",
			Help: "HTTP attempts per subscription, by status class (2xx, 3xx, 4xx, 5xx, network)."},
			[]string{"subscription", "status_class"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "walhook_delivery_latency_seconds",
			Help:    "Time from an event's commit to its 2xx.",
			Buckets: []float64{.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 3600}}),
		coalesced: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "walhook_coalesced_events_total",
			Help: "Events merged into a newer one by debounce."}, []string{"subscription"}),
		pending: prometheus.NewDesc("walhook_pending_events",
			"Events not yet delivered or dead-lettered (in memory and parked).", []string{"subscription"}, nil),
		bytes: prometheus.NewDesc("walhook_pending_bytes",
			"Bytes of events held in memory (max_pending_bytes_per_subscription bounds it).", []string{"subscription"}, nil),
		oldest: prometheus.NewDesc("walhook_oldest_pending_seconds",
			"Age of the oldest pending event's commit; 0 when none.", []string{"subscription"}, nil),
		parked: prometheus.NewDesc("walhook_parked_events",
			"Events in walhook.deliveries.", []string{"subscription"}, nil),
		dead: prometheus.NewDesc("walhook_dead_letters",
			"Rows in walhook.dead_letters.", []string{"subscription"}, nil),
		acker:       acker,
		now:         time.Now,
		subs:        map[string]*subStats{},
		parkedStats: map[string]StoredStats{},
	}
	m.lagSeconds = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "walhook_replication_lag_seconds",
		Help: "Age of the oldest unfinished event's commit (what holds the slot back); 0 when none."},
		func() float64 { return m.LagSeconds() })
	reg.MustRegister(m.events, m.deliveries, m.attempts, m.latency, m.coalesced, m.lagSeconds, m)
	return m
}

// LagSeconds is the age of the oldest unfinished event's commit.
func (m *Metrics) LagSeconds() float64 {
	if t := m.acker.Oldest(); !t.IsZero() {
		return max(m.now().Sub(t).Seconds(), 0)
	}
	return 0
}

// Describe implements prometheus.Collector for the per-subscription gauges.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- m.pending
	ch <- m.bytes
	ch <- m.oldest
	ch <- m.parked
	ch <- m.dead
}

// Collect implements prometheus.Collector.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	for id, s := range m.Snapshot() {
		ch <- prometheus.MustNewConstMetric(m.pending, prometheus.GaugeValue, float64(s.Pending), id)
		ch <- prometheus.MustNewConstMetric(m.bytes, prometheus.GaugeValue, float64(s.PendingBytes), id)
		ch <- prometheus.MustNewConstMetric(m.oldest, prometheus.GaugeValue, s.OldestPendingSeconds, id)
		ch <- prometheus.MustNewConstMetric(m.parked, prometheus.GaugeValue, float64(s.Parked), id)
		ch <- prometheus.MustNewConstMetric(m.dead, prometheus.GaugeValue, float64(s.Dead), id)
	}
}

// SubscriptionReport is one subscription's state, for metrics and status.
type SubscriptionReport struct {
	Pending              int64   `json:"pending"`
	PendingBytes         int64   `json:"pending_bytes"` // in memory
	OldestPendingSeconds float64 `json:"oldest_pending_seconds"`
	Parked               int64   `json:"parked"`
	Dead                 int64   `json:"dead_letters"`
}

// Snapshot reports every known subscription.
func (m *Metrics) Snapshot() map[string]SubscriptionReport {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.now()
	out := map[string]SubscriptionReport{}
	for id, s := range m.subs {
		st := m.parkedStats[id]
		r := SubscriptionReport{Pending: s.pending + st.Parked, PendingBytes: s.bytes, Parked: st.Parked, Dead: st.Dead}
		oldest := s.oldest
		if !st.ParkedOldest.IsZero() && (oldest.IsZero() || st.ParkedOldest.Before(oldest)) {
			oldest = st.ParkedOldest
		}
		if !oldest.IsZero() {
			r.OldestPendingSeconds = max(now.Sub(oldest).Seconds(), 0)
		}
		out[id] = r
	}
	return out
}

// SetStored records what the database knows (parked and dead counts).
func (m *Metrics) SetStored(stats map[string]StoredStats) {
	m.mu.Lock()
	m.parkedStats = stats
	m.mu.Unlock()
}

func (m *Metrics) setPending(sub string, pending, bytes int64, oldest time.Time) {
	m.mu.Lock()
	if s := m.subs[sub]; s != nil {
		s.pending, s.bytes, s.oldest = pending, bytes, oldest
	}
	m.mu.Unlock()
}

func (m *Metrics) addSubscription(sub string) {
	m.mu.Lock()
	if m.subs[sub] == nil {
		m.subs[sub] = &subStats{}
	}
	m.mu.Unlock()
}

// removeSubscription drops a subscription's series: labels stay bounded.
func (m *Metrics) removeSubscription(sub string) {
	m.mu.Lock()
	delete(m.subs, sub)
	m.mu.Unlock()
	m.deliveries.DeletePartialMatch(prometheus.Labels{"subscription": sub})
	m.attempts.DeletePartialMatch(prometheus.Labels{"subscription": sub})
	m.coalesced.DeleteLabelValues(sub)
}

// known makes a subscription's labelled counters exist at zero, so that
// rate() and absence alerts see them before their first increment.
func (m *Metrics) known(sub string) {
	for _, outcome := range []string{"delivered", "dead_lettered", "dropped", "parked"} {
		m.deliveries.WithLabelValues(sub, outcome)
	}
	for _, class := range []string{"2xx", "3xx", "4xx", "5xx", "network"} {
		m.attempts.WithLabelValues(sub, class)
	}
	m.coalesced.WithLabelValues(sub)
}

func (m *Metrics) attempt(sub string, err error) {
	class := attemptClass(err)
	if class == "timeout" {
		class = "network"
	}
	m.attempts.WithLabelValues(sub, class).Inc()
}

func (m *Metrics) finished(sub, outcome string, events []Event) {
	m.deliveries.WithLabelValues(sub, outcome).Add(float64(len(events)))
	if outcome == "delivered" {
		now := m.now()
		for i := range events {
			if !events[i].CommitTime.IsZero() {
				m.latency.Observe(max(now.Sub(events[i].CommitTime).Seconds(), 0))
			}
		}
	}
}
