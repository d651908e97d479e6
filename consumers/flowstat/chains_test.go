package flowstat_test

import (
	"bytes"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat"
	"github.com/flowbus/flowbus/consumers/flowstat/flowstattest"
	"github.com/flowbus/flowbus/consumers/flowstat/pgtest"
	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/flowbus/flowbus/schema"
)

// chainTables dumps what flowstat keeps of chains and derives from them (chain state, holes, gaps,
// run links with their K, duplicates), one sorted text line per row.
func chainTables(t *testing.T, st *store.Store) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for table, q := range map[string]string{
		"run_state":         `SELECT host, run_id, direction, last_seq, seen_batches, from_start, linked, stored_ns FROM run_state`,
		"holes":             `SELECT host, run_id, direction, from_seq, to_seq, 0, 0, 0 FROM holes`,
		"gaps":              `SELECT host, run_id, direction, after_seq, seq, prev_seq, stream_seq, stored_ns FROM gaps`,
		"restarts":          `SELECT host, run_id, direction, prev_run_id, prev_seen, seen_batches, missing_batches, stream_seq FROM restarts`,
		"duplicate_batches": `SELECT host, run_id, direction, seq, stream_seq, stored_ns, 0, 0 FROM duplicate_batches`,
	} {
		rows, err := st.DB().Query(q)
		if err != nil {
			t.Fatalf("%s: %v", table, err)
		}
		for rows.Next() {
			var h, r, d, c4, c5 string
			var c6, c7, c8 int64
			if err := rows.Scan(&h, &r, &d, &c4, &c5, &c6, &c7, &c8); err != nil {
				t.Fatalf("%s: %v", table, err)
			}
			out[table] = append(out[table], fmt.Sprintf("%s|%s|%s|%s|%s|%d|%d|%d", h, r, d, c4, c5, c6, c7, c8))
		}
		if err := rows.Close(); err != nil {
			t.Fatal(err)
		}
		sort.Strings(out[table])
	}
	return out
}

// A consumer that keeps fewer chains in memory than the stream has (2, 4 or even 1, committing every
// message, every 7 or every 1000) follows them exactly as one that keeps them all: many short runs are
// published between each step, so the chains a step continues were evicted, from memory and, committed
// or not, are read back from the pending delta or the database. The steps: a chain continued by its next
// batch (no gap), a lost batch (a gap and a hole), a run link to an evicted run (K = 3), late batches of
// it filling a hole and lowering K, their copies (duplicates), then, after flowstat restarts (loading
// only the most recent chains), more of each and a link to a run only the database holds. The gaps and
// aggregates equal flowstattest's reference; chain state, holes, gaps, run links with K and duplicates
// equal those of a consumer with the default bound, which never looks a chain up.
func TestChainsBeyondTheCache(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := newEnv(t)
		gen := flowstattest.NewGen(21, 20)
		ip := mustAddr("192.0.2.30")
		evs := func(dir schema.Direction) []schema.Event { return gen.Events(3, dir, ip, e.fleet.T0, time.Minute) }
		type held struct {
			p    flowstattest.Published
			data []byte
		}
		hold := func(a *tailtest.Agent, dir schema.Direction) held {
			p, data := e.rec.Encode(a, dir, schema.Drops{}, evs(dir))
			return held{p, data}
		}
		pub := func(h held) { e.rec.PublishEncoded(t, h.p, h.data) }
		again := func(h held) { e.srv.Publish(t, schema.Subject("flows", h.p.Host, h.p.Dir), h.data) } // a copy
		shorts := 0
		filler := func(k int) { // k new runs of one batch: k new chains
			for range k {
				shorts++
				a := tailtest.NewAgent(fmt.Sprintf("web-%02d", shorts%3), fmt.Sprintf("short-%d", shorts))
				pub(hold(a, schema.Outgoing))
			}
		}

		// Phase 1. Run run-old seals 10 outgoing batches (and an incoming one); 5, 9 and 10 are lost.
		old := tailtest.NewAgent("db-01", "run-old")
		var lost []held
		for i := 1; i <= 10; i++ {
			if i == 3 {
				pub(hold(old, schema.Incoming))
			}
			h := hold(old, schema.Outgoing)
			if i == 5 || i >= 9 {
				lost = append(lost, h)
			} else {
				pub(h)
			}
			filler(6)
		}
		neu := tailtest.NewAgent("db-01", "run-new")
		neu.SetPrevRun(schema.Outgoing, &schema.RunLink{RunID: "run-old", LastSeq: 11, Batches: 10, Events: 30, LastNs: 1e18, StartNs: 1e18 + 1e9, End: "unknown"})
		var neuLost []held
		for i := 1; i <= 4; i++ {
			h := hold(neu, schema.Outgoing)
			if i == 2 {
				neuLost = append(neuLost, h)
			} else {
				pub(h)
			}
			filler(5)
		}
		pub(lost[1]) // batch 9 of run-old, after the link: K = 2
		filler(5)
		again(lost[1])
		filler(5)

		type variant struct {
			name             string
			maxChains, chunk int
			st               *store.Store
			dsn              string
		}
		variants := []*variant{{name: "default bound", chunk: 7}, {name: "4 chains, commit each message", maxChains: 4, chunk: 1},
			{name: "4 chains, 7 a chunk", maxChains: 4, chunk: 7}, {name: "2 chains, one chunk", maxChains: 2, chunk: 1000}, {name: "1 chain", maxChains: 1, chunk: 7}}
		for i, v := range variants {
			v.dsn = dsn
			if i > 0 {
				v.dsn = fmt.Sprintf("%s-%d", dsn, i)
				if strings.HasPrefix(dsn, "postgres://") {
					v.dsn = pgtest.Shared(t).NewDB(t)
				}
			}
			v.st = open(t, v.dsn)
		}
		consume := func(phase string) map[string]flowstat.Stats {
			t.Helper()
			stats := map[string]flowstat.Stats{}
			for i, v := range variants {
				o := e.opts()
				o.Durable = fmt.Sprintf("bound-%d", i) // one durable consumer per database
				o.MaxChains, o.MaxChunkMessages = v.maxChains, v.chunk
				peak := 0
				flowstat.ObserveChains(&o, func(n int) { peak = max(peak, n) })
				s := run(t, v.st, o)
				stats[v.name] = s
				flowstattest.Check(t, v.st, flowstattest.Reference(e.rec.Batches, time.Minute))
				if v.maxChains == 0 {
					if s.ChainLookups != 0 {
						t.Errorf("%s, %s: %d chains looked up in the database, want none (all fit in memory)", phase, v.name, s.ChainLookups)
					}
					continue
				}
				if peak != v.maxChains || s.ChainLookups == 0 {
					t.Errorf("%s, %s: at most %d chains in memory, %d looked up in the database; want the bound %d reached and lookups",
						phase, v.name, peak, s.ChainLookups, v.maxChains)
				}
				want, got := chainTables(t, variants[0].st), chainTables(t, v.st)
				for _, table := range []string{"run_state", "holes", "gaps", "restarts", "duplicate_batches"} {
					if w, g := strings.Join(want[table], "\n  "), strings.Join(got[table], "\n  "); w != g {
						t.Errorf("%s, %s: %s differs from the unbounded consumer's:\n  %s\nwant\n  %s", phase, v.name, table, g, w)
					}
				}
				if ref := stats[variants[0].name]; s.Late != ref.Late || s.Duplicates != ref.Duplicates || s.Restarts != ref.Restarts ||
					s.Recovered != ref.Recovered || s.Gaps != ref.Gaps || s.Events != ref.Events {
					t.Errorf("%s, %s: stats %+v, want those of the unbounded consumer %+v", phase, v.name, s, ref)
				}
			}
			return stats
		}
		restart := func(st *store.Store, run string) store.RestartRow {
			t.Helper()
			for _, r := range summary(t, st).Restarts {
				if r.RunID == run {
					return r
				}
			}
			t.Fatalf("no restart of run %s", run)
			return store.RestartRow{}
		}
		stats := consume("phase 1")
		// Batch 9 of run-old follows batch 8: counted (recovered), not late.
		if s := stats["default bound"]; s.Late != 0 || s.Duplicates != 1 || s.Restarts != 1 || s.Recovered != 1 || s.Gaps != 2 {
			t.Errorf("phase 1: stats %+v, want 1 duplicate, 1 restart, 1 recovered, 2 gaps", s)
		}
		if r := restart(variants[0].st, "run-new"); r.PrevSeen != "all" || r.Missing != 2 || r.Seen != 8 {
			t.Errorf("phase 1: link of run-new %+v, want K = 2 of 10 (8 seen)", r)
		}

		// Phase 2, after flowstat restarts: batch 5 of run-old fills its hole (K = 1) and is copied;
		// batch 2 of run-new fills its hole; run-newer links to run-new, which sealed 5 batches of which
		// the last was lost (K = 1); run-new's chain is in no consumer's memory at start.
		filler(6)
		pub(lost[0])
		filler(5)
		again(lost[0])
		pub(neuLost[0])
		filler(5)
		hold(neu, schema.Outgoing) // batch 5 of run-new, lost
		newer := tailtest.NewAgent("db-01", "run-newer")
		newer.SetPrevRun(schema.Outgoing, &schema.RunLink{RunID: "run-new", LastSeq: 5, Batches: 5, Events: 15, LastNs: 2e18, StartNs: 2e18 + 1e9, End: "stopped"})
		filler(6)
		pub(hold(newer, schema.Outgoing))
		filler(3)
		pub(hold(newer, schema.Outgoing))
		stats = consume("phase 2")
		if s := stats["default bound"]; s.Late != 2 || s.Duplicates != 1 || s.Restarts != 1 || s.Recovered != 1 || s.Gaps != 0 {
			t.Errorf("phase 2: stats %+v, want 2 late batches, 1 duplicate, 1 restart, 1 recovered, no gap", s)
		}
		for _, v := range variants {
			if r := restart(v.st, "run-new"); r.Missing != 1 || r.Seen != 9 {
				t.Errorf("%s: link of run-new %+v, want K = 1 (9 of 10 seen)", v.name, r)
			}
			if r := restart(v.st, "run-newer"); r.PrevSeen != "all" || r.Missing != 1 || r.Seen != 4 {
				t.Errorf("%s: link of run-newer %+v, want K = 1 (4 of 5 seen)", v.name, r)
			}
		}
	})
}

// A flowstat restarting on a database of 100,000 chains loads only the most recent MaxChains (1000):
// a batch continuing the newest chain finds it in memory, one continuing the oldest reads it from the
// database; neither is a gap, and the holes of a loaded chain are loaded with it.
func TestRestartLoadsAtMostTheBound(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := newEnv(t)
		st := open(t, dsn)
		const chains, bound = 100_000, 1000
		base := time.Now().Add(-time.Hour).UnixNano()
		// run-1 is the oldest chain, run-100000 the newest, each at batch 5 with batch 4 missing
		// (only run-100000 has the hole recorded).
		q := fmt.Sprintf(`WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < %d)
			INSERT INTO run_state (host, run_id, direction, last_seq, seen_batches, from_start, linked, stored_ns)
			SELECT 'web-01', 'run-' || CAST(i AS TEXT), 'outgoing', 5, 4, 1, 0, %d + CAST(i AS BIGINT) * 1000000 FROM n`, chains, base)
		t0 := time.Now()
		if _, err := st.DB().Exec(q); err != nil {
			t.Fatal(err)
		}
		t.Logf("%d chains written in %v", chains, time.Since(t0))
		if _, err := st.DB().Exec(`INSERT INTO holes (host, run_id, direction, from_seq, to_seq) VALUES ('web-01', 'run-100000', 'outgoing', 4, 4)`); err != nil {
			t.Fatal(err)
		}
		gen := flowstattest.NewGen(22, 10)
		publishNext := func(run string, late bool) {
			a := tailtest.NewAgent("web-01", run)
			for range 3 {
				e.rec.Encode(a, schema.Outgoing, schema.Drops{}, nil) // batches 1..3, counted before
			}
			p4, d4 := e.rec.Encode(a, schema.Outgoing, schema.Drops{}, gen.Events(2, schema.Outgoing, mustAddr("192.0.2.31"), e.fleet.T0, time.Minute))
			e.rec.Encode(a, schema.Outgoing, schema.Drops{}, nil) // batch 5, counted before
			p, data := e.rec.Encode(a, schema.Outgoing, schema.Drops{}, gen.Events(2, schema.Outgoing, mustAddr("192.0.2.31"), e.fleet.T0, time.Minute))
			e.rec.PublishEncoded(t, p, data)
			if late {
				e.rec.PublishEncoded(t, p4, d4)
			}
		}
		publishNext("run-100000", true) // batch 6, then batch 4 late, filling the loaded hole
		publishNext("run-1", false)     // batch 6
		o := e.opts()
		o.MaxChains = bound
		var log bytes.Buffer
		o.Log = &log
		peak := 0
		flowstat.ObserveChains(&o, func(n int) { peak = max(peak, n) })
		t0 = time.Now()
		stats := run(t, st, o)
		t.Logf("flowstat ran in %v", time.Since(t0))
		if stats.ChainsLoaded != bound || peak != bound {
			t.Errorf("loaded %d chains at start, at most %d in memory; want %d", stats.ChainsLoaded, peak, bound)
		}
		if stats.ChainLookups != 1 || stats.Gaps != 0 || stats.Late != 1 || stats.Duplicates != 0 || stats.Events != 6 {
			t.Errorf("stats %+v: want 1 chain looked up (run-1), no gap, 1 late batch, 6 events", stats)
		}
		if !strings.Contains(log.String(), "flowstat: loaded the state of the 1000 most recently active chains (at most 1000 kept in memory") {
			t.Errorf("log:\n%s", log.String())
		}
		var n int
		if err := st.DB().QueryRow(`SELECT COUNT(*) FROM run_state`).Scan(&n); err != nil || n != chains {
			t.Errorf("%d chains in the database (%v), want %d: none pruned", n, err, chains)
		}
	})
}

// The state of chains inactive for longer than the retention (measured against the newest chain's
// activity) is deleted at start, holes included, with one log line; newer chains stay. A running
// consumer prunes too, forgetting the pruned chains in memory as well: a batch continuing one is then a
// run first seen mid-way, exactly as after a restart.
func TestInactiveChainsPruned(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := newEnv(t)
		st := open(t, dsn)
		const day = int64(24 * time.Hour)
		newest := time.Now().Add(-time.Hour).UnixNano()
		for i, c := range []struct {
			run string
			age int64
		}{{"r-new", 0}, {"r-29d", 29 * day}, {"r-31d", 31 * day}, {"r-40d", 40 * day}} {
			if _, err := st.DB().Exec(fmt.Sprintf(`INSERT INTO run_state (host, run_id, direction, last_seq, seen_batches, from_start, linked, stored_ns)
				VALUES ('web-02', '%s', 'outgoing', 9, 8, 1, 0, %d)`, c.run, newest-c.age)); err != nil {
				t.Fatal(err)
			}
			for h := range i + 1 {
				if _, err := st.DB().Exec(fmt.Sprintf(`INSERT INTO holes (host, run_id, direction, from_seq, to_seq) VALUES ('web-02', '%s', 'outgoing', %d, %d)`,
					c.run, 2*h+1, 2*h+1)); err != nil {
					t.Fatal(err)
				}
			}
		}
		var log bytes.Buffer
		o := e.opts()
		o.Log = &log
		run(t, st, o)
		want := "flowstat: pruned the state of chains inactive for more than 720h0m0s (no batch stored since " +
			time.Unix(0, newest-30*day).UTC().Format(time.RFC3339) + "): 2 run_state and 7 holes rows"
		if strings.Count(log.String(), "pruned the state") != 1 || !strings.Contains(log.String(), want) {
			t.Errorf("want one line %q:\n%s", want, log.String())
		}
		got := chainTables(t, st)
		if r, h := strings.Join(got["run_state"], " "), strings.Join(got["holes"], " "); len(got["run_state"]) != 2 || len(got["holes"]) != 3 ||
			!strings.Contains(r, "|r-new|") || !strings.Contains(r, "|r-29d|") || strings.Contains(h, "r-31d") || strings.Contains(h, "r-40d") {
			t.Errorf("after pruning: run_state %v, holes %v; want r-new and r-29d with their 3 holes", got["run_state"], got["holes"])
		}
		log.Reset()
		run(t, st, o)
		if strings.Contains(log.String(), "pruned") {
			t.Errorf("second start pruned again:\n%s", log.String())
		}

		// A retention of 1 ns, pruned after every commit of one message: run-a's chain is pruned once
		// run-b's batch is committed, in the database and in memory, so its next batch is recorded as a
		// run first seen mid-way (a consumer that forgot it in memory only would see no gap).
		restore := flowstat.SetChainPruneEvery(0)
		defer restore()
		a, b := tailtest.NewAgent("web-03", "run-a"), tailtest.NewAgent("web-03", "run-b")
		gen := flowstattest.NewGen(23, 10)
		batch := func(x *tailtest.Agent) (flowstattest.Published, []byte) {
			return e.rec.Encode(x, schema.Outgoing, schema.Drops{}, gen.Events(2, schema.Outgoing, mustAddr("192.0.2.32"), e.fleet.T0, time.Minute))
		}
		p, d := batch(a)
		e.rec.PublishEncoded(t, p, d)
		p, d = batch(b)
		e.rec.PublishEncoded(t, p, d)
		pa, da := batch(a)
		e.rec.PublishEncoded(t, pa, da)
		o.ChainRetention, o.MaxChunkMessages = time.Nanosecond, 1
		log.Reset()
		stats := run(t, st, o)
		if stats.Gaps != 1 || !strings.Contains(log.String(), "): 1 run_state and 0 holes rows") {
			t.Errorf("stats %+v, want 1 gap (run-a pruned while running):\n%s", stats, log.String())
		}
		var after int64
		if err := st.DB().QueryRow(fmt.Sprintf(`SELECT after_seq FROM gaps WHERE run_id = 'run-a' AND seq = %d`, pa.Seq)).Scan(&after); err != nil || after != 0 {
			t.Errorf("gap of run-a's batch 2: after_seq %d (%v), want 0 (first seen mid-way)", after, err)
		}
	})
}
