package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// benchLine is one parsed `go test -bench` result line: its metrics by unit.
type benchLine struct {
	Name    string
	Metrics map[string]float64
}

// parseBench reads the result lines of `go test -bench` output; the name
// loses its -GOMAXPROCS suffix.
func parseBench(out []byte) []benchLine {
	var res []benchLine
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") {
			continue
		}
		if _, err := strconv.Atoi(f[1]); err != nil {
			continue
		}
		name := f[0]
		if i := strings.LastIndexByte(name, '-'); i > 0 {
			name = name[:i]
		}
		bl := benchLine{Name: name, Metrics: map[string]float64{}}
		for i := 2; i+1 < len(f); i += 2 {
			if v, err := strconv.ParseFloat(f[i], 64); err == nil {
				bl.Metrics[f[i+1]] = v
			}
		}
		res = append(res, bl)
	}
	return res
}

var benchBatchRe = regexp.MustCompile(`(?m)^const benchBatch = (\d+)`)

// eventsPerOp reads the batch size the schema benchmarks use, so that
// allocs/op converts to allocs/event even if the constant changes.
func eventsPerOp(modRoot string) float64 {
	b, err := os.ReadFile(filepath.Join(modRoot, "schema", "bench_test.go"))
	if err == nil {
		if m := benchBatchRe.FindSubmatch(b); m != nil {
			if n, err := strconv.Atoi(string(m[1])); err == nil && n > 0 {
				return float64(n)
			}
		}
	}
	return 1000
}

// runB4 runs the schema's Go benchmarks and summarises their medians.
func runB4(ctx context.Context, modRoot string, p Params, progress func(string, ...any)) []Row {
	const target = "encode <= 80 ns/event, 0 allocs/event; msgpack <= 1/4 JSON bytes"
	progress("B4: go test -bench (count %d, benchtime %s)", p.BenchCount, p.BenchTime)
	cmd := exec.CommandContext(ctx, "go", "test", "-run", "^$", "-bench", "BenchmarkBatchEncode|BenchmarkBatchDecode|BenchmarkJSONLines",
		"-benchmem", "-count", strconv.Itoa(p.BenchCount), "-benchtime", p.BenchTime, "./schema")
	cmd.Dir = modRoot
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return []Row{{ID: "B4", What: "batch encode/decode", Figures: "n/a", Target: target, Met: "n/a",
			Note: fmt.Sprintf("go test failed: %v %s", err, lastLine(string(out)+stderr.String()))}}
	}
	per := eventsPerOp(modRoot)
	vals := map[string]map[string][]float64{}
	for _, bl := range parseBench(out) {
		if vals[bl.Name] == nil {
			vals[bl.Name] = map[string][]float64{}
		}
		for u, v := range bl.Metrics {
			vals[bl.Name][u] = append(vals[bl.Name][u], v)
		}
	}
	med := func(name, unit string) (float64, bool) {
		xs := vals[name][unit]
		return median(xs), len(xs) > 0
	}
	encNs, ok1 := med("BenchmarkBatchEncode", "ns/event")
	encAllocs, ok2 := med("BenchmarkBatchEncode", "allocs/op")
	encBytes, ok3 := med("BenchmarkBatchEncode", "bytes/event")
	decNs, _ := med("BenchmarkBatchDecode", "ns/event")
	decAllocs, _ := med("BenchmarkBatchDecode", "allocs/op")
	jsonNs, _ := med("BenchmarkJSONLines", "ns/event")
	jsonBytes, ok4 := med("BenchmarkJSONLines", "bytes/event")
	if !(ok1 && ok2 && ok3 && ok4) || jsonBytes == 0 {
		return []Row{{ID: "B4", What: "batch encode/decode", Figures: "n/a", Target: target, Met: "n/a",
			Note: "benchmark output lacked ns/event, allocs/op or bytes/event"}}
	}
	ratio := encBytes / jsonBytes
	data := map[string]any{
		"events_per_op":            per,
		"encode_ns_per_event":      encNs,
		"encode_allocs_per_event":  encAllocs / per,
		"encode_bytes_per_event":   encBytes,
		"decode_ns_per_event":      decNs,
		"decode_allocs_per_event":  decAllocs / per,
		"json_ns_per_event":        jsonNs,
		"json_bytes_per_event":     jsonBytes,
		"msgpack_json_bytes_ratio": ratio,
		"raw":                      vals,
	}
	encOK := encNs <= 80 && encAllocs == 0
	return []Row{
		{ID: "B4", What: "batch encode (median of " + strconv.Itoa(p.BenchCount) + ")",
			Figures: fmt.Sprintf("%.1f ns/event, %.3g allocs/event", encNs, encAllocs/per),
			Target:  "<= 80 ns/event, 0 allocs/event", Met: metStr(encOK), Data: data},
		{ID: "B4", What: "batch decode (info)",
			Figures: fmt.Sprintf("%.1f ns/event, %.3g allocs/event", decNs, decAllocs/per),
			Target:  "-", Met: "n/a"},
		{ID: "B4", What: "msgpack vs JSON lines bytes",
			Figures: fmt.Sprintf("%.1f vs %.1f B/event = %.3f (JSON %.0f ns/event)", encBytes, jsonBytes, ratio, jsonNs),
			Target:  "<= 0.25", Met: metStr(ratio <= 0.25)},
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}
