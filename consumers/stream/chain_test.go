package stream_test

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/flowbus/flowbus/schema"
	"github.com/nats-io/nats.go/jetstream"
)

// readAll reads every message of stream FLOWS back and decodes it, in stream order.
func readAll(t *testing.T, srv *tailtest.Server, n int) []schema.Batch {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := srv.JS.Stream(ctx, "FLOWS")
	if err != nil {
		t.Fatal(err)
	}
	cons, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	var out []schema.Batch
	for len(out) < n {
		msg, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
		if err != nil {
			t.Fatalf("after %d of %d messages: %v", len(out), n, err)
		}
		var b schema.Batch
		if err := schema.DecodeBatch(msg.Data(), &b); err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	return out
}

// Run links through a real stream: 10 batches of a run, 3 lost (seq 4 in the middle, 9 and 10 at the
// end), the next run's link: K = 3; batch 4 late (a hole filler) and batch 9 after the link: K = 2,
// then 1; a copy of batch 9: not counted. A link to a run seen only from its middle, and to a run never
// seen, claim no K; a previous run that sealed nothing in this direction misses nothing.
func TestChainsRunLinks(t *testing.T) {
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	pub := func(host string, data []byte) { srv.Publish(t, "flows."+host+".outgoing", data) }
	old := tailtest.NewAgent("web-01", "run-a")
	var held [][]byte
	for i := 1; i <= 10; i++ {
		_, data := old.Batch(schema.Outgoing, schema.Drops{})
		if i == 4 || i >= 9 {
			held = append(held, data)
			continue
		}
		pub("web-01", data)
	}
	link := func(a *tailtest.Agent, prev string, batches uint64) {
		a.SetPrevRun(schema.Outgoing, &schema.RunLink{RunID: prev, LastSeq: batches, Batches: batches, LastNs: 1e18, StartNs: 1e18 + 2_072_000_000, End: "unknown"})
		_, data := a.Batch(schema.Outgoing, schema.Drops{})
		pub(a.Host, data)
	}
	link(tailtest.NewAgent("web-01", "run-b"), "run-a", 10)
	pub("web-01", held[0]) // batch 4: late, fills the gap 3..5
	pub("web-01", held[1]) // batch 9: after the link
	pub("web-01", held[1]) // a copy of it
	mid := tailtest.NewAgent("db-02", "run-m")
	mid.Batch(schema.Outgoing, schema.Drops{}) // never published: the consumer sees run-m from batch 2
	_, data := mid.Batch(schema.Outgoing, schema.Drops{})
	pub("db-02", data)
	link(tailtest.NewAgent("db-02", "run-n"), "run-m", 3) // its batch 3 never came
	link(tailtest.NewAgent("db-03", "run-x"), "never-seen", 7)
	link(tailtest.NewAgent("db-04", "run-y"), "nothing-here", 0)

	c := stream.NewChains()
	var restarts []*stream.Restart
	var recovered, atLink []uint64
	for _, b := range readAll(t, srv, 15) {
		o := c.Observe(&b)
		if o.Restart != nil {
			restarts = append(restarts, o.Restart)
			k, _ := o.Restart.Missing()
			atLink = append(atLink, k)
		}
		if o.Recovered != nil {
			k, _ := o.Recovered.Missing()
			recovered = append(recovered, k)
		}
		if b.Seq == 4 && b.RunID == "run-a" && (o.Link != stream.LinkBehind || !o.Late || !o.Counted()) {
			t.Errorf("batch 4: %+v, want a counted late batch", o)
		}
	}
	if len(restarts) != 4 {
		t.Fatalf("%d restarts, want 4", len(restarts))
	}
	r := restarts[0]
	if k, known := r.Missing(); r.Prev != stream.PrevAll || k != 1 || !known || r.Seen != 9 || r.Down() != 2072*time.Millisecond || r.End() != "unknown" {
		k0, _ := r.Missing()
		t.Errorf("run-a link now: prev %v, K %d, seen %d, down %v", r.Prev, k0, r.Seen, r.Down())
	}
	// K was 3 at the link, then each late batch lowered it; the copy did not.
	if atLink[0] != 3 || len(recovered) != 2 || recovered[0] != 2 || recovered[1] != 1 {
		t.Errorf("K at the link %d, after each recovered batch %v; want 3, [2 1]", atLink[0], recovered)
	}
	if got, want := restarts[1].Text(), "host db-02 direction outgoing restarted as run run-n: run run-m ended (unknown) after seq 3; it sealed 3 batches, of which this consumer saw 1, not from the first, the last at seq 2 (so its batches after that one, up to seq 3, have not arrived); how many never arrived before that is unknown; capture stopped 2001-09-09T01:46:40.000Z → 2001-09-09T01:46:42.072Z (2.072 s)"; got != want {
		t.Errorf("partial link:\n%s\nwant\n%s", got, want)
	}
	if got := restarts[2].Text(); !strings.Contains(got, "; it sealed 7 batches; previous run not seen by this consumer, so how many never arrived is unknown;") {
		t.Errorf("unseen link: %s", got)
	}
	for i, want := range []stream.PrevSeen{stream.PrevPartial, stream.PrevUnseen, stream.PrevAll} {
		r := restarts[i+1]
		k, known := r.Missing()
		if r.Prev != want || known != (want == stream.PrevAll) || k != 0 {
			t.Errorf("link %d (%s): prev %v, K %d known %v; want %v", i+1, r.Link.RunID, r.Prev, k, known, want)
		}
	}
}

// End batches chain on their own through a real stream: one run interleaves begin and end batches of
// a direction (seqs from one counter), an end batch is lost. The end chain shows the gap, the begin
// chain none: keyed without the kind, every batch would look like a broken chain. An end batch's run
// link names the previous run's end chain, and its text says so.
func TestChainsKeepKindsApart(t *testing.T) {
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	a := tailtest.NewAgent("web-01", "run-a")
	for i := 1; i <= 6; i++ {
		a.Publish(t, srv, "flows", schema.Outgoing, schema.Drops{})
		if _, data := a.EndBatch(schema.Outgoing, schema.Drops{}); i != 3 { // the third end batch (seq 6) is lost
			srv.Publish(t, schema.EndSubject("flows", a.Host, schema.Outgoing), data)
		}
	}
	b := tailtest.NewAgent("web-01", "run-b")
	b.SetEndPrevRun(schema.Outgoing, &schema.RunLink{RunID: "run-a", LastSeq: 12, Batches: 6, LastNs: 1e18, StartNs: 1e18 + 1e9, End: "stopped"})
	b.PublishEnd(t, srv, "flows", schema.Outgoing, schema.Drops{})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := srv.JS.Stream(ctx, "FLOWS")
	if err != nil {
		t.Fatal(err)
	}
	cons, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	c := stream.NewChains()
	var beginLinks, endLinks []stream.Link
	var restart *stream.Restart
	for range 12 {
		msg, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if schema.SubjectKind(msg.Subject(), "flows") == schema.KindEnd {
			var e schema.EndBatch
			if err := schema.DecodeEndBatch(msg.Data(), &e); err != nil {
				t.Fatal(err)
			}
			o := c.ObserveEnd(&e)
			endLinks = append(endLinks, o.Link)
			if o.Restart != nil {
				restart = o.Restart
			}
			continue
		}
		var bb schema.Batch
		if err := schema.DecodeBatch(msg.Data(), &bb); err != nil {
			t.Fatal(err)
		}
		beginLinks = append(beginLinks, c.Observe(&bb).Link)
	}
	want := []stream.Link{stream.LinkFirst, stream.LinkNext, stream.LinkNext, stream.LinkNext, stream.LinkNext, stream.LinkNext}
	if !slices.Equal(beginLinks, want) {
		t.Errorf("begin chain %v, want %v", beginLinks, want)
	}
	wantEnd := []stream.Link{stream.LinkFirst, stream.LinkNext, stream.LinkGap, stream.LinkNext, stream.LinkNext, stream.LinkFirst}
	if !slices.Equal(endLinks, wantEnd) {
		t.Errorf("end chain %v, want %v", endLinks, wantEnd)
	}
	if restart == nil {
		t.Fatal("the end batch's run link was not accounted")
	}
	if k, known := restart.Missing(); !known || k != 1 || restart.Seen != 5 || restart.Kind != schema.KindEnd {
		t.Errorf("end chain link: K %d known %v seen %d kind %v; want K 1 of 6 (5 seen)", k, known, restart.Seen, restart.Kind)
	}
	if txt := restart.Text(); !strings.HasPrefix(txt, "host web-01 direction outgoing (end events) restarted as run run-b") {
		t.Errorf("text %q", txt)
	}
}
