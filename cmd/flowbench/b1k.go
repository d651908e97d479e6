package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"slices"
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
	// (must be 0, or the programs took the cheaper full-ring path), the
	// begins the reader handed over (about 2 per connection) and the ends
	// (as many with end events on, none without).
	KernelDrops uint64 `json:"kernel_drops,omitempty"`
	Events      uint64 `json:"events,omitempty"`
	Ends        uint64 `json:"ends,omitempty"`
}

// b1kSide is one set of programs measured on the cgroup.
type b1kSide struct {
	progs  map[string]*ebpf.Program
	attach func() error
	detach func() error
	// drops returns the kernel's drop counters summed, and the begins and
	// ends read so far (nil on the noop side).
	drops func() (drops, events, ends uint64, err error)
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
	var drops0, events0, ends0 uint64
	if s.drops != nil {
		if drops0, events0, ends0, err = s.drops(); err != nil {
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
		d, e, n, err := s.drops()
		if err != nil {
			return st, err
		}
		st.KernelDrops, st.Events, st.Ends = d-drops0, e-events0, n-ends0
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

// agentSide loads the agent's programs as the agent does (bpf.Load with
// the agent's defaults, changed by the variant's options) and runs a reader
// that discards, for as long as ctx lives. Attach and detach are per storm;
// close frees everything. Only the programs the variant attaches to the
// cgroup are measured (and get a noop stand-in): a program of the
// collection that a variant leaves detached would otherwise give the floor
// a hook the variant does not pay for.
func agentSide(ctx context.Context, cgPath string, v b1kVariant) (side *b1kSide, closeFn func() error, err error) {
	opts := bpf.Options{CgroupPath: cgPath, RingBytes: bpf.DefaultRingBytes, PollInterval: bpf.DefaultPollInterval}
	v.set(&opts)
	c, err := bpf.Load(opts)
	if err != nil {
		return nil, nil, fmt.Errorf("loading the agent's programs (%s): %w", v.Name, err)
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
		attach: c.Attach,
		detach: c.Detach,
		drops: func() (uint64, uint64, uint64, error) {
			k, err := c.Counters()
			return k.RingbufFull + k.DNSFull + k.DNSQueryFull + k.EndsLost + k.ConfirmsLost, c.Events(), c.Ends(), err
		},
	}
	if side.progs, err = attachedPrograms(cgPath, c); err != nil {
		_ = closeFn()
		return nil, nil, err
	}
	if len(side.progs) == 0 {
		_ = closeFn()
		return nil, nil, errors.New("the bpf package exposes no attached programs")
	}
	return side, closeFn, nil
}

// attachedPrograms attaches c once and keeps, of its programs, those the
// kernel then lists on the cgroup (by program id): what this configuration
// really runs.
func attachedPrograms(cgPath string, c *bpf.Capture) (map[string]*ebpf.Program, error) {
	kinds, err := bpf.ProgramKinds()
	if err != nil {
		return nil, err
	}
	if err := c.Attach(); err != nil {
		return nil, err
	}
	ids := map[ebpf.ProgramID]bool{}
	qerr := func() error {
		f, err := os.Open(cgPath)
		if err != nil {
			return err
		}
		defer f.Close()
		done := map[ebpf.AttachType]bool{}
		for _, k := range kinds {
			if done[k.AttachType] {
				continue
			}
			done[k.AttachType] = true
			q, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: k.AttachType})
			if err != nil {
				return fmt.Errorf("listing the programs attached to %s at %s: %w", cgPath, k.AttachType, err)
			}
			for _, p := range q.Programs {
				ids[p.ID] = true
			}
		}
		return nil
	}()
	if err := errors.Join(qerr, c.Detach()); err != nil {
		return nil, err
	}
	out := map[string]*ebpf.Program{}
	for name, p := range c.Programs() {
		info, err := p.Info()
		if err != nil {
			return nil, fmt.Errorf("reading the id of %s: %w", name, err)
		}
		if id, ok := info.ID(); ok && ids[id] {
			out[name] = p
		}
	}
	return out, nil
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

// b1kVariant is one configuration of the agent's programs, measured against
// noop programs on the hooks it attaches.
type b1kVariant struct {
	Name string
	What string
	// Target is the protocol's bound on the ratio for this variant, 0 for
	// a figure reported without one.
	Target float64
	set    func(*bpf.Options)
}

// b1kVariants are the configurations flowbench knows, in the order they
// are measured in a pair.
var b1kVariants = []b1kVariant{
	// Begin events only: no attribution, no ends (DNS is always on).
	{Name: "begin-noproc", What: "begin events only, without process attribution (its hooks detached)", Target: 2.0, set: func(o *bpf.Options) { o.NoEnds, o.NoAttribution = true, true }},
	// What process attribution costs: begins with its hooks.
	{Name: "begin", What: "begin events with process attribution (end events off)", set: func(o *bpf.Options) { o.NoEnds = true }},
	// Every feature the programs have today: begins and ends (DNS is
	// always on).
	{Name: "begin+end", What: "begin and end events (the agent's default)", Target: 3.0, set: func(*bpf.Options) {}},
	// Every kind of kernel filter set, none dropping a connection of the
	// storm: the cost of the tests themselves against begin+end.
	{Name: "begin+end+filters", What: "begin and end events, a filter of each kind that keeps every connection", Target: 3.0, set: func(o *bpf.Options) {
		o.Filter = bpf.Filter{ExcludeSelf: true, ExcludePorts: []bpf.PortRange{{First: 1, Last: 1}},
			CIDRs:        []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")},
			ExcludeCIDRs: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}, ExcludeComms: []string{"flowbus-none"}}
	}},
}

var b1kVariantsFlag = flag.String("b1k-variants", "begin-noproc,begin,begin+end,begin+end+filters", "B1k: comma-separated variants of the agent's programs, each against its own noop floor ("+b1kVariantNames()+")")

func b1kVariantNames() string {
	names := make([]string, len(b1kVariants))
	for i, v := range b1kVariants {
		names[i] = v.Name
	}
	return strings.Join(names, ", ")
}

// parseB1kVariants picks the variants named in s, in b1kVariants' order.
func parseB1kVariants(s string) ([]b1kVariant, error) {
	want := map[string]bool{}
	for _, n := range strings.Split(s, ",") {
		if n = strings.TrimSpace(n); n != "" {
			want[n] = true
		}
	}
	var out []b1kVariant
	for _, v := range b1kVariants {
		if want[v.Name] {
			out = append(out, v)
			delete(want, v.Name)
		}
	}
	if len(want) > 0 {
		var bad []string
		for n := range want {
			bad = append(bad, n)
		}
		sort.Strings(bad)
		return nil, fmt.Errorf("unknown B1k variant %s (known: %s)", strings.Join(bad, ", "), b1kVariantNames())
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no B1k variant named (known: %s)", b1kVariantNames())
	}
	return out, nil
}

// b1kResult is every pair of one variant and the medians.
type b1kResult struct {
	Variant string    `json:"variant"`
	Pairs   []b1kPair `json:"pairs"`
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

// b1kRunner is one variant loaded: its agent side and its floor.
type b1kRunner struct {
	v           b1kVariant
	agent, noop *b1kSide
	res         b1kResult
}

// measureB1k loads every variant and its noop floor, then runs pairs
// rounds; in each, every variant's agent storm is followed by its noop
// storm, the variants taking turns in alternating order so that a drift of
// the machine does not favour one. It returns, per variant in the order
// given, the pairs done before any error.
func measureB1k(ctx context.Context, cg *cgroup, variants []b1kVariant, pairs, workers int, seconds float64, verbose bool, progress func(string, ...any)) ([]b1kResult, error) {
	runners := make([]*b1kRunner, len(variants))
	results := func() []b1kResult {
		out := make([]b1kResult, len(runners))
		for i, r := range runners {
			if r != nil {
				r.res.summarize()
				out[i] = r.res
			} else {
				out[i].Variant = variants[i].Name
			}
		}
		return out
	}
	for i, v := range variants {
		agent, closeAgent, err := agentSide(ctx, cg.Path, v)
		if err != nil {
			return results(), err
		}
		defer closeAgent()
		noop, closeNoop, err := noopSide(cg.Path, agent.progs)
		if err != nil {
			return results(), err
		}
		defer closeNoop()
		runners[i] = &b1kRunner{v: v, agent: agent, noop: noop, res: b1kResult{Variant: v.Name}}
	}
	for i := 0; i < pairs; i++ {
		order := append([]*b1kRunner(nil), runners...)
		if i%2 == 1 {
			slices.Reverse(order)
		}
		for _, r := range order {
			var pr b1kPair
			var err error
			if pr.Agent, err = r.agent.measure(ctx, cg, workers, seconds); err != nil {
				return results(), fmt.Errorf("%s pair %d agent storm: %w", r.v.Name, i+1, err)
			}
			if pr.Noop, err = r.noop.measure(ctx, cg, workers, seconds); err != nil {
				return results(), fmt.Errorf("%s pair %d noop storm: %w", r.v.Name, i+1, err)
			}
			if pr.Noop.NsPerConn > 0 {
				pr.Ratio = pr.Agent.NsPerConn / pr.Noop.NsPerConn
			}
			r.res.Pairs = append(r.res.Pairs, pr)
			progress("B1k %s pair %d/%d: agent %.0f ns/conn (%.2f runs, %.0f ns/run) vs noop %.0f ns/conn (%.2f runs, %.0f ns/run) = %.2fx; %d vs %d conns, kernel drops %d",
				r.v.Name, i+1, pairs, pr.Agent.NsPerConn, pr.Agent.RunsPerConn, pr.Agent.NsPerRun, pr.Noop.NsPerConn, pr.Noop.RunsPerConn, pr.Noop.NsPerRun,
				pr.Ratio, pr.Agent.Conns, pr.Noop.Conns, pr.Agent.KernelDrops)
			if verbose {
				progress("B1k %s pair %d agent: %s; %d begins, %d ends read", r.v.Name, i+1, progBreakdown(pr.Agent.Programs), pr.Agent.Events, pr.Agent.Ends)
				progress("B1k %s pair %d noop:  %s", r.v.Name, i+1, progBreakdown(pr.Noop.Programs))
			}
		}
	}
	return results(), nil
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

// b1kVersus compares two variants pair by pair (the same round): the
// median of a's agent ns/conn ÷ b's, and of the difference.
func b1kVersus(a, b b1kResult) (ratio, extraNs float64, n int) {
	n = min(len(a.Pairs), len(b.Pairs))
	if n == 0 {
		return 0, 0, 0
	}
	rs, ds := make([]float64, n), make([]float64, n)
	for i := 0; i < n; i++ {
		if b.Pairs[i].Agent.NsPerConn > 0 {
			rs[i] = a.Pairs[i].Agent.NsPerConn / b.Pairs[i].Agent.NsPerConn
		}
		ds[i] = a.Pairs[i].Agent.NsPerConn - b.Pairs[i].Agent.NsPerConn
	}
	return median(rs), median(ds), n
}

// runB1k is the B1k rows, one per variant: kernel ns per connection, the
// agent's programs ÷ the noop floor on the same hooks.
func runB1k(ctx context.Context, p Params, progress func(string, ...any)) []Row {
	variants, err := parseB1kVariants(*b1kVariantsFlag)
	if err != nil {
		return []Row{{ID: "B1k", What: "kernel ns/conn, agent's programs ÷ noop floor", Target: "<= 3.0 x floor (begins only: <= 2.0)", Met: "n/a", Figures: "n/a", Note: err.Error()}}
	}
	rows := make([]Row, len(variants))
	for i, v := range variants {
		rows[i] = Row{ID: "B1k", What: "kernel ns/conn, agent's programs ÷ noop floor: " + v.Name, Target: "(info)", Met: "n/a", Figures: "n/a"}
		if v.Target > 0 {
			rows[i].Target = fmt.Sprintf("<= %.1f x floor", v.Target)
		}
	}
	cg, err := newCgroup("k")
	if err != nil {
		for i := range rows {
			rows[i].Note = err.Error()
		}
		return rows
	}
	defer cg.Remove()
	progress("B1k: variants %s; %d pairs each, storm %g s x %d workers in %s; kernel.bpf_stats_enabled on during each storm only",
		*b1kVariantsFlag, p.Pairs, p.B1kSeconds, p.Workers, cg.Path)
	results, err := measureB1k(ctx, cg, variants, p.Pairs, p.Workers, p.B1kSeconds, p.Verbose, progress)
	var begin *b1kResult
	for i := range results {
		if results[i].Variant == "begin" && len(results[i].Pairs) > 0 {
			begin = &results[i]
		}
	}
	for i, res := range results {
		row := &rows[i]
		v := variants[i]
		if len(res.Pairs) == 0 {
			row.Note = "no pairs"
			if err != nil {
				row.Note = err.Error()
			}
			continue
		}
		ratios := make([]float64, len(res.Pairs))
		for j, pr := range res.Pairs {
			ratios[j] = pr.Ratio
		}
		row.Figures = fmt.Sprintf("%.2fx (%d pairs, min %.2f max %.2f): agent %.0f ns/conn, %.2f runs x %.0f ns [%s]; floor %.0f ns/conn, %.2f runs x %.0f ns [%s]; per hook %s; kernel drops %d",
			res.Ratio, len(res.Pairs), minOf(ratios), maxOf(ratios), res.AgentNsPerConn, res.AgentRunsPerConn, res.AgentNsPerRun,
			progBreakdown(res.AgentPrograms), res.NoopNsPerConn, res.NoopRunsPerConn, res.NoopNsPerRun, progBreakdown(res.NoopPrograms),
			ratioList(res.ProgramRatios), res.KernelDrops)
		data := map[string]any{"result": res, "variant": v.Name, "storm_seconds": p.B1kSeconds, "workers": p.Workers}
		if begin != nil && v.Name != "begin" {
			r, d, n := b1kVersus(res, *begin)
			row.Figures += fmt.Sprintf("; vs begin: %.2fx its ns/conn, %+.0f ns/conn (median of %d pairs)", r, d, n)
			data["vs_begin_ratio"], data["vs_begin_extra_ns_per_conn"] = r, d
		}
		row.Data = data
		if v.Target > 0 {
			row.Met = metStr(res.Ratio <= v.Target)
		}
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
	}
	return rows
}
