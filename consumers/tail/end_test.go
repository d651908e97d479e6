package tail_test

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/consumers/tail"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/flowbus/flowbus/schema"
)

func endEv(port uint16) schema.EndEvent {
	now := time.Now().UnixNano()
	return schema.EndEvent{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.2"), SrcPort: port,
		DstPort: 443, BeginNs: now - 2e9, EndNs: now, SrcBytes: 100, DstBytes: 5000, SrcSegs: 1, DstSegs: 4,
		SRTTus: 300, Reason: schema.EndFIN}
}

// collectKinds runs a tail choosing events and returns what it handed over, in order: "b<port>" for a
// begin, "e<port>" for an end.
func collectKinds(t *testing.T, o tail.Options) ([]string, tail.Stats, error) {
	t.Helper()
	var out []string
	o.OnEnd = func(m *tail.Meta, e *schema.EndEvent) error {
		if m.Kind != schema.KindEnd || e.Direction == 0 || !strings.HasSuffix(m.Subject, ".end") {
			return fmt.Errorf("end event with meta %+v", m)
		}
		out = append(out, fmt.Sprintf("e%d", e.SrcPort))
		return nil
	}
	st, err := tail.Run(context.Background(), o, func(m *tail.Meta, e *schema.Event) error {
		if m.Kind != schema.KindBegin || strings.HasSuffix(m.Subject, ".end") {
			return fmt.Errorf("begin event with meta %+v", m)
		}
		out = append(out, fmt.Sprintf("b%d", e.SrcPort))
		return nil
	})
	return out, st, err
}

// Begins and ends of one run through a real stream, from the real encoders: --event begin reads the
// begins only (the end batches its flows.> filter also gets are skipped unread and counted), end the
// ends only, both all of them in stream order. The end chain has its own gap (a lost end batch),
// which the begin chain does not show; a batch of either kind on the other's subject is refused by
// the decoder of that subject, never shown as the other kind.
func TestRunEvents(t *testing.T) {
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	a := tailtest.NewAgent("web-01", "run")
	a.Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, ev(1), ev(2))
	a.PublishEnd(t, srv, "flows", schema.Outgoing, schema.Drops{}, endEv(1))
	a.Publish(t, srv, "flows", schema.Incoming, schema.Drops{}, ev(3))
	a.EndBatch(schema.Outgoing, schema.Drops{}) // lost: a gap in the outgoing end chain
	a.PublishEnd(t, srv, "flows", schema.Outgoing, schema.Drops{Kernel: 2}, endEv(2))
	a.PublishEnd(t, srv, "flows", schema.Incoming, schema.Drops{}, endEv(3))
	a.Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, ev(4))
	// Stream sequences 1-6 (seqs 1, 2, 3, 5, 6, 7: seq 4 was the lost end batch). Misrouted, 7 and 8: an end batch on a begin subject, a begin batch on an end subject.
	_, end := tailtest.NewAgent("web-01", "x").EndBatch(schema.Outgoing, schema.Drops{}, endEv(9))
	srv.Publish(t, "flows.web-01.outgoing", end)
	_, begin := tailtest.NewAgent("web-01", "y").Batch(schema.Outgoing, schema.Drops{}, ev(8))
	srv.Publish(t, "flows.web-01.outgoing.end", begin)

	for _, tc := range []struct {
		events              tail.Events
		want                string
		ignored, skipped    uint64
		gapWarn, noWarnings []string
	}{
		{tail.EventsBegin, "b1 b2 b3 b4", 4, 1, nil, []string{"gap", "end events", "flows.web-01.outgoing.end"}},
		{tail.EventsEnd, "e1 e2 e3", 0, 1, []string{"gap: host web-01 direction outgoing (end events) run run missing batches 3..4",
			"host web-01 direction outgoing (end events) lost 2 events before batch 5"}, []string{"flows.web-01.outgoing:"}},
		{tail.EventsBoth, "b1 b2 e1 b3 e2 e3 b4", 0, 2, []string{"direction outgoing (end events) run run missing batches 3..4"}, nil},
	} {
		t.Run(tc.events.String(), func(t *testing.T) {
			var warn strings.Builder
			out, st, err := collectKinds(t, tail.Options{URLs: []string{srv.URL}, Start: stream.StartAll, Events: tc.events,
				IdleExit: 500 * time.Millisecond, Warnings: &warn})
			w := warn.String()
			if err != nil || strings.Join(out, " ") != tc.want || st.IgnoredEnds != tc.ignored || st.Skipped != tc.skipped {
				t.Fatalf("err %v, events %v, stats %+v; want %s, %d ignored, %d skipped\n%s", err, out, st, tc.want, tc.ignored, tc.skipped, w)
			}
			if st.Gaps != uint64(min(1, len(tc.gapWarn))) {
				t.Errorf("%d gaps\n%s", st.Gaps, w)
			}
			for _, s := range tc.gapWarn {
				if !strings.Contains(w, s) {
					t.Errorf("no warning %q:\n%s", s, w)
				}
			}
			for _, s := range tc.noWarnings {
				if strings.Contains(w, s) {
					t.Errorf("warning with %q:\n%s", s, w)
				}
			}
			if tc.events != tail.EventsEnd && !strings.Contains(w, "skipping message 7 on flows.web-01.outgoing: unsupported schema version: unsupported flowbus batch schema major: flowbus batch schema major 2 is not supported by this consumer (supports 1): it is a net_flow_tcp_end batch") {
				t.Errorf("the end batch on a begin subject is not refused as major 2:\n%s", w)
			}
			if tc.events != tail.EventsBegin && !strings.Contains(w, "skipping message 8 on flows.web-01.outgoing.end: unsupported schema version: unsupported flowbus batch schema major: flowbus batch schema major 1 is a net_flow_tcp_begin batch, not an end batch (this decoder reads major 2): decode it with schema.DecodeBatch; further") {
				t.Errorf("the begin batch on an end subject is not refused:\n%s", w)
			}
		})
	}
	if _, err := tail.Run(context.Background(), tail.Options{Events: tail.EventsEnd}, func(*tail.Meta, *schema.Event) error { return nil }); err == nil || !strings.Contains(err.Error(), "OnEnd") {
		t.Errorf("end events without OnEnd: %v", err)
	}
	if _, err := tail.ParseEvents("ends"); err == nil {
		t.Error("ParseEvents accepts ends")
	}
}
