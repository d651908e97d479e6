package proctest

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// Agent is a flowagent process. Its output (stdout and stderr) goes to a log
// file; it is killed when this process dies.
type Agent struct {
	// LogPath is the file the agent's output goes to.
	LogPath string
	cmd     *exec.Cmd
	exited  chan struct{}
	exitErr error
}

// StartAgent runs bin with env (KEY=value, later entries override earlier
// ones) and none of this process's FLOWBUS_ variables, writing its output
// to logPath.
func StartAgent(bin string, env []string, logPath string) (*Agent, error) {
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	a := &Agent{LogPath: logPath, exited: make(chan struct{})}
	a.cmd = exec.Command(bin)
	a.cmd.Env = Environ(env...)
	a.cmd.Stdout, a.cmd.Stderr = logf, logf
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := a.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	go func() { a.exitErr = a.cmd.Wait(); close(a.exited) }()
	return a, nil
}

// EnvList turns a map of variables into StartAgent's KEY=value list.
func EnvList(env map[string]string) []string {
	l := make([]string, 0, len(env))
	for k, v := range env {
		l = append(l, k+"="+v)
	}
	return l
}

// Pid is the agent's process id.
func (a *Agent) Pid() int { return a.cmd.Process.Pid }

// Exited is closed once the agent has ended.
func (a *Agent) Exited() <-chan struct{} { return a.exited }

// ExitErr is how the agent ended (nil: status 0); valid once Exited is
// closed.
func (a *Agent) ExitErr() error { return a.exitErr }

// Log is everything the agent wrote so far.
func (a *Agent) Log() string {
	b, _ := os.ReadFile(a.LogPath)
	return string(b)
}

// Signal sends sig unless the agent has ended and, for SIGKILL, waits for
// the end.
func (a *Agent) Signal(sig syscall.Signal) {
	select {
	case <-a.exited:
		return
	default:
	}
	_ = a.cmd.Process.Signal(sig)
	if sig == syscall.SIGKILL {
		<-a.exited
	}
}

// Wait waits up to d for the agent to exit and returns its exit status: -1
// if it was still running (it is killed then), -2 if it ended without one
// (a signal).
func (a *Agent) Wait(d time.Duration) int {
	select {
	case <-a.exited:
	case <-time.After(d):
		a.Signal(syscall.SIGKILL)
		return -1
	}
	if a.exitErr == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(a.exitErr, &ee) {
		return ee.ExitCode()
	}
	return -2
}

// WaitReadyz polls http://metricsAddr/readyz until it answers 200, the agent
// exits, ctx ends or d passes.
func (a *Agent) WaitReadyz(ctx context.Context, metricsAddr string, d time.Duration) error {
	deadline := time.Now().Add(d)
	client := &http.Client{Timeout: time.Second}
	for {
		resp, err := client.Get("http://" + metricsAddr + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-a.exited:
			return fmt.Errorf("exited before ready (%v)", a.exitErr)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %v", d)
		}
	}
}

// WaitReadyFile waits up to d for the file FLOWBUS_READY_FILE names to name
// this agent's pid, and returns its key=value lines (pid, run_id, nats_url).
func (a *Agent) WaitReadyFile(path string, d time.Duration) (map[string]string, error) {
	want := fmt.Sprintf("pid=%d\n", a.Pid())
	deadline := time.Now().Add(d)
	for {
		b, _ := os.ReadFile(path)
		if strings.HasPrefix(string(b), want) {
			m := map[string]string{}
			for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
				k, v, _ := strings.Cut(l, "=")
				m[k] = v
			}
			return m, nil
		}
		select {
		case <-a.exited:
			return nil, errors.New("exited before it was ready")
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no ready file naming pid %d after %v (file: %q)", a.Pid(), d, b)
		}
	}
}

// WaitLog waits up to d for the agent's log to contain s.
func (a *Agent) WaitLog(d time.Duration, s string) bool {
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if strings.Contains(a.Log(), s) {
			return true
		}
	}
	return false
}
