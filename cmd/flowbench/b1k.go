package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/flowbus/flowbus/bpf"
	"github.com/flowbus/flowbus/schema"
)

// bpfStatsSysctl turns on the kernel's per-program run time and run count.
const bpfStatsSysctl = "/proc/sys/kernel/bpf_stats_enabled"

// enableBPFStats sets kernel.bpf_stats_enabled to 1 and returns the function
// that writes back the value it found (only its first call acts). Callers
// defer it: the run's context ends on SIGINT/SIGTERM (main), so an
// interrupted storm returns through the defer too. Only SIGKILL leaves the
// sysctl on; it costs every program run two clock reads, nothing else.
func enableBPFStats() (restore func() error, err error) {
	old, err := os.ReadFile(bpfStatsSysctl)
	if err != nil {
		return nil, fmt.Errorf("reading kernel.bpf_stats_enabled (kernel 5.1 or later needed): %w", err)
	}
	prev := strings.TrimSpace(string(old))
	if err := os.WriteFile(bpfStatsSysctl, []byte("1\n"), 0o644); err != nil {
		return nil, fmt.Errorf("setting kernel.bpf_stats_enabled=1 (needs root): %w", err)
	}
	var once sync.Once
	var rerr error
	return func() error {
		once.Do(func() {
			if err := os.WriteFile(bpfStatsSysctl, []byte(prev+"\n"), 0o644); err != nil {
				rerr = fmt.Errorf("restoring kernel.bpf_stats_enabled=%s: %w; run `sysctl -w kernel.bpf_stats_enabled=%s`", prev, err, prev)
			}
		})
		return rerr
	}, nil
}

// progStat is one program's kernel counters at one instant.
type progStat struct {
	Runtime time.Duration
	Runs    uint64
}

func readStats(progs map[string]*ebpf.Program) (map[string]progStat, error) {
	out := make(map[string]progStat, len(progs))
	for name, p := range progs {
		s, err := p.Stats()
		if err != nil {
			return nil, fmt.Errorf("reading the run statistics of %s: %w", name, err)
		}
		out[name] = progStat{Runtime: s.Runtime, Runs: s.RunCount}
	}
	return out, nil
}

// progCost is one program's share of a storm.
type progCost struct {
	NsPerConn   float64 `json:"ns_per_conn"`
	RunsPerConn float64 `json:"runs_per_conn"`
	NsPerRun    float64 `json:"ns_per_run"`
	Runs        uint64  `json:"runs"`
	RuntimeNs   int64   `json:"runtime_ns"`
}

// b1kStorm is what one storm cost the programs of one side.
type b1kStorm struct {
	Conns       uint64              `json:"conns"`
	Failed      uint64              `json:"failed"`
	Seconds     float64             `json:"seconds"`
	NsPerConn   float64             `json:"ns_per_conn"`
	RunsPerConn float64             `json:"runs_per_conn"`
	NsPerRun    float64             `json:"ns_per_run"`
	Programs    map[string]progCost `json:"programs"`
	// Agent side only: ring buffer drops in the kernel during the storm
	// (must be 0, or the programs took the cheaper full-ring path) and
	// events the reader handed over (about 2 per connection).
	KernelDrops uint64 `json:"kernel_drops,omitempty"`
	Events      uint64 `json:"events,omitempty"`
}

// b1kSide is one set of programs measured on the cgroup.
type b1kSide struct {
	progs  map[string]*ebpf.Program
	attach func() error
	detach func() error
	// drops returns the kernel's drop counter and the events read so far
	// (nil on the noop side).
	drops func() (drops, events uint64, err error)
}

// measure attaches the side, runs one storm in cg with the kernel's
// statistics on, and detaches. Only the programs this process loaded are
// read (by their fds), so other programs on the same hooks, an agent on the
// root cgroup say, do not count.
func (s *b1kSide) measure(ctx context.Context, cg *cgroup, workers int, seconds float64) (st b1kStorm, err error) {
	if err := s.attach(); err != nil {
		return st, err
	}
	defer func() {
		if derr := s.detach(); derr != nil && err == nil {
			err = fmt.Errorf("detaching: %w", derr)
		}
	}()
	restore, err := enableBPFStats()
	if err != nil {
		return st, err
	}
	defer func() {
		if rerr := restore(); rerr != nil && err == nil {
			err = rerr
		}
	}()
	var drops0, events0 uint64
	if s.drops != nil {
		if drops0, events0, err = s.drops(); err != nil {
			return st, err
		}
	}
	before, err := readStats(s.progs)
	if err != nil {
		return st, err
	}
	r, err := cg.storm(ctx, workers, seconds, false)
	if err != nil {
		return st, err
	}
	after, err := readStats(s.progs)
	if err != nil {
		return st, err
	}
	if err := restore(); err != nil {
		return st, err
	}
	st = b1kStorm{Conns: r.Conns, Failed: r.Failed, Seconds: r.Seconds, Programs: map[string]progCost{}}
	if r.Conns == 0 {
		return st, errors.New("the storm made no connection")
	}
	var total time.Duration
	var runs uint64
	for name, a := range after {
		b := before[name]
		c := progCost{Runs: a.Runs - b.Runs, RuntimeNs: int64(a.Runtime - b.Runtime)}
		c.NsPerConn = float64(c.RuntimeNs) / float64(r.Conns)
		c.RunsPerConn = float64(c.Runs) / float64(r.Conns)
		if c.Runs > 0 {
			c.NsPerRun = float64(c.RuntimeNs) / float64(c.Runs)
		}
		st.Programs[shortProg(name)] = c
		total += a.Runtime - b.Runtime
		runs += c.Runs
	}
	st.NsPerConn = float64(total) / float64(r.Conns)
	st.RunsPerConn = float64(runs) / float64(r.Conns)
	if runs > 0 {
		st.NsPerRun = float64(total) / float64(runs)
	}
	if s.drops != nil {
		// The reader polls: give it a few intervals to hand over the tail.
		time.Sleep(5 * bpf.DefaultPollInterval)
		d, e, err := s.drops()
		if err != nil {
			return st, err
		}
		st.KernelDrops, st.Events = d-drops0, e-events0
	}
	return st, nil
}

// shortProg names a program in the figures: flowbus_egress → egress.
func shortProg(name string) string { return strings.TrimPrefix(name, "flowbus_") }

// discard is a bpf.Handler that keeps nothing: the ring is drained as the
// agent drains it, without the agent's user-space work.
type discard struct{}

func (discard) Flow(*schema.Event)                                                    {}
func (discard) DNSQuery(int64, uint8, uint64, netip.AddrPort, netip.AddrPort, []byte) {}
func (discard) DNSAnswer(int64, uint8, uint64, netip.AddrPort, netip.AddrPort, []byte, int) {
}
func (discard) End(*schema.EndEvent) {}

// agentSide loads the agent's programs as the agent does (bpf.Load with the
// agent's defaults) and runs a reader that discards, for as long as ctx
// lives. Attach and detach are per storm; close frees everything.
func agentSide(ctx context.Context, cgPath string) (side *b1kSide, closeFn func() error, err error) {
	c, err := bpf.Load(bpf.Options{CgroupPath: cgPath, RingBytes: bpf.DefaultRingBytes, PollInterval: bpf.DefaultPollInterval})
	if err != nil {
		return nil, nil, fmt.Errorf("loading the agent's programs: %w", err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- c.Run(runCtx, discard{}) }()
	closeFn = func() error {
		cancel()
		runErr := <-done
		return errors.Join(runErr, c.Close())
	}
	side = &b1kSide{
		progs:  c.Programs(),
		attach: c.Attach,
		detach: c.Detach,
		drops: func() (uint64, uint64, error) {
			k, err := c.Counters()
			return k.RingbufFull + k.DNSFull + k.DNSQueryFull, c.Events(), err
		},
	}
	if len(side.progs) == 0 {
		_ = closeFn()
		return nil, nil, errors.New("the bpf package exposes no programs")
	}
	return side, closeFn, nil
}

// noopSide loads, for each of the agent's programs, one of the same type
// and attach type that only returns 1 (let the packet or socket operation
// through): the floor of any design on these hooks.
func noopSide(cgPath string, agentProgs map[string]*ebpf.Program) (side *b1kSide, closeFn func() error, err error) {
	kinds, err := bpf.ProgramKinds()
	if err != nil {
		return nil, nil, err
	}
	progs := map[string]*ebpf.Program{}
	attachTypes := map[string]ebpf.AttachType{}
	closeAll := func() error {
		var errs []error
		for _, p := range progs {
			errs = append(errs, p.Close())
		}
		return errors.Join(errs...)
	}
	names := make([]string, 0, len(agentProgs))
	for name := range agentProgs {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		k, ok := kinds[name]
		if !ok {
			_ = closeAll()
			return nil, nil, fmt.Errorf("no attach type known for program %s", name)
		}
		p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Name:         "noop_" + shortProg(name),
			Type:         k.Type,
			AttachType:   k.AttachType,
			Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
			License:      "GPL",
		})
		if err != nil {
			_ = closeAll()
			return nil, nil, fmt.Errorf("loading a noop %s program for %s: %w", k.Type, name, err)
		}
		progs[name], attachTypes[name] = p, k.AttachType
	}
	var links []link.Link
	side = &b1kSide{
		progs: progs,
		attach: func() error {
			for _, name := range names {
				l, err := link.AttachCgroup(link.CgroupOptions{Path: cgPath, Attach: attachTypes[name], Program: progs[name]})
				if err != nil {
					return fmt.Errorf("attaching the noop program for %s (%s) to %s: %w", name, attachTypes[name], cgPath, err)
				}
				links = append(links, l)
			}
			return nil
		},
		detach: func() error {
			var errs []error
			for _, l := range links {
				errs = append(errs, l.Close())
			}
			links = nil
			return errors.Join(errs...)
		},
	}
	return side, func() error { return errors.Join(side.detach(), closeAll()) }, nil
}

// b1kPair is one A (agent) / B (noop) pair.
type b1kPair struct {
	Agent b1kStorm `json:"agent"`
	Noop  b1kStorm `json:"noop"`
	Ratio float64  `json:"ratio"`
}

// b1kResult is every pair and the medians.
type b1kResult struct {
	Pairs []b1kPair `json:"pairs"`
	// Medians over the pairs.
	Ratio            float64             `json:"median_ratio"`
	AgentNsPerConn   float64             `json:"median_agent_ns_per_conn"`
	NoopNsPerConn    float64             `json:"median_noop_ns_per_conn"`
	AgentRunsPerConn float64             `json:"median_agent_runs_per_conn"`
	NoopRunsPerConn  float64             `json:"median_noop_runs_per_conn"`
	AgentNsPerRun    float64             `json:"median_agent_ns_per_run"`
	NoopNsPerRun     float64             `json:"median_noop_ns_per_run"`
	AgentPrograms    map[string]progCost `json:"median_agent_programs"`
	NoopPrograms     map[string]progCost `json:"median_noop_programs"`
	// ProgramRatios is, per hook, the median over pairs of the agent
	// program's ns/conn ÷ its noop stand-in's: where the excess is.
	ProgramRatios map[string]float64 `json:"median_program_ratios"`
	KernelDrops   uint64             `json:"kernel_drops"` // summed over the agent storms
}

// measureB1k alternates the agent's programs and the noop programs on cg,
// pairs times; it returns the pairs done before any error.
func measureB1k(ctx context.Context, cg *cgroup, pairs, workers int, seconds float64, verbose bool, progress func(string, ...any)) (b1kResult, error) {
	var res b1kResult
	agent, closeAgent, err := agentSide(ctx, cg.Path)
	if err != nil {
		return res, err
	}
	defer closeAgent()
	noop, closeNoop, err := noopSide(cg.Path, agent.progs)
	if err != nil {
		return res, err
	}
	defer closeNoop()
	for i := 0; i < pairs; i++ {
		var pr b1kPair
		if pr.Agent, err = agent.measure(ctx, cg, workers, seconds); err != nil {
			return res, fmt.Errorf("pair %d agent storm: %w", i+1, err)
		}
		if pr.Noop, err = noop.measure(ctx, cg, workers, seconds); err != nil {
			return res, fmt.Errorf("pair %d noop storm: %w", i+1, err)
		}
		if pr.Noop.NsPerConn > 0 {
			pr.Ratio = pr.Agent.NsPerConn / pr.Noop.NsPerConn
		}
		res.Pairs = append(res.Pairs, pr)
		progress("B1k pair %d/%d: agent %.0f ns/conn (%.2f runs, %.0f ns/run) vs noop %.0f ns/conn (%.2f runs, %.0f ns/run) = %.2fx; %d vs %d conns, kernel drops %d",
			i+1, pairs, pr.Agent.NsPerConn, pr.Agent.RunsPerConn, pr.Agent.NsPerRun, pr.Noop.NsPerConn, pr.Noop.RunsPerConn, pr.Noop.NsPerRun,
			pr.Ratio, pr.Agent.Conns, pr.Noop.Conns, pr.Agent.KernelDrops)
		if verbose {
			progress("B1k pair %d agent: %s; %d events read", i+1, progBreakdown(pr.Agent.Programs), pr.Agent.Events)
			progress("B1k pair %d noop:  %s", i+1, progBreakdown(pr.Noop.Programs))
		}
	}
	res.summarize()
	return res, nil
}

// summarize fills the medians from the pairs.
func (r *b1kResult) summarize() {
	col := func(f func(p b1kPair) float64) float64 {
		xs := make([]float64, len(r.Pairs))
		for i, p := range r.Pairs {
			xs[i] = f(p)
		}
		return median(xs)
	}
	r.Ratio = col(func(p b1kPair) float64 { return p.Ratio })
	r.AgentNsPerConn = col(func(p b1kPair) float64 { return p.Agent.NsPerConn })
	r.NoopNsPerConn = col(func(p b1kPair) float64 { return p.Noop.NsPerConn })
	r.AgentRunsPerConn = col(func(p b1kPair) float64 { return p.Agent.RunsPerConn })
	r.NoopRunsPerConn = col(func(p b1kPair) float64 { return p.Noop.RunsPerConn })
	r.AgentNsPerRun = col(func(p b1kPair) float64 { return p.Agent.NsPerRun })
	r.NoopNsPerRun = col(func(p b1kPair) float64 { return p.Noop.NsPerRun })
	progMedians := func(side func(p b1kPair) b1kStorm) map[string]progCost {
		out := map[string]progCost{}
		if len(r.Pairs) == 0 {
			return out
		}
		for name := range side(r.Pairs[0]).Programs {
			out[name] = progCost{
				NsPerConn:   col(func(p b1kPair) float64 { return side(p).Programs[name].NsPerConn }),
				RunsPerConn: col(func(p b1kPair) float64 { return side(p).Programs[name].RunsPerConn }),
				NsPerRun:    col(func(p b1kPair) float64 { return side(p).Programs[name].NsPerRun }),
			}
		}
		return out
	}
	r.AgentPrograms = progMedians(func(p b1kPair) b1kStorm { return p.Agent })
	r.NoopPrograms = progMedians(func(p b1kPair) b1kStorm { return p.Noop })
	r.ProgramRatios = map[string]float64{}
	for name := range r.AgentPrograms {
		r.ProgramRatios[name] = col(func(p b1kPair) float64 {
			if n := p.Noop.Programs[name].NsPerConn; n > 0 {
				return p.Agent.Programs[name].NsPerConn / n
			}
			return 0
		})
	}
	r.KernelDrops = 0
	for _, p := range r.Pairs {
		r.KernelDrops += p.Agent.KernelDrops
	}
}

// progBreakdown prints programs in a fixed order: "egress 700 ns (4.1 runs
// x 170 ns), ...".
func progBreakdown(ps map[string]progCost) string {
	names := make([]string, 0, len(ps))
	for n := range ps {
		names = append(names, n)
	}
	sort.Strings(names)
	var parts []string
	for _, n := range names {
		c := ps[n]
		parts = append(parts, fmt.Sprintf("%s %.0f ns (%.2f runs x %.0f ns)", n, c.NsPerConn, c.RunsPerConn, c.NsPerRun))
	}
	return strings.Join(parts, ", ")
}

// ratioList prints "egress 5.4x, ingress 2.2x" in name order.
func ratioList(rs map[string]float64) string {
	names := make([]string, 0, len(rs))
	for n := range rs {
		names = append(names, n)
	}
	sort.Strings(names)
	parts := make([]string, len(names))
	for i, n := range names {
		parts[i] = fmt.Sprintf("%s %.2fx", n, rs[n])
	}
	return strings.Join(parts, ", ")
}

// b1kTarget is the protocol's bound with every feature on; the agent has no
// switch to load begin events alone, so the 2.0 bound is not measured here.
const b1kTarget = 3.0

// runB1k is the B1k row: kernel ns per connection, agent ÷ noop floor.
func runB1k(ctx context.Context, p Params, progress func(string, ...any)) []Row {
	row := Row{ID: "B1k", What: "kernel ns/conn, agent's programs ÷ noop floor", Target: "<= 3.0 x floor (begins only: <= 2.0)", Met: "n/a", Figures: "n/a"}
	cg, err := newCgroup("k")
	if err != nil {
		row.Note = err.Error()
		return []Row{row}
	}
	defer cg.Remove()
	progress("B1k: %d pairs, storm %g s x %d workers in %s; kernel.bpf_stats_enabled on during each storm only", p.Pairs, p.B1kSeconds, p.Workers, cg.Path)
	res, err := measureB1k(ctx, cg, p.Pairs, p.Workers, p.B1kSeconds, p.Verbose, progress)
	if len(res.Pairs) == 0 {
		if err == nil {
			err = errors.New("no pairs")
		}
		row.Note = err.Error()
		return []Row{row}
	}
	ratios := make([]float64, len(res.Pairs))
	for i, pr := range res.Pairs {
		ratios[i] = pr.Ratio
	}
	row.Figures = fmt.Sprintf("%.2fx (%d pairs, min %.2f max %.2f): agent %.0f ns/conn, %.2f runs x %.0f ns [%s]; floor %.0f ns/conn, %.2f runs x %.0f ns [%s]; per hook %s; kernel drops %d",
		res.Ratio, len(res.Pairs), minOf(ratios), maxOf(ratios), res.AgentNsPerConn, res.AgentRunsPerConn, res.AgentNsPerRun,
		progBreakdown(res.AgentPrograms), res.NoopNsPerConn, res.NoopRunsPerConn, res.NoopNsPerRun, progBreakdown(res.NoopPrograms),
		ratioList(res.ProgramRatios), res.KernelDrops)
	row.Met = metStr(res.Ratio <= b1kTarget)
	row.Data = map[string]any{"result": res, "storm_seconds": p.B1kSeconds, "workers": p.Workers}
	switch {
	case err != nil:
		row.Note = fmt.Sprintf("stopped early: %v", err)
	case res.KernelDrops > 0:
		row.Note = "kernel drops > 0: the agent's programs took the full-ring path, figure biased low"
	}
	if len(res.Pairs) < 5 {
		row.Met = "n/a"
		if row.Note == "" {
			row.Note = "fewer than 5 pairs"
		}
	}
	return []Row{row}
}
