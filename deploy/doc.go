// Package deploy holds walhook's deployment files: the Dockerfile, Kubernetes
// manifests for direct mode (kubernetes/) and relay mode (kubernetes/relay/),
// values for the official NATS Helm chart (nats/), Prometheus rules and
// Grafana dashboards (grafana/). It has no Go code; its tests check that every
// file parses, and that the relay manifests run as written: their config, their
// commands and flags, their probes, and the metrics their alerts and panels
// use (cmd/walhook's TestDeployManifests does the same for direct mode).
package deploy
