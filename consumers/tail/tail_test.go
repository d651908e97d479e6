package tail_test

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/consumers/tail"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/flowbus/flowbus/schema"
	"github.com/nats-io/nats.go/jetstream"
)

func ev(port uint16) schema.Event {
	return schema.Event{
		Timestamp: time.Now().UnixNano(),
		Src:       netip.MustParseAddr("10.0.0.1"),
		Dst:       netip.MustParseAddr("10.0.0.2"),
		SrcPort:   port,
		DstPort:   443,
	}
}

type got struct {
	meta tail.Meta
	port uint16
}

func collect(t *testing.T, ctx context.Context, o tail.Options) ([]got, tail.Stats, error) {
	t.Helper()
	var mu sync.Mutex
	var out []got
	st, err := tail.Run(ctx, o, func(m *tail.Meta, e *schema.Event) error {
		mu.Lock()
		defer mu.Unlock()
		out = append(out, got{*m, e.SrcPort})
		return nil
	})
	return out, st, err
}

func TestRunMeta(t *testing.T) {
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	web, db := tailtest.NewAgent("web-01", "runA"), tailtest.NewAgent("db-02", "runB")
	web.Batch(schema.Outgoing, schema.Drops{}) // seq 1, lost
	web.Batch(schema.Incoming, schema.Drops{}) // seq 2, lost
	web.Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, ev(1), ev(2))
	s2 := db.Publish(t, srv, "flows", schema.Incoming, schema.Drops{Queue: 2}, ev(3))

	var warn strings.Builder
	out, st, err := collect(t, context.Background(), tail.Options{
		URLs: []string{srv.URL}, Start: stream.StartAll, IdleExit: 500 * time.Millisecond, Warnings: &warn,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 3 || st.Events != 3 || st.Batches != 2 || st.Dropped != 2 || st.Reason != "idle" {
		t.Fatalf("got %+v, stats %+v", out, st)
	}
	m := out[2].meta
	if m.Host != "db-02" || m.RunID != "runB" || m.Seq != 1 || m.Direction != schema.Incoming ||
		m.StreamSeq != s2 || m.Subject != "flows.db-02.incoming" || m.Drops.Queue != 2 || m.Stored.IsZero() {
		t.Errorf("meta %+v", m)
	}
	if out[0].meta.Seq != 3 || out[0].meta.PrevSeq != 1 || out[0].port != 1 || out[1].port != 2 {
		t.Errorf("first batch %+v", out[:2])
	}
	if !strings.Contains(warn.String(), "drops: host db-02 direction incoming lost 2 events") {
		t.Errorf("warnings: %q", warn.String())
	}
}

func TestRunCountStopsMidBatch(t *testing.T) {
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	tailtest.NewAgent("h", "r").Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, ev(1), ev(2), ev(3))
	out, st, err := collect(t, context.Background(), tail.Options{URLs: []string{srv.URL}, Start: stream.StartAll, Count: 2})
	if err != nil || len(out) != 2 || st.Reason != "count" {
		t.Fatalf("err %v, %d events, stats %+v", err, len(out), st)
	}
}

func TestRunCancel(t *testing.T) {
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, st, err := collect(t, ctx, tail.Options{URLs: []string{srv.URL}})
	if err != nil || st.Reason != "canceled" {
		t.Fatalf("err %v, stats %+v", err, st)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("cancel took %v", d)
	}
}

func TestRunHandlerError(t *testing.T) {
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	tailtest.NewAgent("h", "r").Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, ev(1))
	boom := errors.New("boom")
	_, err := tail.Run(context.Background(), tail.Options{URLs: []string{srv.URL}, Start: stream.StartAll},
		func(*tail.Meta, *schema.Event) error { return boom })
	if !errors.Is(err, boom) {
		t.Fatalf("err %v", err)
	}
}

// A stream that stores only part of the prefix's subjects can still be tailed with the wide filter.
func TestRunOverlappingFilter(t *testing.T) {
	srv := tailtest.Start(t)
	srv.CreateStream(t, "WEB", "flows.web-01.>")
	tailtest.NewAgent("web-01", "r").Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, ev(1))
	out, _, err := collect(t, context.Background(), tail.Options{URLs: []string{srv.URL}, Stream: "WEB", Start: stream.StartAll, Count: 1})
	if err != nil || len(out) != 1 {
		t.Fatalf("err %v, %d events", err, len(out))
	}

	_, _, err = collect(t, context.Background(), tail.Options{URLs: []string{srv.URL}, Stream: "WEB", Host: "db-02", Start: stream.StartAll, Count: 1})
	if !errors.Is(err, stream.ErrFilterOutsideStream) {
		t.Fatalf("host outside the stream: err %v", err)
	}
}

func TestRunErrors(t *testing.T) {
	srv := tailtest.Start(t)
	_, err := tail.Run(context.Background(), tail.Options{URLs: []string{srv.URL}, Stream: "NOPE"}, nop)
	var se *stream.StreamError
	if !errors.As(err, &se) || !errors.Is(err, jetstream.ErrStreamNotFound) || se.Stream != "NOPE" {
		t.Errorf("missing stream: %v", err)
	}

	_, err = tail.Run(context.Background(), tail.Options{URLs: []string{"nats://127.0.0.1:1"}, ConnectTimeout: time.Second}, nop)
	var ce *stream.ConnectError
	if !errors.As(err, &ce) || ce.URL != "nats://127.0.0.1:1" {
		t.Errorf("unreachable: %v", err)
	}

	_, err = tail.Run(context.Background(), tail.Options{Prefix: "a.>", Host: "Bad Host", Start: stream.StartSeq}, nil)
	if err == nil || !strings.Contains(err.Error(), "prefix") || !strings.Contains(err.Error(), "host") || !strings.Contains(err.Error(), "FromSeq") || !strings.Contains(err.Error(), "handler") {
		t.Errorf("invalid options: %v", err)
	}
}

func nop(*tail.Meta, *schema.Event) error { return nil }

// A steady foreign publisher is reported once, then with growing counts, not once per message.
func TestRunSkipCounts(t *testing.T) {
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	for range 12 {
		srv.Publish(t, "flows.x.y", []byte("not msgpack"))
	}
	tailtest.NewAgent("h", "r").Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, ev(1))
	var warn strings.Builder
	out, st, err := collect(t, context.Background(), tail.Options{URLs: []string{srv.URL}, Start: stream.StartAll, Count: 1, Warnings: &warn})
	if err != nil || len(out) != 1 || st.Skipped != 12 {
		t.Fatalf("err %v, %d events, stats %+v", err, len(out), st)
	}
	w := warn.String()
	if strings.Count(w, "\n") != 3 || !strings.Contains(w, "skipped 10 messages on flows.x.y so far") ||
		!strings.Contains(w, "skipped 12 messages on flows.x.y: not a valid flowbus batch") {
		t.Errorf("warnings:\n%s", w)
	}
}

// A batch stored twice (a retry outside the dedupe window) is delivered but flagged, and is no gap.
func TestRunDuplicateBatch(t *testing.T) {
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	a := tailtest.NewAgent("h", "r")
	_, data := a.Batch(schema.Outgoing, schema.Drops{}, ev(1))
	srv.Publish(t, "flows.h.outgoing", data)
	srv.Publish(t, "flows.h.outgoing", data)
	a.Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, ev(2))
	var warn strings.Builder
	out, st, err := collect(t, context.Background(), tail.Options{URLs: []string{srv.URL}, Start: stream.StartAll, Count: 3, Warnings: &warn})
	if err != nil || len(out) != 3 || st.Gaps != 0 {
		t.Fatalf("err %v, %d events, stats %+v", err, len(out), st)
	}
	if w := warn.String(); !strings.Contains(w, "batch 1 arrived after batch 1 (duplicate or reordered)") || strings.Contains(w, "gap") {
		t.Errorf("warnings:\n%s", w)
	}
}

// The subject is trusted, not the batch: a batch claiming another host or direction than its subject
// (also one hidden below the publisher's own subject) is skipped with a warning and counted.
func TestRunSubjectMismatchSkipped(t *testing.T) {
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	_, web02 := tailtest.NewAgent("web-02", "r").Batch(schema.Outgoing, schema.Drops{}, ev(1))
	srv.Publish(t, "flows.web-01.outgoing", web02)
	srv.Publish(t, "flows.web-01.web-02.outgoing", web02)
	srv.Publish(t, "flows.web-02.incoming", web02)
	tailtest.NewAgent("web-01", "r").Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, ev(2))
	var warn strings.Builder
	out, st, err := collect(t, context.Background(), tail.Options{URLs: []string{srv.URL}, Start: stream.StartAll, Count: 1, Warnings: &warn})
	if err != nil || len(out) != 1 || st.Mismatched != 3 || st.Skipped != 3 {
		t.Fatalf("err %v, %d events, stats %+v; want only web-01's event and 3 mismatches", err, len(out), st)
	}
	w := warn.String()
	for _, s := range []string{"flows.web-01.outgoing", "flows.web-01.web-02.outgoing", "flows.web-02.incoming"} {
		if !strings.Contains(w, "on "+s+": batch for another host or direction than its subject") {
			t.Errorf("no warning for %s:\n%s", s, w)
		}
	}
}

// An agent run sealed 10 outgoing batches and 3 never arrived (one in the middle, the last two: it was
// killed); the next run's first batch names it (prev_run). The tail warns once with K = 3 and the
// capture downtime; a late batch of the old run (republished from its spool) then lowers K to 2. A link
// to a run the tail never saw (it started later) says so and claims no K; a clean stop with every batch
// seen still names the downtime.
func TestRunLinks(t *testing.T) {
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	old := tailtest.NewAgent("web-01", "run-old")
	var lost [][]byte
	for i := 1; i <= 10; i++ {
		_, data := old.Batch(schema.Outgoing, schema.Drops{}, ev(uint16(i)))
		if i == 5 || i >= 9 {
			lost = append(lost, data)
			continue
		}
		srv.Publish(t, "flows.web-01.outgoing", data)
	}
	t1 := time.Date(2026, 12, 2, 12, 0, 1, 234_000_000, time.UTC).UnixNano()
	t2 := t1 + 2_072_000_000
	neu := tailtest.NewAgent("web-01", "run-new")
	neu.SetPrevRun(schema.Outgoing, &schema.RunLink{RunID: "run-old", LastSeq: 10, Batches: 10, Events: 10, LastNs: t1, StartNs: t2, End: "unknown"})
	neu.Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, ev(11))
	srv.Publish(t, "flows.web-01.outgoing", lost[1]) // batch 9 of run-old, from the new run's spool replay
	// A run the tail never saw, and a clean stop whose batches all arrived.
	db := tailtest.NewAgent("db-02", "run-c")
	db.SetPrevRun(schema.Incoming, &schema.RunLink{RunID: "run-unseen", LastSeq: 40, Batches: 20, LastNs: t1, StartNs: t1 + 500_000_000, End: "unknown"})
	db.Publish(t, srv, "flows", schema.Incoming, schema.Drops{}, ev(12))
	db2 := tailtest.NewAgent("db-02", "run-d")
	db2.SetPrevRun(schema.Incoming, &schema.RunLink{RunID: "run-c", LastSeq: 1, Batches: 1, LastNs: t2, StartNs: t2 + 1_000_000, End: "stopped"})
	db2.Publish(t, srv, "flows", schema.Incoming, schema.Drops{}, ev(13))

	var warn strings.Builder
	out, st, err := collect(t, context.Background(), tail.Options{URLs: []string{srv.URL}, Start: stream.StartAll, IdleExit: 700 * time.Millisecond, Warnings: &warn})
	if err != nil {
		t.Fatal(err)
	}
	w := warn.String()
	if len(out) != 11 || st.Restarts != 3 || st.NeverArrived != 3 || st.Recovered != 1 {
		t.Fatalf("%d events, stats %+v; want 11 events, 3 restarts, 3 batches never arrived, 1 recovered\n%s", len(out), st, w)
	}
	for _, want := range []string{
		"warning: host web-01 direction outgoing restarted as run run-new: run run-old ended (unknown) after seq 10; 3 batches (of 10) never arrived; capture stopped 2026-12-02T12:00:01.234Z → 2026-12-02T12:00:03.306Z (2.072 s)\n",
		"warning: host web-01 direction outgoing: batch 9 of previous run run-old arrived late (recovered); 2 batches (of 10) still missing\n",
		"warning: host db-02 direction incoming restarted as run run-c: run run-unseen ended (unknown) after seq 40; it sealed 20 batches; previous run not seen by this consumer, so how many never arrived is unknown; capture stopped 2026-12-02T12:00:01.234Z → 2026-12-02T12:00:01.734Z (0.500 s)\n",
		"warning: host db-02 direction incoming restarted as run run-d: run run-c ended (stopped) after seq 1; its one batch arrived; capture stopped 2026-12-02T12:00:03.306Z → 2026-12-02T12:00:03.307Z (0.001 s)\n",
		"warning: gap: host web-01 direction outgoing run run-old missing batch 5\n",
	} {
		if !strings.Contains(w, want) {
			t.Errorf("warnings lack %q:\n%s", want, w)
		}
	}
	if strings.Count(w, "restarted") != 3 || strings.Contains(w, "duplicate") {
		t.Errorf("want one line per link and no duplicate:\n%s", w)
	}
}
