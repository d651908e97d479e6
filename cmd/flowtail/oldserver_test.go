package main

// End to end, with real processes: a server that was listening before the
// agent started shows in flowtail as the process it is. The agent fills the
// sockets opened before it (bpf Capture.FillExisting, pidfd_getfd over
// /proc); this test proves that what it fills reaches a consumer: the
// incoming begin and end flowtail prints carry the listener's pid, comm and
// uid, in JSON and in the table's PROCESS column.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/cmd/internal/proctest"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
)

// The helpers run in the child cgroup as re-executions of this test binary;
// an init, since this package's TestMain (main_test.go) does not dispatch
// them.
func init() {
	cgrouptest.Register("oldserver-listen", oldServerListen)
	cgrouptest.Register("oldserver-dial", oldServerDial)
	cgrouptest.MaybeRunHelper()
}

// oldServerReport is the line a helper prints: its pid and its address
// (the listener's, or the client's local one).
type oldServerReport struct {
	Pid  int    `json:"pid"`
	Addr string `json:"addr"`
}

// oldServerListen listens on 127.0.0.1 with plain TCP (Go listens with
// Multipath TCP by default, whose subflows no descriptor reaches, so the
// agent could not attribute them), prints its report, then answers each
// connection with one byte and reads it to the end, until stdin closes.
func oldServerListen([]string) error {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				_, _ = c.Write([]byte{'a'})
				_, _ = io.Copy(io.Discard, c)
				c.Close()
			}()
		}
	}()
	if err := json.NewEncoder(os.Stdout).Encode(oldServerReport{os.Getpid(), ln.Addr().String()}); err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}

// oldServerDial connects to args[0], waits for the server's byte (so the
// connection was accepted), prints its report and closes.
func oldServerDial(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("want the listener's address, got %q", args)
	}
	var d net.Dialer
	d.SetMultipathTCP(false)
	d.Timeout = 5 * time.Second
	c, err := d.Dial("tcp", args[0])
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		return fmt.Errorf("reading the server's byte: %w", err)
	}
	return json.NewEncoder(os.Stdout).Encode(oldServerReport{os.Getpid(), c.LocalAddr().String()})
}

// A server listening before the agent starts: flowtail shows its process on
// the incoming begin and end of a connection made afterwards (filled at the
// agent's start), and the client's own process on the outgoing begin (set
// by the connect hook as it happens), in JSON and in the table.
func TestOldServerProcessEndToEnd(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	const (
		host = "host-oldserver"
		comm = "fboldsrv" // the name the listener is executed as: its comm
	)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	root, err := proctest.ModRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	agentBin := filepath.Join(dir, "flowagent")
	if err := proctest.GoBuild(ctx, root, "./cmd/flowagent", agentBin); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, comm)
	if err := os.Symlink(self, exe); err != nil {
		t.Fatal(err)
	}
	srv := tailtest.Start(t)
	cg := cgrouptest.NewChild(t)

	// The server, before the agent.
	lnCmd := cg.Command("oldserver-listen")
	lnCmd.Path, lnCmd.Args[0] = exe, exe
	stdin, err := lnCmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := lnCmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := lnCmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); _ = lnCmd.Process.Kill(); _ = lnCmd.Wait() })
	var ln oldServerReport
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err := errors.Join(err, json.Unmarshal([]byte(line), &ln)); err != nil {
		t.Fatalf("listener's report %q: %v", line, err)
	}
	if ln.Pid != lnCmd.Process.Pid {
		t.Fatalf("listener says pid %d, started as %d", ln.Pid, lnCmd.Process.Pid)
	}

	// The agent, on the server's cgroup.
	metrics, err := proctest.FreeAddr()
	if err != nil {
		t.Fatal(err)
	}
	readyFile := filepath.Join(dir, "ready")
	env := map[string]string{
		"FLOWBUS_NATS_URL":       srv.URL,
		"FLOWBUS_CGROUP_PATH":    cg.Path,
		"FLOWBUS_HOST":           host,
		"FLOWBUS_SPOOL_DIR":      filepath.Join(dir, "spool"),
		"FLOWBUS_RUN_STATE_FILE": filepath.Join(dir, "run.state"),
		"FLOWBUS_READY_FILE":     readyFile,
		"FLOWBUS_METRICS_ADDR":   metrics,
		"FLOWBUS_BATCH_LINGER":   "20ms",
		"FLOWBUS_END_EVENTS":     "true",
		"FLOWBUS_LOG_LEVEL":      "info",
	}
	a, err := proctest.StartAgent(agentBin, proctest.EnvList(env), filepath.Join(dir, "agent.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		a.Signal(syscall.SIGKILL)
		if t.Failed() {
			t.Logf("agent log (tail):\n%s", proctest.Tail(a.LogPath, 25))
		}
	})
	if _, err := a.WaitReadyFile(readyFile, 60*time.Second); err != nil {
		t.Fatalf("agent not ready: %v\n%s", err, proctest.Tail(a.LogPath, 20))
	}
	const filled = "sockets opened before the start attributed"
	if !a.WaitLog(10*time.Second, filled) {
		t.Fatalf("the agent did not log %q:\n%s", filled, proctest.Tail(a.LogPath, 20))
	}
	fillLine := ""
	for _, l := range strings.Split(a.Log(), "\n") {
		if strings.Contains(l, filled) {
			fillLine = l
		}
	}
	t.Logf("agent: %s", fillLine)
	if m := regexp.MustCompile(`\bsockets=(\d+)`).FindStringSubmatch(fillLine); m == nil || m[1] == "0" {
		t.Errorf("the agent filled no socket opened before its start: %s", fillLine)
	}

	// A client in the cgroup connects after the start.
	out, err := cg.Command("oldserver-dial", ln.Addr).Output()
	if err != nil {
		t.Fatalf("client in the cgroup: %v", err)
	}
	var cl oldServerReport
	if err := json.Unmarshal(out, &cl); err != nil {
		t.Fatalf("client's report %q: %v", out, err)
	}
	client := netip.MustParseAddrPort(cl.Addr)
	clientComm := filepath.Base(os.Args[0])
	if len(clientComm) > 15 {
		clientComm = clientComm[:15] // the kernel's comm is 15 bytes at most
	}
	uid := float64(os.Getuid())

	// flowtail, JSON: the incoming begin and end name the server, the
	// outgoing begin the client.
	tailJSON := func(event, dir string) map[string]any {
		t.Helper()
		r := runArgs(t, "--nats", srv.URL, "--all", "--json", "--host", host, "--event", event, "--direction", dir, "--count", "1")
		if r.code != 0 {
			t.Fatalf("flowtail --event %s --direction %s: exit %d: %s", event, dir, r.code, r.stderr)
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(strings.TrimSpace(r.stdout)), &m); err != nil {
			t.Fatalf("flowtail --json output %q: %v", r.stdout, err)
		}
		t.Logf("flowtail --event %s --direction %s --json: %s", event, dir, strings.TrimSpace(r.stdout))
		if m["src"] != client.Addr().String() || m["src_port"] != float64(client.Port()) {
			t.Errorf("%s %s: src %v:%v, want the client's %s", event, dir, m["src"], m["src_port"], client)
		}
		return m
	}
	checkProc := func(what string, m map[string]any, pid int, comm string) {
		t.Helper()
		if m["pid"] != float64(pid) || m["comm"] != comm || m["uid"] != uid {
			t.Errorf("%s: pid %v comm %v uid %v, want %d %q %g", what, m["pid"], m["comm"], m["uid"], pid, comm, uid)
		}
	}
	checkProc("incoming begin (the server, listening before the agent)", tailJSON("begin", "incoming"), ln.Pid, comm)
	checkProc("incoming end", tailJSON("end", "incoming"), ln.Pid, comm)
	checkProc("outgoing begin (the client)", tailJSON("begin", "outgoing"), cl.Pid, clientComm)

	// flowtail, table: the PROCESS column of the incoming begin.
	r := runArgs(t, "--nats", srv.URL, "--all", "--host", host, "--direction", "incoming", "--count", "1")
	if r.code != 0 {
		t.Fatalf("flowtail table: exit %d: %s", r.code, r.stderr)
	}
	t.Logf("flowtail --direction incoming:\n%s", r.stdout)
	lines := strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n")
	// The header, and again above the row if the row widened a column (the
	// host here is wider than its column's start width).
	if n := len(lines); n < 2 || n > 3 || !strings.HasPrefix(lines[n-2], "TIME") || strings.HasPrefix(lines[n-1], "TIME") {
		t.Fatalf("%d lines, want the header (once or twice) and one row:\n%s", len(lines), r.stdout)
	}
	head, row := strings.Fields(lines[len(lines)-2]), strings.Fields(lines[len(lines)-1])
	col := slices.Index(head, "PROCESS")
	want := comm + "[" + strconv.Itoa(ln.Pid) + "]"
	if col < 0 || len(row) != len(head) || row[col] != want {
		t.Errorf("PROCESS column (field %d of the header) is not %s:\n%s", col, want, r.stdout)
	}
}
