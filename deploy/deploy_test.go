package deploy_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/walhook/walhook/internal/natstest"
	"github.com/walhook/walhook/internal/pgtest"
	"github.com/walhook/walhook/internal/testwait"
	"go.yaml.in/yaml/v3"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// TestFilesParse: every YAML file under deploy/ parses, every document of it,
// and every JSON file is valid JSON.
func TestFilesParse(t *testing.T) {
	n := 0
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		switch filepath.Ext(path) {
		case ".yaml", ".yml":
			n++
			if _, err := yamlDocs(path); err != nil {
				t.Error(err)
			}
		case ".json":
			n++
			if b, err := os.ReadFile(path); err != nil || !json.Valid(b) {
				t.Errorf("%s: not valid JSON (%v)", path, err)
			}
		}
		return nil
	})
	if err != nil || n < 8 {
		t.Fatalf("walked %d files: %v", n, err)
	}
}

func yamlDocs(path string) ([]map[string]any, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var docs []map[string]any
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for {
		var doc map[string]any
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		docs = append(docs, doc)
	}
}

// m walks a parsed YAML document: m(doc, "spec", "template") is
// doc["spec"]["template"], nil where a key is missing.
func m(v any, keys ...string) any {
	for _, k := range keys {
		mm, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = mm[k]
	}
	return v
}

type container struct {
	name, image string
	args        []string
	port        int
	probes      []string // paths
	mounts      map[string]bool
}

func containers(t *testing.T, dep map[string]any) (init, main []container) {
	spec := m(dep, "spec", "template", "spec")
	for _, kind := range []string{"initContainers", "containers"} {
		list, _ := m(spec, kind).([]any)
		for _, c := range list {
			x := container{name: fmt.Sprint(m(c, "name")), image: fmt.Sprint(m(c, "image")), mounts: map[string]bool{}}
			args, _ := m(c, "args").([]any)
			for _, a := range args {
				x.args = append(x.args, fmt.Sprint(a))
			}
			if ports, ok := m(c, "ports").([]any); ok {
				x.port, _ = m(ports[0], "containerPort").(int)
			}
			for _, p := range []string{"livenessProbe", "readinessProbe", "startupProbe"} {
				if path := m(c, p, "httpGet", "path"); path != nil {
					x.probes = append(x.probes, fmt.Sprint(path))
				}
			}
			if vms, ok := m(c, "volumeMounts").([]any); ok {
				for _, vm := range vms {
					x.mounts[fmt.Sprint(m(vm, "mountPath"))] = true
				}
			}
			if !strings.Contains(x.image, "walhook") {
				continue
			}
			if sc := m(c, "securityContext"); m(sc, "readOnlyRootFilesystem") != true || m(sc, "allowPrivilegeEscalation") != false {
				t.Errorf("%s: securityContext %v", x.name, sc)
			}
			if kind == "initContainers" {
				init = append(init, x)
			} else {
				main = append(main, x)
			}
		}
	}
	return init, main
}

func matchLabels(sel, labels any) bool {
	s, _ := m(sel, "matchLabels").(map[string]any)
	l, _ := labels.(map[string]any)
	if len(s) == 0 {
		return false
	}
	for k, v := range s {
		if l[k] != v {
			return false
		}
	}
	return true
}

var metricRE = regexp.MustCompile(`walhook_[a-z_]+`)

// TestRelayManifests: the relay mode manifests, the NATS values and the
// relay dashboard agree with each other and with the binary: the ConfigMap's
// config runs as `walhook setup`, `walhook run` and `walhook deliver` with the
// manifests' arguments, against a real PostgreSQL and a real nats-server
// (its url and replicas: 1 replaced, the slot made the test's own); the
// probes' paths answer; every metric the alerts and the dashboard use is
// served by one of them.
func TestRelayManifests(t *testing.T) {
	byKind := map[string][]map[string]any{}
	files, _ := filepath.Glob("kubernetes/relay/*.yaml")
	if len(files) < 3 {
		t.Fatalf("relay manifests: %v", files)
	}
	for _, f := range files {
		docs, err := yamlDocs(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range docs {
			byKind[fmt.Sprint(d["kind"])] = append(byKind[fmt.Sprint(d["kind"])], d)
		}
	}
	one := func(kind string) map[string]any {
		if len(byKind[kind]) != 1 {
			t.Fatalf("want one %s, have %d", kind, len(byKind[kind]))
		}
		return byKind[kind][0]
	}

	// The config: relay mode, R3 on the chart's three nodes.
	cm := one("ConfigMap")
	cfgText, _ := m(cm, "data", "walhook.yaml").(string)
	var cfg map[string]any
	if err := yaml.Unmarshal([]byte(cfgText), &cfg); err != nil {
		t.Fatalf("ConfigMap walhook.yaml: %v", err)
	}
	relay, _ := cfg["relay"].(map[string]any)
	if relay == nil || relay["replicas"] != 3 {
		t.Fatalf("ConfigMap: relay %v, want replicas: 3", relay)
	}
	values, err := yamlDocs("nats/values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if v := values[0]; m(v, "config", "cluster", "enabled") != true || m(v, "config", "cluster", "replicas") != 3 ||
		m(v, "config", "jetstream", "enabled") != true || m(v, "config", "jetstream", "fileStore", "enabled") != true {
		t.Errorf("nats/values.yaml: want a 3-node cluster with JetStream on files, have %v", v["config"])
	}
	env := map[string]string{}
	for k, v := range m(one("Secret"), "stringData").(map[string]any) {
		env[k] = fmt.Sprint(v)
	}

	// The Deployments: the app with the sidecar (setup as init), the workers with a PDB.
	var app, workers map[string]any
	for _, d := range byKind["Deployment"] {
		if _, main := containers(t, d); len(main) == 1 && main[0].args[0] == "deliver" {
			workers = d
		} else {
			app = d
		}
	}
	if app == nil || workers == nil {
		t.Fatal("want the app's Deployment with the sidecar, and the walhook-worker Deployment")
	}
	appInit, appMain := containers(t, app)
	_, workerMain := containers(t, workers)
	if len(appInit) != 1 || appInit[0].args[0] != "setup" || len(appMain) != 1 || appMain[0].args[0] != "run" {
		t.Fatalf("the app's walhook containers: init %v, main %v", appInit, appMain)
	}
	workerLabels := m(workers, "spec", "template", "metadata", "labels")
	if pdb := one("PodDisruptionBudget"); !matchLabels(m(pdb, "spec", "selector"), workerLabels) {
		t.Errorf("the PodDisruptionBudget does not select the workers")
	} else if mu, _ := m(pdb, "spec", "maxUnavailable").(int); mu < 1 || mu >= m(workers, "spec", "replicas").(int) {
		t.Errorf("PodDisruptionBudget maxUnavailable %v for %v workers", m(pdb, "spec", "maxUnavailable"), m(workers, "spec", "replicas"))
	}
	if pm := one("PodMonitor"); !matchLabels(m(pm, "spec", "selector"), workerLabels) ||
		m(m(pm, "spec", "podMetricsEndpoints").([]any)[0], "path") != "/metrics" {
		t.Errorf("the PodMonitor does not scrape the workers' /metrics")
	}
	if svc := one("Service"); !matchLabels(map[string]any{"matchLabels": m(svc, "spec", "selector")}, m(app, "spec", "template", "metadata", "labels")) {
		t.Errorf("the Service does not select the app's pods")
	}
	_, port, _ := net.SplitHostPort(fmt.Sprint(cfg["listen"]))
	var rulesBuf bytes.Buffer
	enc := json.NewEncoder(&rulesBuf)
	enc.SetEscapeHTML(false)
	enc.Encode(one("PrometheusRule"))
	rules := rulesBuf.Bytes()
	for _, alert := range []string{"PublishLag", "Paused", "Backlog", "RedeliveryStorm", "PartitionsUnowned"} {
		if !strings.Contains(string(rules), `"WalhookRelay`+alert+`"`) {
			t.Errorf("no alert WalhookRelay%s", alert)
		}
	}
	if !strings.Contains(string(rules), fmt.Sprintf("< %v", relay["partitions"])) {
		t.Errorf("WalhookRelayPartitionsUnowned does not compare with relay.partitions (%v)", relay["partitions"])
	}
	runbooks, _ := os.ReadFile("../docs/operations.md")
	for _, r := range regexp.MustCompile(`docs/operations.md#([a-z-]+)`).FindAllStringSubmatch(string(rules), -1) {
		if !strings.Contains(strings.ToLower(string(runbooks)), "### "+r[1]) {
			t.Errorf("runbook %s: docs/operations.md has no heading for it", r[0])
		}
	}
	dash, err := os.ReadFile("grafana/walhook-relay.json")
	if err != nil || !json.Valid(dash) {
		t.Fatalf("grafana/walhook-relay.json: %v", err)
	}

	// Run them.
	db := pgtest.New(t)
	nats := natstest.Start(t)
	relay["url"], relay["replicas"] = nats.URL(), 1
	dir := t.TempDir()
	b, _ := yaml.Marshal(cfg)
	cfgPath := filepath.Join(dir, "walhook.yaml")
	os.WriteFile(cfgPath, b, 0o600)
	bin := filepath.Join(dir, "walhook")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/walhook").CombinedOutput(); err != nil {
		t.Fatalf("build walhook: %v\n%s", err, out)
	}
	env["WALHOOK_DATABASE_URL"], env["WALHOOK_SLOT"], env["WALHOOK_PUBLICATION"] = db.URL, db.Name, db.Name
	command := func(c container, listen string) *exec.Cmd {
		args := slices.Clone(c.args)
		for i, a := range args {
			if strings.HasSuffix(a, "/walhook.yaml") {
				if !c.mounts[filepath.Dir(a)] {
					t.Errorf("%s: %s is not under a mounted volume", c.name, a)
				}
				args[i] = cfgPath
			}
		}
		if c.port != 0 && fmt.Sprint(c.port) != port {
			t.Errorf("%s: containerPort %d, listen is %v", c.name, c.port, cfg["listen"])
		}
		cmd := exec.Command(bin, args...)
		cmd.Env = os.Environ()
		for k, v := range env {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
		cmd.Env = append(cmd.Env, "WALHOOK_LISTEN="+listen)
		return cmd
	}
	if out, err := command(appInit[0], "127.0.0.1:0").CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", appInit[0].name, err, out)
	}
	type running struct {
		c    container
		addr string
		log  *testwait.Buffer
	}
	var procs []running
	for _, c := range []container{appMain[0], workerMain[0]} {
		r := running{c: c, addr: freeAddr(t), log: &testwait.Buffer{}}
		cmd := command(c, r.addr)
		cmd.Stdout, cmd.Stderr = r.log, r.log
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			cmd.Process.Signal(syscall.SIGTERM)
			done := make(chan struct{})
			go func() { cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				cmd.Process.Kill()
				<-done
			}
			if t.Failed() {
				t.Logf("%s (walhook %s):\n%s", c.name, c.args[0], r.log.String())
			}
		})
		procs = append(procs, r)
	}
	for _, r := range procs {
		for _, p := range r.c.probes {
			testwait.For(t, time.Minute, fmt.Sprintf("%s: %s to answer 200", r.c.name, p), func() bool { return get(r.addr, p) == http.StatusOK })
		}
	}

	// The worker takes every partition (its leases work with this config).
	testwait.For(t, time.Minute, "the worker to own every partition", func() bool {
		return metricValue(procs[1].addr, "walhook_relay_partitions_owned") == fmt.Sprint(relay["partitions"])
	})

	// Every metric the alerts and the dashboard use is served.
	used := map[string]bool{}
	for _, n := range metricRE.FindAllString(string(rules)+string(dash), -1) {
		used[n] = true
	}
	var missing []string
	deadline := time.Now().Add(30 * time.Second) // the stream's gauges come with the first poll
	for {
		served := map[string]bool{}
		for _, r := range procs {
			for n := range metricNames(r.addr) {
				served[n] = true
			}
		}
		missing = missing[:0]
		for n := range used {
			if !served[n] {
				missing = append(missing, n)
			}
		}
		if len(missing) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond) // poll interval
	}
	sort.Strings(missing)
	for _, n := range missing {
		t.Errorf("the relay alerts or dashboard use %s, which neither walhook run nor walhook deliver serves", n)
	}
}

func get(addr, path string) int {
	resp, err := http.Get("http://" + addr + path)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// metricNames are the metric families addr serves, with a histogram's
// _bucket, _sum and _count.
func metricNames(addr string) map[string]bool {
	names := map[string]bool{}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return names
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) == 4 && f[0] == "#" && f[1] == "TYPE" {
			names[f[2]] = true
			if f[3] == "histogram" {
				for _, s := range []string{"_bucket", "_sum", "_count"} {
					names[f[2]+s] = true
				}
			}
		}
	}
	return names
}

// metricValue is an unlabelled metric's value as addr serves it, "" if none.
func metricValue(addr, name string) string {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			return v
		}
	}
	return ""
}

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
