#!/usr/bin/env bash
# Installs what flowbus needs on a Debian machine, as root: a Go toolchain of
# the version go.mod asks for, gcc (for -race), make, git and iproute2; for
# the tests also PostgreSQL (flowstat's tests start a server of their own on
# loopback), docker-compose (validates docker-compose.yml; no engine needed)
# systemd (systemd-analyze verifies the units), prometheus (its promtool tests
# the alert rules), tcpdump (the tests compare event times with its packet
# times), nftables (the end-event tests inject loss with it: no netem here),
# staticcheck (pinned; `make check`) and Node.js with schema/jstest's npm packages (the JavaScript
# decoding test).
# clang and libbpf-dev are only needed to regenerate the eBPF objects
# (`make generate`); pass --generate to install them too. --bench adds
# libbpf-tools for `make bench` (B1p).
set -euo pipefail
cd "$(dirname "$0")/.."

want_go=$(sed -n 's/^go \([0-9.]*\)$/\1/p' go.mod)
export PATH=/usr/local/go/bin:$PATH

log() { printf 'install-deps: %s\n' "$*" >&2; }

apt_install() {
	local missing=()
	for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
	[ ${#missing[@]} -eq 0 ] && return 0
	if [ "$(id -u)" -ne 0 ]; then
		log "missing Debian packages: ${missing[*]}; run this script as root (or apt-get install them)"
		exit 1
	fi
	log "installing ${missing[*]}"
	if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq; APT_UPDATED=1; fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pkgs=(gcc libc6-dev make git iproute2 ca-certificates postgresql docker-compose systemd prometheus tcpdump nftables chromium)
for a in "$@"; do
	case $a in
	--generate) pkgs+=(clang llvm libbpf-dev) ;;
	--bench) pkgs+=(libbpf-tools) ;; # tcpstates, the peer of B1p
	*) log "unknown option $a (--generate, --bench)"; exit 2 ;;
	esac
done
had_prometheus=$(dpkg -s prometheus >/dev/null 2>&1 && echo yes || true)
apt_install "${pkgs[@]}"
# Only promtool is wanted (make validate checks and tests the alert rules):
# the server the package enables is not.
if [ -z "$had_prometheus" ] && command -v systemctl >/dev/null 2>&1; then
	systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

go_ok() {
	command -v go >/dev/null 2>&1 || return 1
	local have
	have=$(go env GOVERSION 2>/dev/null | sed 's/^go//')
	[ -n "$have" ] && [ "$(printf '%s\n%s\n' "$want_go" "$have" | sort -V | head -1)" = "$want_go" ]
}

if ! go_ok; then
	# Debian's Go may be older than go.mod wants. Any Go can fetch the
	# official toolchain as the module golang.org/toolchain through the
	# module proxy, which is then installed at /usr/local/go.
	command -v go >/dev/null 2>&1 || apt_install golang-go
	export PATH=$PATH:/usr/lib/go/bin
	arch=$(dpkg --print-architecture)
	mod="golang.org/toolchain@v0.0.1-go${want_go}.linux-${arch}"
	log "fetching Go ${want_go} ($mod)"
	tmp=$(mktemp -d)
	(cd "$tmp" && GOFLAGS=-modcacherw GOTOOLCHAIN=local go mod init tmp >/dev/null 2>&1 && \
		GOFLAGS=-modcacherw GOTOOLCHAIN=local go mod download -json "$mod" > dl.json)
	dir=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' "$tmp/dl.json")
	[ -d "$dir" ] || { log "could not fetch $mod"; exit 1; }
	rm -rf /usr/local/go && cp -r "$dir" /usr/local/go && chmod -R u+w,a+rX /usr/local/go && chmod +x /usr/local/go/bin/* /usr/local/go/pkg/tool/*/*
	rm -rf "$tmp"
	go_ok || { log "Go ${want_go} not usable after install"; exit 1; }
fi
# staticcheck, pinned: `make check` runs it.
staticcheck_version=0.8.2 # staticcheck 2026.2.2
gobin=$(go env GOPATH)/bin
if ! "$gobin/staticcheck" -version 2>/dev/null | grep -qF "($staticcheck_version)"; then
	log "installing staticcheck $staticcheck_version"
	GOFLAGS=-modcacherw go install "honnef.co/go/tools/cmd/staticcheck@v$staticcheck_version"
fi

# The JavaScript decoding test (schema/jstest) runs the official NATS client
# on Node.js. A Node.js from elsewhere (NodeSource) bundles npm, and its
# package conflicts with Debian's npm: only install when npm is missing.
command -v npm >/dev/null 2>&1 || apt_install nodejs npm
(cd schema/jstest && npm ci --no-audit --no-fund --loglevel=error >/dev/null)

log "ready: $(go version), $("$gobin/staticcheck" -version), node $(node --version)"
