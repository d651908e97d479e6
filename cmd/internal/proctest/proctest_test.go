package proctest

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// TestMain runs StormMain or LoadMain when a test started this binary as
// one (childCmd).
func TestMain(m *testing.M) {
	if kind := os.Getenv("PROCTEST_CHILD"); kind != "" {
		var args []string
		for _, a := range os.Args[1:] {
			if !strings.HasPrefix(a, "-test.") {
				args = append(args, a)
			}
		}
		main := StormMain
		if kind == "load" {
			main = LoadMain
		}
		if err := main(args); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestParseProm(t *testing.T) {
	text := `# HELP flowbus_agent_events_total Events by stage.
# TYPE flowbus_agent_events_total counter
flowbus_agent_events_total{stage="captured"} 12
flowbus_agent_events_total{stage="acked"} 1.5e+06
flowbus_agent_dropped_events_total{stage="kernel_ringbuf"} 3
flowbus_agent_dropped_events_total{stage="kernel_syncookie"} 4
flowbus_agent_dropped_events_total{stage="queue"} 5
flowbus_agent_ready 1
flowbus_agent_label_with_space{path="a b"} 7
not_a_number NaNx

flowbus_build_info{commit="abc",version="dev"} 1
`
	m, err := ParseProm(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{
		`flowbus_agent_events_total{stage="captured"}`:                 12,
		`flowbus_agent_events_total{stage="acked"}`:                    1.5e6,
		`flowbus_agent_dropped_events_total{stage="kernel_ringbuf"}`:   3,
		`flowbus_agent_dropped_events_total{stage="kernel_syncookie"}`: 4,
		`flowbus_agent_dropped_events_total{stage="queue"}`:            5,
		`flowbus_agent_ready`:                                          1,
		`flowbus_agent_label_with_space{path="a b"}`:                   7,
		`flowbus_build_info{commit="abc",version="dev"}`:               1,
	}
	if len(m) != len(want) {
		t.Errorf("%d series, want %d: %v", len(m), len(want), m)
	}
	for k, v := range want {
		if got, ok := m[k]; !ok || got != v {
			t.Errorf("%s = %v (present %v), want %v", k, got, ok, v)
		}
	}
	if s := SumPrefix(m, `flowbus_agent_dropped_events_total{stage="kernel`); s != 7 {
		t.Errorf("kernel drops sum to %v, want 7", s)
	}
	if s := SumPrefix(m, "flowbus_agent_dropped_events_total"); s != 12 {
		t.Errorf("all drops sum to %v, want 12", s)
	}
	if s := SumPrefix(m, "flowbus_nothing"); s != 0 {
		t.Errorf("no series sum to %v, want 0", s)
	}
}

// A line longer than the scanner's buffer is an error, not a silent cut.
func TestParsePromTooLong(t *testing.T) {
	if _, err := ParseProm(strings.NewReader("x{l=\"" + strings.Repeat("a", 2<<20) + "\"} 1\n")); err == nil {
		t.Error("a 2 MiB line parsed without error")
	}
}

func TestFreePort(t *testing.T) {
	p, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	if p <= 0 || p > 65535 {
		t.Fatalf("port %d", p)
	}
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
	if err != nil {
		t.Fatalf("the free port %d cannot be bound: %v", p, err)
	}
	ln.Close()
	a, err := FreeAddr()
	if err != nil {
		t.Fatal(err)
	}
	if host, _, err := net.SplitHostPort(a); err != nil || host != "127.0.0.1" {
		t.Fatalf("FreeAddr %q (err %v): want 127.0.0.1:port", a, err)
	}
	ln, err = net.Listen("tcp", a)
	if err != nil {
		t.Fatalf("the free address %s cannot be bound: %v", a, err)
	}
	ln.Close()
}

// The test process's own figures: it has a resident set, and burning CPU
// for a while shows in its CPU time and in the machine's busy time.
func TestProcStatsOfSelf(t *testing.T) {
	pid := os.Getpid()
	rss, hwm, err := ProcMem(pid)
	if err != nil {
		t.Fatal(err)
	}
	// VmHWM is updated lazily by the kernel: it can trail VmRSS a little.
	if rss < 1<<20 || hwm < 1<<20 {
		t.Errorf("VmRSS %d, VmHWM %d: want at least 1 MiB each", rss, hwm)
	}
	w, err := WatchProc(pid)
	if err != nil {
		t.Fatal(err)
	}
	sys0, err := SysBusy()
	if err != nil {
		t.Fatal(err)
	}
	spin(600 * time.Millisecond)
	sys1, err := SysBusy()
	if err != nil {
		t.Fatal(err)
	}
	u, err := w.End()
	if err != nil {
		t.Fatal(err)
	}
	// USER_HZ granularity is 10 ms; a busy loop of 600 ms is at least 300 ms
	// of CPU even on a loaded machine.
	if u.CPU < 0.3 || u.Seconds < 0.6 || u.Cores <= 0 || u.Cores > float64(runtime.NumCPU())+0.5 {
		t.Errorf("window %+v: want >= 0.3 s of CPU over >= 0.6 s", u)
	}
	if u.Samples < 3 || u.RSSAvgMiB < 1 || u.RSSAvgMiB > u.RSSMaxMiB || u.HWMMiB < 1 {
		t.Errorf("window %+v: want >= 3 RSS samples, 1 MiB <= avg <= max, a VmHWM", u)
	}
	if d := sys1 - sys0; d < 300*time.Millisecond {
		t.Errorf("the machine was busy %v while this process spun 600 ms", d)
	}
	if _, err := ProcCPU(1 << 30); err == nil {
		t.Error("ProcCPU of a pid that cannot exist: no error")
	}
	if _, _, err := ProcMem(1 << 30); err == nil {
		t.Error("ProcMem of a pid that cannot exist: no error")
	}
}

func spin(d time.Duration) {
	x := 0
	for end := time.Now().Add(d); time.Now().Before(end); {
		for i := 0; i < 1000; i++ {
			x += i
		}
	}
	_ = x
}

func TestTail(t *testing.T) {
	p := filepath.Join(t.TempDir(), "log")
	if err := os.WriteFile(p, []byte("a\nb\nc\nd\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := Tail(p, 2); got != "c\nd" {
		t.Errorf("Tail 2 = %q", got)
	}
	if got := Tail(p, 10); got != "a\nb\nc\nd" {
		t.Errorf("Tail 10 = %q", got)
	}
	if got := Tail(filepath.Join(t.TempDir(), "none"), 3); got != "" {
		t.Errorf("Tail of a missing file = %q", got)
	}
}

// StartAgent's process handling, with a shell script in the agent's place:
// the caller's FLOWBUS_ variables are not passed on, the later of two
// settings wins, output goes to the log, the ready file is read, and Wait
// tells an exit status from a process that had to be killed.
func TestStartAgentProcess(t *testing.T) {
	t.Setenv("FLOWBUS_NATS_URL", "nats://inherited:4222")
	dir := t.TempDir()
	script := filepath.Join(dir, "fake-agent")
	body := `#!/bin/sh
echo "nats=${FLOWBUS_NATS_URL:-unset} host=$FLOWBUS_HOST"
echo "err line" >&2
printf 'pid=%d\nrun_id=r1\n' $$ > "$FLOWBUS_READY_FILE"
[ -n "$EXIT" ] && exit "$EXIT"
exec sleep 60
`
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	ready := filepath.Join(dir, "ready")
	a, err := StartAgent(script, []string{"FLOWBUS_HOST=first", "FLOWBUS_READY_FILE=" + ready, "FLOWBUS_HOST=second"}, filepath.Join(dir, "a.log"))
	if err != nil {
		t.Fatal(err)
	}
	m, err := a.WaitReadyFile(ready, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if m["pid"] != fmt.Sprint(a.Pid()) || m["run_id"] != "r1" {
		t.Errorf("ready file fields %v", m)
	}
	if !a.WaitLog(5*time.Second, "err line") {
		t.Fatalf("stderr not in the log: %q", a.Log())
	}
	if !strings.Contains(a.Log(), "nats=unset host=second\n") {
		t.Errorf("log %q: want the inherited FLOWBUS_NATS_URL dropped and the later FLOWBUS_HOST", a.Log())
	}
	if code := a.Wait(200 * time.Millisecond); code != -1 {
		t.Errorf("Wait on a running process = %d, want -1", code)
	}
	select {
	case <-a.Exited():
	default:
		t.Error("Wait's timeout did not kill the process")
	}

	b, err := StartAgent(script, []string{"FLOWBUS_READY_FILE=" + filepath.Join(dir, "ready2"), "EXIT=3"}, filepath.Join(dir, "b.log"))
	if err != nil {
		t.Fatal(err)
	}
	if code := b.Wait(10 * time.Second); code != 3 {
		t.Errorf("exit status %d, want 3", code)
	}
	if _, err := b.WaitReadyFile(filepath.Join(dir, "never"), 5*time.Second); err == nil || !strings.Contains(err.Error(), "exited") {
		t.Errorf("WaitReadyFile of an ended process: %v, want it to say it exited", err)
	}
	b.Signal(syscall.SIGKILL) // ended already: no effect, no hang

	if _, err := StartAgent(filepath.Join(dir, "missing"), nil, filepath.Join(dir, "c.log")); err == nil {
		t.Error("starting a missing binary: no error")
	}
}

// A nats-server process of the version go.mod selects: it serves clients,
// names them on its monitoring port, and keeps its stream over a restart.
func TestNATSServerProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("builds nats-server")
	}
	root, err := ModRoot()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	bin, version, err := BuildNATSServer(ctx, root, filepath.Join(os.TempDir(), "flowbus-test-bin"))
	if err != nil {
		t.Fatal(err)
	}
	if want, _ := ModuleVersion(root, NATSServerModule); version != want || !strings.HasSuffix(bin, "nats-server-"+want) {
		t.Errorf("built %s as version %s, want go.mod's %s", bin, version, want)
	}
	s, err := NewNATSServer(bin, t.TempDir(), NATSOptions{Name: "proctest", Monitor: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Kill()
	if s.Pid() != 0 {
		t.Error("a server not started has a pid")
	}
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Start(ctx); err == nil {
		t.Error("a second Start of a running server: no error")
	}
	nc, err := nats.Connect(s.URL(), nats.Name("proctest-client"), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	var seen bool
	for deadline := time.Now().Add(5 * time.Second); !seen && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if seen, err = s.HasClient("proctest-client"); err != nil {
			t.Fatal(err)
		}
	}
	if !seen {
		t.Error("/connz does not list the connected client")
	}
	if ok, _ := s.HasClient("nobody"); ok {
		t.Error("/connz lists a client that never connected")
	}
	if err := nc.Publish("x", []byte("y")); err != nil {
		t.Fatal(err)
	}
	s.Stop(syscall.SIGTERM, 15*time.Second)
	if s.Pid() != 0 {
		t.Error("a stopped server has a pid")
	}
	if err := s.Start(ctx); err != nil {
		t.Fatalf("restart on the same port: %v", err)
	}
	if err := nc.FlushTimeout(10 * time.Second); err != nil {
		t.Errorf("the client did not get back to the restarted server: %v", err)
	}
	if !strings.Contains(Tail(s.LogPath, 100), "Server is ready") {
		t.Errorf("log lacks the server's start line:\n%s", Tail(s.LogPath, 10))
	}
}

// A command started in a cgroup runs inside it from the start; its CPU is
// the cgroup's; Remove ends what is left inside and removes the directory.
func TestCgroupCommand(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("creates a cgroup: needs root")
	}
	cg, err := NewCgroup("flowbus-proctest-")
	if err != nil {
		t.Fatal(err)
	}
	removed := false
	defer func() {
		if !removed {
			_ = cg.Remove()
		}
	}()
	out, err := cg.Command(context.Background(), "sh", "-c", "cat /proc/self/cgroup; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done").Output()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(strings.TrimSpace(string(out)), "/"+filepath.Base(cg.Path)) {
		t.Errorf("/proc/self/cgroup inside: %q, want it to end in %s", out, filepath.Base(cg.Path))
	}
	if cpu, err := CgroupCPU(cg.Path); err != nil || cpu <= 0 {
		t.Errorf("cgroup CPU %v (err %v): want the shell's CPU time", cpu, err)
	}
	left := cg.Command(context.Background(), "sleep", "60")
	if err := left.Start(); err != nil {
		t.Fatal(err)
	}
	if err := cg.Remove(); err != nil {
		t.Fatal(err)
	}
	removed = true
	if _, err := os.Stat(cg.Path); !os.IsNotExist(err) {
		t.Errorf("cgroup directory still there (err %v)", err)
	}
	if err := left.Wait(); err == nil {
		t.Error("the process left inside was not killed")
	}
}

// childCmd is this test binary re-executed as a storm or load process.
func childCmd(kind string, args []string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], append([]string{"-test.run=^$"}, args...)...)
	cmd.Env = append(os.Environ(), "PROCTEST_CHILD="+kind)
	cmd.Stderr = os.Stderr
	return cmd
}

func stormCmd(args []string) *exec.Cmd { return childCmd("storm", args) }

// A storm bounded by its connection count makes exactly that many, all to
// the listener it reports; a long one ends when killed.
func TestStorm(t *testing.T) {
	began := time.Now()
	st, err := StartStorm(stormCmd(StormArgs("127.0.0.1", 3, time.Minute, 0, 200)))
	if err != nil {
		t.Fatal(err)
	}
	r, err := st.Wait(time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := netip.ParseAddrPort(r.Server)
	if err != nil || srv.Addr().String() != "127.0.0.1" || srv.Port() == 0 {
		t.Errorf("server %q (err %v): want 127.0.0.1 and a port", r.Server, err)
	}
	if len(r.Ports) != 200 || r.Errors != 0 {
		t.Errorf("%d connections, %d errors (last %q): want 200 and none", len(r.Ports), r.Errors, r.LastEr)
	}
	for i, p := range r.Ports {
		if p == 0 || p == srv.Port() {
			t.Fatalf("client port %d", p)
		}
		if len(r.At) != len(r.Ports) {
			t.Fatalf("%d dial times for %d connections", len(r.At), len(r.Ports))
		}
		if r.At[i] < began.UnixNano() || r.At[i] > time.Now().UnixNano() {
			t.Fatalf("connection %d (port %d): dial time %s not within the test", i, p, time.Unix(0, r.At[i]))
		}
	}

	long, err := StartStorm(stormCmd(StormArgs("127.0.0.1", 1, time.Hour, 1, 1000)))
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if _, err := long.Wait(300 * time.Millisecond); err == nil {
		t.Error("an hour-long storm ended within 300 ms")
	}
	if d := time.Since(t0); d > 10*time.Second {
		t.Errorf("killing the storm took %v", d)
	}
	long.Kill() // killed already: returns at once

	badCmd := stormCmd([]string{"bad"})
	badCmd.Stderr = nil
	bad, err := StartStorm(badCmd)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bad.Wait(time.Minute); err == nil {
		t.Error("a storm with bad arguments: no error")
	}
}

// runLoad runs a load process and decodes what it prints.
func runLoad(t *testing.T, v any, args ...string) {
	t.Helper()
	out, err := childCmd("load", args).Output()
	if err != nil {
		t.Fatalf("load %v: %v", args, err)
	}
	if err := json.Unmarshal(out, v); err != nil {
		t.Fatalf("load %v output %q: %v", args, out, err)
	}
}

// The benchmarks' load: an unpaced storm reports its client ports, one
// count per connection made; a paced one keeps to its rate; a bulk stream
// delivers every byte.
func TestLoad(t *testing.T) {
	var fast LoadStormResult
	runLoad(t, &fast, "storm", "-workers", "2", "-seconds", "0.5", "-ports")
	var n uint64
	for p, c := range fast.PortCounts {
		if p == 0 || int(p) == fast.ListenPort {
			t.Errorf("client port %d", p)
		}
		n += uint64(c)
	}
	if fast.Conns == 0 || n != fast.Conns || fast.ListenPort == 0 || fast.Seconds < 0.5 {
		t.Errorf("storm %d conns, port counts sum to %d, listen port %d, %v s: want conns > 0 and equal, a port, >= 0.5 s",
			fast.Conns, n, fast.ListenPort, fast.Seconds)
	}

	var paced LoadStormResult
	runLoad(t, &paced, "storm", "-workers", "2", "-seconds", "1", "-rate", "200")
	if paced.Rate != 200 || paced.Seconds > 1 || paced.Conns+paced.Failed+paced.Lost < 150 || paced.Conns+paced.Failed > 201 {
		t.Errorf("paced storm %+v: want about 200 connections in at most 1 s", paced)
	}

	var bulk BulkResult
	runLoad(t, &bulk, "bulk", "-bytes", fmt.Sprint(8<<20))
	if bulk.Bytes != 8<<20 || bulk.Seconds <= 0 {
		t.Errorf("bulk %+v: want 8 MiB in a positive time", bulk)
	}

	for _, args := range [][]string{nil, {"nosuch"}, {"storm", "-bogus"}} {
		c := childCmd("load", args)
		c.Stderr = nil // the usage text it prints is expected
		if err := c.Run(); err == nil {
			t.Errorf("load %q: no error", args)
		}
	}
}
