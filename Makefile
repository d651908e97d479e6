# flowbus. `make test` is what CI runs (via .ci/run); `make run` is the demo.
SHELL := /bin/bash
GO ?= go
BIN := bin
MULTIARCH := $(shell gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
FUZZTIME ?= 15s

.PHONY: all build generate test check unit fuzz run bench compose-config clean

all: build

build:
	$(GO) build -o $(BIN)/ ./cmd/...

# Rebuild the eBPF objects and Go bindings (needs clang and libbpf-dev).
generate:
	cd bpf && BPF2GO_CFLAGS="-O2 -g -Wall -Werror -I/usr/include/$(MULTIARCH)" $(GO) generate ./...

# Everything CI checks: formatting, vet, the race-enabled tests (privileged
# ones need root) and a bounded run of every fuzz target.
test: check unit fuzz

check:
	@bad=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go') | grep -v '_bpfel.go$$' || true); \
	  if [ -n "$$bad" ]; then echo "gofmt needed: $$bad"; exit 1; fi
	$(GO) vet ./...

unit:
	$(GO) test -race -count=1 -timeout 15m ./...

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

clean:
	rm -rf $(BIN) bench/results.json
