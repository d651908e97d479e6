package deploytest

import (
	"regexp"
	"testing"
)

var (
	statShortRE = regexp.MustCompile(`\b(?:counter|gauge)\("([a-z0-9_]+)"`)
	statNameRE  = regexp.MustCompile(`Name:\s*"(flowbus_flowstat_[a-z0-9_]+)"`)
	statHistRE  = regexp.MustCompile(`NewHistogram\(prometheus\.HistogramOpts\{Name:\s*"(flowbus_flowstat_[a-z0-9_]+)"`)
)

// flowstatMetrics are the metrics `flowstat run` registers (consumers/flowstat/monitor.go): those of its
// counter and gauge helpers, and those named in full.
func flowstatMetrics(t *testing.T) metrics {
	t.Helper()
	src := string(read(t, "consumers/flowstat/monitor.go"))
	m := metrics{names: map[string]bool{}, histograms: map[string]bool{}}
	for _, s := range statShortRE.FindAllStringSubmatch(src, -1) {
		m.names["flowbus_flowstat_"+s[1]] = true
	}
	for _, s := range statNameRE.FindAllStringSubmatch(src, -1) {
		m.names[s[1]] = true
	}
	for _, s := range statHistRE.FindAllStringSubmatch(src, -1) {
		m.histograms[s[1]] = true
	}
	// The metrics the alerts are built on: a rename must move them too.
	for _, want := range []string{
		"flowbus_flowstat_ready", "flowbus_flowstat_pending_messages", "flowbus_flowstat_last_commit_timestamp_seconds",
		"flowbus_flowstat_dead_letters_total", "flowbus_flowstat_gaps_total", "flowbus_flowstat_commit_latency_seconds",
		"flowbus_flowstat_events_total", "flowbus_flowstat_commits_total",
	} {
		if !m.names[want] {
			t.Errorf("consumers/flowstat/monitor.go no longer defines %s (dashboard and alerts use it)", want)
		}
	}
	if !m.histograms["flowbus_flowstat_commit_latency_seconds"] {
		t.Error("consumers/flowstat/monitor.go: flowbus_flowstat_commit_latency_seconds is no histogram any more")
	}
	return m
}

// allMetrics are the agent's and flowstat's metrics, for the alert rules, which use both.
func allMetrics(t *testing.T) metrics {
	t.Helper()
	m := agentMetrics(t)
	s := flowstatMetrics(t)
	for n := range s.names {
		m.names[n] = true
	}
	for n := range s.histograms {
		m.histograms[n] = true
	}
	return m
}
