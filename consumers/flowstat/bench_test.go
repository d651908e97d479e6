package flowstat_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat"
	"github.com/flowbus/flowbus/consumers/flowstat/flowstattest"
	"github.com/flowbus/flowbus/consumers/flowstat/pgtest"
	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/flowbus/flowbus/schema"
	"github.com/nats-io/nats.go/jetstream"
)

// benchEventsEnv sets how many events BenchmarkConsume streams (B6 in bench/PROTOCOL.md uses 5,000,000);
// unset, it is 1,000,000 so a plain -bench run stays short.
const benchEventsEnv = "FLOWSTAT_BENCH_EVENTS"

func benchEvents(b *testing.B) int {
	s := os.Getenv("FLOWSTAT_BENCH_EVENTS")
	if s == "" {
		return 1_000_000
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		b.Fatalf("%s=%q: want a positive number of events", benchEventsEnv, s)
	}
	return n
}

// BenchmarkConsume is B6: the consumer reads a file-backed stream holding N events (batches as the
// agent seals them: at most 4096 events or 64 KiB; 8 hosts, both directions, 200 peers each with a
// skewed distribution, 8 service ports, 0-3 DNS names, event times over 10 one-minute buckets) and
// commits the aggregates with its checkpoints to a fresh SQLite file, until it has caught up. One op is
// the whole stream; events/s is the figure bench/PROTOCOL.md targets (>= 500,000). Filling the stream is not
// timed.
func BenchmarkConsume(b *testing.B) {
	benchConsume(b, func(b *testing.B) string { return filepath.Join(b.TempDir(), "flowstat.db") })
}

// BenchmarkConsumePostgres is B6 on PostgreSQL: the same stream into a fresh database of a PostgreSQL
// server the test starts (pgtest), through the same code; skipped without PostgreSQL.
func BenchmarkConsumePostgres(b *testing.B) {
	pg := pgtest.Shared(b)
	benchConsume(b, func(b *testing.B) string { return pg.NewDB(b) })
}

// benchConsume fills the stream and consumes it into a fresh database from newDB once per op.
func benchConsume(b *testing.B, newDB func(*testing.B) string) {
	n := benchEvents(b)
	srv := tailtest.Start(b)
	flowstattest.CreateStream(b, srv, "FLOWS", "flows.>")
	msgs, bytes := fillStream(b, srv, n)
	b.Logf("stream: %d events in %d messages (%.1f MB, %.1f bytes/event)", n, msgs, float64(bytes)/1e6, float64(bytes)/float64(n))

	b.ResetTimer()
	var elapsed time.Duration
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		st, err := store.Open(context.Background(), newDB(b))
		if err != nil {
			b.Fatal(err)
		}
		o := flowstat.Options{URLs: []string{srv.URL}, Durable: fmt.Sprintf("bench-%d", i), ExitWhenCaughtUp: true}
		b.StartTimer()
		start := time.Now()
		stats, err := flowstat.Run(context.Background(), st, o)
		elapsed += time.Since(start)
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		if stats.Events != uint64(n) {
			b.Fatalf("consumed %d events, want %d", stats.Events, n)
		}
		if i == 0 {
			b.Logf("%d commits; %+v", stats.Commits, stats)
		}
		st.Close()
	}
	b.ReportMetric(float64(n)*float64(b.N)/elapsed.Seconds(), "events/s")
	b.ReportMetric(float64(elapsed.Nanoseconds())/float64(n)/float64(b.N), "ns/event")
}

// fillStream publishes n events as 8 agents would and returns the messages and bytes stored.
func fillStream(b *testing.B, srv *tailtest.Server, n int) (msgs, bytes int) {
	const hosts = 8
	gen := flowstattest.NewGen(42, 200)
	t0 := time.Now().Add(-time.Hour).Truncate(time.Minute)
	type agent struct {
		enc  [2]*schema.BatchEncoder
		ip   netip.Addr
		host string
	}
	agents := make([]agent, hosts)
	for i := range agents {
		a := &agents[i]
		a.host = fmt.Sprintf("host-%02d", i)
		a.ip = netip.AddrFrom4([4]byte{192, 0, 2, byte(10 + i)})
		a.enc[0] = schema.NewBatchEncoder(a.host, "bench", schema.Outgoing)
		a.enc[1] = schema.NewBatchEncoder(a.host, "bench", schema.Incoming)
	}
	var seq uint64
	var futures []jetstream.PubAckFuture
	publish := func(a *agent, d int) {
		seq++
		data := a.enc[d].Finish(nil, seq, schema.Drops{})
		dir := schema.Outgoing
		if d == 1 {
			dir = schema.Incoming
		}
		f, err := srv.JS.PublishAsync(schema.Subject("flows", a.host, dir), data)
		if err != nil {
			b.Fatal(err)
		}
		futures = append(futures, f)
		msgs++
		bytes += len(data)
	}
	const chunk = 4096
	for done := 0; done < n; {
		k := min(chunk, n-done)
		a := &agents[(done/chunk)%hosts]
		d := (done / chunk / hosts) % 2
		dir := schema.Outgoing
		if d == 1 {
			dir = schema.Incoming
		}
		// Event times advance with the stream, as live traffic does, over ten minutes in all.
		from := t0.Add(time.Duration(float64(10*time.Minute) * float64(done) / float64(n)))
		evs := gen.Events(k, dir, a.ip, from, time.Duration(float64(10*time.Minute)*float64(k)/float64(n))+time.Millisecond)
		for i := range evs {
			a.enc[d].Add(&evs[i])
			if a.enc[d].Len() >= 4096 || a.enc[d].Size() >= 64<<10 {
				publish(a, d)
			}
		}
		done += k
	}
	for i := range agents {
		for d := range agents[i].enc {
			if agents[i].enc[d].Len() > 0 {
				publish(&agents[i], d)
			}
		}
	}
	select {
	case <-srv.JS.PublishAsyncComplete():
	case <-time.After(2 * time.Minute):
		b.Fatal("publishing the benchmark stream timed out")
	}
	for _, f := range futures {
		select {
		case err := <-f.Err():
			b.Fatalf("publish: %v", err)
		default:
		}
	}
	return msgs, bytes
}
