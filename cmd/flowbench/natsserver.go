package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/flowbus/flowbus/cmd/internal/proctest"
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

// ensureNATSServer builds (once, cached) nats-server at the version of our
// go.mod, so B3 and B5 measure the server the agent embeds.
func ensureNATSServer(ctx context.Context, modRoot string) (bin, version string, err error) {
	bin, version, err = proctest.BuildNATSServer(ctx, modRoot, toolCache())
	if err != nil {
		return "", "", oneLine(err)
	}
	return bin, version, nil
}

// oneLine keeps an error's first line and the last of the output after it
// (a build's, a log's), for a table note.
func oneLine(err error) error {
	first, rest, ok := strings.Cut(err.Error(), "\n")
	if !ok {
		return err
	}
	return fmt.Errorf("%s %s", first, lastLine(rest))
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
// storage, with its own directory.
type natsServerProc struct {
	*proctest.NATSServer
	dir string
}

// startNATSServer starts bin with JetStream storing under a fresh directory
// in tmp, listening on a free loopback port, and waits until it accepts
// connections.
func startNATSServer(ctx context.Context, bin, tmp string) (*natsServerProc, error) {
	dir, err := os.MkdirTemp(tmp, "nats-server-")
	if err != nil {
		return nil, err
	}
	s, err := proctest.NewNATSServer(bin, dir, proctest.NATSOptions{})
	if err == nil {
		err = s.Start(ctx)
	}
	if err != nil {
		os.RemoveAll(dir)
		return nil, oneLine(err)
	}
	return &natsServerProc{NATSServer: s, dir: dir}, nil
}

// Stop terminates the server and removes its store.
func (s *natsServerProc) Stop() {
	defer os.RemoveAll(s.dir)
	s.NATSServer.Stop(syscall.SIGTERM, 10*time.Second)
}
