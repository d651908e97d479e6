// Package deploytest validates the deployment artifacts under deploy/ and
// docker-compose.yml: the Kubernetes manifests (strictly decoded into the
// typed Kubernetes API objects), the NATS server configurations (parsed by
// nats-server itself), the Compose file, the systemd units, the Prometheus
// alert rules and the Grafana dashboard. It has no code outside its tests.
package deploytest
