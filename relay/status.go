package relay

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
)

// Status is the relay as `walhook status` shows it.
type Status struct {
	Stream     string            `json:"stream"`
	Messages   uint64            `json:"messages"` // deliveries not yet finished by a worker
	Bytes      uint64            `json:"bytes"`
	Parked     uint64            `json:"parked"`  // events in the park stream, of resources whose endpoint kept failing
	Workers    []string          `json:"workers"` // members seen in the last lease TTL
	Partitions []PartitionStatus `json:"partitions"`
}

// PartitionStatus is one partition: its owner and backlog.
type PartitionStatus struct {
	Partition int    `json:"partition"`
	Owner     string `json:"owner"`    // "" when none holds the lease
	Messages  uint64 `json:"messages"` // in the stream: not yet finished
	Parked    uint64 `json:"parked"`   // in the park stream
}

// Inspect reads the stream and the leases.
func Inspect(ctx context.Context, js jetstream.JetStream, c Config) (*Status, error) {
	c = c.WithDefaults()
	s, err := js.Stream(ctx, c.Stream)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", c.Stream, err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(c.Stream+".p.*"))
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", c.Stream, err)
	}
	st := &Status{Stream: c.Stream, Bytes: info.State.Bytes, Workers: []string{}}
	for _, n := range info.State.Subjects { // the partitions': not the keep message
		st.Messages += n
	}
	owners := map[int]string{}
	if kv, err := js.KeyValue(ctx, c.bucket()); err == nil {
		keys, err := kv.ListKeys(ctx)
		if err != nil && !errors.Is(err, jetstream.ErrNoKeysFound) {
			return nil, fmt.Errorf("leases: %w", err)
		}
		if keys != nil {
			for k := range keys.Keys() {
				switch {
				case strings.HasPrefix(k, "m."):
					st.Workers = append(st.Workers, strings.TrimPrefix(k, "m."))
				case strings.HasPrefix(k, "p."):
					n, err := strconv.Atoi(strings.TrimPrefix(k, "p."))
					if e, gerr := kv.Get(ctx, k); err == nil && gerr == nil {
						owners[n] = string(e.Value())
					}
				}
			}
		}
	}
	slices.Sort(st.Workers)
	parked := map[int]uint64{}
	if ps, err := js.Stream(ctx, c.parked()); err == nil { // none until a worker started
		pinfo, err := ps.Info(ctx, jetstream.WithSubjectFilter(c.parked()+".*.k.*"))
		if err != nil {
			return nil, fmt.Errorf("stream %s: %w", c.parked(), err)
		}
		for subj, n := range pinfo.State.Subjects { // <parked>.<partition>.k.<hash>
			f := strings.Split(strings.TrimPrefix(subj, c.parked()+"."), ".")
			if p, err := strconv.Atoi(f[0]); err == nil {
				parked[p] += n
				st.Parked += n
			}
		}
	} else if !errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, fmt.Errorf("stream %s: %w", c.parked(), err)
	}
	for p := range c.Partitions {
		st.Partitions = append(st.Partitions, PartitionStatus{Partition: p, Owner: owners[p],
			Messages: info.State.Subjects[c.subject(p)], Parked: parked[p]})
	}
	return st, nil
}
