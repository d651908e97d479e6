// Command flowbench runs flowbus's benchmark protocol (bench/PROTOCOL.md,
// `make bench`): B4 (encoding), B1 (kernel-side cost: connection storm and
// bulk stream, with ÷ without the agent), B1k (the same cost from the
// kernel's own counters: ns per connection of the agent's programs ÷ noop
// programs on the same hooks), B1p (the same against libbpf-tools
// tcpstates), B2 (completeness under load), B3 (publish pipeline vs nats
// bench), B5 (agent footprint), B6 (consumer) and B7 (latency). It prints one
// table with the machine, versions and parameters, and writes the same
// figures as JSON.
//
// Benchmarks report, they never fail: the exit status is 0 whenever the
// harness could run, whether or not targets were met.
package main

import (
	"bytes"
	"context"
	"debug/buildinfo"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"
)

// Params are every knob of a run, printed and saved with the figures.
type Params struct {
	Quick        bool     `json:"quick"`
	Only         []string `json:"only"`
	Pairs        int      `json:"pairs"`
	Workers      int      `json:"workers"`
	StormSeconds float64  `json:"storm_seconds"`
	BulkBytes    int64    `json:"bulk_bytes"`
	B2Seconds    float64  `json:"b2_seconds"`
	BenchCount   int      `json:"b4_count"`
	BenchTime    string   `json:"b4_benchtime"`
	Agent        string   `json:"agent"`
	B3Pairs      int      `json:"b3_pairs"`
	B3Seconds    float64  `json:"b3_leg_seconds"`
	B5Seconds    float64  `json:"b5_seconds"`
	B5Rate       float64  `json:"b5_conns_per_s"`
	B7Seconds    float64  `json:"b7_seconds"`
	B7Rate       float64  `json:"b7_conns_per_s"`
	B6Events     int      `json:"b6_events"`
	B1kSeconds   float64  `json:"b1k_storm_seconds"`
	Verbose      bool     `json:"verbose"`
}

// Machine describes where the figures were taken.
type Machine struct {
	Cores      int    `json:"cores"`
	CPU        string `json:"cpu"`
	Kernel     string `json:"kernel"`
	Go         string `json:"go"`
	NATSServer string `json:"nats_server"`
	NATSGo     string `json:"nats_go"`
	Revision   string `json:"flowbus_revision"`
	Time       string `json:"time"`
	// BPFStats is kernel.bpf_stats_enabled: when on, every BPF program run
	// also reads the clock twice, which inflates B1's cost of the agent.
	BPFStats bool `json:"bpf_stats_enabled"`
}

// Row is one line of the result table.
type Row struct {
	ID      string         `json:"id"`
	What    string         `json:"what"`
	Figures string         `json:"figures"`
	Target  string         `json:"target"`
	Met     string         `json:"met"` // yes, no, n/a
	Note    string         `json:"note,omitempty"`
	Data    map[string]any `json:"data,omitempty"`
}

// Report is the content of results.json.
type Report struct {
	Machine Machine `json:"machine"`
	Params  Params  `json:"params"`
	Rows    []Row   `json:"rows"`
	Seconds float64 `json:"seconds"`
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == workerCmd {
		if err := runWorker(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "flowbench worker:", err)
			os.Exit(1)
		}
		return
	}
	os.Exit(run())
}

func run() int {
	quick := flag.Bool("quick", false, "short run (fewer pairs, shorter storms)")
	only := flag.String("only", "B4,B1,B1k,B1p,B2,B3,B5,B6,B7", "comma-separated benchmarks to run")
	out := flag.String("out", "", "where to write the JSON results (default: bench/results.json in the module)")
	pairs := flag.Int("pairs", 0, "A/B pairs for ratios (default 7, --quick 5; at least 5 is the protocol)")
	workers := flag.Int("workers", 4, "storm workers")
	stormSec := flag.Float64("storm-seconds", 0, "B1 storm length in seconds (default 3, --quick 2)")
	b2Sec := flag.Float64("b2-seconds", 0, "B2 storm length in seconds (default 20, --quick 5)")
	bulkMiB := flag.Int64("bulk-mib", 0, "B1 bulk stream size in MiB (default 2048, --quick 1024; protocol: at least 1024)")
	b3Pairs := flag.Int("b3-pairs", 0, "B3 ours/nats-bench pairs (default 5, --quick 3)")
	b3Sec := flag.Float64("b3-seconds", 0, "B3 length of each leg in seconds (default 5, --quick 2)")
	b5Sec := flag.Float64("b5-seconds", 0, "B5 paced storm length in seconds (default 30, --quick 10)")
	b7Sec := flag.Float64("b7-seconds", 0, "B7 paced storm length in seconds (default 20, --quick 8)")
	b1kSec := flag.Float64("b1k-seconds", 0, "B1k storm length in seconds (default 4, --quick 2)")
	verbose := flag.Bool("v", false, "verbose: per-program figures of every B1k pair")
	agentBin := flag.String("agent", "", "flowagent binary to measure (default: build ./cmd/flowagent from this tree into a temp dir, so it matches the decoder B2 uses)")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of this process (B3's publishing side, B4's parent) to this file")
	flag.Parse()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "flowbench: --cpuprofile:", err)
			return 1
		}
		defer pprof.StopCPUProfile()
	}

	p := Params{Quick: *quick, Pairs: 7, Workers: *workers, StormSeconds: 3, B2Seconds: 20, BulkBytes: 2048 << 20, BenchCount: 5, BenchTime: "1s", Agent: *agentBin,
		B3Pairs: 5, B3Seconds: 5, B5Seconds: 30, B5Rate: 25_000, B7Seconds: 20, B7Rate: 500, B6Events: 5_000_000,
		B1kSeconds: 4, Verbose: *verbose}
	if *quick {
		p.Pairs, p.StormSeconds, p.B2Seconds, p.BenchTime, p.BulkBytes = 5, 2, 5, "300ms", 1024<<20
		p.B3Pairs, p.B3Seconds, p.B5Seconds, p.B7Seconds = 3, 2, 10, 8
		p.B1kSeconds = 2
	}
	for _, o := range []struct {
		dst *float64
		v   float64
	}{{&p.B3Seconds, *b3Sec}, {&p.B5Seconds, *b5Sec}, {&p.B1kSeconds, *b1kSec}, {&p.B7Seconds, *b7Sec}} {
		if o.v > 0 {
			*o.dst = o.v
		}
	}
	if *b3Pairs > 0 {
		p.B3Pairs = *b3Pairs
	}
	if *bulkMiB > 0 {
		p.BulkBytes = *bulkMiB << 20
	}
	if *pairs > 0 {
		p.Pairs = *pairs
	}
	if *stormSec > 0 {
		p.StormSeconds = *stormSec
	}
	if *b2Sec > 0 {
		p.B2Seconds = *b2Sec
	}
	want := map[string]bool{}
	for _, id := range strings.Split(*only, ",") {
		if id = strings.TrimSpace(id); id != "" {
			want[strings.ToUpper(id)] = true
			p.Only = append(p.Only, id)
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	start := time.Now()

	// The module is needed for B4 (go test) and to build the agent; a
	// prebuilt --agent can run B1/B2 from anywhere.
	modRoot, err := findModRoot()
	if err != nil && (want["B4"] || want["B3"] || want["B6"] || *agentBin == "") {
		fmt.Fprintln(os.Stderr, "flowbench:", err)
		return 1
	}
	tmp, err := os.MkdirTemp("", "flowbench-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "flowbench:", err)
		return 1
	}
	defer os.RemoveAll(tmp)

	needAgent, needRoot := false, false
	for _, b := range benchmarks {
		needRoot = needRoot || (b.needsRoot && want[strings.ToUpper(b.id)])
		needAgent = needAgent || (b.needsRoot && !b.ownLoader && want[strings.ToUpper(b.id)])
	}
	root := os.Geteuid() == 0
	exit := 0
	if needRoot && !root {
		fmt.Fprintln(os.Stderr, "flowbench: B1, B1k, B1p, B2, B5 and B7 need root (they load eBPF programs and create cgroups): skipped; run as root for the full protocol")
		exit = 2
	}
	if needAgent && root {
		if p.Agent, err = ensureAgent(ctx, modRoot, p.Agent, tmp); err != nil {
			fmt.Fprintln(os.Stderr, "flowbench:", err)
			return 1
		}
	}

	m := machine(modRoot, p.Agent)
	printHeader(m, p)

	var rows []Row
	progress := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "[%5.1fs] "+format+"\n", append([]any{time.Since(start).Seconds()}, args...)...)
	}
	env := &benchEnv{ctx: ctx, modRoot: modRoot, tmp: tmp, p: p, progress: progress}
	for _, b := range benchmarks {
		if !want[strings.ToUpper(b.id)] {
			continue
		}
		if b.needsRoot && !root {
			for _, s := range b.skipped {
				rows = append(rows, Row{ID: b.id, What: s.what, Figures: "n/a", Target: s.target, Met: "n/a", Note: "needs root"})
			}
			continue
		}
		env.rows = rows
		rows = append(rows, b.run(env)...)
	}
	if ctx.Err() != nil {
		fmt.Fprintln(os.Stderr, "flowbench: interrupted; partial results")
		exit = 130
	}

	printTable(rows)
	if *out == "" {
		*out = filepath.Join(modRoot, "bench", "results.json")
		if modRoot == "" {
			*out = filepath.Join("bench", "results.json")
		}
	}
	rep := Report{Machine: m, Params: p, Rows: rows, Seconds: time.Since(start).Seconds()}
	if err := writeJSON(*out, rep); err != nil {
		fmt.Fprintln(os.Stderr, "flowbench:", err)
		return 1
	}
	fmt.Printf("\nwrote %s (%.0f s)\n", *out, rep.Seconds)
	return exit
}

// findModRoot walks up from the working directory to go.mod, so that B4 and
// the agent build work from any directory inside the module.
func findModRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("run flowbench inside the flowbus module (no go.mod found above the working directory)")
		}
		dir = parent
	}
}

// ensureAgent returns an absolute path to the flowagent binary. Without one
// given it builds the tree's agent (cached by go build, so cheap after `make
// build`): a stale bin/flowagent would write batches that this decoder may
// not read, and B2 would measure the mismatch, not the agent.
func ensureAgent(ctx context.Context, modRoot, bin, tmp string) (string, error) {
	if bin != "" {
		if !filepath.IsAbs(bin) {
			bin = filepath.Join(modRoot, bin)
		}
		if _, err := os.Stat(bin); err != nil {
			return "", fmt.Errorf("--agent: %w", err)
		}
		return bin, nil
	}
	out := filepath.Join(tmp, "flowagent")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./cmd/flowagent")
	cmd.Dir = modRoot
	msg, err := cmd.CombinedOutput()
	if err == nil {
		return out, nil
	}
	// Other work in progress can break the tree for a while: fall back to the
	// binary `make build` left, and say so.
	prebuilt := filepath.Join(modRoot, "bin", "flowagent")
	if _, serr := os.Stat(prebuilt); serr == nil {
		fmt.Fprintf(os.Stderr, "flowbench: building ./cmd/flowagent failed (%s); measuring the prebuilt %s instead\n",
			lastLine(string(msg)), prebuilt)
		return prebuilt, nil
	}
	return "", fmt.Errorf("building flowagent: %w: %s", err, msg)
}

// machine collects the environment printed with the figures. Versions of the
// NATS server come from the agent binary's build info: that is what runs.
func machine(modRoot, agentBin string) Machine {
	m := Machine{Cores: runtime.NumCPU(), Go: runtime.Version(), Time: time.Now().UTC().Format(time.RFC3339)}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/sys/kernel/bpf_stats_enabled"); err == nil {
		m.BPFStats = strings.TrimSpace(string(b)) == "1"
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	dep := func(bi *debug.BuildInfo, path string) string {
		for _, d := range bi.Deps {
			if d.Path == path {
				if d.Replace != nil {
					return d.Replace.Version
				}
				return d.Version
			}
		}
		return ""
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		m.NATSServer = dep(bi, "github.com/nats-io/nats-server/v2")
		m.NATSGo = dep(bi, "github.com/nats-io/nats.go")
	}
	if bi, err := buildinfo.ReadFile(agentBin); err == nil {
		if v := dep(bi, "github.com/nats-io/nats-server/v2"); v != "" {
			m.NATSServer = v
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				m.Revision = s.Value
			}
			if s.Key == "vcs.modified" && s.Value == "true" {
				m.Revision += "+dirty"
			}
		}
	}
	if m.Revision == "" {
		// go run and failed builds carry no VCS stamp: ask git.
		if out, err := exec.Command("git", "-C", modRoot, "rev-parse", "--short=12", "HEAD").Output(); err == nil {
			m.Revision = strings.TrimSpace(string(out))
			if st, err := exec.Command("git", "-C", modRoot, "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(bytes.TrimSpace(st)) > 0 {
				m.Revision += "+dirty"
			}
		}
	}
	if m.NATSServer == "" {
		// No agent binary to read (B4 only): the module's requirement is what
		// it would be built with.
		m.NATSServer = "unknown"
		if out, err := exec.Command("go", "list", "-C", modRoot, "-m", "-f", "{{.Version}}", "github.com/nats-io/nats-server/v2").Output(); err == nil {
			m.NATSServer = strings.TrimSpace(string(out)) + " (go.mod)"
		}
	}
	return m
}

func printHeader(m Machine, p Params) {
	fmt.Printf("flowbench  %s\n", m.Time)
	fmt.Printf("machine:   %d cores (%s), kernel %s\n", m.Cores, m.CPU, m.Kernel)
	if m.BPFStats {
		fmt.Println("WARNING:   kernel.bpf_stats_enabled=1 makes every BPF program run slower and inflates B1/B1p;")
		fmt.Println("           run `sysctl -w kernel.bpf_stats_enabled=0` first for figures to compare")
	}
	fmt.Printf("versions:  %s, nats-server %s, nats.go %s, flowbus %s\n", m.Go, m.NATSServer, m.NATSGo, orDash(m.Revision))
	fmt.Printf("params:    quick=%v only=%s pairs=%d workers=%d storm=%gs bulk=%d MiB b2=%gs b4: -count %d -benchtime %s\n",
		p.Quick, strings.Join(p.Only, ","), p.Pairs, p.Workers, p.StormSeconds, p.BulkBytes>>20, p.B2Seconds, p.BenchCount, p.BenchTime)
	fmt.Printf("           b1k: %d pairs x %gs storms; b3: %d pairs x %gs legs; b5: %g conn/s for %gs; b6: %d events; b7: %g conn/s for %gs\n",
		p.Pairs, p.B1kSeconds, p.B3Pairs, p.B3Seconds, p.B5Rate, p.B5Seconds, p.B6Events, p.B7Rate, p.B7Seconds)
	fmt.Printf("agent:     %s\n", orDash(p.Agent))
	fmt.Println("all traffic on loopback from a worker process in a child cgroup; ratios: A B A B alternating, median of pairs")
	fmt.Println()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func printTable(rows []Row) {
	fmt.Println()
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 1, ' ', 0)
	fmt.Fprintln(tw, "id\t| what\t| figure(s)\t| target\t| met?")
	fmt.Fprintln(tw, "--\t| ----\t| ---------\t| ------\t| ----")
	for _, r := range rows {
		met := r.Met
		if r.Note != "" {
			met += " (" + r.Note + ")"
		}
		fmt.Fprintf(tw, "%s\t| %s\t| %s\t| %s\t| %s\n", r.ID, r.What, r.Figures, r.Target, met)
	}
	tw.Flush()
}

func writeJSON(path string, rep Report) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// median of a copy of xs (0 for none).
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// metStr turns a check into the table's yes/no.
func metStr(ok bool) string {
	if ok {
		return "yes"
	}
	return "no"
}

// benchEnv is what every benchmark gets: the run's context, the module root
// (empty outside the module), a scratch directory, the parameters, the rows
// measured so far (B1p compares with B1's) and the progress printer.
type benchEnv struct {
	ctx      context.Context
	modRoot  string
	tmp      string
	p        Params
	rows     []Row
	progress func(format string, args ...any)
}

// benchmark is one entry of the protocol (bench/PROTOCOL.md), run in table
// order when --only names it.
type benchmark struct {
	id        string
	needsRoot bool      // loads eBPF programs or creates cgroups
	ownLoader bool      // loads the programs in-process: no agent binary
	skipped   []rowStub // the rows shown instead when not root
	run       func(e *benchEnv) []Row
}

type rowStub = struct{ what, target string }

var benchmarks = []benchmark{
	{id: "B4", run: func(e *benchEnv) []Row { return runB4(e.ctx, e.modRoot, e.p, e.progress) }},
	{id: "B1", needsRoot: true, skipped: []rowStub{{"conn-rate ratio", ">= 0.97"}, {"bulk ratio", ">= 0.99"}},
		run: func(e *benchEnv) []Row { return runB1(e.ctx, e.tmp, e.p, e.progress) }},
	{id: "B1k", needsRoot: true, ownLoader: true, skipped: []rowStub{{"kernel ns/conn, agent's programs ÷ noop floor", "<= 3.0 x floor (begins only: <= 2.0)"}},
		run: func(e *benchEnv) []Row { return runB1k(e.ctx, e.p, e.progress) }},
	{id: "B1p", needsRoot: true, skipped: []rowStub{{"tcpstates conn-rate ratio", "ours >= peer's"}},
		run: func(e *benchEnv) []Row { return runB1p(e.ctx, e.p, e.rows, e.progress) }},
	{id: "B2", needsRoot: true, skipped: []rowStub{{"completeness under load", "0 lost, 0 dup, 0 kernel drops"}},
		run: func(e *benchEnv) []Row { return runB2(e.ctx, e.tmp, e.p, e.progress) }},
	{id: "B3", run: func(e *benchEnv) []Row { return runB3(e.ctx, e.modRoot, e.tmp, e.p, e.progress) }},
	{id: "B5", needsRoot: true, skipped: []rowStub{{"agent footprint", "<= 0.1 core, RSS <= 64 MiB"}},
		run: func(e *benchEnv) []Row { return runB5(e.ctx, e.modRoot, e.tmp, e.p, e.progress) }},
	{id: "B6", run: func(e *benchEnv) []Row { return runB6(e.ctx, e.modRoot, e.p, e.progress) }},
	{id: "B7", needsRoot: true, skipped: []rowStub{{"latency SYN-ACK to ack", "p99 <= linger + 20 ms"}},
		run: func(e *benchEnv) []Row { return runB7(e.ctx, e.tmp, e.p, e.progress) }},
}
