package flowstat_test

import (
	"bytes"
	"context"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat"
	"github.com/flowbus/flowbus/consumers/flowstat/flowstattest"
	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/flowbus/flowbus/schema"
)

// An agent run sealed 10 outgoing batches; 3 never arrived (5 in the middle, 9 and 10 at the end: it
// was killed). The next run's first batch names it (prev_run). flowstat records the restart with K = 3
// and the downtime, logs it, and `summary` shows it; after a restart of flowstat a late batch of the old
// run (republished from the new run's spool) lowers K to 2. A link to a run this database never saw
// records no K. The aggregates stay the reference's.
func TestRestartsRecorded(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := newEnv(t)
		gen := flowstattest.NewGen(13, 10)
		ip := mustAddr("192.0.2.8")
		evs := func() []schema.Event { return gen.Events(4, schema.Outgoing, ip, e.fleet.T0, time.Minute) }
		old := tailtest.NewAgent("web-08", "run-old")
		type held struct {
			p    flowstattest.Published
			data []byte
		}
		var lost []held
		for i := 1; i <= 10; i++ {
			p, data := e.rec.Encode(old, schema.Outgoing, schema.Drops{}, evs())
			if i == 5 || i >= 9 {
				lost = append(lost, held{p, data})
				continue
			}
			e.rec.PublishEncoded(t, p, data)
		}
		t1 := time.Date(2026, 12, 2, 12, 0, 1, 234_000_000, time.UTC).UnixNano()
		t2 := t1 + 2_072_000_000
		neu := tailtest.NewAgent("web-08", "run-new")
		neu.SetPrevRun(schema.Outgoing, &schema.RunLink{RunID: "run-old", LastSeq: 10, Batches: 10, Events: 40, LastNs: t1, StartNs: t2, End: "unknown"})
		p, data := e.rec.Encode(neu, schema.Outgoing, schema.Drops{}, evs())
		e.rec.PublishEncoded(t, p, data)
		other := tailtest.NewAgent("db-09", "run-c")
		other.SetPrevRun(schema.Outgoing, &schema.RunLink{RunID: "run-before", LastSeq: 30, Batches: 15, LastNs: t1, StartNs: t1 + 500_000_000, End: "stopped"})
		p, data = e.rec.Encode(other, schema.Outgoing, schema.Drops{}, evs())
		e.rec.PublishEncoded(t, p, data)

		st := open(t, dsn)
		var log bytes.Buffer
		o := e.opts()
		o.Log = &log
		o.Monitor = flowstat.NewMonitor()
		stats := run(t, st, o)
		rec := httptest.NewRecorder()
		o.Monitor.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		for _, m := range []string{"flowbus_flowstat_restarts_total 2\n", "flowbus_flowstat_restart_missing_batches_total 3\n"} {
			if !strings.Contains(rec.Body.String(), m) {
				t.Errorf("metrics lack %q", m)
			}
		}
		o.Monitor = nil
		flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
		if stats.Restarts != 2 || stats.Recovered != 0 {
			t.Errorf("stats %+v, want 2 restarts", stats)
		}
		want := "flowstat: host web-08 direction outgoing restarted as run run-new: run run-old ended (unknown) after seq 10; 3 batches (of 10) never arrived; capture stopped 2026-12-02T12:00:01.234Z → 2026-12-02T12:00:03.306Z (2.072 s)\n"
		if !strings.Contains(log.String(), want) || !strings.Contains(log.String(), "run run-before ended (stopped) after seq 30; it sealed 15 batches; previous run not seen by this consumer") {
			t.Errorf("log lacks the restarts:\n%s", log.String())
		}
		sum := summary(t, st)
		if len(sum.Restarts) != 2 {
			t.Fatalf("summary restarts %+v", sum.Restarts)
		}
		r, c := sum.Restarts[1], sum.Restarts[0] // newest first
		if r.Host != "web-08" || r.RunID != "run-new" || r.PrevRunID != "run-old" || r.PrevEnd != "unknown" || r.PrevLastSeq != 10 || r.PrevBatches != 10 ||
			r.PrevEvents != 40 || r.PrevSeen != "all" || r.Seen != 7 || r.Missing != 3 || r.DownNs != 2_072_000_000 || r.DownFrom.UnixNano() != t1 || r.DownTo.UnixNano() != t2 {
			t.Errorf("restart of web-08: %+v", r)
		}
		if c.Host != "db-09" || c.PrevSeen != "unseen" || c.Missing != -1 || c.Seen != 0 || c.PrevEnd != "stopped" {
			t.Errorf("restart after a run never seen: %+v", c)
		}
		if rt := sum.RestartTotals; rt.Links != 2 || rt.Runs != 2 || rt.Missing != 3 || rt.Untold != 1 || rt.DownNs != 2_572_000_000 {
			t.Errorf("restart totals %+v", rt)
		}
		var host *store.HostTotal
		for i := range sum.Hosts {
			if sum.Hosts[i].Host == "web-08" {
				host = &sum.Hosts[i]
			}
		}
		if host == nil || host.Restarts != 1 || host.NeverArrived != 3 || host.DownNs != 2_072_000_000 || host.Gaps != 1 {
			t.Errorf("web-08's totals: %+v (want 1 restart, 3 never arrived, 1 gap at batch 5)", host)
		}

		// flowstat restarts; batch 9 of the old run arrives late; so does a copy of it (not counted).
		e.rec.PublishEncoded(t, lost[1].p, lost[1].data)
		e.srv.Publish(t, "flows.web-08.outgoing", lost[1].data)
		stats = run(t, st, o)
		flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
		if stats.Recovered != 1 || stats.Duplicates != 1 || stats.Restarts != 0 {
			t.Errorf("after the late batch: stats %+v, want 1 recovered, 1 duplicate", stats)
		}
		sum = summary(t, st)
		if r := sum.Restarts[1]; r.Missing != 2 || r.Seen != 8 || sum.RestartTotals.Missing != 2 {
			t.Errorf("after the late batch: restart %+v, totals %+v; want K = 2", r, sum.RestartTotals)
		}
		// Batch 5 (in the hole the gap left) lowers it too.
		e.rec.PublishEncoded(t, lost[0].p, lost[0].data)
		stats = run(t, st, o)
		if r := summary(t, st).Restarts[1]; stats.Late != 1 || r.Missing != 1 {
			t.Errorf("after batch 5: stats %+v, restart %+v; want K = 1", stats, r)
		}
		flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
	})
}

func summary(t *testing.T, st *store.Store) *store.Summary {
	t.Helper()
	sum, err := st.Summary(context.Background(), 20)
	if err != nil {
		t.Fatal(err)
	}
	return sum
}
