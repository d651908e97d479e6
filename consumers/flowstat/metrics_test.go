package flowstat_test

import (
	"context"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat"
	"github.com/flowbus/flowbus/consumers/flowstat/flowstattest"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/flowbus/flowbus/schema"
)

// sample is one line of a Prometheus text page.
type sample struct {
	name   string
	labels string // as written between the braces, "" without
	value  float64
}

var sampleRE = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? (\S+)$`)

// scrape GETs /metrics over HTTP and parses the page.
func scrape(t *testing.T, base string) []sample {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %d, %v", resp.StatusCode, err)
	}
	var out []sample
	for _, l := range strings.Split(string(b), "\n") {
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		m := sampleRE.FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("unparsable metrics line %q", l)
		}
		v, err := strconv.ParseFloat(m[3], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", l, err)
		}
		out = append(out, sample{m[1], m[2], v})
	}
	return out
}

// value is the sample of name with exactly these labels; NaN when absent.
func value(ss []sample, name, labels string) float64 {
	for _, s := range ss {
		if s.name == name && s.labels == labels {
			return s.value
		}
	}
	return math.NaN()
}

// One Run over batches, gaps and dead letters of every reason: /metrics, scraped over HTTP, counts what
// the database holds (summary by reason, the reference aggregates), every commit once in the latency
// histogram, and the time of the last commit.
func TestMetricsOfARun(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := newEnv(t)
		bad := poison(t)
		e.fleet.Publish(t, e.rec, 20)
		for _, name := range []string{"foreign", "major2", "truncated"} {
			e.rec.PublishRaw(t, "flows.web-09.outgoing", bad[name])
			e.fleet.Publish(t, e.rec, 3)
		}
		ev := schema.Event{Timestamp: e.fleet.T0.UnixNano(), Src: mustAddr("192.0.2.7"), Dst: mustAddr("198.51.100.9"), SrcPort: 40000, DstPort: 443}
		_, web02 := tailtest.NewAgent("web-02", "r").Batch(schema.Outgoing, schema.Drops{}, ev)
		for _, subject := range []string{"flows.web-01.outgoing", "flows.web-03.incoming"} {
			e.rec.PublishRaw(t, subject, web02)
		}
		lastSeq := e.rec.PublishRaw(t, "flows.web-09.outgoing", bad["foreign"])

		st := open(t, dsn)
		o := e.opts()
		o.Log = io.Discard
		o.Monitor = flowstat.NewMonitor()
		hs := httptest.NewServer(o.Monitor.Handler())
		defer hs.Close()
		before := time.Now()
		stats := run(t, st, o)
		after := time.Now()

		want := flowstattest.Reference(e.rec.Batches, time.Minute)
		flowstattest.Check(t, st, want)
		sum, err := st.Summary(context.Background(), 0)
		if err != nil {
			t.Fatal(err)
		}
		if sum.DeadLetters != 6 {
			t.Fatalf("the database holds %d dead letters, want 6: the scenario is not what this test means", sum.DeadLetters)
		}
		ss := scrape(t, hs.URL)
		for _, r := range flowstat.DeadLetterReasons {
			if got := value(ss, "flowbus_flowstat_dead_letters_total", `reason="`+r+`"`); got != float64(sum.DeadByReason[r]) {
				t.Errorf("dead letters %s: metric %v, database %d", r, got, sum.DeadByReason[r])
			}
		}
		if sum.DeadByReason[flowstat.ReasonMalformed] != 2 || sum.DeadByReason[flowstat.ReasonSubjectMismatch] != 2 {
			t.Errorf("database by reason %v, want 2 malformed, 2 subject_mismatch", sum.DeadByReason)
		}
		for name, w := range map[string]float64{
			"flowbus_flowstat_events_total":                  float64(e.rec.Events()),
			"flowbus_flowstat_batches_total":                 float64(len(e.rec.Batches)),
			"flowbus_flowstat_gaps_total":                    float64(len(want.Gaps)),
			"flowbus_flowstat_commits_total":                 float64(stats.Commits),
			"flowbus_flowstat_commit_latency_seconds_count":  float64(stats.Commits),
			"flowbus_flowstat_committed_sequence":            float64(lastSeq),
			"flowbus_flowstat_pending_messages":              0,
			"flowbus_flowstat_dead_letters_not_copied_total": 0,
			"flowbus_flowstat_ready":                         0, // Run has returned
		} {
			if got := value(ss, name, ""); got != w {
				t.Errorf("%s = %v, want %v", name, got, w)
			}
		}
		if stats.Commits < 4 || len(want.Gaps) == 0 {
			t.Fatalf("%d commits, %d gaps: too few to prove much", stats.Commits, len(want.Gaps))
		}
		// Every commit took part of the run's time; the buckets are cumulative and end at the count.
		if s := value(ss, "flowbus_flowstat_commit_latency_seconds_sum", ""); !(s > 0 && s <= after.Sub(before).Seconds()) {
			t.Errorf("commit latency sum %v s, want within the run's %v", s, after.Sub(before))
		}
		var buckets []sample
		for _, s := range ss {
			if s.name == "flowbus_flowstat_commit_latency_seconds_bucket" {
				buckets = append(buckets, s)
			}
		}
		if len(buckets) < 5 || buckets[len(buckets)-1].labels != `le="+Inf"` || buckets[len(buckets)-1].value != float64(stats.Commits) ||
			!sort.SliceIsSorted(buckets, func(i, j int) bool { return buckets[i].value < buckets[j].value }) {
			t.Errorf("commit latency buckets %v", buckets)
		}
		if ts := value(ss, "flowbus_flowstat_last_commit_timestamp_seconds", ""); ts < float64(before.UnixNano())/1e9 || ts > float64(after.UnixNano())/1e9 {
			t.Errorf("last commit at %v, want between %v and %v", ts, before, after)
		}
	})
}

// Before its first commit, a consumer's last commit time is when it began consuming, so that one that
// never commits still ages; every reason is exported at 0 from the start.
func TestMetricsBeforeTheFirstCommit(t *testing.T) {
	e := newEnv(t)
	st := open(t, sqlitePath(t))
	mon := flowstat.NewMonitor()
	hs := httptest.NewServer(mon.Handler())
	defer hs.Close()
	ss := scrape(t, hs.URL)
	for _, r := range flowstat.DeadLetterReasons {
		if got := value(ss, "flowbus_flowstat_dead_letters_total", `reason="`+r+`"`); got != 0 {
			t.Errorf("dead letters %s before any run: %v, want 0", r, got)
		}
	}
	if got := value(ss, "flowbus_flowstat_last_commit_timestamp_seconds", ""); got != 0 {
		t.Errorf("last commit before any run: %v, want 0", got)
	}
	o := e.opts()
	o.Log = io.Discard
	o.Monitor = mon
	before := time.Now()
	stats := run(t, st, o) // an empty stream: nothing to commit
	after := time.Now()
	ss = scrape(t, hs.URL)
	if stats.Commits != 0 || value(ss, "flowbus_flowstat_commits_total", "") != 0 || value(ss, "flowbus_flowstat_commit_latency_seconds_count", "") != 0 {
		t.Errorf("an empty stream committed: stats %+v", stats)
	}
	if ts := value(ss, "flowbus_flowstat_last_commit_timestamp_seconds", ""); ts < float64(before.UnixNano())/1e9 || ts > float64(after.UnixNano())/1e9 {
		t.Errorf("last commit time %v, want when consuming began, between %v and %v", ts, before, after)
	}
}
