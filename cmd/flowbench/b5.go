package main

import (
	"context"
	"fmt"
	"time"

	"github.com/flowbus/flowbus/cmd/internal/proctest"
)

// b5Run is the agent's footprint in one configuration.
type b5Run struct {
	Mode        string                   `json:"mode"` // embedded or external
	Storm       proctest.LoadStormResult `json:"storm"`
	ConnRate    float64                  `json:"conns_per_s"`
	EventRate   float64                  `json:"captured_events_per_s"`
	Captured    float64                  `json:"captured"`
	Acked       float64                  `json:"acked"`
	KernelDrops float64                  `json:"kernel_drops"`
	AllDrops    float64                  `json:"all_drops"`
	Agent       proctest.Usage           `json:"agent"`
	Server      *proctest.Usage          `json:"external_server,omitempty"`
	// WorkerCores is the storm's own CPU (its cgroup); OtherCores the rest
	// of the machine's busy CPU: other jobs on a shared host, kernel threads.
	WorkerCores float64 `json:"worker_cores"`
	OtherCores  float64 `json:"other_cores"`
}

// runB5 measures the agent's CPU and memory at a steady connection rate,
// once with its embedded NATS server (the default install: the process also
// stores the stream) and once publishing to an external nats-server process,
// which leaves the agent alone in the figures.
func runB5(ctx context.Context, modRoot, tmp string, p Params, progress func(string, ...any)) []Row {
	const cpuTarget, rssTarget = 0.1, 64.0
	target := fmt.Sprintf("CPU <= %.1f core, RSS <= %.0f MiB", cpuTarget, rssTarget)
	rowExt := Row{ID: "B5", What: "agent footprint, external nats-server (agent alone)", Figures: "n/a", Target: target, Met: "n/a"}
	rowEmb := Row{ID: "B5", What: "agent footprint, embedded server (info: agent + JetStream)", Figures: "n/a", Target: target, Met: "n/a"}
	fail := func(err error) []Row {
		rowExt.Note, rowEmb.Note = err.Error(), err.Error()
		return []Row{rowExt, rowEmb}
	}
	srvBin, srvVer, err := ensureNATSServer(ctx, modRoot)
	if err != nil {
		return fail(err)
	}
	cg, err := newCgroup("b5")
	if err != nil {
		return fail(err)
	}
	defer cg.Remove()

	measure := func(mode string) (b5Run, error) {
		r := b5Run{Mode: mode}
		var err error
		var env []string
		var srv *natsServerProc
		if mode == "external" {
			if srv, err = startNATSServer(ctx, srvBin, tmp); err != nil {
				return r, err
			}
			defer srv.Stop()
			env = append(env, "FLOWBUS_NATS_URL="+srv.URL())
		}
		a, err := startAgent(ctx, p.Agent, cg.Path, tmp, env...)
		if err != nil {
			return r, err
		}
		// After the explicit Stop below, which reports its error, a no-op.
		defer a.Stop()
		time.Sleep(500 * time.Millisecond) // start-up work done: measure the steady state
		m0, err := a.Scrape()
		if err != nil {
			return r, err
		}
		wa, err := proctest.WatchProc(a.Pid())
		if err != nil {
			return r, err
		}
		var ws *proctest.Window
		if srv != nil {
			if ws, err = proctest.WatchProc(srv.Pid()); err != nil {
				return r, err
			}
		}
		sys0, _ := proctest.SysBusy()
		cg0, _ := proctest.CgroupCPU(cg.Path)
		r.Storm, err = cg.paced(ctx, p.Workers, p.B5Seconds, p.B5Rate)
		if err != nil {
			return r, err
		}
		if r.Agent, err = wa.End(); err != nil {
			return r, err
		}
		sys1, _ := proctest.SysBusy()
		cg1, _ := proctest.CgroupCPU(cg.Path)
		r.WorkerCores = (cg1 - cg0).Seconds() / r.Agent.Seconds
		r.OtherCores = (sys1-sys0).Seconds()/r.Agent.Seconds - r.WorkerCores - r.Agent.Cores
		if ws != nil {
			su, err := ws.End()
			if err != nil {
				return r, err
			}
			r.Server = &su
			r.OtherCores -= su.Cores
		}
		r.OtherCores = max(0, r.OtherCores)
		m1, err := a.Scrape()
		if err != nil {
			return r, err
		}
		if err := a.Stop(); err != nil {
			return r, err
		}
		r.ConnRate = float64(r.Storm.Conns) / r.Storm.Seconds
		key := `flowbus_agent_events_total{stage="captured"}`
		r.Captured = m1[key] - m0[key]
		key = `flowbus_agent_events_total{stage="acked"}`
		r.Acked = m1[key] - m0[key]
		r.EventRate = r.Captured / r.Agent.Seconds
		r.KernelDrops = kernelDrops(m1)
		r.AllDrops = proctest.SumPrefix(m1, "flowbus_agent_dropped_events_total")
		return r, nil
	}
	describe := func(r b5Run) string {
		s := fmt.Sprintf("%.3f cores (user+sys %.2f s / %.1f s); VmHWM %.1f MiB, VmRSS max %.1f avg %.1f MiB; %.0f conn/s achieved of %.0f = %.0f events/s captured",
			r.Agent.Cores, r.Agent.CPU, r.Agent.Seconds, r.Agent.HWMMiB, r.Agent.RSSMaxMiB, r.Agent.RSSAvgMiB, r.ConnRate, p.B5Rate, r.EventRate)
		if r.Server != nil {
			s += fmt.Sprintf("; nats-server %.3f cores, %.0f MiB", r.Server.Cores, r.Server.RSSMaxMiB)
		}
		s += fmt.Sprintf("; storm worker %.2f cores, other %.2f", r.WorkerCores, r.OtherCores)
		if r.KernelDrops > 0 || r.AllDrops > 0 {
			s += fmt.Sprintf("; drops: kernel %.0f, all %.0f", r.KernelDrops, r.AllDrops)
		}
		return s
	}
	for _, mode := range []string{"embedded", "external"} {
		progress("B5 (%s): paced storm %.0f conn/s x %g s, %d workers, in %s", mode, p.B5Rate, p.B5Seconds, p.Workers, cg.Path)
		r, err := measure(mode)
		if err != nil {
			note := fmt.Sprintf("%s: %v", mode, err)
			if mode == "embedded" {
				rowEmb.Note = note
			} else {
				rowExt.Note = note
			}
			continue
		}
		progress("B5 (%s): %s", mode, describe(r))
		row := &rowEmb
		if mode == "external" {
			row = &rowExt
		}
		row.Figures = describe(r)
		row.Data = map[string]any{"run": r, "nats_server": srvVer, "target_conns_per_s": p.B5Rate, "seconds": p.B5Seconds}
		ok := r.Agent.Cores <= cpuTarget && r.Agent.HWMMiB <= rssTarget
		// The comparable figure is the agent alone; the embedded row is
		// information: it also carries the stream's storage work.
		if mode == "external" {
			row.Met = metStr(ok)
		} else {
			row.Met = "n/a"
			row.Note = fmt.Sprintf("info, includes the embedded JetStream server; within target: %s", metStr(ok))
		}
		if r.ConnRate < 0.95*p.B5Rate {
			note := fmt.Sprintf("achieved %.0f of %.0f conn/s", r.ConnRate, p.B5Rate)
			if r.OtherCores > 0.25 {
				note += fmt.Sprintf(" (host busy: %.2f cores of other work)", r.OtherCores)
			}
			if row.Note != "" {
				note = row.Note + "; " + note
			}
			row.Note = note
		}
	}
	return []Row{rowExt, rowEmb}
}
