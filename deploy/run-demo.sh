#!/usr/bin/env bash
# The demo: flowagent on its embedded JetStream (the whole host, or
# FLOWBUS_CGROUP_PATH), and flowtail showing live flows until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
	echo "run-demo: flowagent loads eBPF programs: run as root (sudo make run)" >&2
	exit 1
fi
export FLOWBUS_EMBEDDED_LISTEN=${FLOWBUS_EMBEDDED_LISTEN:-127.0.0.1:4222}
export FLOWBUS_METRICS_ADDR=${FLOWBUS_METRICS_ADDR:-127.0.0.1:9464}
log=${FLOWBUS_DEMO_LOG:-/tmp/flowagent-demo.log}

bin/flowagent >"$log" 2>&1 &
agent=$!
trap 'kill -TERM $agent 2>/dev/null; wait $agent 2>/dev/null || true' EXIT INT TERM

for _ in $(seq 100); do
	if ! kill -0 $agent 2>/dev/null; then
		echo "run-demo: flowagent exited; its log ($log):" >&2
		cat "$log" >&2
		exit 1
	fi
	# The metrics endpoint opens once the programs are attached.
	if (: >"/dev/tcp/${FLOWBUS_METRICS_ADDR%:*}/${FLOWBUS_METRICS_ADDR##*:}") 2>/dev/null; then
		break
	fi
	sleep 0.1
done
echo "flowagent is running (log: $log, metrics: http://$FLOWBUS_METRICS_ADDR/metrics)." >&2
echo "Live TCP connection beginnings on this host follow; open a connection (e.g. curl or ssh) to see one. Ctrl-C stops." >&2
bin/flowtail --nats "nats://$FLOWBUS_EMBEDDED_LISTEN" "$@"
