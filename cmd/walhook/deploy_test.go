package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/walhook/walhook/cdc"
	"github.com/walhook/walhook/outbox"
	"github.com/walhook/walhook/outbox/pgstore"
	"go.yaml.in/yaml/v3"
)

// metricNames are the metrics walhook serves.
func metricNames(t *testing.T) map[string]bool {
	reg := prometheus.NewRegistry()
	acker := outbox.NewAcker(0)
	m := outbox.NewMetrics(reg, acker)
	m.SetStored(map[string]outbox.StoredStats{})
	d := outbox.NewDispatcher(outbox.DispatcherConfig{Subscriptions: []*outbox.Subscription{{ID: "s", Events: []string{"*"}}},
		Acker: acker, Metrics: m, Logger: zerolog.Nop()})
	_ = d
	stream := cdc.NewStream(cdc.Config{Registerer: reg}, acker, zerolog.Nop())
	pgstore.NewProber(reg, nil, m, acker, streamHold{stream}, zerolog.Nop())
	names := map[string]bool{}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		names[f.GetName()] = true
		if f.GetType().String() == "HISTOGRAM" {
			for _, s := range []string{"_bucket", "_count", "_sum"} {
				names[f.GetName()+s] = true
			}
		}
	}
	// Vectors and per-subscription gauges show only once they have series.
	for _, n := range []string{"walhook_deliveries_total", "walhook_delivery_attempts_total", "walhook_coalesced_events_total",
		"walhook_pending_events", "walhook_oldest_pending_seconds", "walhook_parked_events", "walhook_dead_letters"} {
		names[n] = true
	}
	return names
}

var metricRE = regexp.MustCompile(`walhook_[a-z_]+`)

func checkMetrics(t *testing.T, where, text string, names map[string]bool) {
	for _, n := range metricRE.FindAllString(text, -1) {
		if !names[n] {
			t.Errorf("%s uses metric %s, which walhook does not serve", where, n)
		}
	}
}

// TestDeployManifests: the manifests parse, and use only commands, flags, env
// variables, ports, paths and metrics the binary has.
func TestDeployManifests(t *testing.T) {
	names := metricNames(t)
	files, _ := filepath.Glob("../../deploy/kubernetes/*.yaml")
	if len(files) == 0 {
		t.Fatal("no manifests")
	}
	var docs []map[string]any
	for _, f := range files {
		data, _ := os.ReadFile(f)
		dec := yaml.NewDecoder(bytes.NewReader(data))
		for {
			var doc map[string]any
			err := dec.Decode(&doc)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			docs = append(docs, doc)
		}
	}
	byKind := map[string][]map[string]any{}
	for _, d := range docs {
		byKind[d["kind"].(string)] = append(byKind[d["kind"].(string)], d)
	}
	// The config in the ConfigMap is valid with the env the Secret gives.
	env := map[string]string{}
	for _, s := range byKind["Secret"] {
		for k, v := range s["stringData"].(map[string]any) {
			env[k] = v.(string)
			if _, ok := (&Config{}).envKeys()[strings.ToLower(strings.TrimPrefix(k, "WALHOOK_"))]; !ok || !strings.HasPrefix(k, "WALHOOK_") {
				t.Errorf("Secret sets %s, which walhook does not read", k)
			}
		}
	}
	cm := byKind["ConfigMap"][0]["data"].(map[string]any)["walhook.yaml"].(string)
	path := filepath.Join(t.TempDir(), "walhook.yaml")
	os.WriteFile(path, []byte(cm), 0o600)
	cfg, err := loadConfig(path, func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(true); err != nil {
		t.Errorf("ConfigMap walhook.yaml: %v", err)
	}
	if cfg.apiDisabled() != "" {
		t.Errorf("the manifests listen off loopback without an admin token")
	}
	_, port, _ := strings.Cut(cfg.Listen, ":")

	for _, dep := range byKind["Deployment"] {
		spec := dep["spec"].(map[string]any)["template"].(map[string]any)["spec"].(map[string]any)
		var containers []any
		for _, k := range []string{"initContainers", "containers"} {
			if c, ok := spec[k].([]any); ok {
				containers = append(containers, c...)
			}
		}
		found := 0
		for _, c := range containers {
			c := c.(map[string]any)
			if !strings.Contains(c["image"].(string), "walhook") {
				continue
			}
			found++
			var args []string
			for _, a := range c["args"].([]any) {
				args = append(args, a.(string))
			}
			fs := newFlagSet(args[0], noEnv, &cliFlags{})
			if fs == nil {
				t.Errorf("%s: unknown command %q", c["name"], args[0])
				continue
			}
			for _, a := range args[1:] {
				if name, ok := strings.CutPrefix(a, "--"); ok && fs.Lookup(name) == nil {
					t.Errorf("%s: walhook %s has no flag --%s", c["name"], args[0], name)
				}
			}
			if ports, ok := c["ports"].([]any); ok {
				for _, p := range ports {
					if got := strings.TrimSpace(jsonString(p.(map[string]any)["containerPort"])); got != port {
						t.Errorf("%s: containerPort %s, walhook listens on %s", c["name"], got, port)
					}
				}
			}
			for _, probe := range []string{"livenessProbe", "readinessProbe"} {
				if p, ok := c[probe].(map[string]any); ok {
					path := p["httpGet"].(map[string]any)["path"].(string)
					if path != "/healthz" && path != "/readyz" {
						t.Errorf("%s: %s on %s, which walhook does not serve", c["name"], probe, path)
					}
				}
			}
			sc := c["securityContext"].(map[string]any)
			if sc["readOnlyRootFilesystem"] != true || sc["allowPrivilegeEscalation"] != false {
				t.Errorf("%s: securityContext %v", c["name"], sc)
			}
		}
		if found < 2 {
			t.Errorf("want walhook as init (setup) and sidecar container, found %d", found)
		}
	}
	for _, sm := range byKind["ServiceMonitor"] {
		for _, ep := range sm["spec"].(map[string]any)["endpoints"].([]any) {
			if p := ep.(map[string]any)["path"]; p != "/metrics" {
				t.Errorf("ServiceMonitor scrapes %v", p)
			}
		}
	}
	rules, _ := json.Marshal(byKind["PrometheusRule"])
	checkMetrics(t, "PrometheusRule", string(rules), names)
	for _, alert := range []string{"ReplicationLagBytes", "ReplicationLagSeconds", "RetainedWALNearLimit", "DeadLettersGrowing", "NotReady", "NoActiveReplica"} {
		if !strings.Contains(string(rules), "Walhook"+alert) {
			t.Errorf("no alert Walhook%s", alert)
		}
	}
	dash, err := os.ReadFile("../../deploy/grafana/walhook.json")
	if err != nil || !json.Valid(dash) {
		t.Fatalf("grafana dashboard: %v", err)
	}
	checkMetrics(t, "the Grafana dashboard", string(dash), names)
	docker, _ := os.ReadFile("../../deploy/Dockerfile")
	for _, want := range []string{`HEALTHCHECK --interval=10s --timeout=3s CMD ["/walhook", "healthcheck"]`, `CMD ["run", "--config"`, "USER 65532", "CGO_ENABLED=0"} {
		if !strings.Contains(string(docker), want) {
			t.Errorf("Dockerfile lacks %s", want)
		}
	}
}

func jsonString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
