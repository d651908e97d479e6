// Package proctest runs flowbus's programs and their peers as real processes,
// for the process-level tests of cmd/flowagent and for cmd/flowbench: the
// flowagent binary and nats-server (built at the version go.mod selects),
// free loopback ports, a process's CPU and memory from /proc, the agent's
// Prometheus metrics, child cgroups, and the traffic run inside them: the
// exact connection storm of the tests (StormMain) and the benchmarks' load
// (LoadMain: a storm measured for its rate, a bulk stream).
//
// Nothing here depends on package testing: callers turn errors into test
// failures or benchmark notes as they see fit.
package proctest

import (
	"net"
	"os"
	"strings"
)

// FreePort asks the kernel for an unused loopback port. The port is free
// when FreePort returns; whoever binds it next wins it.
func FreePort() (int, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// FreeAddr is FreePort as "127.0.0.1:port".
func FreeAddr() (string, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// Tail returns the last n lines of a file (a log), for failure messages;
// nothing when the file cannot be read.
func Tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Environ is this process's environment without any FLOWBUS_ variable, then
// env (KEY=value): one inherited from the caller's shell (a NATS URL, say)
// would silently change what a child agent does.
func Environ(env ...string) []string {
	var l []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "FLOWBUS_") {
			l = append(l, kv)
		}
	}
	return append(l, env...)
}
