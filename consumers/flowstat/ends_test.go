package flowstat_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat"
	"github.com/flowbus/flowbus/consumers/flowstat/flowstattest"
	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/flowbus/flowbus/schema"
)

// End batches from the real encoders, interleaved with begins on a real JetStream, some of both lost:
// the end aggregates, the process aggregates and the gaps of both chains equal the reference computed
// from the published events; crashes, a failed transaction and a replay count every end exactly once.
func TestEndsMatchReference(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := newEnv(t)
		e.fleet.Ends = true
		e.fleet.Publish(t, e.rec, 40)
		st := open(t, dsn)
		o := e.opts()
		for _, after := range []int{5, 13} {
			flowstat.SetCrashAfter(&o, after)
			if _, err := flowstat.Run(context.Background(), st, o); !errors.Is(err, flowstat.ErrCrashed) {
				t.Fatalf("Run with CrashAfter %d: %v", after, err)
			}
		}
		flowstat.SetCrashAfter(&o, 0)
		run(t, st, o)
		want := flowstattest.Reference(e.rec.Batches, time.Minute)
		flowstattest.Check(t, st, want)
		endGaps := 0
		for _, g := range want.Gaps {
			if len(g) > 8 && g[:8] == "kind=end" {
				endGaps++
			}
		}
		if len(want.Ends) < 50 || endGaps == 0 || len(want.Procs) < 10 {
			t.Fatalf("scenario too small: %d end rows, %d end gaps, %d process rows", len(want.Ends), endGaps, len(want.Procs))
		}
		e.fleet.Publish(t, e.rec, 10)
		stats := run(t, st, o)
		flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
		if stats.Ends == 0 || stats.Events == 0 {
			t.Errorf("second run: %+v, want begins and ends", stats)
		}
		ro := flowstat.ReplayOptions{URLs: []string{e.srv.URL}, From: e.fleet.T0.Add(-time.Hour), To: time.Now().Add(time.Hour), MaxChunkEvents: 200}
		rs, err := flowstat.Replay(context.Background(), st, ro)
		if err != nil {
			t.Fatal(err)
		}
		if rs.Ends != uint64(e.rec.EndEvents()) {
			t.Errorf("replay counted %d ends, want %d", rs.Ends, e.rec.EndEvents())
		}
		flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
	})
}

// Exact figures of `top --by bytes`, worked out by hand: bytes are from the host's side (an outgoing
// connection's src is this host, an incoming one's dst), mean and max durations, reasons with an
// unknown code as other; a repeated end batch is counted once; `top --by process` groups begins by the
// process they carry.
func TestTopBytesExact(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := newEnv(t)
		a := tailtest.NewAgent("web-03", "run-e")
		me, db := mustAddr("192.0.2.3"), mustAddr("10.1.0.5")
		t0 := e.fleet.T0.UnixNano()
		begins := []schema.Event{
			{Timestamp: t0, Src: me, Dst: db, SrcPort: 40000, DstPort: 5432, PID: 42, Comm: "app"},
			{Timestamp: t0 + 1e6, Src: me, Dst: db, SrcPort: 40001, DstPort: 5432, PID: 42, Comm: "app"},
			{Timestamp: t0 + 2e6, Src: me, Dst: db, SrcPort: 40002, DstPort: 5432},
		}
		e.rec.Publish(t, a, schema.Outgoing, schema.Drops{}, false, begins)
		out := []schema.EndEvent{
			{Src: me, Dst: db, DstDNS: []string{"db.example"}, SrcPort: 40000, DstPort: 5432, BeginNs: t0, EndNs: t0 + 2e9, SrcBytes: 100, DstBytes: 5000, Reason: schema.EndFIN},
			{Src: me, Dst: db, DstDNS: []string{"db.example"}, SrcPort: 40001, DstPort: 5432, BeginNs: t0, EndNs: t0 + 4e9, SrcBytes: 300, DstBytes: 7000, Retrans: 2, Reason: 9},
		}
		in := []schema.EndEvent{
			// An incoming connection from the same peer to this host's port 22: the peer sent 900.
			{Src: db, Dst: me, SrcPort: 50000, DstPort: 22, BeginNs: t0, EndNs: t0 + 1e9, SrcBytes: 900, DstBytes: 40, Reason: schema.EndRSTReceived},
		}
		p, data := e.rec.EncodeEnd(a, schema.Outgoing, schema.Drops{}, out)
		e.rec.PublishEncoded(t, p, data)
		e.srv.Publish(t, schema.EndSubject("flows", "web-03", schema.Outgoing), data) // a copy: counted once
		e.rec.PublishEnd(t, a, schema.Incoming, schema.Drops{}, false, in)
		st := open(t, dsn)
		stats := run(t, st, e.opts())
		if stats.Ends != 3 || stats.Duplicates != 1 {
			t.Errorf("stats %+v, want 3 ends and 1 duplicate", stats)
		}
		flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
		f := store.Filter{Since: e.fleet.T0.Add(-time.Hour)}
		peers, err := st.TopBytes(context.Background(), "peer", f, 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(peers) != 1 {
			t.Fatalf("peers %+v", peers)
		}
		r := peers[0]
		if r.Key != "10.1.0.5" || r.Name != "db.example" || r.Ends != 3 || r.BytesSent != 100+300+40 || r.BytesReceived != 5000+7000+900 ||
			r.Bytes != 13340 || r.Retrans != 2 || r.MeanDuration != 7_000_000_000/3 || r.MaxDuration != 4e9 ||
			r.Reasons["fin"] != 1 || r.Reasons["other"] != 1 || r.Reasons["rst_received"] != 1 || r.Reasons["timeout"] != 0 {
			t.Errorf("top peer by bytes %+v", r)
		}
		ports, err := st.TopBytes(context.Background(), "port", f, 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(ports) != 2 || ports[0].Key != "5432" || ports[0].Bytes != 12400 || ports[1].Key != "22" || ports[1].Bytes != 940 {
			t.Errorf("top ports by bytes %+v", ports)
		}
		procs, err := st.TopProcesses(context.Background(), f, 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(procs) != 2 || procs[0] != (store.ProcRow{Host: "web-03", Comm: "app", PID: 42, Conns: 2}) || procs[1] != (store.ProcRow{Host: "web-03", Conns: 1}) {
			t.Errorf("top processes %+v", procs)
		}
		sum := summary(t, st)
		if len(sum.Hosts) != 2 || sum.Hosts[0].Ends+sum.Hosts[1].Ends != 3 || sum.Hosts[1].BytesSent != 400 || sum.Hosts[1].EndBatches != 1 {
			t.Errorf("summary hosts %+v", sum.Hosts)
		}
	})
}
