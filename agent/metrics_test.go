package agent

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
)

// metric returns the value of one sample line of a Prometheus text page.
func metric(t *testing.T, page, sample string) float64 {
	t.Helper()
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(sample) + ` ([0-9.e+-]+)$`)
	m := re.FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("metric %s not found", sample)
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestMetricsAfterTraffic(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	cg := cgrouptest.NewChild(t)
	a := startAgent(t, testConfig(t, cg.Path))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, err := ServeMetrics(ctx, "127.0.0.1:0", a, testBuild, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	base := "http://" + addr.String()
	if code, _ := get(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz: %d", code)
	}
	if code, body := get(t, base+"/readyz"); code != 200 {
		t.Errorf("/readyz: %d %s", code, body)
	}

	const n = 10
	cg.Traffic(t, "127.0.0.1", n, false)
	deadline := time.Now().Add(10 * time.Second)
	// Every connection closed: its two ends follow its two begins.
	for (a.Snapshot().Publisher.EventsAcked < 2*n || a.Snapshot().Publisher.EndsAcked < 2*n) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	_, page := get(t, base+"/metrics")
	for sample, want := range map[string]float64{
		`flowbus_agent_events_total{stage="captured"}`:                 2 * n,
		`flowbus_agent_events_total{stage="published"}`:                2 * n,
		`flowbus_agent_events_total{stage="acked"}`:                    2 * n,
		`flowbus_agent_dropped_events_total{stage="kernel_ringbuf"}`:   0,
		`flowbus_agent_dropped_events_total{stage="queue"}`:            0,
		`flowbus_agent_dropped_events_total{stage="publish"}`:          0,
		`flowbus_agent_ready`:                                          1,
		`flowbus_agent_pending_batches`:                                0,
		`flowbus_agent_dns_cache_lookups_total{result="miss"}`:         8 * n, // begins and ends
		`flowbus_agent_ends_total{stage="captured"}`:                   2 * n,
		`flowbus_agent_ends_total{stage="published"}`:                  2 * n,
		`flowbus_agent_ends_total{stage="acked"}`:                      2 * n,
		`flowbus_agent_ends_total{stage="never_established"}`:          0,
		`flowbus_agent_ends_total{stage="self_excluded"}`:              0,
		`flowbus_agent_dropped_ends_total{stage="kernel_ringbuf"}`:     0,
		`flowbus_agent_dropped_ends_total{stage="kernel_storage"}`:     0,
		`flowbus_agent_dropped_ends_total{stage="half_open_overflow"}`: 0,
		`flowbus_agent_dropped_ends_total{stage="publisher"}`:          0,
		`flowbus_agent_half_open_pending`:                              0,
		`flowbus_agent_half_open_confirms_lost_total`:                  0,
		`flowbus_agent_synack_retransmits_suppressed_total`:            0,
		`flowbus_agent_begins_at_established_total`:                    0,
		`flowbus_agent_dropped_events_total{stage="kernel_truncated"}`: 0,
		`flowbus_agent_dns_messages_total{outcome="malformed"}`:        0,
		`flowbus_agent_dns_cache_entries`:                              0,
		`flowbus_agent_events_total{stage="self_excluded"}`:            0,
		`flowbus_agent_duplicate_acks_total`:                           0,
		`flowbus_agent_publish_errors_total`:                           0,
		`flowbus_agent_dns_messages_total{outcome="lost"}`:             0,
		`flowbus_agent_dns_cut_in_kernel_total`:                        0,
		`flowbus_agent_dns_messages_total{outcome="partial"}`:          0,
		`flowbus_agent_dns_cache_evictions_total{reason="entries"}`:    0,
		`flowbus_agent_dns_cache_evictions_total{reason="bytes"}`:      0,
		`flowbus_agent_dns_cache_evictions_total{reason="ttl"}`:        0,
		`flowbus_agent_dns_cache_bytes`:                                0,
		`flowbus_agent_dns_cache_names`:                                0,
		`flowbus_agent_dns_cache_names_displaced_total`:                0,
		`flowbus_agent_dns_records_learned_total`:                      0,
		`flowbus_agent_dns_records_dropped_total{reason="cut"}`:        0,
		`flowbus_agent_dns_records_dropped_total{reason="malformed"}`:  0,
		`flowbus_agent_dropped_events_total{stage="reader"}`:           0,
		`flowbus_agent_dropped_events_total{stage="spool"}`:            0,
		`flowbus_agent_dns_messages_total{outcome="ignored"}`:          0,
		`flowbus_agent_dns_cache_expired_total`:                        0,
		`flowbus_agent_dns_messages_total{outcome="truncated"}`:        0,
		`flowbus_agent_dns_messages_total{outcome="learned"}`:          0,
		`flowbus_agent_dns_cache_lookups_total{result="hit"}`:          0,
		"flowbus_agent_batch_events_sum":                               4 * n, // begin and end batches
		`flowbus_agent_check_ok{check="nats"}`:                         1,
		`flowbus_agent_check_ok{check="stream"}`:                       1,
		`flowbus_agent_check_ok{check="acks"}`:                         1,
		`flowbus_agent_check_ok{check="cgroup"}`:                       1,
	} {
		if got := metric(t, page, sample); got != want {
			t.Errorf("%s = %v, want %v", sample, got, want)
		}
	}
	if got := metric(t, page, buildInfoSample(testBuild)); got != 1 {
		t.Errorf("%s = %v, want 1", buildInfoSample(testBuild), got)
	}
	batches := metric(t, page, "flowbus_agent_batches_acked_total")
	if batches < 1 || metric(t, page, "flowbus_agent_batch_events_count") != batches ||
		metric(t, page, "flowbus_agent_publish_latency_seconds_count") != batches ||
		metric(t, page, "flowbus_agent_batch_bytes_count") != batches {
		t.Errorf("histograms do not count the %v acked batches", batches)
	}
	if metric(t, page, "flowbus_agent_batch_bytes_sum") != metric(t, page, "flowbus_agent_batch_bytes_acked_total") {
		t.Errorf("batch bytes histogram and counter disagree")
	}
}

// testBuild is the build the tests' metrics endpoints report.
var testBuild = Build{Version: "v0.0.0-test", Commit: "0123456789ab-dirty", GoVersion: runtime.Version()}

// buildInfoSample is the flowbus_build_info sample of build b.
func buildInfoSample(b Build) string {
	return `flowbus_build_info{commit="` + b.Commit + `",goversion="` + b.GoVersion +
		`",nats_server="` + server.VERSION + `",version="` + b.Version + `"}`
}

// flowbus_build_info is 1 with the labels of the build.
func TestMetricBuildInfo(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewBuildInfoCollector(testBuild))
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer srv.Close()
	_, page := get(t, srv.URL)
	if got := metric(t, page, buildInfoSample(testBuild)); got != 1 {
		t.Errorf("%s = %v, want 1", buildInfoSample(testBuild), got)
	}
	if !strings.Contains(page, "# TYPE flowbus_build_info gauge") {
		t.Errorf("flowbus_build_info is not a gauge:\n%s", page)
	}
}

// /readyz lists every failing check, one line each with its cause, and
// says ready only when none fails.
func TestReadyzBody(t *testing.T) {
	if body, ok := readyzBody([]Check{{Name: "nats", OK: true}, {Name: "cgroup", OK: true}}); !ok || body != "ready" {
		t.Errorf("all checks pass: %q, %v", body, ok)
	}
	body, ok := readyzBody([]Check{{Name: "nats", OK: true}, {Name: "stream", Cause: "no stream: create it"}, {Name: "acks", OK: true}, {Name: "cgroup", Cause: "gone: recreate it"}})
	if want := "not ready:\nstream: no stream: create it\ncgroup: gone: recreate it"; ok || body != want {
		t.Errorf("two checks fail: %q, %v; want %q", body, ok, want)
	}
}
