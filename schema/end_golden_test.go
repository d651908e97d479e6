package schema

import (
	"bytes"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
)

// endGoldenCases are the end batch vectors, testdata/end_*.msgpack; ours: made by EndBatchEncoder.
func endGoldenCases() []goldenCase {
	return []goldenCase{
		{"end_mixed", func() []byte {
			return encodeEnds("web-01", "01jd8zq0m5", Outgoing, 43, Drops{Kernel: 2}, goldenEndEvents())
		}, true},
		{"end_first_of_run", func() []byte { // the first end batch of a direction names the previous run's end chain
			enc := NewEndBatchEncoder("web-01", "5be0a7c4d93f1e28", Incoming)
			l := goldenLink()
			l.LastSeq, l.Batches, l.Events = 1840, 310, 402_117
			if err := enc.SetPrevRun(l); err != nil {
				panic(err)
			}
			evs := goldenEndEvents()[3:]
			for i := range evs {
				enc.AddEnd(&evs[i])
			}
			return enc.Finish(nil, 2, Drops{})
		}, true},
		{"end_incoming_20", func() []byte { // more than 15 events and endpoints: array16 headers, every reason
			var evs []EndEvent
			for i := range 20 {
				end := int64(1763990000000000000) + int64(i)*1000
				evs = append(evs, EndEvent{BeginNs: end - int64(i)*1_000_000_007, EndNs: end,
					Src: netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), Dst: netip.MustParseAddr("10.0.3.17"),
					SrcPort: uint16(50000 + i), DstPort: 22, SrcBytes: uint64(i) * 100, DstBytes: uint64(i) * 7000,
					SrcSegs: uint64(i), DstSegs: uint64(i) * 5, SRTTus: uint32(200 + i), Reason: EndReason(i % int(numEndReasons))})
			}
			return encodeEnds("db_2", "r", Incoming, 65537, Drops{Reader: 1, Queue: 2}, evs)
		}, true},
		{"end_future_minor", func() []byte { // what a 2.3 producer might send: must decode the same
			enc := msgpack.GetEncoder()
			defer msgpack.PutEncoder(enc)
			var buf bytes.Buffer
			enc.Reset(&buf)
			enc.SetSortMapKeys(true)
			enc.UseCompactInts(true)
			err := enc.Encode(map[string]any{
				"schema_major": 2, "schema_minor": 3, "event": "net_flow_tcp_end", "host": "web-01", "conn_direction": "incoming",
				"run_id": "r2", "seq": 8, "prev_seq": 6, "t0": 1763990000000000000,
				"drops":     map[string]any{"queue": 5, "tls": 1},
				"endpoints": []any{[]any{"198.51.100.7", []any{}, "asn:64500"}, []any{"10.0.3.17", []any{"web-01.internal"}}},
				"ctx":       []any{map[string]any{"pid": 311, "comm": "nginx", "uid": 33}},
				"events": []any{
					// reason 9: a code a later minor added; kept, printed "unknown"
					[]any{0, 1, 49152, 443, 0, 0, 2_000_000, 310, 4096, 2, 3, 0, 180, 9, "ecn", map[string]any{"rto_us": 200000}},
					[]any{0, 1, 49153, 443, -3, nil, 0, 0, 0, 0, 0, 0, 0, 5},
				},
				"sampling": map[string]any{"rate": 1},
			})
			if err != nil {
				panic(err)
			}
			return buf.Bytes()
		}, false},
	}
}

// endBatchJSON is batchJSON for an end batch: the header (with event), then one AppendJSON object per event.
func endBatchJSON(b *EndBatch) []byte {
	out := []byte(`{"schema_major":` + strconv.Itoa(b.Major) + `,"schema_minor":` + strconv.Itoa(b.Minor) +
		`,"event":"` + EndEventName + `","host":`)
	out = appendJSONString(out, b.Host)
	out = append(out, `,"conn_direction":"`+b.Direction.String()+`","run_id":`...)
	out = appendJSONString(out, b.RunID)
	out = append(out, `,"seq":`+strconv.FormatUint(b.Seq, 10)...)
	out = append(out, `,"prev_seq":`+strconv.FormatUint(b.PrevSeq, 10)...)
	if l := b.PrevRun; l != nil {
		out = append(out, `,"prev_run":{"run_id":`...)
		out = appendJSONString(out, l.RunID)
		out = append(out, `,"last_seq":`+strconv.FormatUint(l.LastSeq, 10)+`,"batches":`+strconv.FormatUint(l.Batches, 10)+
			`,"events":`+strconv.FormatUint(l.Events, 10)+`,"last_ns":`+strconv.FormatInt(l.LastNs, 10)+
			`,"start_ns":`+strconv.FormatInt(l.StartNs, 10)+`,"end":`...)
		out = appendJSONString(out, l.End)
		out = append(out, '}')
	}
	d := b.Drops
	out = append(out, `,"drops":{"kernel":`+strconv.FormatUint(d.Kernel, 10)+`,"reader":`+strconv.FormatUint(d.Reader, 10)+
		`,"queue":`+strconv.FormatUint(d.Queue, 10)+`,"spool":`+strconv.FormatUint(d.Spool, 10)+
		`,"publish":`+strconv.FormatUint(d.Publish, 10)+`},"events":[`...)
	for i := range b.Events {
		if i > 0 {
			out = append(out, ',')
		}
		out = append(out, "\n  "...)
		out = b.Events[i].AppendJSON(out, b.Host)
	}
	return append(out, "\n]}\n"...)
}

func TestEndGolden(t *testing.T) {
	for _, gc := range endGoldenCases() {
		t.Run(gc.name, func(t *testing.T) {
			mpPath := filepath.Join("testdata", gc.name+".msgpack")
			jsPath := filepath.Join("testdata", gc.name+".json")
			got := gc.build()
			if *update {
				var b EndBatch
				if err := DecodeEndBatch(got, &b); err != nil {
					t.Fatal(err)
				}
				must(t, os.WriteFile(mpPath, got, 0o644))
				must(t, os.WriteFile(jsPath, endBatchJSON(&b), 0o644))
			}
			data, err := os.ReadFile(mpPath)
			must(t, err)
			wantJSON, err := os.ReadFile(jsPath)
			must(t, err)
			if gc.ours && !bytes.Equal(got, data) {
				t.Fatalf("encoder output differs from %s (run go test ./schema -update if the change is intended)\n got  %x\n want %x", mpPath, got, data)
			}
			var b EndBatch
			must(t, DecodeEndBatch(data, &b))
			if js := endBatchJSON(&b); !bytes.Equal(js, wantJSON) {
				t.Fatalf("decoded %s differs from %s:\n%s", mpPath, jsPath, js)
			}
			assertPlain(t, data)

			// The begin decoder, as every 1.x consumer has it, refuses every end vector: an unknown
			// major, named, with who reads it; never an event.
			var bb Batch
			err = DecodeBatch(data, &bb)
			if !errors.Is(err, ErrUnsupportedMajor) || errors.Is(err, ErrMalformed) || len(bb.Events) != 0 {
				t.Fatalf("DecodeBatch of %s: %v (%d events)", mpPath, err, len(bb.Events))
			}
			for _, want := range []string{"schema major 2 is not supported by this consumer (supports 1)", "net_flow_tcp_end", "newer flowbus", "upgrade the consumer"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("DecodeBatch error %q does not say %q", err, want)
				}
			}
		})
	}
}

// The end vectors hold exactly the events encoded, and a begin vector is refused by DecodeEndBatch.
func TestEndGoldenExact(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("testdata", "end_mixed.msgpack"))
	must(t, err)
	var b EndBatch
	must(t, DecodeEndBatch(data, &b))
	want := goldenEndEvents()
	for i := range want {
		want[i].Direction = Outgoing
	}
	if ok, why := endsEqual(b.Events, want); !ok {
		t.Fatal(why)
	}
	if b.Seq != 43 || b.Drops != (Drops{Kernel: 2}) || b.Host != "web-01" || b.Major != 2 || b.Minor != EndMinor {
		t.Fatalf("%+v", b)
	}
	fut, err := os.ReadFile(filepath.Join("testdata", "end_future_minor.msgpack"))
	must(t, err)
	must(t, DecodeEndBatch(fut, &b))
	if b.Minor != 3 || len(b.Events) != 2 || b.Events[0].Reason != 9 || b.Events[0].Reason.String() != "unknown" ||
		b.Events[1].Reason != EndNeverEstablished || b.Events[0].Duration() != 2_000_000 || b.Events[0].SRTTus != 180 {
		t.Fatalf("future minor: %+v", b)
	}
	begin, err := os.ReadFile(filepath.Join("testdata", "outgoing_mixed.msgpack"))
	must(t, err)
	err = DecodeEndBatch(begin, &b)
	if !errors.Is(err, ErrUnsupportedMajor) || !strings.Contains(err.Error(), "major 1 is a net_flow_tcp_begin batch") {
		t.Fatalf("DecodeEndBatch of a begin batch: %v", err)
	}
}
