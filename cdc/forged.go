package cdc

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/walhook/walhook/outbox"
)

// forgedLogEvery is how often at most a forged message is logged; the counter
// counts every one.
const forgedLogEvery = time.Minute

// forgeries counts and logs the logical messages walhook ignores as forged:
// those with a control prefix (control changes come only from walhook.control),
// and with RejectEmit those with the walhook prefix. Owned by Run's goroutine.
type forgeries struct {
	log      zerolog.Logger
	total    *prometheus.CounterVec
	last     time.Time // of the last log line
	unlogged int       // forged messages since the last log line
}

func newForgeries(log zerolog.Logger) *forgeries {
	f := &forgeries{log: log, total: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "walhook_forged_messages_total",
		Help: "Logical messages with walhook's prefixes that walhook ignored as forged (any role can emit them), by prefix.",
	}, []string{"prefix"})}
	for _, p := range []string{MessagePrefix, SubscriptionPrefix, ReplayPrefix, RecoverPrefix} {
		f.total.WithLabelValues(p) // present at 0, so an alert can use increase()
	}
	return f
}

// note counts one forged message; the first is logged at once, then at most one
// line a minute with how many came since the last.
func (f *forgeries) note(prefix string, lsn outbox.LSN) {
	f.total.WithLabelValues(prefix).Inc()
	f.unlogged++
	now := time.Now()
	if !f.last.IsZero() && now.Sub(f.last) < forgedLogEvery {
		return
	}
	f.log.Error().Str("prefix", prefix).Stringer("lsn", lsn).Int("count", f.unlogged).
		Msg("forged logical messages ignored: a database role emitted walhook's prefixes (docs/security.md)")
	f.last, f.unlogged = now, 0
}
