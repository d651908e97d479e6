package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// natscliVersion is the `nats` CLI that B3 compares against (`nats bench js
// pub async`). It is built in a throwaway module, never through our go.mod.
const natscliVersion = "v0.5.1"

// toolCache is where built helper binaries are kept between runs.
func toolCache() string {
	dir, err := os.UserCacheDir()
	if err != nil {
		dir = os.TempDir()
	}
	return filepath.Join(dir, "flowbench")
}

// moduleVersion is the version our go.mod selects for a module.
func moduleVersion(modRoot, path string) (string, error) {
	out, err := exec.Command("go", "list", "-C", modRoot, "-m", "-f", "{{.Version}}", path).Output()
	if err != nil {
		return "", fmt.Errorf("go list -m %s: %w", path, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// ensureNATSServer builds (once, cached) nats-server at the version of our
// go.mod, so B3 and B5 measure the server the agent embeds.
func ensureNATSServer(ctx context.Context, modRoot string) (bin, version string, err error) {
	version, err = moduleVersion(modRoot, "github.com/nats-io/nats-server/v2")
	if err != nil {
		return "", "", err
	}
	bin = filepath.Join(toolCache(), "nats-server-"+version)
	if _, err := os.Stat(bin); err == nil {
		return bin, version, nil
	}
	if err := os.MkdirAll(toolCache(), 0o755); err != nil {
		return "", "", err
	}
	tmpOut := bin + ".tmp"
	cmd := exec.CommandContext(ctx, "go", "build", "-o", tmpOut, "github.com/nats-io/nats-server/v2")
	cmd.Dir = modRoot
	// -mod=readonly: building a dependency must never rewrite our go.mod.
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=readonly")
	if msg, err := cmd.CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("building nats-server %s: %w: %s", version, err, lastLine(string(msg)))
	}
	return bin, version, os.Rename(tmpOut, bin)
}

// ensureNATSCLI builds (once, cached) the nats CLI from the module proxy in a
// temporary module, so that our go.mod is left alone.
func ensureNATSCLI(ctx context.Context, tmp string) (string, error) {
	bin := filepath.Join(toolCache(), "nats-"+natscliVersion)
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	if err := os.MkdirAll(toolCache(), 0o755); err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp(tmp, "natscli-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	env := append(os.Environ(), "GOFLAGS=-mod=mod", "GOWORK=off")
	tmpOut := bin + ".tmp"
	for _, args := range [][]string{
		{"mod", "init", "flowbench-natscli"},
		{"get", "github.com/nats-io/natscli@" + natscliVersion},
		{"build", "-o", tmpOut, "github.com/nats-io/natscli/nats"},
	} {
		cmd := exec.CommandContext(ctx, "go", args...)
		cmd.Dir = dir
		cmd.Env = env
		if msg, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("go %s: %w: %s", strings.Join(args, " "), err, lastLine(string(msg)))
		}
	}
	return bin, os.Rename(tmpOut, bin)
}

// natsServerProc is a standalone nats-server process with JetStream on file
// storage.
type natsServerProc struct {
	cmd    *exec.Cmd
	Addr   string // host:port
	dir    string
	exited chan error
}

// URL is the client URL of the server.
func (s *natsServerProc) URL() string { return "nats://" + s.Addr }

// Pid is the server's process id.
func (s *natsServerProc) Pid() int { return s.cmd.Process.Pid }

// startNATSServer starts bin with JetStream storing under a fresh directory
// in tmp, listening on a free loopback port, and waits until it accepts
// connections.
func startNATSServer(ctx context.Context, bin, tmp string) (*natsServerProc, error) {
	dir, err := os.MkdirTemp(tmp, "nats-server-")
	if err != nil {
		return nil, err
	}
	addr, err := freePort()
	if err != nil {
		return nil, err
	}
	host, port, _ := net.SplitHostPort(addr)
	logf, err := os.Create(filepath.Join(dir, "server.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	s := &natsServerProc{Addr: addr, dir: dir, exited: make(chan error, 1)}
	s.cmd = exec.Command(bin, "-js", "-sd", filepath.Join(dir, "store"), "-a", host, "-p", port, "-m", "0")
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	go func() { s.exited <- s.cmd.Wait() }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
			c.Close()
			return s, nil
		}
		select {
		case err := <-s.exited:
			s.exited <- err
			b, _ := os.ReadFile(filepath.Join(dir, "server.log"))
			return nil, fmt.Errorf("nats-server exited (%v): %s", err, lastLine(string(b)))
		case <-ctx.Done():
			s.Stop()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Stop()
			return nil, errors.New("nats-server not listening after 20 s")
		}
	}
}

// Stop terminates the server and removes its store.
func (s *natsServerProc) Stop() {
	defer os.RemoveAll(s.dir)
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-s.exited:
		s.exited <- err
	case <-time.After(10 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
}
