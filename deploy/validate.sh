#!/usr/bin/env bash
# Validates the deployment artifacts offline, in a few seconds:
#   - docker-compose.yml with `docker compose config -q` or `docker-compose config -q` (required),
#   - the Kubernetes manifests, strictly decoded into the typed Kubernetes API objects, and
#     checked for what the API server or the pods would reject,
#   - the NATS configurations, parsed by nats-server,
#   - the systemd units with `systemd-analyze verify` (skipped if absent),
#   - the Prometheus rules: `promtool check rules` and `promtool test rules` with
#     deploy/prometheus/alerts_test.yml (required), the PrometheusRule copy of
#     them, the Prometheus configuration of OPERATIONS.md (`promtool check config`),
#   - the Grafana dashboard.
# All of it is the Go test package deploy/deploytest; `go test ./...` runs it
# too, but skips the Compose check there when no docker-compose is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH
FLOWBUS_DEPLOY_STRICT=1 exec go test -count=1 -v ./deploy/deploytest/ "$@"
