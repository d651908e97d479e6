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
# The agent writes this file, naming its own pid, once it runs: a port that
# answers could be another agent's, this file cannot.
ready=$(mktemp -u "${TMPDIR:-/tmp}/flowagent-demo.XXXXXX.ready")
export FLOWBUS_READY_FILE=$ready

agent= tailer=
cleanup() {
	[ -n "$tailer" ] && kill -TERM "$tailer" 2>/dev/null || true
	[ -n "$agent" ] && kill -TERM "$agent" 2>/dev/null || true
	[ -n "$agent" ] && wait "$agent" 2>/dev/null || true
	rm -f "$ready"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# died: the agent is gone; show why, on screen, and fail.
died() {
	echo "run-demo: flowagent (pid $agent) $1; its log ($log):" >&2
	tail -n 20 "$log" >&2
	exit 1
}

bin/flowagent >"$log" 2>&1 &
agent=$!
for _ in $(seq 300); do
	kill -0 "$agent" 2>/dev/null || died "exited"
	if [ -f "$ready" ] && grep -qx "pid=$agent" "$ready"; then
		break
	fi
	sleep 0.1
done
grep -qx "pid=$agent" "$ready" 2>/dev/null || died "is not ready after 30 s"
url=$(sed -n 's/^nats_url=//p' "$ready")
echo "flowagent is running (pid $agent, log: $log, metrics: http://$FLOWBUS_METRICS_ADDR/metrics)." >&2
echo "Live TCP connection beginnings on this host follow; open a connection (e.g. curl or ssh) to see one. Ctrl-C stops." >&2

# flowtail runs beside a watch on the agent, so that an agent that dies
# says so at once instead of leaving flowtail waiting on a server gone.
bin/flowtail --nats "$url" "$@" &
tailer=$!
while kill -0 "$tailer" 2>/dev/null; do
	kill -0 "$agent" 2>/dev/null || died "stopped"
	sleep 0.2
done
set +e
wait "$tailer"
status=$?
tailer=
exit $status
