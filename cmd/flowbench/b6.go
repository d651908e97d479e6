package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// B6 is flowstat's own Go benchmark: it builds a stream of events on an
// in-process JetStream and consumes it into a fresh SQLite database, with
// checkpoints, as `flowstat run` does.
const (
	b6Pkg   = "./consumers/flowstat"
	b6Bench = "BenchmarkConsume"
	b6Knob  = "FLOWSTAT_BENCH_EVENTS" // how many events the stream holds
)

// b6PGBench is the same benchmark into PostgreSQL (a server the benchmark starts; skipped without one).
const b6PGBench = "BenchmarkConsumePostgres"

// runB6 runs the aggregating consumer's Go benchmark once over p.B6Events, into SQLite (the protocol's
// B6) and into PostgreSQL (reported for information).
func runB6(ctx context.Context, modRoot string, p Params, progress func(string, ...any)) []Row {
	return []Row{
		runB6One(ctx, modRoot, p, progress, b6Bench, "SQLite", 500_000),
		runB6One(ctx, modRoot, p, progress, b6PGBench, "PostgreSQL", 0),
	}
}

// runB6One runs one of the consumer benchmarks; target 0 reports the figure without a bound.
func runB6One(ctx context.Context, modRoot string, p Params, progress func(string, ...any), name, db string, target float64) Row {
	row := Row{ID: "B6", What: "consumer (flowstat " + name + ", " + db + ") events/s", Figures: "n/a", Target: ">= 500,000 events/s", Met: "n/a"}
	if target == 0 {
		row.Target = "(info)"
	}
	pkg := b6Pkg
	args := []string{"test", "-run", "^$", "-bench", "^" + name + "$", "-benchmem", "-timeout", "10m", "-benchtime", "1x"}
	// One op is the whole stream: run it once.
	setting := fmt.Sprintf("%s=%d -benchtime 1x", b6Knob, p.B6Events)
	env := append(os.Environ(), fmt.Sprintf("%s=%d", b6Knob, p.B6Events))
	args = append(args, pkg)
	progress("B6: go %s (%s)", strings.Join(args, " "), setting)
	cctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(cctx, "go", args...)
	cmd.Dir, cmd.Env = modRoot, env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		row.Note = fmt.Sprintf("go test failed: %v %s", err, lastLine(string(out)+stderr.String()))
		return row
	}
	var eps float64
	var metrics map[string]float64
	for _, bl := range parseBench(out) {
		if bl.Name != name {
			continue
		}
		metrics = bl.Metrics
		switch {
		case bl.Metrics["events/s"] > 0:
			eps = bl.Metrics["events/s"]
		case bl.Metrics["ns/event"] > 0:
			eps = 1e9 / bl.Metrics["ns/event"]
		}
	}
	if eps == 0 {
		row.Note = "benchmark output had no events/s or ns/event: " + lastLine(string(out))
		if strings.Contains(string(out), "SKIP") {
			row.Note = db + " not installed: " + lastLine(string(out))
		}
		row.Data = map[string]any{"metrics": metrics, "setting": setting}
		return row
	}
	row.Figures = fmt.Sprintf("%.0f events/s (%s)", eps, setting)
	row.Met = "info"
	if target > 0 {
		row.Met = metStr(eps >= target)
	}
	row.Data = map[string]any{"events_per_s": eps, "metrics": metrics, "setting": setting, "package": pkg, "benchmark": name}
	progress("B6 %s: %s", db, row.Figures)
	return row
}
