#!/usr/bin/env bash
# Checks the README's first steps as a new user on a fresh Debian would take
# them: a clone of HEAD, an empty HOME (no module or build cache), a clean
# environment with a fresh root's PATH, and /usr/local hidden behind an empty
# tmpfs in a private mount namespace (so no Go of /usr/local/go), then
# `./deploy/install-deps.sh && make build` and every binary's --version.
# Needs root; downloads Go and the modules, so it takes minutes. Not part of
# `make test`; .ci/run runs the test command under the same clean PATH.
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "check-fresh: run as root (it uses a private mount namespace)" >&2; exit 1; }
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/flowbus"
mkdir "$work/home"
unshare -m --propagation private bash -euc '
	mount -t tmpfs tmpfs /usr/local
	mkdir -p /usr/local/bin /usr/local/sbin
	cd "$1/flowbus"
	env -i HOME="$1/home" PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		bash -c "./deploy/install-deps.sh && make build && bin/flowagent --version && bin/flowtail --version && bin/flowstat --version"
' check-fresh "$work"
echo "check-fresh: ok"
