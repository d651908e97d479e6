package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// agentProc is one flowagent subprocess with its own embedded JetStream
// server, store directory and metrics endpoint.
type agentProc struct {
	cmd     *exec.Cmd
	Metrics string // host:port of /metrics
	NATS    string // host:port of the embedded server
	dir     string
	logPath string
	exited  chan error

	stopOnce sync.Once
	stopErr  error
}

// freePort asks the kernel for an unused loopback port.
func freePort() (string, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// startAgent starts the agent watching cgroupPath and waits for /readyz.
// extraEnv (KEY=value) is added last, so it overrides ours (an external
// FLOWBUS_NATS_URL, say).
func startAgent(ctx context.Context, bin, cgroupPath, tmp string, extraEnv ...string) (*agentProc, error) {
	dir, err := os.MkdirTemp(tmp, "agent-")
	if err != nil {
		return nil, err
	}
	metrics, err := freePort()
	if err != nil {
		return nil, err
	}
	natsAddr, err := freePort()
	if err != nil {
		return nil, err
	}
	a := &agentProc{Metrics: metrics, NATS: natsAddr, dir: dir, logPath: filepath.Join(dir, "agent.log"), exited: make(chan error, 1)}
	logf, err := os.Create(a.logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	// A FLOWBUS_* variable inherited from the caller's shell (a NATS URL, say)
	// would silently change what is measured: pass only ours.
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "FLOWBUS_") {
			env = append(env, kv)
		}
	}
	env = append(env,
		"FLOWBUS_CGROUP_PATH="+cgroupPath,
		"FLOWBUS_EMBEDDED_LISTEN="+natsAddr,
		"FLOWBUS_EMBEDDED_STORE_DIR="+filepath.Join(dir, "store"),
		"FLOWBUS_SPOOL_DIR="+filepath.Join(dir, "spool"),
		"FLOWBUS_METRICS_ADDR="+metrics,
		"FLOWBUS_HOST=bench",
	)
	env = append(env, extraEnv...)
	a.cmd = exec.Command(bin)
	a.cmd.Env = env
	a.cmd.Stdout = logf
	a.cmd.Stderr = logf
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := a.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	go func() { a.exited <- a.cmd.Wait() }()

	deadline := time.Now().Add(30 * time.Second)
	client := &http.Client{Timeout: time.Second}
	for {
		resp, err := client.Get("http://" + metrics + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return a, nil
			}
		}
		select {
		case err := <-a.exited:
			a.exited <- err
			return nil, fmt.Errorf("agent exited before ready (%v): %s", err, a.logTail())
		case <-ctx.Done():
			_ = a.Stop()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = a.Stop()
			return nil, fmt.Errorf("agent not ready after 30 s: %s", a.logTail())
		}
	}
}

// Pid is the agent's process id.
func (a *agentProc) Pid() int { return a.cmd.Process.Pid }

// logTail returns the last lines of the agent's log, for error messages.
func (a *agentProc) logTail() string {
	b, _ := os.ReadFile(a.logPath)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 5 {
		lines = lines[len(lines)-5:]
	}
	return strings.Join(lines, " | ")
}

// Stop sends SIGTERM (the agent flushes and exits), kills it after 20 s, and
// removes its store. Only the first call acts; later ones (a deferred Stop
// after an explicit one) return its result.
func (a *agentProc) Stop() error {
	a.stopOnce.Do(func() { a.stopErr = a.stop() })
	return a.stopErr
}

func (a *agentProc) stop() error {
	defer os.RemoveAll(a.dir)
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-a.exited:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return fmt.Errorf("agent exit: %w: %s", err, a.logTail())
		}
		return err
	case <-time.After(20 * time.Second):
		_ = a.cmd.Process.Kill()
		<-a.exited
		return errors.New("agent did not exit within 20 s of SIGTERM; killed")
	}
}

// Scrape reads the agent's Prometheus metrics into "name{labels}" → value.
func (a *agentProc) Scrape() (map[string]float64, error) {
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get("http://" + a.Metrics + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return parseProm(resp.Body)
}

// parseProm parses the Prometheus text format, enough for counters and
// gauges: comment lines skipped, "name{labels} value" kept as is.
func parseProm(r io.Reader) (map[string]float64, error) {
	m := map[string]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		m[line[:i]] = v
	}
	return m, sc.Err()
}

// sumPrefix adds every series whose key starts with prefix.
func sumPrefix(m map[string]float64, prefix string) float64 {
	var s float64
	for k, v := range m {
		if strings.HasPrefix(k, prefix) {
			s += v
		}
	}
	return s
}
