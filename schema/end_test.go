package schema

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func goldenEndEvents() []EndEvent {
	names := []string{"api.example.com", "edge-7.cdn.example.net"}
	v4a, v4b := netip.MustParseAddr("10.0.3.17"), netip.MustParseAddr("93.184.215.14")
	v6a, v6b := netip.MustParseAddr("2001:db8:10::17"), netip.MustParseAddr("2606:4700::6810:84e5")
	const t0 = 1763990005123456789
	return []EndEvent{
		{Src: v4a, Dst: v4b, SrcPort: 51234, DstPort: 443, DstDNS: names, BeginNs: t0 - 5_000_000_000, EndNs: t0,
			SrcBytes: 517, DstBytes: 1_234_567, SrcSegs: 3, DstSegs: 860, Retrans: 2, SRTTus: 11_250, Reason: EndFIN,
			CgroupID: 4711, PID: 1234, Comm: "curl", ContainerID: "3f2a9c0d1e5b"},
		{Src: v6a, Dst: v6b, SrcPort: 40000, DstPort: 80, DstDNS: names[:1], BeginNs: t0 - 120, EndNs: t0 - 20,
			Reason: EndRSTReceived},
		{Src: v4a, Dst: v4b, SrcPort: 60999, DstPort: 8443, BeginNs: t0 - 3_600_000_000_000, EndNs: t0 + 3_000_000_000,
			SrcBytes: 1 << 40, DstBytes: 18446744073709551615, SrcSegs: 1 << 33, DstSegs: 70000, Retrans: 4_000_000_000,
			SRTTus: 4294967295, Reason: EndTimeout, PID: 99, Comm: "weird \"comm\"\n\x01é"},
		{Src: v4b, Dst: v4a, SrcPort: 1, DstPort: 65535, BeginNs: t0 + 10, EndNs: t0 + 10, Reason: EndRSTSent,
			CgroupID: 18446744073709551615, PID: 4294967295},
		{Src: netip.MustParseAddr("fe80::1%eth0"), Dst: netip.MustParseAddr("::1"), SrcPort: 2, DstPort: 22,
			BeginNs: t0 + 70_000 - 63_000_000_000, EndNs: t0 + 70_000, Reason: EndNeverEstablished},
	}
}

func encodeEnds(host, runID string, dir Direction, seq uint64, drops Drops, evs []EndEvent) []byte {
	enc := NewEndBatchEncoder(host, runID, dir)
	for i := range evs {
		enc.AddEnd(&evs[i])
	}
	return enc.Finish(nil, seq, drops)
}

func endsEqual(a, b []EndEvent) (bool, string) {
	if len(a) != len(b) {
		return false, "lengths differ"
	}
	for i := range a {
		x, y := a[i], b[i]
		for _, e := range []*EndEvent{&x, &y} {
			if len(e.SrcDNS) == 0 {
				e.SrcDNS = nil
			}
			if len(e.DstDNS) == 0 {
				e.DstDNS = nil
			}
		}
		if !reflect.DeepEqual(x, y) {
			return false, "event differs:\n got  " + strings.TrimSpace(jsonOf(&x)) + "\n want " + jsonOf(&y)
		}
	}
	return true, ""
}

func jsonOf(e *EndEvent) string { return string(e.AppendJSON(nil, "h")) }

func TestEndRoundTrip(t *testing.T) {
	want := goldenEndEvents()
	data := encodeEnds("web-01", "01jd8zq0m5", Incoming, 43, Drops{Kernel: 1}, want)
	var b EndBatch
	must(t, DecodeEndBatch(data, &b))
	for i := range want {
		want[i].Direction = Incoming
	}
	if ok, why := endsEqual(b.Events, want); !ok {
		t.Fatal(why)
	}
	if b.Major != 2 || b.Minor != EndMinor || b.Host != "web-01" || b.Seq != 43 || b.Direction != Incoming || b.Drops.Kernel != 1 {
		t.Fatalf("%+v", b)
	}
	// A begin decoder refuses it as an unknown major, naming 2 and who reads it.
	var bb Batch
	err := DecodeBatch(data, &bb)
	if !errors.Is(err, ErrUnsupportedMajor) || !strings.Contains(err.Error(), "major 2") || !strings.Contains(err.Error(), "DecodeEndBatch") {
		t.Fatalf("DecodeBatch of an end batch: %v", err)
	}
	if len(bb.Events) != 0 {
		t.Fatalf("begin decoder produced %d events from an end batch", len(bb.Events))
	}
}

// validEndPairs is a minimal valid end batch: one event between two endpoints, with context.
func validEndPairs() []pair {
	return []pair{
		kv("schema_major", 2), kv("schema_minor", 0), kv("event", "net_flow_tcp_end"), kv("host", "h"),
		kv("conn_direction", "incoming"), kv("run_id", "r"), kv("seq", 5), kv("prev_seq", 3), kv("t0", 1000),
		kv("drops", map[string]any{"queue": 2}),
		kv("endpoints", []any{[]any{"10.0.0.1", []any{}}, []any{"2001:db8::1", []any{"x.example"}}}),
		kv("ctx", []any{map[string]any{"pid": 7, "comm": "curl"}}),
		kv("events", []any{endRow()}),
	}
}

func endRow(extra ...any) []any {
	return append([]any{1, 0, 40000, 443, -5, 0, 100, 10, 20, 1, 2, 0, 250, 1}, extra...)
}

func TestAddEndZeroAllocs(t *testing.T) {
	evs := realisticEnds(1000, Outgoing)
	enc := NewEndBatchEncoder("web-01", "run", Outgoing)
	dst := make([]byte, 0, 1<<20)
	for range 2 {
		for i := range evs {
			enc.AddEnd(&evs[i])
		}
		dst = enc.Finish(dst[:0], 1, Drops{})
	}
	allocs := testing.AllocsPerRun(20, func() {
		for i := range evs {
			enc.AddEnd(&evs[i])
		}
		dst = enc.Finish(dst[:0], 1, Drops{Kernel: 3})
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per 1000-event end batch, want 0", allocs)
	}
	if enc.Len() != 0 {
		t.Fatal("Finish did not reset")
	}
}

// Size is an upper bound of what Finish writes, also with the event key and a run link.
func TestEndSizeBound(t *testing.T) {
	enc := NewEndBatchEncoder("web-01", "run", Incoming)
	must(t, enc.SetPrevRun(goldenLink()))
	evs := goldenEndEvents()
	for i := range evs {
		enc.AddEnd(&evs[i])
	}
	bound := enc.Size()
	if n := len(enc.Finish(nil, 1, Drops{Kernel: 1 << 60, Reader: 1 << 60, Queue: 1 << 60, Spool: 1 << 60, Publish: 1 << 60})); n > bound {
		t.Fatalf("Finish wrote %d bytes, Size said at most %d", n, bound)
	}
}

// Random end events of every shape survive encode and decode; seqs chain per encoder.
func TestEndRoundTripRandom(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 9))
	enc := NewEndBatchEncoder("h", "run", Outgoing)
	var prev uint64
	for round := range 50 {
		begins := randEvents(r, r.IntN(40), Outgoing)
		evs := make([]EndEvent, len(begins))
		for i, b := range begins {
			evs[i] = EndEvent{Direction: Outgoing, Src: b.Src, Dst: b.Dst, SrcPort: b.SrcPort, DstPort: b.DstPort,
				SrcDNS: b.SrcDNS, DstDNS: b.DstDNS, EndNs: b.Timestamp, BeginNs: b.Timestamp - r.Int64N(1e12) + 5,
				SrcBytes: r.Uint64() >> r.IntN(64), DstBytes: r.Uint64() >> r.IntN(64), SrcSegs: r.Uint64() >> r.IntN(64),
				DstSegs: r.Uint64() >> r.IntN(64), Retrans: r.Uint64() >> r.IntN(64), SRTTus: r.Uint32() >> r.IntN(32),
				Reason: EndReason(r.IntN(256)), CgroupID: b.CgroupID, PID: b.PID, Comm: b.Comm, ContainerID: b.ContainerID}
			enc.AddEnd(&evs[i])
		}
		seq := uint64(2*round + 1)
		var b EndBatch
		must(t, DecodeEndBatch(enc.Finish(nil, seq, Drops{}), &b))
		if ok, why := endsEqual(b.Events, evs); !ok {
			t.Fatalf("round %d: %s", round, why)
		}
		if b.Seq != seq || b.PrevSeq != prev {
			t.Fatalf("round %d: seq %d prev_seq %d, want %d %d", round, b.Seq, b.PrevSeq, seq, prev)
		}
		prev = seq
	}
}

func TestEndForwardCompatibleAndMalformed(t *testing.T) {
	base := validEndPairs()
	ok := func(name string, ps []pair) {
		t.Helper()
		var b EndBatch
		if err := DecodeEndBatch(rawBatch(ps...), &b); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	ok("minimal", base)
	ok("unknown top-level key", append(with(base, "schema_minor", 7), kv("future", map[string]any{"a": []any{1, "x"}})))
	ok("extra row elements", with(base, "events", []any{endRow("x", map[string]any{"k": 1}, nil)}))
	ok("no ctx, no drops", with(without(without(base, "ctx"), "drops"), "events", []any{[]any{1, 0, 1, 2, 0, nil, 0, 0, 0, 0, 0, 0, 0, 0}}))
	ok("unknown reason code", with(base, "events", []any{[]any{1, 0, 1, 2, 0, nil, 0, 0, 0, 0, 0, 0, 0, 255}}))
	ok("event at its bound is still checked for its value", base)

	bad := []struct {
		name, want string
		ps         []pair
	}{
		{"duplicate event key", "event: duplicate key", append(base, kv("event", "net_flow_tcp_end"))},
		{"duplicate seq", "seq: duplicate key", append(base, kv("seq", 6))},
		{"missing event", "event: missing key", without(base, "event")},
		{"wrong event", `event "net_flow_tcp_begin" in a schema major 2 batch`, with(base, "event", "net_flow_tcp_begin")},
		{"event past its bound", "event: string of 33 bytes is longer than the bound of 32", with(base, "event", strings.Repeat("e", 33))},
		{"short row", "events[0]: row has 13 elements, need 14", with(base, "events", []any{endRow()[:13]})},
		{"srtt past uint32", "events[0][12] (srtt_us): value 4294967296 out of range", with(base, "events", []any{[]any{1, 0, 1, 2, 0, nil, 0, 0, 0, 0, 0, 0, uint64(1) << 32, 0}})},
		{"reason past uint8", "events[0][13] (reason): value 256 out of range", with(base, "events", []any{[]any{1, 0, 1, 2, 0, nil, 0, 0, 0, 0, 0, 0, 0, 256}})},
		{"negative bytes", "events[0][7] (src_bytes): negative value -1", with(base, "events", []any{[]any{1, 0, 1, 2, 0, nil, 0, -1, 0, 0, 0, 0, 0, 0}})},
		{"string duration", "events[0][6] (duration_ns): expected int, got string", with(base, "events", []any{[]any{1, 0, 1, 2, 0, nil, "1s", 0, 0, 0, 0, 0, 0, 0}})},
		{"ref out of range", "events[0][1] (dst_ref): reference 2 out of range", with(base, "events", []any{[]any{1, 2, 1, 2, 0, nil, 0, 0, 0, 0, 0, 0, 0, 0}})},
		{"host past its bound", "host: string of 65 bytes", with(base, "host", strings.Repeat("h", 65))},
		{"dns name past its bound", "string of 254 bytes is longer than the bound of 253", with(base, "endpoints", []any{[]any{"10.0.0.1", []any{}}, []any{"::1", []any{strings.Repeat("n", 254)}}})},
		{"unknown key past its bound", "string of 65 bytes is longer than the bound of 64", append(base, kv(strings.Repeat("k", 65), 1))},
		{"prev_run on a later batch", "prev_run: on a batch with prev_seq 3", append(base, kv("prev_run", map[string]any{"run_id": "x"}))},
	}
	for _, tc := range bad {
		var b EndBatch
		err := DecodeEndBatch(rawBatch(tc.ps...), &b)
		if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want ErrMalformed saying %q", tc.name, err, tc.want)
		}
	}
	// Majors: 1 is a begin batch, 3 a future end major.
	for major, want := range map[int]string{1: "decode it with schema.DecodeBatch", 3: "end batch schema major 3 is not supported by this consumer (supports 2): upgrade"} {
		err := DecodeEndBatch(rawBatch(with(base, "schema_major", major)...), &EndBatch{})
		if !errors.Is(err, ErrUnsupportedMajor) || !strings.Contains(err.Error(), want) {
			t.Errorf("major %d: %v", major, err)
		}
	}
	// A begin batch with an event key, as some producer might write, is still a begin batch to DecodeBatch.
	var bb Batch
	if err := DecodeBatch(rawBatch(append(validPairs(), kv("event", strings.Repeat("x", 64)))...), &bb); err != nil || len(bb.Events) != 1 {
		t.Errorf("begin batch with an unknown event key: %v", err)
	}
}

// Every truncation of an end vector fails cleanly.
func TestEndTruncations(t *testing.T) {
	data := encodeEnds("web-01", "r", Outgoing, 1, Drops{}, goldenEndEvents())
	for n := range len(data) {
		var b EndBatch
		if err := DecodeEndBatch(data[:n], &b); !errors.Is(err, ErrMalformed) {
			t.Fatalf("truncated to %d of %d bytes: %v", n, len(data), err)
		}
	}
}

func TestEndReasonNames(t *testing.T) {
	for r := EndUnknown; r < numEndReasons; r++ {
		if got, ok := ParseEndReason(r.String()); !ok || got != r {
			t.Errorf("%d: %q parses to %d %v", r, r.String(), got, ok)
		}
	}
	if _, ok := ParseEndReason("FIN"); ok {
		t.Error("ParseEndReason accepts FIN")
	}
	if EndReason(200).String() != "unknown" {
		t.Error("an unknown code is not unknown")
	}
}

func TestEndSubjects(t *testing.T) {
	if s := EndSubject("flows", "web-01", Incoming); s != "flows.web-01.incoming.end" {
		t.Fatal(s)
	}
	if SubjectKind("flows.web-01.incoming.end", "flows") != KindEnd || SubjectKind("flows.web-01.incoming", "flows") != KindBegin ||
		SubjectKind("acme.x.flows.web-01.incoming.end", "acme.x.flows") != KindEnd || SubjectKind("flows.end.outgoing", "") != KindBegin {
		t.Fatal("SubjectKind")
	}
	must(t, CheckEndSubject("flows.web-01.incoming.end", "", "web-01", Incoming))
	for _, s := range []string{"flows.web-01.incoming", "flows.web-02.incoming.end", "flows.web-01.outgoing.end", "flows.web-01.incoming.end.x"} {
		if err := CheckEndSubject(s, "flows", "web-01", Incoming); !errors.Is(err, ErrSubjectMismatch) {
			t.Errorf("%s: %v", s, err)
		}
	}
	for _, c := range []struct {
		host         string
		d            Direction
		begins, ends bool
		want         string
	}{
		{"", 0, true, false, "flows.*.*"},
		{"", 0, false, true, "flows.*.*.end"},
		{"", 0, true, true, "flows.*.* flows.*.*.end"},
		{"web-01", Incoming, true, true, "flows.web-01.incoming flows.web-01.incoming.end"},
		{"", Outgoing, false, true, "flows.*.outgoing.end"},
	} {
		if got := strings.Join(FilterSubjects("", c.host, c.d, c.begins, c.ends), " "); got != c.want {
			t.Errorf("FilterSubjects(%q, %v, %v, %v) = %q, want %q", c.host, c.d, c.begins, c.ends, got, c.want)
		}
	}
	if EndSchemaHeaderValue() != "2.1" {
		t.Fatal(EndSchemaHeaderValue())
	}
}
