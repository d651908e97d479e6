package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"
)

const b6Pkgs = "./consumers/flowstat/..."

// b6Bench finds a BenchmarkConsume... in the flowstat packages: its name and
// package import path, or "" when there is none (yet).
func b6Bench(ctx context.Context, modRoot string) (name, pkg string, err error) {
	cmd := exec.CommandContext(ctx, "go", "test", "-list", "Benchmark.*", b6Pkgs)
	cmd.Dir = modRoot
	out, err := cmd.CombinedOutput()
	if err != nil {
		why := lastLine(string(out))
		for _, l := range strings.Split(string(out), "\n") {
			if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") && !strings.HasPrefix(l, "FAIL") {
				why = l
				break
			}
		}
		return "", "", fmt.Errorf("go test -list: %v: %s", err, why)
	}
	// go test -list prints a package's names, then "ok  <pkg>  <time>".
	var names []string
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) == 1 && strings.HasPrefix(f[0], "BenchmarkConsume"):
			names = append(names, f[0])
		case len(f) >= 2 && f[0] == "ok":
			if len(names) > 0 {
				sort.Strings(names)
				return names[0], f[1], nil
			}
		case len(f) >= 2 && f[0] == "?":
			names = nil
		}
	}
	return "", "", nil
}

var getenvRe = regexp.MustCompile(`os\.(?:Getenv|LookupEnv)\("([A-Za-z0-9_]+)"\)`)

// b6EventsKnob looks in the package's tests for an environment variable that
// sets how many events the benchmark consumes (a name with EVENTS in it).
func b6EventsKnob(dir string) string {
	files, _ := filepath.Glob(filepath.Join(dir, "*_test.go"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, m := range getenvRe.FindAllSubmatch(b, -1) {
			if strings.Contains(strings.ToUpper(string(m[1])), "EVENTS") {
				return string(m[1])
			}
		}
	}
	return ""
}

// runB6 runs the aggregating consumer's own Go benchmark, if it exists yet.
func runB6(ctx context.Context, modRoot string, p Params, progress func(string, ...any)) []Row {
	row := Row{ID: "B6", What: "consumer (flowstat) events/s", Figures: "n/a", Target: ">= 500,000 events/s", Met: "n/a"}
	name, pkg, err := b6Bench(ctx, modRoot)
	if err != nil || name == "" {
		row.Figures = "n/a: flowstat not built yet"
		why := "no BenchmarkConsume... in " + b6Pkgs
		if err != nil {
			why = err.Error()
		}
		row.Data = map[string]any{"why": why}
		progress("B6: %s (%s)", row.Figures, why)
		return []Row{row}
	}
	row.What = "consumer (flowstat " + name + ") events/s"
	dirOut, _ := exec.CommandContext(ctx, "go", "list", "-C", modRoot, "-f", "{{.Dir}}", pkg).Output()
	knob := b6EventsKnob(strings.TrimSpace(string(dirOut)))
	args := []string{"test", "-run", "^$", "-bench", "^" + name + "$", "-benchmem", "-timeout", "10m"}
	env := os.Environ()
	setting := "as is (no events knob found)"
	if knob != "" {
		// One op is the whole stream of 5,000,000 events: run it once.
		env = append(env, fmt.Sprintf("%s=%d", knob, p.B6Events))
		args = append(args, "-benchtime", "1x")
		setting = fmt.Sprintf("%s=%d -benchtime 1x", knob, p.B6Events)
	}
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
		return []Row{row}
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
		row.Data = map[string]any{"metrics": metrics, "setting": setting}
		return []Row{row}
	}
	row.Figures = fmt.Sprintf("%.0f events/s (%s)", eps, setting)
	row.Met = metStr(eps >= 500_000)
	row.Data = map[string]any{"events_per_s": eps, "metrics": metrics, "setting": setting, "package": pkg, "benchmark": name}
	progress("B6: %s", row.Figures)
	return []Row{row}
}
