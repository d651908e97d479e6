#!/usr/bin/env bash
# The demo: flowagent on its embedded JetStream (the whole host, or
# FLOWBUS_CGROUP_PATH), flowtail showing live flows until Ctrl-C, and beside
# them flowstat aggregating into its database and serving the web view
# (FLOWBUS_DEMO_WEB=0 leaves flowstat out).
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

web=${FLOWBUS_DEMO_WEB:-1}
web_listen=${FLOWBUS_DEMO_WEB_LISTEN:-127.0.0.1:9466}
statlog=${FLOWBUS_DEMO_STAT_LOG:-/tmp/flowstat-demo.log}

agent= tailer= stat= serve=
cleanup() {
	[ -n "$tailer" ] && kill -TERM "$tailer" 2>/dev/null || true
	[ -n "$serve" ] && kill -TERM "$serve" 2>/dev/null || true
	[ -n "$stat" ] && kill -TERM "$stat" 2>/dev/null || true
	[ -n "$serve" ] && wait "$serve" 2>/dev/null || true
	[ -n "$stat" ] && wait "$stat" 2>/dev/null || true
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

# flowstat: aggregates into its database (FLOWBUS_DB, else flowstat.db in
# the state directory, beside the embedded store) and serves the web view.
# Not needed for the live flows: if it cannot start, the demo says why and
# goes on.
if [ "$web" != 0 ]; then
	bin/flowstat run --nats "$url" >"$statlog" 2>&1 &
	stat=$!
	bin/flowstat serve --nats "$url" --listen "$web_listen" >>"$statlog" 2>&1 &
	serve=$!
	sleep 1
	if kill -0 "$stat" 2>/dev/null && kill -0 "$serve" 2>/dev/null; then
		echo "flowstat is aggregating (log: $statlog); web view: http://$web_listen/" >&2
	else
		echo "run-demo: flowstat did not start (the live flows below do not need it); its log ($statlog):" >&2
		tail -n 5 "$statlog" >&2
	fi
fi
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
