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

	variants, err := parseB1kVariants("begin+end,begin")
	if err != nil {
		t.Fatal(err)
	}
	if len(variants) != 2 || variants[0].Name != "begin" || variants[1].Name != "begin+end" {
		t.Fatalf("variants %+v, want begin then begin+end", variants)
	}
	results, err := measureB1k(ctx, cg, variants, 1, 2, 0.5, true, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	if len(results) != 2 {
		t.Fatalf("%d results, want one per variant", len(results))
	}
	sockopsRuns := map[string]float64{}
	for _, res := range results {
		if len(res.Pairs) != 1 {
			t.Fatalf("%s: %d pairs, want 1", res.Variant, len(res.Pairs))
		}
		pr := res.Pairs[0]
		for side, st := range map[string]b1kStorm{"agent": pr.Agent, "noop": pr.Noop} {
			if st.Conns == 0 {
				t.Fatalf("%s %s storm made no connection", res.Variant, side)
			}
			// Every hook the agent uses, on both sides: the noop side
			// stands in for each program the variant attaches.
			for _, name := range []string{"ingress", "egress", "sockops"} {
				c, ok := st.Programs[name]
				if !ok {
					t.Fatalf("%s %s side has no %s program: %v", res.Variant, side, name, st.Programs)
				}
				// Every loopback connection passes both skb hooks and
				// several sock_ops callbacks.
				if c.RunsPerConn < 1 || c.RuntimeNs <= 0 || c.NsPerRun <= 0 {
					t.Errorf("%s %s %s: %+v, want at least one run per connection and a run time", res.Variant, side, name, c)
				}
			}
			if len(st.Programs) != len(pr.Agent.Programs) {
				t.Errorf("%s %s side has %d programs, agent side %d", res.Variant, side, len(st.Programs), len(pr.Agent.Programs))
			}
			if st.NsPerConn <= 0 || st.RunsPerConn < 3 {
				t.Errorf("%s %s: %.0f ns and %.2f runs per connection", res.Variant, side, st.NsPerConn, st.RunsPerConn)
			}
		}
		// The reader drained the ring: begins arrived, none dropped, 2 per
		// connection (both ends are in the cgroup).
		if pr.Agent.Events < 2*pr.Agent.Conns || pr.Agent.KernelDrops != 0 {
			t.Errorf("%s agent storm: %d begins read for %d connections, %d kernel drops; want 2 per connection and 0 drops",
				res.Variant, pr.Agent.Events, pr.Agent.Conns, pr.Agent.KernelDrops)
		}
		// Ends only where they are on: the variant is what it says.
		switch res.Variant {
		case "begin":
			if pr.Agent.Ends != 0 {
				t.Errorf("begin variant: %d ends read, want none", pr.Agent.Ends)
			}
		case "begin+end":
			if pr.Agent.Ends < pr.Agent.Conns {
				t.Errorf("begin+end variant: %d ends read for %d connections", pr.Agent.Ends, pr.Agent.Conns)
			}
		}
		sockopsRuns[res.Variant] = pr.Agent.Programs["sockops"].RunsPerConn
		if res.Ratio <= 0 || res.AgentNsPerConn <= 0 || res.NoopNsPerConn <= 0 {
			t.Errorf("%s: medians not filled: %+v", res.Variant, res)
		}
		for _, name := range []string{"ingress", "egress", "sockops"} {
			if res.ProgramRatios[name] <= 0 || res.AgentPrograms[name].NsPerConn <= 0 {
				t.Errorf("%s: no per-program median for %s: %v %+v", res.Variant, name, res.ProgramRatios, res.AgentPrograms)
			}
		}
	}
	// With ends off no socket asks for its state changes: fewer sock_ops
	// runs per connection, counted by the kernel.
	if sockopsRuns["begin"] >= sockopsRuns["begin+end"] {
		t.Errorf("sock_ops runs per connection: begin %.2f, begin+end %.2f; want fewer without ends", sockopsRuns["begin"], sockopsRuns["begin+end"])
	}
	if r, _, n := b1kVersus(results[1], results[0]); n != 1 || r <= 0 {
		t.Errorf("begin+end vs begin: ratio %.2f over %d pairs", r, n)
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
	results, err := measureB1k(ctx, cg, b1kVariants, 5, 2, 20, false, t.Logf)
	if err == nil {
		t.Fatal("an interrupted run returned no error")
	}
	for _, res := range results {
		if len(res.Pairs) != 0 {
			t.Errorf("%s: %d pairs from an interrupted first storm", res.Variant, len(res.Pairs))
		}
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

func TestParseB1kVariants(t *testing.T) {
	vs, err := parseB1kVariants(" begin+end , begin,begin")
	if err != nil || len(vs) != 2 || vs[0].Name != "begin" || vs[1].Name != "begin+end" {
		t.Fatalf("got %+v, %v; want begin, begin+end once each in the table's order", vs, err)
	}
	if _, err := parseB1kVariants("begin,bogus,other"); err == nil || !strings.Contains(err.Error(), "bogus, other") {
		t.Errorf("unknown names: %v, want an error naming both", err)
	}
	if _, err := parseB1kVariants(" , "); err == nil {
		t.Error("no names: no error")
	}
}
