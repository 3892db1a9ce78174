package relay

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// leaseTTL is how long a partition lease (and a worker's membership) lasts
// without renewal; renewals come every leaseRenew.
const (
	leaseTTL   = 5 * time.Second
	leaseRenew = time.Second
)

// partitionsKey is the stream's metadata key for its number of partitions.
const partitionsKey = "walhook_partitions"

// ErrPartitions: the stream was created with another number of partitions
// than this process is configured with. Not retried: the process stops.
var ErrPartitions = errors.New("relay: the stream has another number of partitions")

// EnsureStream creates the stream, or updates what may change of it
// (replicas, duplicate window, and the keep message's subject and rollups for
// a stream from before it). Work-queue retention: a message is gone once
// its partition's consumer acknowledged it. The number of partitions is
// written in the stream's metadata when it is created, and a process
// configured with another number is refused: a resource's messages would be
// published to one partition and consumed, or parked, under another.
func EnsureStream(ctx context.Context, js jetstream.JetStream, c Config) (jetstream.Stream, error) {
	parts := strconv.Itoa(c.Partitions)
	cfg := jetstream.StreamConfig{
		Name:        c.Stream,
		Subjects:    []string{c.Stream + ".p.*", c.keepSubject()},
		AllowRollup: true,
		Retention:   jetstream.WorkQueuePolicy,
		Storage:     jetstream.FileStorage,
		Replicas:    c.Replicas,
		Duplicates:  c.Duplicates,
		Discard:     jetstream.DiscardNew,
		Metadata:    map[string]string{partitionsKey: parts},
	}
	// Update only what differs: every process calls this at start, and an
	// update racing a consumer's creation is a data race inside nats-server
	// 2.15 (seen under -race).
	s, err := js.Stream(ctx, c.Stream)
	switch {
	case errors.Is(err, jetstream.ErrStreamNotFound):
		s, err = js.CreateStream(ctx, cfg)
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			s, err = js.Stream(ctx, c.Stream)
		}
	case err == nil:
		have := s.CachedInfo().Config
		if p, ok := have.Metadata[partitionsKey]; ok && p != parts {
			return nil, fmt.Errorf("%w: relay.partitions is %d, but stream %s was created with %s, and they are fixed for a stream's life (docs/scale-out.md)", ErrPartitions, c.Partitions, c.Stream, p)
		}
		if have.Replicas != cfg.Replicas || have.Duplicates != cfg.Duplicates || have.Metadata[partitionsKey] == "" ||
			!have.AllowRollup || !slices.Equal(have.Subjects, cfg.Subjects) { // before the keep message
			for k, v := range have.Metadata { // a stream from before the key, or the server's own keys
				if k != partitionsKey {
					cfg.Metadata[k] = v
				}
			}
			s, err = js.UpdateStream(ctx, cfg)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("create stream %s: %w", c.Stream, err)
	}
	return s, nil
}

// Deliveries is the number of deliveries the stream s of c holds: its
// messages but the publisher's keep message.
func Deliveries(ctx context.Context, s jetstream.Stream, c Config) (uint64, error) {
	keep := c.WithDefaults().keepSubject()
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(keep))
	if err != nil {
		return 0, fmt.Errorf("stream %s: %w", c.Stream, err)
	}
	return info.State.Msgs - min(info.State.Msgs, info.State.Subjects[keep]), nil
}

// ensureBucket creates the key-value bucket of leases and members.
func ensureBucket(ctx context.Context, js jetstream.JetStream, c Config) (jetstream.KeyValue, error) {
	kv, err := js.KeyValue(ctx, c.bucket())
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: c.bucket(), TTL: leaseTTL, History: 1,
			Replicas: c.Replicas, Storage: jetstream.FileStorage})
		if errors.Is(err, jetstream.ErrBucketExists) {
			kv, err = js.KeyValue(ctx, c.bucket())
		}
	}
	if err != nil {
		return nil, fmt.Errorf("lease bucket %s: %w", c.bucket(), err)
	}
	return kv, nil
}

// OldestEvent returns the sequence of the oldest event in the stream: the
// stream keeps only what no worker has finished, so no older event is still
// to be delivered (replayed dead letters and the copies a sidecar streaming
// again from the slot republishes aside; debounce marks do not apply to the
// former, and the slot's rule covers the latter). False when it is empty.
func OldestEvent(ctx context.Context, js jetstream.JetStream, c Config) (uint64, bool, error) {
	s, err := js.Stream(ctx, c.Stream)
	if err != nil {
		return 0, false, fmt.Errorf("stream %s: %w", c.Stream, err)
	}
	st := s.CachedInfo().State
	if st.Msgs == 0 {
		return 0, false, nil
	}
	// The first at or after FirstSeq: it may have been acknowledged since.
	raw, err := s.GetMsg(ctx, st.FirstSeq, jetstream.WithGetMsgSubject(c.Stream+".p.*"))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("stream %s: %w", c.Stream, err)
	}
	m, err := decodeMessage(raw.Data)
	if err != nil {
		return 0, false, fmt.Errorf("stream %s, message %d: %w", c.Stream, raw.Sequence, err)
	}
	return m.Event.Seq, true, nil
}
