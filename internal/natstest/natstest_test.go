package natstest

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func publishOne(t *testing.T, url string, replicas int) {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{Name: "T", Subjects: []string{"t.>"}, Replicas: replicas}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, "t.1", []byte("x")); err != nil {
		t.Fatal(err)
	}
}

func TestSingleNodeRestartKeepsData(t *testing.T) {
	c := Start(t)
	publishOne(t, c.URL(), 1)
	c.Shutdown(0)
	if err := c.Restart(); err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(c.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, "T")
	if err != nil {
		t.Fatal(err)
	}
	if n := s.CachedInfo().State.Msgs; n != 1 {
		t.Fatalf("after restart the stream holds %d messages, want 1", n)
	}
}

func TestClusterSurvivesOneNode(t *testing.T) {
	c := StartCluster(t, 3)
	publishOne(t, c.URL(), 3)
	c.Shutdown(0)
	if err := c.WaitReady(); err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(c.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// R3 with one node down: a new leader takes publishes.
	for {
		_, err := js.Publish(ctx, "t.2", []byte("y"))
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("no publish accepted with two of three nodes: %v", err)
		}
	}
}
