# flowbus. `make test` is what CI runs (via .ci/run); `make run` is the demo.
SHELL := /bin/bash
# deploy/install-deps.sh installs the Go that go.mod asks for in /usr/local/go,
# which a fresh Debian root's PATH does not hold, and Debian's golang-go (in
# /usr/bin) may be older: put ours first, for make and every tool it runs.
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/flowbus/flowbus/cmd/internal/buildinfo.Version=$(VERSION)
BIN := bin
MULTIARCH := $(shell gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
FUZZTIME ?= 15s

.PHONY: all build generate test check unit validate fuzz run bench compose-up compose-down clean webview-assets

all: build

build:
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/...

# Rebuild the eBPF objects and Go bindings (needs clang and libbpf-dev).
generate:
	cd bpf && BPF2GO_CFLAGS="-O2 -g -Wall -Werror -I/usr/include/$(MULTIARCH)" $(GO) generate ./...

# Everything CI checks: formatting, vet, the race-enabled tests (privileged
# ones need root) and a bounded run of every fuzz target.
test: check unit validate fuzz

check:
	@bad=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go') | grep -v '_bpfel.go$$' || true); \
	  if [ -n "$$bad" ]; then echo "gofmt needed: $$bad"; exit 1; fi
	$(GO) vet ./...
	@# staticcheck is installed, pinned, by deploy/install-deps.sh.
	"$$($(GO) env GOPATH)/bin/staticcheck" ./...

unit:
	$(GO) test -race -count=1 -timeout 15m ./...

# The deployment files, offline: docker-compose.yml (docker-compose config),
# the Kubernetes manifests (strictly decoded into the API's types), the NATS
# configs, the systemd units, the alert rules and the dashboard.
validate:
	./deploy/validate.sh

fuzz:
	@set -e; for pkg in $$($(GO) list ./...); do \
	  dir=$$($(GO) list -f '{{.Dir}}' $$pkg); \
	  for f in $$(grep -ho '^func Fuzz[A-Za-z0-9_]*' $$dir/*_test.go 2>/dev/null | sed 's/^func //'); do \
	    echo "fuzz $$pkg $$f ($(FUZZTIME))"; \
	    $(GO) test -run='^$$' -fuzz="^$$f$$" -fuzztime=$(FUZZTIME) $$pkg; \
	  done; \
	done

# The main job: the agent on its embedded JetStream, and flowtail showing live flows.
run: build
	./deploy/run-demo.sh

bench: build
	$(GO) run ./cmd/flowbench

# The dev stack (needs a Docker engine): NATS with JetStream, the agent,
# flowstat; `docker compose -p flowbus --profile tail run --rm flowtail` for live flows.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
compose-up:
	$(COMPOSE) -p flowbus up -d --build

compose-down:
	$(COMPOSE) -p flowbus down

# Vendor flowstat serve's charting library from npm (package-lock.json) into
# consumers/webview/assets/vendor, which is committed: go build needs no npm.
webview-assets:
	./consumers/webview/web/build.sh

clean:
	rm -rf $(BIN) bench/results.json
