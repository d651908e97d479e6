package main

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
)

// TestMain lets the test binary act as the storm worker, as flowbench
// re-executes itself (/proc/self/exe) inside the cgroup.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == workerCmd {
		if err := runWorker(os.Args[2:]); err != nil {
			os.Stderr.WriteString("worker: " + err.Error() + "\n")
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func readSysctl(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(bpfStatsSysctl)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func writeSysctl(t *testing.T, v string) {
	t.Helper()
	if err := os.WriteFile(bpfStatsSysctl, []byte(v+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// keepSysctl puts the host's value back when the test ends, whatever it did.
func keepSysctl(t *testing.T) string {
	orig := readSysctl(t)
	t.Cleanup(func() { writeSysctl(t, orig) })
	return orig
}

func TestEnableBPFStatsRestoresPrevious(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	keepSysctl(t)
	for _, prev := range []string{"0", "1"} {
		writeSysctl(t, prev)
		restore, err := enableBPFStats()
		if err != nil {
			t.Fatal(err)
		}
		if got := readSysctl(t); got != "1" {
			t.Fatalf("prev %s: while enabled the sysctl is %s, want 1", prev, got)
		}
		if err := restore(); err != nil {
			t.Fatal(err)
		}
		if got := readSysctl(t); got != prev {
			t.Fatalf("after restore the sysctl is %s, want the previous %s", got, prev)
		}
		// Only the first call acts: a deferred restore after an explicit
		// one must not undo what happened in between.
		other := map[string]string{"0": "1", "1": "0"}[prev]
		writeSysctl(t, other)
		if err := restore(); err != nil {
			t.Fatal(err)
		}
		if got := readSysctl(t); got != other {
			t.Fatalf("a second restore wrote %s over %s", got, other)
		}
	}
}

// attachedTo counts the programs attached directly to cg at typ.
func attachedTo(t *testing.T, cg *cgroup, typ ebpf.AttachType) int {
	t.Helper()
	f, err := os.Open(cg.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	q, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: typ})
	if err != nil {
		t.Fatal(err)
	}
	return len(q.Programs)
}

var b1kHooks = []ebpf.AttachType{ebpf.AttachCGroupInetIngress, ebpf.AttachCGroupInetEgress, ebpf.AttachCGroupSockOps}

func TestB1kMeasuresBothSides(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	orig := keepSysctl(t)
	cg, err := newCgroup("test")
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Remove()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	res, err := measureB1k(ctx, cg, 1, 2, 0.5, true, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Pairs) != 1 {
		t.Fatalf("%d pairs, want 1", len(res.Pairs))
	}
	pr := res.Pairs[0]
	for side, st := range map[string]b1kStorm{"agent": pr.Agent, "noop": pr.Noop} {
		if st.Conns == 0 {
			t.Fatalf("%s storm made no connection", side)
		}
		// Every hook the agent uses, on both sides: the noop side stands in
		// for each of the agent's programs.
		for _, name := range []string{"ingress", "egress", "sockops"} {
			c, ok := st.Programs[name]
			if !ok {
				t.Fatalf("%s side has no %s program: %v", side, name, st.Programs)
			}
			// Every loopback connection passes both skb hooks and
			// several sock_ops callbacks.
			if c.RunsPerConn < 1 || c.RuntimeNs <= 0 || c.NsPerRun <= 0 {
				t.Errorf("%s %s: %+v, want at least one run per connection and a run time", side, name, c)
			}
		}
		if len(st.Programs) != len(pr.Agent.Programs) {
			t.Errorf("%s side has %d programs, agent side %d", side, len(st.Programs), len(pr.Agent.Programs))
		}
		if st.NsPerConn <= 0 || st.RunsPerConn < 3 {
			t.Errorf("%s: %.0f ns and %.2f runs per connection", side, st.NsPerConn, st.RunsPerConn)
		}
	}
	// The reader drained the ring: events arrived, none dropped.
	if pr.Agent.Events == 0 || pr.Agent.KernelDrops != 0 {
		t.Errorf("agent storm: %d events read, %d kernel drops; want events and 0 drops", pr.Agent.Events, pr.Agent.KernelDrops)
	}
	if res.Ratio <= 0 || res.AgentNsPerConn <= 0 || res.NoopNsPerConn <= 0 {
		t.Errorf("medians not filled: %+v", res)
	}
	for _, name := range []string{"ingress", "egress", "sockops"} {
		if res.ProgramRatios[name] <= 0 || res.AgentPrograms[name].NsPerConn <= 0 {
			t.Errorf("no per-program median for %s: %v %+v", name, res.ProgramRatios, res.AgentPrograms)
		}
	}
	if got := readSysctl(t); got != orig {
		t.Errorf("kernel.bpf_stats_enabled is %s after the run, was %s", got, orig)
	}
	for _, typ := range b1kHooks {
		if n := attachedTo(t, cg, typ); n != 0 {
			t.Errorf("%d programs still attached at %s after the run", n, typ)
		}
	}
}

// An interrupted storm (the context of SIGINT/SIGTERM) returns an error with
// the sysctl back at its value and nothing left attached.
func TestB1kInterruptedRestores(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	orig := keepSysctl(t)
	cg, err := newCgroup("test")
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Remove()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	seenOn := make(chan string, 1)
	go func() {
		// Cancel in the middle of the first (agent) storm, once the
		// statistics are on.
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			if b, err := os.ReadFile(bpfStatsSysctl); err == nil && strings.TrimSpace(string(b)) == "1" {
				time.Sleep(200 * time.Millisecond)
				seenOn <- "1"
				cancel()
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
		seenOn <- "never"
		cancel()
	}()
	start := time.Now()
	res, err := measureB1k(ctx, cg, 5, 2, 20, false, t.Logf)
	if err == nil {
		t.Fatal("an interrupted run returned no error")
	}
	if len(res.Pairs) != 0 {
		t.Errorf("%d pairs from an interrupted first storm", len(res.Pairs))
	}
	if d := time.Since(start); d > 15*time.Second {
		t.Errorf("interrupted run took %v (storm of 20 s)", d)
	}
	if orig == "0" {
		if s := <-seenOn; s != "1" {
			t.Fatalf("the statistics were never switched on during the storm")
		}
	}
	if got := readSysctl(t); got != orig {
		t.Errorf("kernel.bpf_stats_enabled is %s after the interrupted run, was %s", got, orig)
	}
	for _, typ := range b1kHooks {
		if n := attachedTo(t, cg, typ); n != 0 {
			t.Errorf("%d programs still attached at %s after the interrupted run", n, typ)
		}
	}
	t.Logf("error (expected): %v", err)
}
