// Package bpf loads flowbus's eBPF programs, attaches them to a cgroup v2 and
// reads the events they hand over through a ring buffer.
package bpf

// The generated objects and bindings are committed so that `go build` needs no
// clang; `make generate` reruns this with BPF2GO_CFLAGS pointing at the
// multiarch include directory.
//go:generate go tool bpf2go -cc clang -no-strip -target bpfel -type flow_event -type flow4_event -type confirm_event -type dns_event -type dnsq_event -type dns_key -type end_event -type sock_state flowbus flowbus.c
