package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/flowbus/flowbus/cmd/internal/proctest"
)

// agentProc is one flowagent subprocess with its own embedded JetStream
// server, store directory and metrics endpoint.
type agentProc struct {
	*proctest.Agent
	Metrics string // host:port of /metrics
	NATS    string // host:port of the embedded server
	dir     string

	stopOnce sync.Once
	stopErr  error
}

// startAgent starts the agent watching cgroupPath and waits for /readyz.
// extraEnv (KEY=value) is added last, so it overrides ours (an external
// FLOWBUS_NATS_URL, say).
func startAgent(ctx context.Context, bin, cgroupPath, tmp string, extraEnv ...string) (*agentProc, error) {
	dir, err := os.MkdirTemp(tmp, "agent-")
	if err != nil {
		return nil, err
	}
	metrics, err := proctest.FreeAddr()
	if err != nil {
		return nil, err
	}
	natsAddr, err := proctest.FreeAddr()
	if err != nil {
		return nil, err
	}
	env := append([]string{
		"FLOWBUS_CGROUP_PATH=" + cgroupPath,
		"FLOWBUS_EMBEDDED_LISTEN=" + natsAddr,
		"FLOWBUS_EMBEDDED_STORE_DIR=" + filepath.Join(dir, "store"),
		"FLOWBUS_SPOOL_DIR=" + filepath.Join(dir, "spool"),
		"FLOWBUS_METRICS_ADDR=" + metrics,
		"FLOWBUS_HOST=bench",
	}, extraEnv...)
	pa, err := proctest.StartAgent(bin, env, filepath.Join(dir, "agent.log"))
	if err != nil {
		return nil, err
	}
	a := &agentProc{Agent: pa, Metrics: metrics, NATS: natsAddr, dir: dir}
	if err := pa.WaitReadyz(ctx, metrics, 30*time.Second); err != nil {
		if ctx.Err() == nil {
			err = fmt.Errorf("agent %w: %s", err, a.logTail())
		}
		_ = a.Stop()
		return nil, err
	}
	return a, nil
}

// logTail returns the last lines of the agent's log, for error messages.
func (a *agentProc) logTail() string {
	return strings.ReplaceAll(strings.TrimSpace(proctest.Tail(a.LogPath, 5)), "\n", " | ")
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
	a.Signal(syscall.SIGTERM)
	select {
	case <-a.Exited():
		err := a.ExitErr()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return fmt.Errorf("agent exit: %w: %s", err, a.logTail())
		}
		return err
	case <-time.After(20 * time.Second):
		a.Signal(syscall.SIGKILL)
		return errors.New("agent did not exit within 20 s of SIGTERM; killed")
	}
}

// Scrape reads the agent's Prometheus metrics into "name{labels}" → value.
func (a *agentProc) Scrape() (map[string]float64, error) { return proctest.Scrape(a.Metrics) }
