package relay

import (
	"context"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
)

type publisherMetrics struct {
	published, duplicates, errors prometheus.Counter
	ackSeconds                    prometheus.Histogram
}

func newPublisherMetrics(reg prometheus.Registerer, p *Publisher) *publisherMetrics {
	m := &publisherMetrics{
		published: prometheus.NewCounter(prometheus.CounterOpts{Name: "walhook_relay_published_total",
			Help: "Deliveries JetStream acknowledged (duplicates included)."}),
		duplicates: prometheus.NewCounter(prometheus.CounterOpts{Name: "walhook_relay_duplicates_total",
			Help: "Publishes JetStream dropped as duplicates of a stored message id (republished after a restart)."}),
		errors: prometheus.NewCounter(prometheus.CounterOpts{Name: "walhook_relay_publish_errors_total",
			Help: "Failed publishes (each is published again, in order)."}),
		ackSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "walhook_relay_publish_ack_seconds",
			Help:    "From the first publish of a delivery to its acknowledgement.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1, 5, 30}}),
	}
	reg.MustRegister(m.published, m.duplicates, m.errors, m.ackSeconds,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "walhook_relay_pending_acks",
			Help: "Deliveries handed to the relay and not yet acknowledged by JetStream (they hold the slot's confirmed position)."},
			func() float64 { return float64(p.pending.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "walhook_relay_publish_lag_seconds",
			Help: "Age of the oldest publish JetStream has not acknowledged; 0 when none."},
			func() float64 {
				if o := p.oldest.Load(); o > 0 {
					return time.Since(time.Unix(0, o)).Seconds()
				}
				return 0
			}),
	)
	return m
}

// streamMetrics reports the stream's size, polled.
type streamMetrics struct {
	msgs, bytes, consumers prometheus.Gauge
}

func newStreamMetrics(reg prometheus.Registerer) *streamMetrics {
	m := &streamMetrics{
		msgs: prometheus.NewGauge(prometheus.GaugeOpts{Name: "walhook_relay_stream_messages",
			Help: "Messages in the relay stream: deliveries not yet finished by a worker."}),
		bytes: prometheus.NewGauge(prometheus.GaugeOpts{Name: "walhook_relay_stream_bytes",
			Help: "Bytes in the relay stream."}),
		consumers: prometheus.NewGauge(prometheus.GaugeOpts{Name: "walhook_relay_stream_consumers",
			Help: "Partition consumers of the relay stream."}),
	}
	reg.MustRegister(m.msgs, m.bytes, m.consumers)
	return m
}

// PollStream updates the stream gauges every interval until ctx ends; a
// failed poll leaves them as they were.
func PollStream(ctx context.Context, js jetstream.JetStream, c Config, reg prometheus.Registerer, every time.Duration) error {
	m := newStreamMetrics(reg)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		ictx, cancel := context.WithTimeout(ctx, every)
		if s, err := js.Stream(ictx, c.WithDefaults().Stream); err == nil {
			st := s.CachedInfo().State
			if n, err := Deliveries(ictx, s, c); err == nil {
				m.msgs.Set(float64(n))
			}
			m.bytes.Set(float64(st.Bytes))
			m.consumers.Set(float64(st.Consumers))
		}
		cancel()
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

type workerMetrics struct {
	redeliveries, finished, resets, takes, gaps prometheus.Counter
	parked, unparked, parkFenced                prometheus.Counter
	fetchDelay                                  prometheus.Histogram
}

func newWorkerMetrics(reg prometheus.Registerer, w *Worker) *workerMetrics {
	m := &workerMetrics{
		redeliveries: prometheus.NewCounter(prometheus.CounterOpts{Name: "walhook_relay_redeliveries_total",
			Help: "Messages JetStream delivered more than once (after a worker failover, a lost ack or AckWait)."}),
		finished: prometheus.NewCounter(prometheus.CounterOpts{Name: "walhook_relay_acked_total",
			Help: "Messages acknowledged: their event finished (delivered, dead-lettered or dropped)."}),
		resets: prometheus.NewCounter(prometheus.CounterOpts{Name: "walhook_relay_consumer_resets_total",
			Help: "Partition consumers reset to their unacknowledged messages (a partition taken, or an epoch restarted)."}),
		takes: prometheus.NewCounter(prometheus.CounterOpts{Name: "walhook_relay_partitions_taken_total",
			Help: "Partition leases this worker took."}),
	}
	m.gaps = prometheus.NewCounter(prometheus.CounterOpts{Name: "walhook_relay_delivery_gaps_total",
		Help: "Deliveries from JetStream that never arrived (a reconnect), or a partition consumer a restarted nats-server forgot: each restarts the worker's epoch."})
	m.fetchDelay = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "walhook_relay_fetch_delay_seconds",
		Help:    "From JetStream storing a message to this worker receiving it, first deliveries only (both clocks: the server's and the worker's).",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1, 5, 30}})
	m.parked = prometheus.NewCounter(prometheus.CounterOpts{Name: "walhook_relay_parked_total",
		Help: "Events this worker parked into the park stream (a resource failing for park_after)."})
	m.unparked = prometheus.NewCounter(prometheus.CounterOpts{Name: "walhook_relay_unparked_total",
		Help: "Parked events this worker finished (delivered or dead-lettered) and deleted."})
	m.parkFenced = prometheus.NewCounter(prometheus.CounterOpts{Name: "walhook_relay_park_fenced_total",
		Help: "Park publishes refused because a newer owner, or a newer epoch of this worker, marked the partition."})
	reg.MustRegister(m.parked, m.unparked, m.parkFenced,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "walhook_relay_parked_resources",
			Help: "Parked resources in the partitions this worker owns."},
			func() float64 { return float64(w.park.parkedResources()) }))
	reg.MustRegister(m.redeliveries, m.finished, m.resets, m.takes, m.gaps, m.fetchDelay,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "walhook_relay_partitions_owned",
			Help: "Partitions this worker owns (their leases)."},
			func() float64 { return float64(len(w.Owned())) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "walhook_relay_held_bytes",
			Help: "Bytes of messages this worker holds unfinished (bounded by max_pending_bytes)."},
			func() float64 { return float64(w.heldBytes.Load()) }),
	)
	return m
}
