package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/walhook/walhook/internal/procstat"
	"github.com/walhook/walhook/relay"
)

// jetStreamFloor is relay latency's reference, against the same nats-server
// in the same run: a bare asynchronous publisher at eps messages/s over the
// partitions of a stream configured as the relay's (relay.EnsureStream), and
// two bare pull consumers sharing the partitions (one durable consumer each,
// its state in memory like the workers',
// Fetch of 256 with a 1 s wait, acknowledging each message at once). It
// reports publish → PubAck and publish → fetched, both on this process's
// clock.
func jetStreamFloor(run, eps, partitions int, d time.Duration) (map[string]any, error) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cfg := relay.Config{URL: natsURL, Stream: fmt.Sprintf("FLOOR%d", run), Partitions: partitions, Replicas: 1}.WithDefaults()
	connect := func(name string) (*nats.Conn, jetstream.JetStream, error) {
		nc, err := cfg.Connect(name)
		if err != nil {
			return nil, nil, err
		}
		js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(8192))
		if err != nil {
			nc.Close()
			return nil, nil, err
		}
		return nc, js, nil
	}
	pc, pjs, err := connect("floor publisher")
	if err != nil {
		return nil, err
	}
	defer pc.Close()
	if _, err := relay.EnsureStream(ctx, pjs, cfg); err != nil {
		return nil, err
	}
	defer pjs.DeleteStream(context.Background(), cfg.Stream)
	n := eps * int(d.Seconds())
	var mu sync.Mutex
	var fetched []float64
	var wg sync.WaitGroup
	for c := range 2 {
		cc, cjs, err := connect("floor consumer")
		if err != nil {
			return nil, err
		}
		defer cc.Close()
		for p := c; p < partitions; p += 2 {
			cons, err := cjs.CreateConsumer(ctx, cfg.Stream, jetstream.ConsumerConfig{Durable: "p" + strconv.Itoa(p),
				FilterSubject: cfg.Stream + ".p." + strconv.Itoa(p), AckPolicy: jetstream.AckExplicitPolicy, MaxAckPending: 10000, MemoryStorage: true})
			if err != nil {
				return nil, err
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				for ctx.Err() == nil {
					b, err := cons.Fetch(256, jetstream.FetchMaxWait(time.Second))
					if err != nil {
						continue
					}
					for m := range b.Messages() {
						at := time.Now()
						m.Ack()
						sent := int64(binary.BigEndian.Uint64(m.Data()))
						mu.Lock()
						fetched = append(fetched, float64(at.UnixNano()-sent)/1e6)
						mu.Unlock()
					}
				}
			}()
		}
	}
	acks := make(chan struct {
		at  time.Time
		fut jetstream.PubAckFuture
	}, n)
	var ackMs []float64
	ackDone := make(chan struct{})
	go func() {
		defer close(ackDone)
		for x := range acks {
			select {
			case <-x.fut.Ok():
				ackMs = append(ackMs, float64(time.Since(x.at).Microseconds())/1000)
			case <-x.fut.Err():
			}
		}
	}()
	cpu0 := procstat.CPUSeconds(natsPid)
	tick := time.NewTicker(time.Second / time.Duration(eps))
	payload := make([]byte, 200) // about a relay message's size
	for i := range n {
		<-tick.C
		at := time.Now()
		data := append([]byte(nil), payload...)
		binary.BigEndian.PutUint64(data, uint64(at.UnixNano()))
		fut, err := pjs.PublishMsgAsync(&nats.Msg{Subject: cfg.Stream + ".p." + strconv.Itoa(i%partitions), Data: data},
			jetstream.WithMsgID("floor-"+strconv.Itoa(i)))
		if err != nil {
			continue
		}
		acks <- struct {
			at  time.Time
			fut jetstream.PubAckFuture
		}{at, fut}
	}
	tick.Stop()
	close(acks)
	<-ackDone
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) { // poll interval
		mu.Lock()
		got := len(fetched)
		mu.Unlock()
		if got >= len(ackMs) {
			break
		}
	}
	natsCPU := (procstat.CPUSeconds(natsPid) - cpu0) * 100000 / float64(n)
	cancel()
	wg.Wait()
	q := func(xs []float64, p float64) float64 {
		if len(xs) == 0 {
			return -1
		}
		sort.Float64s(xs)
		return xs[min(len(xs)-1, int(p*float64(len(xs))))]
	}
	mu.Lock()
	defer mu.Unlock()
	return map[string]any{"ack_p50_ms": q(ackMs, .5), "ack_p99_ms": q(ackMs, .99), "fetched_p50_ms": q(fetched, .5),
		"fetched_p99_ms": q(fetched, .99), "fetched": len(fetched), "published": len(ackMs), "nats_cpu_per_100k": natsCPU}, nil
}
