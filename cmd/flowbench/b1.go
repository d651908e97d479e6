package main

import (
	"context"
	"fmt"
	"time"

	"github.com/flowbus/flowbus/cmd/internal/proctest"
)

// pairRecord is one A/B pair of a ratio benchmark.
type pairRecord struct {
	RateA     float64 `json:"rate_a"` // connections/s without anything attached
	RateB     float64 `json:"rate_b"` // connections/s with the observer attached
	ConnRatio float64 `json:"conn_ratio"`
	ConnsA    uint64  `json:"conns_a"`
	ConnsB    uint64  `json:"conns_b"`
	FailedA   uint64  `json:"failed_a"`
	FailedB   uint64  `json:"failed_b"`
	BulkA     float64 `json:"bulk_a_mib_s,omitempty"`
	BulkB     float64 `json:"bulk_b_mib_s,omitempty"`
	BulkRatio float64 `json:"bulk_ratio,omitempty"`
	Info      string  `json:"info,omitempty"` // what the observer said about run B
}

// observer is what run B has attached; attach starts it and returns the
// function that reports on it and detaches it.
type observer func(ctx context.Context) (detach func() (info string, err error), err error)

// runPairs alternates A (storm in cgA, nothing attached) and B (storm in cgB
// with the observer attached), optionally followed by a bulk stream on each
// side. cgA is a sibling of cgB, so even an observer left running never
// watches it.
func runPairs(ctx context.Context, label string, p Params, cgA, cgB *cgroup, withBulk bool, attach observer, progress func(string, ...any)) ([]pairRecord, error) {
	var recs []pairRecord
	for i := 0; i < p.Pairs; i++ {
		var r pairRecord
		a, err := cgA.storm(ctx, p.Workers, p.StormSeconds, false)
		if err != nil {
			return recs, fmt.Errorf("pair %d A storm: %w", i+1, err)
		}
		r.ConnsA, r.FailedA, r.RateA = a.Conns, a.Failed, float64(a.Conns)/a.Seconds
		if withBulk {
			ba, err := cgA.bulk(ctx, p.BulkBytes)
			if err != nil {
				return recs, fmt.Errorf("pair %d A bulk: %w", i+1, err)
			}
			r.BulkA = float64(ba.Bytes) / ba.Seconds / (1 << 20)
		}

		detach, err := attach(ctx)
		if err != nil {
			return recs, fmt.Errorf("pair %d attaching: %w", i+1, err)
		}
		// Let the observer finish its start-up work (stream creation, BTF
		// loading) so B measures the steady state, as A does.
		time.Sleep(300 * time.Millisecond)
		b, errB := cgB.storm(ctx, p.Workers, p.StormSeconds, false)
		var bb proctest.BulkResult
		if errB == nil && withBulk {
			bb, errB = cgB.bulk(ctx, p.BulkBytes)
		}
		info, errD := detach()
		if errB != nil {
			return recs, fmt.Errorf("pair %d B: %w", i+1, errB)
		}
		if errD != nil {
			info += " detach: " + errD.Error()
		}
		r.ConnsB, r.FailedB, r.RateB = b.Conns, b.Failed, float64(b.Conns)/b.Seconds
		if r.RateA > 0 {
			r.ConnRatio = r.RateB / r.RateA
		}
		if withBulk {
			r.BulkB = float64(bb.Bytes) / bb.Seconds / (1 << 20)
			if r.BulkA > 0 {
				r.BulkRatio = r.BulkB / r.BulkA
			}
		}
		r.Info = info
		recs = append(recs, r)
		if withBulk {
			progress("%s pair %d/%d: storm %.0f vs %.0f conn/s = %.3f; bulk %.0f vs %.0f MiB/s = %.3f %s",
				label, i+1, p.Pairs, r.RateA, r.RateB, r.ConnRatio, r.BulkA, r.BulkB, r.BulkRatio, info)
		} else {
			progress("%s pair %d/%d: storm %.0f vs %.0f conn/s = %.3f %s", label, i+1, p.Pairs, r.RateA, r.RateB, r.ConnRatio, info)
		}
	}
	return recs, nil
}

// agentObserver starts a fresh agent watching cg for each B run and stops it
// (SIGTERM, flush) afterwards, so run A has no agent process at all.
func agentObserver(tmp, bin string, cg *cgroup) observer {
	return func(ctx context.Context) (func() (string, error), error) {
		a, err := startAgent(ctx, bin, cg.Path, tmp)
		if err != nil {
			return nil, err
		}
		return func() (string, error) {
			var info string
			if m, err := a.Scrape(); err == nil {
				info = fmt.Sprintf("(agent captured %.0f, kernel drops %.0f)",
					m[`flowbus_agent_events_total{stage="captured"}`], kernelDrops(m))
			}
			return info, a.Stop()
		}, nil
	}
}

// kernelDrops is the agent's count of events the kernel could not hand over.
func kernelDrops(m map[string]float64) float64 {
	return proctest.SumPrefix(m, `flowbus_agent_dropped_events_total{stage="kernel`)
}

// runB1 measures the agent's cost on a connection storm and a bulk stream.
func runB1(ctx context.Context, tmp string, p Params, progress func(string, ...any)) []Row {
	connRow := Row{ID: "B1", What: "conn-rate ratio (agent ÷ none)", Target: ">= 0.97", Met: "n/a", Figures: "n/a"}
	bulkRow := Row{ID: "B1", What: fmt.Sprintf("bulk ratio, 1 stream of %d MiB", p.BulkBytes>>20), Target: ">= 0.99", Met: "n/a", Figures: "n/a"}
	fail := func(err error) []Row {
		connRow.Note, bulkRow.Note = err.Error(), err.Error()
		return []Row{connRow, bulkRow}
	}
	cgA, err := newCgroup("a")
	if err != nil {
		return fail(err)
	}
	defer cgA.Remove()
	cgB, err := newCgroup("b")
	if err != nil {
		return fail(err)
	}
	defer cgB.Remove()

	progress("B1: %d pairs, storm %g s x %d workers, bulk %d MiB; A=%s B=%s (agent)", p.Pairs, p.StormSeconds, p.Workers, p.BulkBytes>>20, cgA.Path, cgB.Path)
	recs, err := runPairs(ctx, "B1", p, cgA, cgB, true, agentObserver(tmp, p.Agent, cgB), progress)
	if len(recs) == 0 {
		if err == nil {
			err = fmt.Errorf("no pairs")
		}
		return fail(err)
	}
	var conn, bulk, rateA, rateB, bulkA, bulkB []float64
	for _, r := range recs {
		conn, bulk = append(conn, r.ConnRatio), append(bulk, r.BulkRatio)
		rateA, rateB = append(rateA, r.RateA), append(rateB, r.RateB)
		bulkA, bulkB = append(bulkA, r.BulkA), append(bulkB, r.BulkB)
	}
	mc, mb := median(conn), median(bulk)
	connRow.Figures = fmt.Sprintf("%.3f (%d pairs, min %.3f max %.3f; %.0f vs %.0f conn/s)", mc, len(recs), minOf(conn), maxOf(conn), median(rateB), median(rateA))
	connRow.Met = metStr(mc >= 0.97)
	connRow.Data = map[string]any{"median_ratio": mc, "median_rate_a": median(rateA), "median_rate_b": median(rateB), "pairs": recs}
	bulkRow.Figures = fmt.Sprintf("%.3f (%d pairs, min %.3f max %.3f; %.0f vs %.0f MiB/s)", mb, len(recs), minOf(bulk), maxOf(bulk), median(bulkB), median(bulkA))
	bulkRow.Met = metStr(mb >= 0.99)
	bulkRow.Data = map[string]any{"median_ratio": mb, "median_mib_s_a": median(bulkA), "median_mib_s_b": median(bulkB)}
	if err != nil {
		connRow.Note = fmt.Sprintf("stopped early: %v", err)
		bulkRow.Note = connRow.Note
	}
	if len(recs) < 5 {
		connRow.Met, bulkRow.Met = "n/a", "n/a"
		if connRow.Note == "" {
			connRow.Note = "fewer than 5 pairs"
			bulkRow.Note = connRow.Note
		}
	}
	return []Row{connRow, bulkRow}
}

func minOf(xs []float64) float64 {
	m := xs[0]
	for _, x := range xs {
		m = min(m, x)
	}
	return m
}

func maxOf(xs []float64) float64 {
	m := xs[0]
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}
