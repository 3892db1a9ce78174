package main

import (
	"context"
	"encoding/json"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/walhook/walhook/internal/natstest"
	"github.com/walhook/walhook/outbox/pgstore"
	"github.com/walhook/walhook/relay"
	"github.com/walhook/walhook/sender/sendertest"
)

// Parking in relay mode (docs/scale-out.md, "Parking in relay mode").

// failingResources is an endpoint that answers 503 for r0 and r1 while down
// is set, and 204 otherwise.
func failingResources(t *testing.T) (*sendertest.Server, *atomic.Bool) {
	down := &atomic.Bool{}
	down.Store(true)
	srv := sendertest.NewServer(t, func(_ int, r *sendertest.Request) (int, http.Header) {
		b := string(r.Body)
		if down.Load() && (strings.Contains(b, `"resource_id":"r0"`) || strings.Contains(b, `"resource_id":"r1"`)) {
			return http.StatusServiceUnavailable, nil
		}
		return http.StatusNoContent, nil
	})
	return srv, down
}

// resourceN is an event's resource and payload n.
func resourceN(t *testing.T, r sendertest.Request) (string, int) {
	env := decode(t, r.Body)
	var p struct{ N int }
	json.Unmarshal(env.Data, &p)
	return deref(env.ResourceID), p.N
}

// deliveredOnce fails t unless every one of want events was accepted
// exactly once, and per resource in n order.
func deliveredOnce(t *testing.T, reqs []sendertest.Request, want int) {
	t.Helper()
	ok := sendertest.Delivered(reqs)
	n, dups := checkRelayed(t, ok)
	if n != want || dups != 0 {
		t.Errorf("%d events accepted (%d duplicates), want %d once each", n, dups, want)
	}
}

// streamMessages is how many messages the test's relay stream holds.
func streamMessages(t *testing.T, url, stream string) uint64 {
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return 1 << 62
	}
	n, err := relay.Deliveries(ctx, s, relay.Config{Stream: stream})
	if err != nil {
		return 1 << 62
	}
	return n
}

// TestRelayParksFailingResources: two resources' endpoint fails for longer
// than park_after while three others of the same (only) partition keep
// flowing; the failing ones leave the worker and the stream for the park
// stream, newer events of theirs go behind them, and once the endpoint
// answers everything is accepted once, in order per resource.
func TestRelayParksFailingResources(t *testing.T) {
	t.Parallel()
	nc := natstest.Start(t)
	srv, down := failingResources(t)
	relay := strings.Replace(relayYAML(t, nc.URL()), "partitions: 8", "partitions: 1", 1)
	stream := strings.Fields(relay[strings.Index(relay, "stream:"):])[1]
	e := newEnv(t, relay+"defaults: {park_after: 1s, retry_initial: 100ms, retry_max_interval: 500ms}\nsubscriptions:\n"+
		sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	_, workerLog := startSidecarAndWorker(t, e.path, e.path)
	const resources = 5
	e.insertEvents(0, 100, resources)
	e.eventually(60*time.Second, "r0 and r1 parked", func() bool { return countLines(workerLog, `"parked: the endpoint`) >= 1 })
	// More events while they are parked: the others flow, r0's and r1's
	// are parked behind their older ones, and none waits in the stream.
	e.insertEvents(100, 100, resources)
	srv.Wait(t, 60*time.Second, "the other resources' events", func(r []sendertest.Request) bool {
		return len(sendertest.Delivered(r)) == 120
	})
	e.eventually(30*time.Second, "the relay stream to hold nothing", func() bool { return streamMessages(t, nc.URL(), stream) == 0 })
	// walhook status shows them parked: 80 events of r0 and r1, in partition 0.
	code, stdout, stderr := e.walhook("status", "--json")
	var st struct {
		Relay struct {
			Parked     uint64 `json:"parked"`
			Partitions []struct {
				Parked uint64 `json:"parked"`
			} `json:"partitions"`
		} `json:"relay"`
	}
	if err := json.Unmarshal([]byte(stdout), &st); err != nil || code != 0 {
		t.Fatalf("walhook status --json: exit %d, %v\n%s%s", code, err, stdout, stderr)
	}
	if st.Relay.Parked != 80 || len(st.Relay.Partitions) != 1 || st.Relay.Partitions[0].Parked != 80 {
		t.Fatalf("walhook status: relay %+v, want 80 parked events in partition 0", st.Relay)
	}
	for _, r := range sendertest.Delivered(srv.Requests()) {
		if res, _ := resourceN(t, r); res == "r0" || res == "r1" {
			t.Fatalf("%s delivered while its endpoint was down", res)
		}
	}
	down.Store(false)
	reqs := srv.Wait(t, 60*time.Second, "every event", func(r []sendertest.Request) bool {
		return len(sendertest.Delivered(r)) >= 200
	})
	deliveredOnce(t, reqs, 200)
	e.waitCaughtUp()
}

// TestRelayParkedSurviveWorkerKill9: the owner of the only partition is
// killed while resources are parked; the next owner loads the parked
// resources before it consumes the partition, so newer events of theirs go
// behind the parked ones, and once the endpoint answers every event is
// accepted in order per resource.
func TestRelayParkedSurviveWorkerKill9(t *testing.T) {
	t.Parallel()
	nc := natstest.Start(t)
	srv, down := failingResources(t)
	relay := strings.Replace(relayYAML(t, nc.URL()), "partitions: 8", "partitions: 1", 1)
	e := newEnv(t, relay+"defaults: {park_after: 1s, retry_initial: 100ms, retry_max_interval: 500ms}\nsubscriptions:\n"+
		sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	var sidecarLog, w1Log, w2Log syncBuffer
	startReplica(t, e.path, &sidecarLog)
	w1 := startWorker(t, e.path, &w1Log)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("sidecar:\n%s\nworker 1:\n%s\nworker 2:\n%s", sidecarLog.String(), w1Log.String(), w2Log.String())
		}
	})
	e.eventually(30*time.Second, "worker 1 to own the partition", func() bool { return countLines(&w1Log, `"partition taken"`) > 0 })
	startWorker(t, e.path, &w2Log) // a standby: one partition, and worker 1 holds it
	const resources = 5
	e.insertEvents(0, 50, resources)
	srv.Wait(t, 60*time.Second, "the other resources' events", func(r []sendertest.Request) bool {
		return len(sendertest.Delivered(r)) == 30
	})
	// Stored, not just logged: the park write follows the log line, and a
	// kill in between leaves the events in the relay stream (worker 2 then
	// parks them itself; CI saw it).
	e.eventually(60*time.Second, "r0's and r1's 20 events parked", func() bool { return e.relayParked() == 20 })
	w1.Process.Signal(syscall.SIGKILL)
	w1.Wait()
	killed := time.Now()
	e.insertEvents(50, 50, resources) // newer events of the parked resources, and of the others
	e.eventually(30*time.Second, "worker 2 to load the parked resources", func() bool {
		return countLines(&w2Log, `"parked resources loaded"`) > 0
	})
	srv.Wait(t, 60*time.Second, "the other resources' newer events", func(r []sendertest.Request) bool {
		return len(sendertest.Delivered(r)) == 60
	})
	if took := time.Since(killed); took > 30*time.Second {
		t.Errorf("the takeover took %s", took)
	}
	down.Store(false)
	reqs := srv.Wait(t, 60*time.Second, "every event", func(r []sendertest.Request) bool {
		return distinctEvents(t, sendertest.Delivered(r)) == 100
	})
	// Duplicates are allowed (a request whose answer the killed worker never
	// saw); a newer event before an older one is not.
	n, dups := checkRelayed(t, sendertest.Delivered(reqs))
	// Not even attempted early: a newer event of a parked resource waits
	// behind the parked ones (the next owner knew them before it consumed).
	left := map[string]map[int]bool{"r0": {}, "r1": {}}
	for n := range 50 {
		if res := "r" + string(rune('0'+n%resources)); left[res] != nil {
			left[res][n] = true
		}
	}
	for _, r := range reqs {
		res, n := resourceN(t, r)
		if left[res] == nil {
			continue
		}
		if n >= 50 && len(left[res]) > 0 {
			t.Errorf("%s: n=%d attempted before the parked n<50 were delivered (%d left)", res, n, len(left[res]))
			break
		}
		if r.Status == http.StatusNoContent {
			delete(left[res], n)
		}
	}
	if n != 100 {
		t.Errorf("%d events accepted, want 100", n)
	}
	e.waitCaughtUp()
	t.Logf("%d events, %d duplicates", n, dups)
}

// TestRelayEndpointHealthShared: one worker's endpoint health disables a
// dynamic subscription (its resource fails for disable_after); every worker
// then dead-letters its events, and an enable (the API's store call) reaches
// every worker: later events of every partition are delivered.
func TestRelayEndpointHealthShared(t *testing.T) {
	t.Parallel()
	nc := natstest.Start(t)
	srv, down := failingResources(t) // r0 and r1 fail while down
	e := newEnv(t, "allow_targets: [127.0.0.1/32]\n"+relayYAML(t, nc.URL())+
		"defaults: {disable_after: 2s, park_after: 1s, retry_initial: 100ms, retry_max_interval: 300ms}\n")
	e.setup()
	var sidecarLog, w1Log, w2Log syncBuffer
	startReplica(t, e.path, &sidecarLog)
	startWorker(t, e.path, &w1Log)
	startWorker(t, e.path, &w2Log)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("sidecar:\n%s\nworker 1:\n%s\nworker 2:\n%s", sidecarLog.String(), w1Log.String(), w2Log.String())
		}
	})
	e.eventually(30*time.Second, "the sidecar to load its subscriptions and both workers to own partitions", func() bool {
		return countLines(&sidecarLog, "subscriptions loaded") > 0 &&
			countLines(&w1Log, `"partition taken"`) > 0 && countLines(&w2Log, `"partition taken"`) > 0
	})
	code, out, stderr := e.walhook("subscriptions", "add", "--event", "*", "--target-url", srv.HooksURL())
	if code != 0 {
		t.Fatalf("subscriptions add: exit %d: %s", code, stderr)
	}
	id := strings.TrimSpace(strings.TrimPrefix(strings.SplitN(out, "\n", 2)[0], "id: "))
	deadLetters := func() (n int) {
		e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.dead_letters WHERE subscription = $1`, id).Scan(&n)
		return n
	}
	// Only r0 first: the worker that owns its partition sees nothing but failures.
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) SELECT 'x', 'r0', jsonb_build_object('n', g) FROM generate_series(0, 4) g`)
	e.eventually(30*time.Second, "the subscription disabled in its row", func() bool {
		var off bool
		e.db.Pool.QueryRow(context.Background(), `SELECT disabled_at IS NOT NULL FROM walhook.subscriptions WHERE id = $1`, id).Scan(&off)
		return off
	})
	e.eventually(30*time.Second, "r0's events dead-lettered", func() bool { return deadLetters() == 5 })
	// The other worker learns it from the row (its refresh, every 2 s).
	e.eventually(30*time.Second, "both workers to stop it", func() bool {
		return countLines(&w1Log, "subscription disabled") > 0 && countLines(&w2Log, "subscription disabled") > 0
	})
	// Every worker stops it: events of 16 resources (both workers'
	// partitions) become dead letters, none is sent.
	sent := len(srv.Requests())
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) SELECT 'x', 'q' || g, jsonb_build_object('n', 100 + g) FROM generate_series(0, 15) g`)
	e.eventually(30*time.Second, "every later event dead-lettered", func() bool { return deadLetters() == 21 })
	if got := len(srv.Requests()); got != sent {
		t.Errorf("%d requests to a disabled subscription", got-sent)
	}
	down.Store(false)
	if err := pgstore.New(e.db.Pool, e.db.Name).EnableSubscription(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	e.eventually(30*time.Second, "both workers to enable it", func() bool {
		return countLines(&w1Log, "subscription enabled") > 0 && countLines(&w2Log, "subscription enabled") > 0
	})
	e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload) SELECT 'x', 'q' || g, jsonb_build_object('n', 200 + g) FROM generate_series(0, 15) g`)
	srv.Wait(t, 30*time.Second, "every event after the enable", func(r []sendertest.Request) bool {
		return len(sendertest.Delivered(r)) == 16
	})
	e.waitCaughtUp()
}

// TestRelayDeletedSubscriptionDelivered: events routed to a dynamic
// subscription before its deletion are delivered by a worker that never
// loaded it (it started after the deletion), from its last definition, as
// direct mode delivers what was committed before a deletion; events
// committed after the deletion are not.
func TestRelayDeletedSubscriptionDelivered(t *testing.T) {
	t.Parallel()
	nc := natstest.Start(t)
	always := sendertest.NewServer(t, nil)
	dyn := sendertest.NewServer(t, nil)
	e := newEnv(t, "allow_targets: [127.0.0.1/32]\n"+relayYAML(t, nc.URL())+"subscriptions:\n"+sub("s", always.HooksURL(), `["*"]`))
	e.setup()
	var sidecarLog, workerLog syncBuffer
	startReplica(t, e.path, &sidecarLog)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("sidecar:\n%s\nworker:\n%s", sidecarLog.String(), workerLog.String())
		}
	})
	e.eventually(30*time.Second, "the sidecar to load its subscriptions", func() bool {
		return countLines(&sidecarLog, "subscriptions loaded") > 0
	})
	code, out, stderr := e.walhook("subscriptions", "add", "--event", "*", "--target-url", dyn.HooksURL())
	if code != 0 {
		t.Fatalf("subscriptions add: exit %d: %s", code, stderr)
	}
	id := strings.TrimSpace(strings.TrimPrefix(strings.SplitN(out, "\n", 2)[0], "id: "))
	e.insertEvents(0, 30, 3)
	if code, _, stderr := e.walhook("subscriptions", "rm", id); code != 0 {
		t.Fatalf("subscriptions rm: exit %d: %s", code, stderr)
	}
	e.insertEvents(30, 30, 3)
	e.waitCaughtUp() // published: the worker starts after the deletion
	startWorker(t, e.path, &workerLog)
	always.Wait(t, 60*time.Second, "every event", func(r []sendertest.Request) bool { return distinctEvents(t, r) == 60 })
	reqs := dyn.Wait(t, 60*time.Second, "the 30 events routed before the deletion", func(r []sendertest.Request) bool {
		return distinctEvents(t, r) == 30
	})
	for _, r := range reqs {
		if _, n := resourceN(t, r); n >= 30 {
			t.Errorf("the deleted subscription got n=%d, committed after its deletion", n)
		}
	}
	checkRelayed(t, reqs)
	if countLines(&workerLog, "deleted subscription loaded") == 0 {
		t.Errorf("the worker did not load the deleted subscription's definition")
	}
}

// relayParked is what `walhook status` says is parked in the relay.
func (e *env) relayParked() uint64 {
	e.t.Helper()
	code, stdout, stderr := e.walhook("status", "--json")
	var st struct {
		Relay struct {
			Parked uint64 `json:"parked"`
		} `json:"relay"`
	}
	if err := json.Unmarshal([]byte(stdout), &st); err != nil || code != 0 {
		e.t.Fatalf("walhook status --json: exit %d, %v\n%s%s", code, err, stdout, stderr)
	}
	return st.Relay.Parked
}

// TestRelayParkedOfDeletedSubscriptionDelivered: a dynamic subscription's
// resources are parked, it is deleted, and its worker dies; the next owner
// of the partition started after the deletion (a refresh does not list the
// subscription) and no message of it is left in the stream. It still loads
// the subscription's last definition for the parked events, and delivers
// them, as what was routed before a deletion is delivered.
func TestRelayParkedOfDeletedSubscriptionDelivered(t *testing.T) {
	t.Parallel()
	nc := natstest.Start(t)
	always := sendertest.NewServer(t, nil)
	dyn, down := failingResources(t)
	relay := strings.Replace(relayYAML(t, nc.URL()), "partitions: 8", "partitions: 1", 1)
	e := newEnv(t, "allow_targets: [127.0.0.1/32]\n"+relay+"defaults: {park_after: 1s, retry_initial: 100ms, retry_max_interval: 500ms}\nsubscriptions:\n"+
		sub("s", always.HooksURL(), `["*"]`))
	e.setup()
	var sidecarLog, w1Log, w2Log syncBuffer
	startReplica(t, e.path, &sidecarLog)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("sidecar:\n%s\nworker 1:\n%s\nworker 2:\n%s", sidecarLog.String(), w1Log.String(), w2Log.String())
		}
	})
	e.eventually(30*time.Second, "the sidecar to load its subscriptions", func() bool {
		return countLines(&sidecarLog, "subscriptions loaded") > 0
	})
	code, out, stderr := e.walhook("subscriptions", "add", "--event", "*", "--target-url", dyn.HooksURL())
	if code != 0 {
		t.Fatalf("subscriptions add: exit %d: %s", code, stderr)
	}
	id := strings.TrimSpace(strings.TrimPrefix(strings.SplitN(out, "\n", 2)[0], "id: "))
	w1 := startWorker(t, e.path, &w1Log)
	const resources = 5
	e.insertEvents(0, 50, resources)
	dyn.Wait(t, 60*time.Second, "the other resources' events", func(r []sendertest.Request) bool {
		return len(sendertest.Delivered(r)) == 30
	})
	e.eventually(60*time.Second, "r0's and r1's 20 events parked", func() bool { return e.relayParked() == 20 })
	if code, _, stderr := e.walhook("subscriptions", "rm", id); code != 0 {
		t.Fatalf("subscriptions rm: exit %d: %s", code, stderr)
	}
	always.Wait(t, 60*time.Second, "every event to the other subscription", func(r []sendertest.Request) bool {
		return distinctEvents(t, r) == 50
	})
	w1.Process.Signal(syscall.SIGKILL)
	w1.Wait()
	down.Store(false)
	startWorker(t, e.path, &w2Log)
	reqs := dyn.Wait(t, 60*time.Second, "the parked events", func(r []sendertest.Request) bool {
		return distinctEvents(t, sendertest.Delivered(r)) == 50
	})
	checkRelayed(t, sendertest.Delivered(reqs))
	e.eventually(30*time.Second, "nothing parked", func() bool { return e.relayParked() == 0 })
	if countLines(&w2Log, "deleted subscription loaded") == 0 {
		t.Errorf("worker 2 did not load the deleted subscription's definition")
	}
}

// TestRelayParkedOfUnknownSubscriptionKept: a config-file subscription's
// resources are parked, and the next owner of the partition runs a config
// without it (a rolling change of the config file, say): it leaves the
// parked events where they are and says so, and a later owner that has the
// subscription delivers them, in order.
func TestRelayParkedOfUnknownSubscriptionKept(t *testing.T) {
	t.Parallel()
	nc := natstest.Start(t)
	srv, down := failingResources(t)
	other := sendertest.NewServer(t, nil)
	relay := strings.Replace(relayYAML(t, nc.URL()), "partitions: 8", "partitions: 1", 1)
	defaults := "defaults: {park_after: 1s, retry_initial: 100ms, retry_max_interval: 500ms}\n"
	e := newEnv(t, relay+defaults+"subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	without := filepath.Join(e.dir, "without-s.yaml")
	e.writeConfigAt(without, relay+defaults+"subscriptions:\n"+sub("t", other.HooksURL(), `["nothing"]`))
	e.setup()
	var sidecarLog, w1Log, w2Log, w3Log syncBuffer
	startReplica(t, e.path, &sidecarLog)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("sidecar:\n%s\nworker 1:\n%s\nworker 2:\n%s\nworker 3:\n%s", sidecarLog.String(), w1Log.String(), w2Log.String(), w3Log.String())
		}
	})
	w1 := startWorker(t, e.path, &w1Log)
	e.insertEvents(0, 50, 5)
	srv.Wait(t, 60*time.Second, "the other resources' events", func(r []sendertest.Request) bool {
		return len(sendertest.Delivered(r)) == 30
	})
	e.eventually(60*time.Second, "r0's and r1's 20 events parked", func() bool { return e.relayParked() == 20 })
	w1.Process.Signal(syscall.SIGKILL)
	w1.Wait()
	w2 := startWorker(t, without, &w2Log)
	e.eventually(30*time.Second, "worker 2 to look at them", func() bool {
		return countLines(&w2Log, "parked deliveries of a subscription this worker does not know are left") > 0
	})
	if n := e.relayParked(); n != 20 {
		t.Fatalf("%d events parked after worker 2 took the partition, want the 20", n)
	}
	w2.Process.Signal(syscall.SIGKILL)
	w2.Wait()
	down.Store(false)
	startWorker(t, e.path, &w3Log)
	reqs := srv.Wait(t, 60*time.Second, "every event", func(r []sendertest.Request) bool {
		return distinctEvents(t, sendertest.Delivered(r)) == 50
	})
	checkRelayed(t, sendertest.Delivered(reqs))
	e.eventually(30*time.Second, "nothing parked", func() bool { return e.relayParked() == 0 })
}
