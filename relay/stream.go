package relay

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// leaseTTL is how long a partition lease (and a worker's membership) lasts
// without renewal; renewals come every leaseRenew.
const (
	leaseTTL   = 5 * time.Second
	leaseRenew = time.Second
)

// EnsureStream creates the stream, or updates what may change of it
// (replicas, duplicate window). Work-queue retention: a message is gone once
// its partition's consumer acknowledged it.
func EnsureStream(ctx context.Context, js jetstream.JetStream, c Config) (jetstream.Stream, error) {
	cfg := jetstream.StreamConfig{
		Name:       c.Stream,
		Subjects:   []string{c.Stream + ".p.*"},
		Retention:  jetstream.WorkQueuePolicy,
		Storage:    jetstream.FileStorage,
		Replicas:   c.Replicas,
		Duplicates: c.Duplicates,
		Discard:    jetstream.DiscardNew,
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
		if have := s.CachedInfo().Config; have.Replicas != cfg.Replicas || have.Duplicates != cfg.Duplicates {
			s, err = js.UpdateStream(ctx, cfg)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("create stream %s: %w", c.Stream, err)
	}
	return s, nil
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
