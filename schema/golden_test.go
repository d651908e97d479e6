package schema

import (
	"bytes"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
)

var update = flag.Bool("update", false, "regenerate schema/testdata golden vectors")

type goldenCase struct {
	name  string
	build func() []byte // the encoding under test
	ours  bool          // produced by BatchEncoder: bytes must match exactly
}

func goldenEvents() []Event {
	names := []string{"api.example.com", "edge-7.cdn.example.net"}
	v4a, v4b := netip.MustParseAddr("10.0.3.17"), netip.MustParseAddr("93.184.215.14")
	v6a, v6b := netip.MustParseAddr("2001:db8:10::17"), netip.MustParseAddr("2606:4700::6810:84e5")
	const t0 = 1763990000123456789
	return []Event{
		{Timestamp: t0, Src: v4a, Dst: v4b, SrcPort: 51234, DstPort: 443, DstDNS: names,
			CgroupID: 4711, PID: 1234, Comm: "curl", ContainerID: "3f2a9c0d1e5b"},
		{Timestamp: t0 + 1500, Src: v4a, Dst: v4b, SrcPort: 51236, DstPort: 443, DstDNS: names,
			CgroupID: 4711, PID: 1234, Comm: "curl", ContainerID: "3f2a9c0d1e5b"},
		{Timestamp: t0 - 20, Src: v6a, Dst: v6b, SrcPort: 40000, DstPort: 80, DstDNS: []string{"www.example.org"}},
		{Timestamp: t0 + 3_000_000_000, Src: v4a, Dst: v4b, SrcPort: 60999, DstPort: 8443, DstDNS: names[:1],
			PID: 99, Comm: "weird \"comm\"\n\x01é"},
		{Timestamp: t0 + 70_000, Src: v6a, Dst: netip.MustParseAddr("::1"), SrcPort: 1, DstPort: 65535,
			CgroupID: 18446744073709551615, PID: 4294967295},
	}
}

func goldenCases() []goldenCase {
	return []goldenCase{
		{"empty", func() []byte {
			return encodeEvents("web-01", "01jd8zq0m5", Outgoing, 0, Drops{}, nil)
		}, true},
		{"outgoing_mixed", func() []byte {
			return encodeEvents("web-01", "01jd8zq0m5", Outgoing, 42, Drops{Kernel: 3, Publish: 1}, goldenEvents())
		}, true},
		{"incoming_20", func() []byte { // more than 15 events and endpoints: array16 headers
			var evs []Event
			for i := range 20 {
				evs = append(evs, Event{Timestamp: 1763990000000000000 + int64(i)*1000,
					Src: netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), Dst: netip.MustParseAddr("10.0.3.17"),
					SrcPort: uint16(50000 + i), DstPort: 22})
			}
			return encodeEvents("db_2", "r", Incoming, 65536, Drops{Reader: 1, Queue: 2, Spool: 70000}, evs)
		}, true},
		{"first_of_run", func() []byte { // schema 1.1: the first batch of a run names the previous one
			enc := NewBatchEncoder("web-01", "5be0a7c4d93f1e28", Outgoing)
			if err := enc.SetPrevRun(goldenLink()); err != nil {
				panic(err)
			}
			evs := goldenEvents()[:2]
			for i := range evs {
				enc.Add(&evs[i])
			}
			return enc.Finish(nil, 1, Drops{})
		}, true},
		{"process", func() []byte { // schema 1.2: uid in ctx, 0 (root) known, and a context without uid
			const t0 = 1763990000123456789
			v4a, v4b := netip.MustParseAddr("10.0.3.17"), netip.MustParseAddr("198.51.100.7")
			return encodeEvents("web-01", "5be0a7c4d93f1e28", Incoming, 3, Drops{}, []Event{
				{Timestamp: t0, Src: v4b, Dst: v4a, SrcPort: 49152, DstPort: 443, CgroupID: 4711, PID: 311, Comm: "nginx", UID: 33, UIDKnown: true},
				{Timestamp: t0 + 10, Src: v4b, Dst: v4a, SrcPort: 49153, DstPort: 22, PID: 1, Comm: "systemd", UID: 0, UIDKnown: true},
				{Timestamp: t0 + 20, Src: v4b, Dst: v4a, SrcPort: 49154, DstPort: 22, PID: 812, Comm: "sshd"},
				{Timestamp: t0 + 30, Src: v4b, Dst: v4a, SrcPort: 49155, DstPort: 443, CgroupID: 4711, PID: 311, Comm: "nginx", UID: 33, UIDKnown: true},
			})
		}, true},
		{"prev_run_future", func() []byte { // a later minor's prev_run: extra keys, another order
			enc := msgpack.GetEncoder()
			defer msgpack.PutEncoder(enc)
			var buf bytes.Buffer
			enc.Reset(&buf)
			enc.SetSortMapKeys(true)
			enc.UseCompactInts(true)
			err := enc.Encode(map[string]any{
				"schema_major": 1, "schema_minor": 4, "host": "db_2", "conn_direction": "incoming",
				"run_id": "r3", "seq": 2, "prev_seq": 0, "t0": 0, "endpoints": []any{}, "events": []any{},
				"prev_run": map[string]any{"end": "stopped", "start_ns": 1763990000500000000, "last_ns": 1763990000400000000,
					"events": 0, "batches": 0, "last_seq": 0, "run_id": "r2", "signal": "TERM", "spool": map[string]any{"batches": 3}},
			})
			if err != nil {
				panic(err)
			}
			return buf.Bytes()
		}, false},
		{"future_minor", func() []byte { // what a v1.3 producer might send: must decode the same
			enc := msgpack.GetEncoder()
			defer msgpack.PutEncoder(enc)
			var buf bytes.Buffer
			enc.Reset(&buf)
			enc.SetSortMapKeys(true) // deterministic: and not in our key order
			enc.UseCompactInts(true)
			err := enc.Encode(map[string]any{
				"schema_major": 1, "schema_minor": 3, "host": "web-01", "conn_direction": "incoming",
				"run_id": "r2", "seq": 7, "prev_seq": 5, "t0": 1763990000000000000,
				"drops":     map[string]any{"queue": 5, "tls": 1},
				"endpoints": []any{[]any{"198.51.100.7", []any{}, "asn:64500"}, []any{"10.0.3.17", []any{"web-01.internal"}}},
				"ctx":       []any{map[string]any{"pid": 311, "comm": "nginx", "uid": 33}},
				"events": []any{
					[]any{0, 1, 49152, 443, 0, 0, "tls1.3", map[string]any{"rtt_us": 120}},
					[]any{0, 1, 49153, 443, -3, nil, "tls1.2"},
				},
				"sampling": map[string]any{"rate": 1, "note": []any{nil, "x"}},
			})
			if err != nil {
				panic(err)
			}
			return buf.Bytes()
		}, false},
	}
}

// batchJSON renders a decoded batch as the expected-output text stored next to each vector: the header
// fields, then one AppendJSON object per event.
func batchJSON(b *Batch) []byte {
	out := []byte(`{"schema_major":` + strconv.Itoa(b.Major) + `,"schema_minor":` + strconv.Itoa(b.Minor) + `,"host":`)
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

func TestGolden(t *testing.T) {
	for _, gc := range goldenCases() {
		t.Run(gc.name, func(t *testing.T) {
			mpPath := filepath.Join("testdata", gc.name+".msgpack")
			jsPath := filepath.Join("testdata", gc.name+".json")
			got := gc.build()
			if *update {
				var b Batch
				if err := DecodeBatch(got, &b); err != nil {
					t.Fatal(err)
				}
				must(t, os.WriteFile(mpPath, got, 0o644))
				must(t, os.WriteFile(jsPath, batchJSON(&b), 0o644))
			}
			data, err := os.ReadFile(mpPath)
			must(t, err)
			wantJSON, err := os.ReadFile(jsPath)
			must(t, err)
			if gc.ours && !bytes.Equal(got, data) {
				t.Fatalf("encoder output differs from %s (run go test ./schema -update if the change is intended)\n got  %x\n want %x", mpPath, got, data)
			}
			var b Batch
			if err := DecodeBatch(data, &b); err != nil {
				t.Fatal(err)
			}
			if js := batchJSON(&b); !bytes.Equal(js, wantJSON) {
				t.Fatalf("decoded %s differs from %s:\n%s", mpPath, jsPath, js)
			}
			assertPlain(t, data)
		})
	}
}

func TestGoldenEventsExact(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("testdata", "outgoing_mixed.msgpack"))
	must(t, err)
	var b Batch
	must(t, DecodeBatch(data, &b))
	want := goldenEvents()
	for i := range want {
		want[i].Direction = Outgoing
	}
	if ok, why := eventsEqual(b.Events, want); !ok {
		t.Fatal(why)
	}
	if b.Seq != 42 || b.Drops != (Drops{Kernel: 3, Publish: 1}) || b.Host != "web-01" || b.RunID != "01jd8zq0m5" {
		t.Fatalf("%+v", b)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
