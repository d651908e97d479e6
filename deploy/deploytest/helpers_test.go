package deploytest

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"testing"
)

// root is the repository root.
func root(t *testing.T) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot locate the test file")
	}
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

func read(t *testing.T, rel string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root(t), rel))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// strict reports whether a missing validation tool is a failure rather than a
// skip (deploy/validate.sh sets it).
func strict() bool { return os.Getenv("FLOWBUS_DEPLOY_STRICT") == "1" }

// tool finds an external validator, or skips (fails when strict and required).
func tool(t *testing.T, required bool, names ...string) string {
	t.Helper()
	for _, n := range names {
		if p, err := exec.LookPath(n); err == nil {
			return p
		}
	}
	if required && strict() {
		t.Fatalf("none of %v is installed (FLOWBUS_DEPLOY_STRICT=1)", names)
	}
	t.Skipf("skipping: none of %v is installed", names)
	return ""
}

var (
	envTagRE    = regexp.MustCompile("`env:\"([A-Z0-9_]+)\"")
	descNameRE  = regexp.MustCompile(`\bd\("([a-z0-9_]+)"`)
	histNameRE  = regexp.MustCompile(`Name:\s*"(flowbus_[a-z0-9_]+)"`)
	metricRefRE = regexp.MustCompile(`\b(flowbus_[a-z0-9_]+|process_[a-z0-9_]+|go_[a-z0-9_]+|up)\b`)
	flowbusVar  = regexp.MustCompile(`\bFLOWBUS_[A-Z0-9_]+\b`)
)

// agentVariables are the FLOWBUS_* variables the agent reads (its Config
// struct tags), plus those of the consumers.
func agentVariables(t *testing.T) map[string]bool {
	t.Helper()
	vars := map[string]bool{
		"FLOWBUS_DB":       true, // flowstat
		"FLOWBUS_NATS_URL": true, // flowtail, flowstat
	}
	for _, m := range envTagRE.FindAllStringSubmatch(string(read(t, "agent/config.go")), -1) {
		vars["FLOWBUS_"+m[1]] = true
	}
	// flowstat and flowtail name their variables in their code as strings.
	for _, dir := range []string{"cmd/flowstat", "cmd/flowtail"} {
		files, _ := filepath.Glob(filepath.Join(root(t), dir, "*.go"))
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			for _, v := range flowbusVar.FindAllString(string(b), -1) {
				vars[v] = true
			}
		}
	}
	if len(vars) < 20 {
		t.Fatalf("found only %d FLOWBUS_* variables in agent/config.go: has its format changed?", len(vars))
	}
	return vars
}

// checkVariable fails on a FLOWBUS_* name no program reads (a typo would be
// silently ignored at run time).
func checkVariable(t *testing.T, vars map[string]bool, where, name string) {
	t.Helper()
	if strings.HasPrefix(name, "FLOWBUS_") && !vars[name] {
		t.Errorf("%s: %s is not a flowbus setting (known: agent/config.go, README)", where, name)
	}
}

// metrics are the agent's metric names (agent/metrics.go) and which
// of them are histograms.
type metrics struct {
	names      map[string]bool
	histograms map[string]bool
}

func agentMetrics(t *testing.T) metrics {
	t.Helper()
	src := string(read(t, "agent/metrics.go"))
	m := metrics{names: map[string]bool{}, histograms: map[string]bool{}}
	for _, s := range descNameRE.FindAllStringSubmatch(src, -1) {
		m.names["flowbus_agent_"+s[1]] = true
	}
	for _, s := range histNameRE.FindAllStringSubmatch(src, -1) {
		m.names[s[1]] = true
		m.histograms[s[1]] = true
	}
	// The metrics the dashboard and the alerts are built on.
	for _, want := range []string{
		"flowbus_agent_events_total", "flowbus_agent_dropped_events_total", "flowbus_agent_pending_batches",
		"flowbus_agent_pending_bytes", "flowbus_agent_batches_acked_total", "flowbus_agent_batch_bytes_acked_total",
		"flowbus_agent_duplicate_acks_total", "flowbus_agent_publish_errors_total",
		"flowbus_agent_synack_retransmits_suppressed_total", "flowbus_agent_ready", "flowbus_agent_dns_cache_entries",
		"flowbus_agent_dns_cache_lookups_total", "flowbus_agent_dns_messages_total", "flowbus_agent_dns_cache_evictions_total",
		"flowbus_agent_dns_cache_expired_total", "flowbus_agent_batch_events", "flowbus_agent_batch_bytes",
		"flowbus_agent_publish_latency_seconds",
	} {
		if !m.names[want] {
			t.Errorf("agent/metrics.go no longer defines %s (dashboard and alerts use it)", want)
		}
	}
	return m
}

// check returns the metric names in a PromQL expression that the agent does
// not export. process_*, go_* and up come from the client library and
// Prometheus.
func (m metrics) unknown(expr string) []string {
	var bad []string
	for _, ref := range metricRefRE.FindAllString(expr, -1) {
		if !strings.HasPrefix(ref, "flowbus_") {
			continue
		}
		name := ref
		for _, suf := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(ref, suf); ok && m.histograms[base] {
				name = base
			}
		}
		if m.histograms[ref] {
			bad = append(bad, ref+" (a histogram: use _bucket, _sum or _count)")
			continue
		}
		if !m.names[name] {
			bad = append(bad, ref)
		}
	}
	return bad
}

// referenced returns the flowbus metrics an expression uses, histogram
// series folded onto their histogram.
func (m metrics) referenced(expr string) []string {
	var out []string
	for _, ref := range metricRefRE.FindAllString(expr, -1) {
		for _, suf := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(ref, suf); ok && m.histograms[base] {
				ref = base
			}
		}
		if m.names[ref] {
			out = append(out, ref)
		}
	}
	return out
}

func sortedKeys(m map[string]bool) []string {
	var k []string
	for s := range m {
		k = append(k, s)
	}
	sort.Strings(k)
	return k
}
