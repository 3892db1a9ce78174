package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/walhook/walhook/internal/natstest"
	"github.com/walhook/walhook/relay"
	"github.com/walhook/walhook/sender/sendertest"
)

// Relay mode end to end: PostgreSQL → walhook run (relay) → JetStream →
// walhook deliver × N → receiver, every process but NATS a child process.

// relayYAML is the relay section for a test's NATS, with its own stream.
func relayYAML(t *testing.T, url string) string {
	return relayYAMLStream(url, fmt.Sprintf("T%d", time.Now().UnixNano()%1e9))
}

func relayYAMLStream(url, stream string) string {
	return fmt.Sprintf("relay:\n  url: %s\n  stream: %s\n  replicas: 1\n  partitions: 8\n  ack_wait: 6s\n", url, stream)
}

// startWorker runs `walhook deliver --config path` as a child process.
func startWorker(t *testing.T, path string, log *syncBuffer) *exec.Cmd {
	return runChild(t, log, "deliver", "--config", path)
}

// startSidecarAndWorker runs a sidecar (walhook run) and one worker, and
// logs both if the test fails.
func startSidecarAndWorker(t *testing.T, sidecarPath, workerPath string) (sidecarLog, workerLog *syncBuffer) {
	sidecarLog, workerLog = &syncBuffer{}, &syncBuffer{}
	startReplica(t, sidecarPath, sidecarLog)
	startWorker(t, workerPath, workerLog)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("sidecar:\n%s\nworker:\n%s", sidecarLog.String(), workerLog.String())
		}
	})
	return sidecarLog, workerLog
}

// slowServer answers 204, one request at a time, each taking a little
// while (the endpoint's work): a kill lands mid-delivery.
func slowServer(t *testing.T) *sendertest.Server {
	var mu sync.Mutex
	return sendertest.NewServer(t, func(int, *sendertest.Request) (int, http.Header) {
		mu.Lock()
		defer mu.Unlock()
		time.Sleep(2 * time.Millisecond) // the endpoint's work, not synchronisation
		return http.StatusNoContent, nil
	})
}

// insertEvents commits n events over resources r0…r<resources-1>, ten per
// transaction, with payload n = from, from+1, ….
func (e *env) insertEvents(from, n, resources int) {
	e.t.Helper()
	for i := 0; i < n; i += 10 {
		e.exec(`INSERT INTO walhook.outbox (event, resource_id, payload)
			SELECT 'contact.updated', 'r' || (g % $3), jsonb_build_object('n', g) FROM generate_series($1::int, $2::int) g`,
			from+i, from+min(i+10, n)-1, resources)
	}
}

// checkRelayed fails t unless every one of want events arrived, per
// resource first deliveries in commit order, and a redelivered event came
// with the same webhook-id and body. It returns the number of duplicates.
func checkRelayed(t *testing.T, reqs []sendertest.Request) (distinct, dups int) {
	t.Helper()
	byID := map[string]sendertest.Request{}
	lastFirst := map[string]int{}
	for _, r := range reqs {
		env := decode(t, r.Body)
		if prev, ok := byID[env.ID]; ok {
			dups++
			if prev.Header.Get("webhook-id") != r.Header.Get("webhook-id") || string(prev.Body) != string(r.Body) {
				t.Errorf("event %s redelivered with another webhook-id or body", env.ID)
			}
			continue
		}
		byID[env.ID] = r
		var p struct{ N int }
		json.Unmarshal(env.Data, &p)
		res := deref(env.ResourceID)
		if last, ok := lastFirst[res]; ok && p.N < last {
			t.Errorf("resource %s: n=%d first delivered after n=%d", res, p.N, last)
		}
		lastFirst[res] = p.N
	}
	return len(byID), dups
}

func distinctEvents(t *testing.T, reqs []sendertest.Request) int {
	ids := map[string]bool{}
	for _, r := range reqs {
		ids[decode(t, r.Body).ID] = true
	}
	return len(ids)
}

// TestRelayDeliversThroughJetStream: two workers share the partitions;
// every event arrives signed, once, in per-resource order, and the slot is
// confirmed to the end once JetStream holds everything.
func TestRelayDeliversThroughJetStream(t *testing.T) {
	t.Parallel()
	nats := natstest.Start(t)
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, relayYAML(t, nats.URL())+"subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
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
	const events, resources = 200, 7
	e.insertEvents(0, events, resources)
	reqs := srv.Wait(t, 60*time.Second, "every event", func(r []sendertest.Request) bool { return distinctEvents(t, r) == events })
	n, dups := checkRelayed(t, reqs)
	wh := verifier(t)
	for _, r := range reqs {
		if err := wh.Verify(r.Body, r.Header); err != nil {
			t.Fatalf("signature: %v", err)
		}
	}
	e.waitCaughtUp()
	// walhook status shows the stream, every partition with an owner, and
	// the two workers.
	e.eventually(20*time.Second, "walhook status to show the relay", func() bool {
		code, out, _ := e.walhook("status", "--json")
		var st struct {
			Relay struct {
				Stream     string
				Workers    []string
				Partitions []struct{ Owner string }
				Error      string
			}
		}
		if code != 0 || json.Unmarshal([]byte(out), &st) != nil || len(st.Relay.Workers) != 2 || len(st.Relay.Partitions) != 8 {
			return false
		}
		for _, p := range st.Relay.Partitions {
			if p.Owner == "" {
				return false
			}
		}
		return true
	})
	if code, out, stderr := e.walhook("status"); code != 0 || !strings.Contains(out, "PARTITION") {
		t.Errorf("walhook status: exit %d\n%s%s", code, out, stderr)
	}
	// The workers write the attempt log, as direct mode does.
	e.eventually(10*time.Second, "the workers' attempts in walhook.attempts", func() bool {
		var logged int
		e.db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM walhook.attempts WHERE outcome = 'delivered'`).Scan(&logged)
		return logged >= n
	})
	t.Logf("%d events, %d duplicates", n, dups)
}

// TestRelayWorkerKill9: a worker killed mid-delivery; the other takes its
// partitions within 10 s, nothing is lost, per-resource order holds, and
// redeliveries carry the same webhook-id.
func TestRelayWorkerKill9(t *testing.T) {
	t.Parallel()
	nats := natstest.Start(t)
	srv := slowServer(t)
	e := newEnv(t, relayYAML(t, nats.URL())+"subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	var sidecarLog, w1Log, w2Log syncBuffer
	startReplica(t, e.path, &sidecarLog)
	w1 := startWorker(t, e.path, &w1Log)
	startWorker(t, e.path, &w2Log)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("sidecar:\n%s\nworker 1:\n%s\nworker 2:\n%s", sidecarLog.String(), w1Log.String(), w2Log.String())
		}
	})
	const events, resources = 600, 16
	// Wait for both workers to own partitions: a fair split is 4 each.
	e.eventually(30*time.Second, "both workers to own partitions", func() bool {
		return countLines(&w1Log, `"partition taken"`) > 0 && countLines(&w2Log, `"partition taken"`) > 0
	})
	e.insertEvents(0, events, resources)
	srv.WaitN(t, events/4, 60*time.Second)
	w1.Process.Signal(syscall.SIGKILL)
	w1.Wait()
	killed := time.Now()
	before := len(srv.Requests())
	// New events on every resource after the kill: every partition must be
	// delivered again within 10 s of it.
	e.insertEvents(events, resources, resources)
	reqs := srv.Wait(t, 90*time.Second, "every event", func(r []sendertest.Request) bool {
		return distinctEvents(t, r) == events+resources
	})
	if before >= events {
		t.Fatalf("all events were delivered before the kill; the test proves nothing")
	}
	// Per partition the new events come after the old ones; when the last
	// resource saw its first delivery after the kill bounds the takeover.
	firstAfter := map[string]time.Time{}
	for _, r := range reqs {
		if r.At.After(killed) {
			res := deref(decode(t, r.Body).ResourceID)
			if _, ok := firstAfter[res]; !ok {
				firstAfter[res] = r.At
			}
		}
	}
	var slowest time.Duration
	for _, at := range firstAfter {
		slowest = max(slowest, at.Sub(killed))
	}
	if len(firstAfter) != resources {
		t.Errorf("only %d of %d resources were delivered after the kill", len(firstAfter), resources)
	}
	if slowest > 10*time.Second {
		t.Errorf("a resource waited %s after the kill for a delivery: the takeover took longer than 10 s", slowest.Round(time.Millisecond))
	}
	n, dups := checkRelayed(t, reqs)
	t.Logf("%d events, %d duplicates, %d requests before the kill; every resource delivered again within %s of it",
		n, dups, before, slowest.Round(time.Millisecond))
}

// TestRelaySidecarKill9: the sidecar killed after JetStream acknowledged
// deliveries whose LSN it had not confirmed yet; the next one streams them
// again and JetStream drops them as duplicates (same message ids): the
// stream holds each delivery once, nothing is lost, none is sent twice.
func TestRelaySidecarKill9(t *testing.T) {
	t.Parallel()
	natsSrv := natstest.Start(t)
	srv := sendertest.NewServer(t, nil)
	stream := fmt.Sprintf("K%d", time.Now().UnixNano()%1e9)
	e := newEnv(t, relayYAMLStream(natsSrv.URL(), stream)+"subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	nc, err := nats.Connect(natsSrv.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	stored := func() int {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := js.Stream(ctx, stream)
		if err != nil {
			return -1
		}
		n, err := relay.Deliveries(ctx, s, relay.Config{Stream: stream})
		if err != nil {
			return -1
		}
		return int(n)
	}
	var logs []*syncBuffer
	defer func() {
		if t.Failed() {
			for i, l := range logs {
				t.Logf("sidecar %d:\n%s", i+1, l.String())
			}
		}
	}()
	// No worker yet: the stream keeps what is published. Kill the sidecar
	// once JetStream holds a batch; retry while the kill found it confirmed.
	const resources, batch = 7, 300
	events := 0
	for attempt := 1; ; attempt++ {
		log := &syncBuffer{}
		logs = append(logs, log)
		sidecar := startReplica(t, e.path, log)
		e.insertEvents(events, batch, resources)
		events += batch
		var end int64
		e.db.Pool.QueryRow(context.Background(), `SELECT pg_current_wal_insert_lsn() - '0/0'`).Scan(&end)
		e.eventually(60*time.Second, "jetstream to hold every delivery", func() bool { return stored() == events })
		sidecar.Process.Signal(syscall.SIGKILL)
		sidecar.Wait()
		if int64(e.confirmedFlush()) < end {
			break
		}
		if attempt == 3 {
			t.Fatalf("every kill found the batch confirmed: the test proves nothing")
		}
	}
	log := &syncBuffer{}
	logs = append(logs, log)
	startReplica(t, e.path, log)
	e.waitCaughtUp()
	if n := stored(); n != events {
		t.Fatalf("the stream holds %d messages for %d deliveries: the republished tail was not deduplicated", n, events)
	}
	if !strings.Contains(log.String(), "dropped as duplicates") {
		t.Errorf("the restarted sidecar published nothing again: the kill did not land between publish and confirm")
	}
	var workerLog syncBuffer
	startWorker(t, e.path, &workerLog)
	reqs := srv.Wait(t, 90*time.Second, "every event", func(r []sendertest.Request) bool { return distinctEvents(t, r) == events })
	n, dups := checkRelayed(t, reqs)
	if dups > 0 {
		t.Errorf("%d events delivered twice", dups)
	}
	t.Logf("%d events, %d duplicate deliveries, %d sidecar kills", n, dups, len(logs)-1)
}

// TestRelayNATSDown: all of NATS down for a while. The sidecar keeps the
// slot (answering keepalives), does not confirm what it could not publish,
// says so on /readyz, and after NATS is back nothing is lost.
func TestRelayNATSDown(t *testing.T) {
	t.Parallel()
	nats := natstest.Start(t)
	srv := sendertest.NewServer(t, nil)
	port := freePort(t)
	e := newEnv(t, relayYAML(t, nats.URL())+"subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	b, _ := os.ReadFile(e.path)
	sidecarPath := e.dir + "/sidecar.yaml"
	os.WriteFile(sidecarPath, []byte(strings.Replace(string(b), "listen: 127.0.0.1:0", fmt.Sprintf("listen: 127.0.0.1:%d", port), 1)), 0o600)
	startSidecarAndWorker(t, sidecarPath, e.path)
	const resources = 5
	e.insertEvents(0, 50, resources)
	srv.Wait(t, 60*time.Second, "the first events", func(r []sendertest.Request) bool { return distinctEvents(t, r) == 50 })
	e.waitCaughtUp()

	nats.Shutdown(0)
	down := time.Now()
	e.insertEvents(50, 50, resources)
	var insertEnd int64
	e.db.Pool.QueryRow(context.Background(), `SELECT pg_current_wal_insert_lsn() - '0/0'`).Scan(&insertEnd)
	readyz := fmt.Sprintf("http://127.0.0.1:%d/readyz", port)
	e.eventually(30*time.Second, "/readyz to say the relay cannot publish", func() bool {
		resp, err := http.Get(readyz)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusServiceUnavailable
	})
	// NATS stays down 20 s in all: meanwhile the slot is held and not
	// confirmed past what was published.
	check := time.NewTicker(500 * time.Millisecond) // paces the checks of a 20 s outage
	defer check.Stop()
	for time.Since(down) < 20*time.Second {
		if int64(e.confirmedFlush()) >= insertEnd {
			t.Fatalf("the slot was confirmed past events JetStream never stored")
		}
		if !e.slotActive() {
			t.Fatalf("the sidecar left the slot while NATS was down")
		}
		<-check.C
	}
	if err := nats.Restart(); err != nil {
		t.Fatal(err)
	}
	srv.Wait(t, 90*time.Second, "every event", func(r []sendertest.Request) bool { return distinctEvents(t, r) == 100 })
	n, dups := checkRelayed(t, srv.Requests())
	e.waitCaughtUp()
	t.Logf("%d events, %d duplicates after NATS was down for 20 s", n, dups)
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func countLines(b *syncBuffer, sub string) int { return strings.Count(b.String(), sub) }

// TestRelayNATSNodeLost: a 3-node JetStream cluster with R3; one node is
// stopped while events flow: delivery goes on, nothing is lost, order holds.
func TestRelayNATSNodeLost(t *testing.T) {
	t.Parallel()
	cluster := natstest.StartCluster(t, 3)
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, strings.Replace(relayYAML(t, cluster.URL()), "replicas: 1", "replicas: 3", 1)+
		"subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
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
	const resources = 7
	e.insertEvents(0, 200, resources)
	srv.WaitN(t, 50, 60*time.Second)
	cluster.Shutdown(0)
	e.insertEvents(200, 200, resources)
	reqs := srv.Wait(t, 90*time.Second, "every event", func(r []sendertest.Request) bool { return distinctEvents(t, r) == 400 })
	n, dups := checkRelayed(t, reqs)
	e.waitCaughtUp()
	t.Logf("%d events, %d duplicates with one node of three stopped", n, dups)
}

// TestRelaySubscriptionChangesKeepStreamOrder: a subscription added while
// events flow gets exactly the events committed after its creation; once it
// is removed, later events no longer reach it; a worker learns of it from
// its first message, without waiting for a refresh.
func TestRelaySubscriptionChangesKeepStreamOrder(t *testing.T) {
	t.Parallel()
	nats := natstest.Start(t)
	always := sendertest.NewServer(t, nil)
	dyn := sendertest.NewServer(t, nil)
	e := newEnv(t, "allow_targets: [127.0.0.1/32]\n"+relayYAML(t, nats.URL())+"subscriptions:\n"+sub("s", always.HooksURL(), `["*"]`))
	e.setup()
	sidecarLog, _ := startSidecarAndWorker(t, e.path, e.path)
	// The sidecar must stream before the subscription is added: a first
	// start takes the subscriptions in the table as they are then.
	e.eventually(30*time.Second, "the sidecar to load its subscriptions", func() bool {
		return countLines(sidecarLog, "subscriptions loaded") > 0
	})
	e.insertEvents(0, 30, 3)
	code, out, stderr := e.walhook("subscriptions", "add", "--event", "*", "--target-url", dyn.HooksURL())
	if code != 0 {
		t.Fatalf("subscriptions add: exit %d: %s", code, stderr)
	}
	id := strings.TrimSpace(strings.TrimPrefix(strings.SplitN(out, "\n", 2)[0], "id: "))
	e.insertEvents(30, 30, 3)
	always.Wait(t, 60*time.Second, "the first 60 events", func(r []sendertest.Request) bool { return distinctEvents(t, r) == 60 })
	dyn.Wait(t, 60*time.Second, "the 30 events after the creation", func(r []sendertest.Request) bool { return distinctEvents(t, r) == 30 })
	if code, _, stderr := e.walhook("subscriptions", "rm", id); code != 0 {
		t.Fatalf("subscriptions rm: exit %d: %s", code, stderr)
	}
	e.insertEvents(60, 30, 3)
	always.Wait(t, 60*time.Second, "every event", func(r []sendertest.Request) bool { return distinctEvents(t, r) == 90 })
	e.waitCaughtUp()
	for _, r := range dyn.Requests() {
		var p struct{ N int }
		json.Unmarshal(decode(t, r.Body).Data, &p)
		if p.N < 30 || p.N >= 60 {
			t.Errorf("the dynamic subscription got n=%d, committed outside its lifetime [30, 60)", p.N)
		}
	}
	checkRelayed(t, dyn.Requests())
}

// TestRelayFailingResourceDoesNotBlockOthers: the endpoint rejects one
// resource's events with 503 for as long as the test runs; the other
// resources of the same partitions are delivered and acknowledged, the slot is
// confirmed (the stream holds the failing ones), and the failing resource's
// events wait in JetStream in order.
func TestRelayFailingResourceDoesNotBlockOthers(t *testing.T) {
	t.Parallel()
	nats := natstest.Start(t)
	srv := sendertest.NewServer(t, func(_ int, r *sendertest.Request) (int, http.Header) {
		if strings.Contains(string(r.Body), `"resource_id":"r0"`) {
			return http.StatusServiceUnavailable, nil
		}
		return http.StatusNoContent, nil
	})
	e := newEnv(t, strings.Replace(relayYAML(t, nats.URL()), "partitions: 8", "partitions: 1", 1)+
		"defaults: {retry_initial: 100ms, retry_max_interval: 500ms}\nsubscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	startSidecarAndWorker(t, e.path, e.path)
	const resources = 5 // r0 fails; every resource is in the one partition
	e.insertEvents(0, 100, resources)
	reqs := srv.Wait(t, 60*time.Second, "the other resources' events", func(r []sendertest.Request) bool {
		ok := map[string]bool{}
		for _, q := range r {
			if q.Status == http.StatusNoContent {
				ok[decode(t, q.Body).ID] = true
			}
		}
		return len(ok) == 80
	})
	e.waitCaughtUp()
	for _, r := range reqs {
		if res := deref(decode(t, r.Body).ResourceID); res == "r0" {
			var p struct{ N int }
			json.Unmarshal(decode(t, r.Body).Data, &p)
			if p.N != 0 {
				t.Errorf("r0: n=%d attempted while n=0 keeps failing", p.N)
			}
		}
	}
}

// TestRelayWorkerDropsAnOlderEventStoredAgain: JetStream forgets the ids of
// removed messages when it restarts, so a sidecar streaming again from an
// older LSN stores copies of finished deliveries after newer ones. A worker
// that already handed on a newer event of the partition drops such a copy
// instead of sending the old event after the new one (found by
// TestChaosRelay: a debounced subscription got a superseded event after the
// newest). The copy is published here by hand, with another message id.
func TestRelayWorkerDropsAnOlderEventStoredAgain(t *testing.T) {
	t.Parallel()
	natsSrv := natstest.Start(t)
	srv := sendertest.NewServer(t, nil)
	stream := fmt.Sprintf("S%d", time.Now().UnixNano()%1e9)
	e := newEnv(t, relayYAMLStream(natsSrv.URL(), stream)+"subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	var workerLog syncBuffer
	startWorker(t, e.path, &workerLog)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("worker:\n%s", workerLog.String())
		}
	})
	nc, err := nats.Connect(natsSrv.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	subject := fmt.Sprintf("%s.p.%d", stream, relay.Partition("s", "r0", 8))
	publish := func(id string, seq uint64, msgID string) {
		t.Helper()
		body := fmt.Sprintf(`{"s":"s","e":{"ID":%q,"Type":"contact.updated","ResourceID":"r0","Payload":{"n":%q},"CommitTime":%q,"Seq":%d,"Coalesced":1}}`,
			id, id, time.Now().UTC().Format(time.RFC3339Nano), seq)
		e.eventually(30*time.Second, "a publish to the worker's stream", func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			_, err := js.Publish(ctx, subject, []byte(body), jetstream.WithMsgID(msgID), jetstream.WithExpectStream(stream))
			return err == nil
		})
	}
	publish("1", 100, "m1")
	publish("2", 200, "m2")
	srv.Wait(t, 30*time.Second, "events 1 and 2", func(r []sendertest.Request) bool { return distinctEvents(t, r) == 2 })
	publish("1", 100, "m1-again") // stored again after 2: its id forgotten
	publish("3", 300, "m3")
	reqs := srv.Wait(t, 30*time.Second, "event 3", func(r []sendertest.Request) bool { return distinctEvents(t, r) == 3 })
	var got []string
	for _, r := range reqs {
		got = append(got, decode(t, r.Body).ID)
	}
	if strings.Join(got, ",") != "1,2,3" {
		t.Errorf("delivered %v, want 1,2,3: the older event stored again was sent after a newer one", got)
	}
}

// TestRelayNATSRestartForgetsConsumers: the partition consumers keep their
// state in memory, so a nats-server restarted quickly (the worker keeps its
// leases) no longer has them; the worker notices, restarts its epoch, resets
// them and delivers everything, in order per resource.
func TestRelayNATSRestartForgetsConsumers(t *testing.T) {
	t.Parallel()
	nats := natstest.Start(t)
	srv := sendertest.NewServer(t, nil)
	e := newEnv(t, relayYAML(t, nats.URL())+"subscriptions:\n"+sub("s", srv.HooksURL(), `["*"]`))
	e.setup()
	_, workerLog := startSidecarAndWorker(t, e.path, e.path)
	const resources = 5
	e.insertEvents(0, 50, resources)
	srv.Wait(t, 60*time.Second, "the first events", func(r []sendertest.Request) bool { return distinctEvents(t, r) == 50 })
	nats.Shutdown(0)
	if err := nats.Restart(); err != nil {
		t.Fatal(err)
	}
	e.insertEvents(50, 50, resources)
	srv.Wait(t, 60*time.Second, "every event", func(r []sendertest.Request) bool { return distinctEvents(t, r) == 100 })
	n, dups := checkRelayed(t, srv.Requests())
	e.waitCaughtUp()
	if !strings.Contains(workerLog.String(), "no longer has its consumer") {
		t.Logf("worker:\n%s", workerLog.String())
		t.Fatalf("the worker never noticed that nats-server forgot its consumers")
	}
	t.Logf("%d events, %d duplicates after a quick NATS restart", n, dups)
}

// metricValue reads an unlabelled metric from the /metrics of addr; -1 when
// it cannot.
func metricValue(addr, name string) float64 {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err == nil {
				return f
			}
		}
	}
	return -1
}

// TestRelayLostPartitionSparesTheOthers: a worker loses one partition (its
// lease is taken from under it) while attempts of every partition are in
// flight. The lost partition's attempts stop; the others' finish and are
// acknowledged before the epoch ends, so none of their events is sent
// twice (they all were, as cancelled sends come again, when a lost
// partition ended the epoch at once). Once everything is delivered the
// worker holds nothing (a lost partition's held messages used to count
// against max_pending_bytes for good).
func TestRelayLostPartitionSparesTheOthers(t *testing.T) {
	t.Parallel()
	nc := natstest.Start(t)
	srv := sendertest.NewServer(t, func(int, *sendertest.Request) (int, http.Header) {
		time.Sleep(300 * time.Millisecond) // the endpoint's work, not synchronisation: attempts in flight
		return http.StatusNoContent, nil
	})
	top := strings.Replace(relayYAML(t, nc.URL()), "partitions: 8", "partitions: 4", 1)
	stream := strings.Fields(top[strings.Index(top, "stream:"):])[1]
	subs := "subscriptions:\n" + sub("s", srv.HooksURL(), `["*"]`, "    batch_max: 1\n")
	e := newEnv(t, top+subs)
	workerAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	workerPath := filepath.Join(e.dir, "worker.yaml")
	e.writeConfigAt(workerPath, top+subs)
	cfg, err := os.ReadFile(workerPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(workerPath, []byte(strings.Replace(string(cfg), "listen: 127.0.0.1:0", "listen: "+workerAddr, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	e.setup()
	_, workerLog := startSidecarAndWorker(t, e.path, workerPath)
	e.eventually(30*time.Second, "the worker to own every partition", func() bool {
		return countLines(workerLog, `"partition taken"`) == 4
	})
	const events, resources = 160, 16
	e.insertEvents(0, events, resources)
	srv.WaitN(t, 16, 60*time.Second) // attempts of every partition in flight
	lost := relay.Partition("s", "r0", 4)
	conn, err := nats.Connect(nc.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	js, _ := jetstream.New(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kv, err := js.KeyValue(ctx, stream+"_owners")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, fmt.Sprintf("p.%d", lost), []byte("intruder")); err != nil { // expires unrenewed: the worker takes it back
		t.Fatal(err)
	}
	e.eventually(30*time.Second, "the worker to lose the partition", func() bool {
		return countLines(workerLog, `"partitions lost`) > 0
	})
	reqs := srv.Wait(t, 90*time.Second, "every event", func(r []sendertest.Request) bool {
		return distinctEvents(t, sendertest.Delivered(r)) == events
	})
	checkRelayed(t, sendertest.Delivered(reqs))
	times := map[string]int{}
	for _, r := range sendertest.Delivered(reqs) {
		env := decode(t, r.Body)
		if relay.Partition("s", deref(env.ResourceID), 4) != lost {
			times[env.ID]++
		}
	}
	var dups []string
	for id, n := range times {
		if n > 1 {
			dups = append(dups, id)
		}
	}
	if len(dups) > 0 {
		slices.Sort(dups)
		t.Errorf("events of the partitions not lost sent more than once: %v", dups)
	}
	e.eventually(10*time.Second, "the worker to hold nothing", func() bool {
		return metricValue(workerAddr, "walhook_relay_held_bytes") == 0
	})
}
