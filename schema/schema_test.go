package schema

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
)

func TestRoundTripRandom(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	enc := NewBatchEncoder("web-01", "run1", Outgoing)
	var dst []byte
	var got Batch
	for iter := 0; iter < 300; iter++ {
		dir := Outgoing
		if iter%2 == 1 {
			dir = Incoming
		}
		if enc.dir != dir {
			enc = NewBatchEncoder("web-01", "run1", dir)
		}
		n := r.IntN(40)
		if iter%50 == 0 {
			n = 70000 // array32 for events and array16 for endpoints
		}
		evs := randEvents(r, n, dir)
		for i := range evs {
			enc.Add(&evs[i])
		}
		if enc.Len() != n {
			t.Fatalf("Len %d, want %d", enc.Len(), n)
		}
		size := enc.Size()
		drops := Drops{Kernel: r.Uint64() >> r.IntN(64), Publish: uint64(iter)}
		dst = enc.Finish(dst[:0], uint64(iter), drops)
		if len(dst) > size {
			t.Fatalf("Size %d < encoded %d", size, len(dst))
		}
		if enc.Len() != 0 {
			t.Fatal("Finish did not Reset")
		}
		if err := DecodeBatch(dst, &got); err != nil {
			t.Fatalf("iter %d: %v", iter, err)
		}
		if got.Major != Major || got.Minor != Minor || got.Host != "web-01" || got.RunID != "run1" || got.Seq != uint64(iter) ||
			got.Direction != dir || got.Drops != drops {
			t.Fatalf("header mismatch: %+v", got)
		}
		if ok, why := eventsEqual(got.Events, evs); !ok {
			t.Fatalf("iter %d: %s", iter, why)
		}
	}
}

func TestEmptyBatchAndSizeBound(t *testing.T) {
	enc := NewBatchEncoder(strings.Repeat("h", MaxHostLen), strings.Repeat("r", MaxRunIDLen), Incoming)
	all := Drops{math.MaxUint64, math.MaxUint64, math.MaxUint64, math.MaxUint64, math.MaxUint64}
	size := enc.Size()
	out := enc.Finish(nil, math.MaxUint64, all)
	if len(out) > size {
		t.Fatalf("Size %d < encoded %d", size, len(out))
	}
	var b Batch
	b.Events = make([]Event, 3)
	if err := DecodeBatch(out, &b); err != nil {
		t.Fatal(err)
	}
	if len(b.Events) != 0 || b.Drops != all || b.Seq != math.MaxUint64 {
		t.Fatalf("%+v", b)
	}
	// A single event with every string at its bound and extreme values.
	ev := Event{Timestamp: math.MinInt64, Src: netip.MustParseAddr("fe80::1").WithZone(strings.Repeat("z", MaxAddrLen-len("fe80::1%"))),
		Dst: netip.IPv6Unspecified(), SrcDNS: []string{strings.Repeat("n", MaxDNSNameLen)}, CgroupID: math.MaxUint64,
		PID: math.MaxUint32, Comm: strings.Repeat("c", MaxCommLen), ContainerID: strings.Repeat("x", MaxContainerIDLen), SrcPort: 65535}
	enc.Add(&ev)
	size = enc.Size()
	out = enc.Finish(out[:0], 0, all)
	if len(out) > size {
		t.Fatalf("Size %d < encoded %d", size, len(out))
	}
	if err := DecodeBatch(out, &b); err != nil {
		t.Fatal(err)
	}
	ev.Direction = Incoming
	if ok, why := eventsEqual(b.Events, []Event{ev}); !ok {
		t.Fatal(why)
	}
}

func TestEndpointDictionary(t *testing.T) {
	a := netip.MustParseAddr("192.0.2.1")
	names := []string{"a.example", "b.example"}
	copyNames := append([]string(nil), names...)
	other := []string{"c.example"}
	evs := []Event{
		{Src: a, Dst: a, DstDNS: names, SrcDNS: nil},
		{Src: a, Dst: a, DstDNS: names},     // same slice: reuse
		{Src: a, Dst: a, DstDNS: copyNames}, // equal contents: reuse
		{Src: a, Dst: a, DstDNS: other},     // different names: new entry
		{Src: a, Dst: a, DstDNS: names[:1]}, // prefix: new entry
	}
	enc := NewBatchEncoder("h", "r", Outgoing)
	for i := range evs {
		enc.Add(&evs[i])
	}
	if got := len(enc.epEntries); got != 4 {
		t.Fatalf("%d endpoint entries, want 4 (nil, names, other, prefix)", got)
	}
	out := enc.Finish(nil, 1, Drops{})
	var b Batch
	if err := DecodeBatch(out, &b); err != nil {
		t.Fatal(err)
	}
	for i := range evs {
		evs[i].Direction = Outgoing
	}
	if ok, why := eventsEqual(b.Events, evs); !ok {
		t.Fatal(why)
	}
	// Decoded events that share an endpoint share its names slice.
	if &b.Events[0].DstDNS[0] != &b.Events[2].DstDNS[0] {
		t.Error("names of one endpoint entry are not shared")
	}
}

func TestAddZeroAllocs(t *testing.T) {
	evs := realisticEvents(1000, Outgoing)
	enc := NewBatchEncoder("web-01", "run", Outgoing)
	dst := make([]byte, 0, 1<<20)
	for range 2 {
		for i := range evs {
			enc.Add(&evs[i])
		}
		dst = enc.Finish(dst[:0], 1, Drops{})
	}
	allocs := testing.AllocsPerRun(20, func() {
		for i := range evs {
			enc.Add(&evs[i])
		}
		dst = enc.Finish(dst[:0], 1, Drops{Kernel: 3})
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per 1000-event batch, want 0", allocs)
	}
}

func TestUnknownMajor(t *testing.T) {
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"major 2 first, rest unknown to v1", rawBatch(kv("schema_major", 2), kv("schema_minor", 0), kv("events", "a v2 shape"))},
		{"major 2 after other keys", rawBatch(kv("host", "h"), kv("schema_major", 2))},
		{"major 0", rawBatch(kv("schema_major", 0))},
	} {
		var b Batch
		err := DecodeBatch(tc.data, &b)
		if !errors.Is(err, ErrUnsupportedMajor) || errors.Is(err, ErrMalformed) {
			t.Fatalf("%s: got %v", tc.name, err)
		}
		if !strings.Contains(err.Error(), "supports 1") || !strings.Contains(err.Error(), "upgrade") {
			t.Errorf("%s: unclear message %q", tc.name, err)
		}
	}
	err := DecodeBatch(rawBatch(kv("schema_major", 2)), &Batch{})
	if !strings.Contains(err.Error(), "major 2 is not supported") {
		t.Errorf("message %q does not name major 2", err)
	}
}

type pair struct {
	k string
	v any
}

func kv(k string, v any) pair { return pair{k, v} }

// raw is pre-encoded msgpack, inserted verbatim by rawBatch.
type raw []byte

func mustMarshal(v any) []byte {
	if r, ok := v.(raw); ok {
		return r
	}
	b, err := msgpack.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// rawBatch builds a top-level map with keys in the given order, values encoded by the generic library.
func rawBatch(ps ...pair) []byte {
	out := appendMapHeader(nil, len(ps))
	for _, p := range ps {
		out = appendStr(out, p.k)
		out = append(out, mustMarshal(p.v)...)
	}
	return out
}

// validPairs is a minimal valid batch: one event between two endpoints, with context.
func validPairs() []pair {
	return []pair{
		kv("schema_major", 1), kv("schema_minor", 0), kv("host", "h"), kv("conn_direction", "incoming"),
		kv("run_id", "r"), kv("seq", 5), kv("prev_seq", 3), kv("t0", 1000), kv("drops", map[string]any{"queue": 2}),
		kv("endpoints", []any{[]any{"10.0.0.1", []any{}}, []any{"2001:db8::1", []any{"x.example"}}}),
		kv("ctx", []any{map[string]any{"pid": 7, "comm": "curl"}}),
		kv("events", []any{[]any{1, 0, 40000, 443, -5, 0}}),
	}
}

func with(ps []pair, k string, v any) []pair {
	out := append([]pair(nil), ps...)
	for i := range out {
		if out[i].k == k {
			out[i].v = v
			return out
		}
	}
	return append(out, kv(k, v))
}

func without(ps []pair, k string) []pair {
	var out []pair
	for _, p := range ps {
		if p.k != k {
			out = append(out, p)
		}
	}
	return out
}

func TestValidAndForwardCompatible(t *testing.T) {
	want := []Event{{Timestamp: 995, Direction: Incoming, Src: netip.MustParseAddr("2001:db8::1"),
		Dst: netip.MustParseAddr("10.0.0.1"), SrcPort: 40000, DstPort: 443, SrcDNS: []string{"x.example"}, PID: 7, Comm: "curl"}}
	base := validPairs()
	// Reversed key order, unknown keys (nested deeply but within bounds), extra row and entry elements,
	// unknown ctx and drops keys, a higher minor, nil ctx fields.
	deep := any("leaf")
	for range 20 {
		deep = []any{deep, map[string]any{"k": 1.5, "b": []byte{1}}}
	}
	rev := make([]pair, 0, len(base)+2)
	for i := len(base) - 1; i >= 0; i-- {
		rev = append(rev, base[i])
	}
	rev = with(rev, "schema_minor", 7)
	rev = with(rev, "events", []any{[]any{1, 0, 40000, 443, -5, 0, "future", map[string]any{"x": deep}}})
	rev = with(rev, "endpoints", []any{[]any{"10.0.0.1", []any{}, 99}, []any{"2001:db8::1", []any{"x.example"}}})
	rev = with(rev, "ctx", []any{map[string]any{"pid": 7, "comm": "curl", "future_key": 1000, "cgroup_id": nil}})
	rev = with(rev, "drops", map[string]any{"queue": 2, "future_stage": "x"})
	rev = append(rev, kv("zz_future", deep), kv("flags", raw{0xd4, 1, 2}))
	for name, ps := range map[string][]pair{"canonical": base, "v1.7 shape": rev} {
		var b Batch
		if err := DecodeBatch(rawBatch(ps...), &b); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if ok, why := eventsEqual(b.Events, want); !ok {
			t.Fatalf("%s: %s", name, why)
		}
		if b.Host != "h" || b.RunID != "r" || b.Seq != 5 || b.Drops != (Drops{Queue: 2}) {
			t.Fatalf("%s: %+v", name, b)
		}
	}
	// drops and ctx are optional.
	var b Batch
	ps := with(without(without(base, "drops"), "ctx"), "events", []any{[]any{0, 0, 1, 2, 3, nil}})
	if err := DecodeBatch(rawBatch(ps...), &b); err != nil {
		t.Fatal(err)
	}
}

// Each string of a batch is accepted at its bound and malformed one byte past it.
func TestStringBounds(t *testing.T) {
	base := validPairs()
	zone := func(n int) string { return "fe80::1%" + strings.Repeat("z", n-len("fe80::1%")) }
	cases := []struct {
		name, where string
		bound       int
		batch       func(n int) []byte
	}{
		{"host", "host", MaxHostLen, func(n int) []byte { return rawBatch(with(base, "host", strings.Repeat("h", n))...) }},
		{"run_id", "run_id", MaxRunIDLen, func(n int) []byte { return rawBatch(with(base, "run_id", strings.Repeat("r", n))...) }},
		{"address", "endpoints[0][0] (address)", MaxAddrLen, func(n int) []byte {
			return rawBatch(with(base, "endpoints", []any{[]any{zone(n), []any{}}, []any{"::1", []any{}}})...)
		}},
		{"dns name", "endpoints[1][1][0] (name)", MaxDNSNameLen, func(n int) []byte {
			return rawBatch(with(base, "endpoints", []any{[]any{"10.0.0.1", []any{}}, []any{"::1", []any{strings.Repeat("n", n)}}})...)
		}},
		{"comm", `ctx[0]["comm"]`, MaxCommLen, func(n int) []byte {
			return rawBatch(with(base, "ctx", []any{map[string]any{"comm": strings.Repeat("c", n)}})...)
		}},
		{"container_id", `ctx[0]["container_id"]`, MaxContainerIDLen, func(n int) []byte {
			return rawBatch(with(base, "ctx", []any{map[string]any{"container_id": strings.Repeat("x", n)}})...)
		}},
		{"unknown top-level key", "top-level key #12", MaxKeyLen, func(n int) []byte { return rawBatch(append(base, kv(strings.Repeat("k", n), 1))...) }},
		{"unknown drops key", "drops key #", MaxKeyLen, func(n int) []byte {
			return rawBatch(with(base, "drops", map[string]any{"queue": 2, strings.Repeat("k", n): 1})...)
		}},
		{"unknown ctx key", "ctx[0] key #", MaxKeyLen, func(n int) []byte {
			return rawBatch(with(base, "ctx", []any{map[string]any{strings.Repeat("k", n): 1}})...)
		}},
	}
	for _, tc := range cases {
		var b Batch
		if err := DecodeBatch(tc.batch(tc.bound), &b); err != nil {
			t.Errorf("%s of %d bytes (the bound): %v", tc.name, tc.bound, err)
		}
		err := DecodeBatch(tc.batch(tc.bound+1), &b)
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("%s of %d bytes: got %v, want ErrMalformed", tc.name, tc.bound+1, err)
			continue
		}
		want := fmt.Sprintf("%s: string of %d bytes is longer than the bound of %d", tc.where, tc.bound+1, tc.bound)
		if strings.HasSuffix(tc.where, "key #") {
			if !strings.Contains(err.Error(), tc.where) {
				t.Errorf("%s: error %q does not say %q", tc.name, err, tc.where)
			}
			want = fmt.Sprintf("string of %d bytes is longer than the bound of %d", tc.bound+1, tc.bound)
		}
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %q does not say %q", tc.name, err, want)
		}
	}
	// A 900 KB run id, as in the report, is refused without its text in the error.
	err := DecodeBatch(rawBatch(with(base, "run_id", strings.Repeat("r", 900_000))...), &Batch{})
	if !errors.Is(err, ErrMalformed) || len(err.Error()) > 200 {
		t.Fatalf("900 KB run id: %d-byte error %.200q", len(err.Error()), err)
	}
}

func TestMalformed(t *testing.T) {
	base := validPairs()
	huge := raw{0xdd, 0xff, 0xff, 0xff, 0xff, 0x90}
	deep := any(1)
	for range 40 {
		deep = []any{deep}
	}
	cases := []struct {
		name, want string
		data       []byte
	}{
		{"not a map", "batch", mustMarshal([]any{1})},
		{"empty input", "batch", nil},
		{"trailing bytes", "trailing", append(rawBatch(base...), 0xc0)},
		{"non-string key", "top-level key #0", append(appendMapHeader(nil, 1), 1, 1)},
		{"duplicate key", "host", rawBatch(append(base, kv("host", "x"))...)},
		{"missing events", "events", rawBatch(without(base, "events")...)},
		{"missing major", "schema_major", rawBatch(without(base, "schema_major")...)},
		{"major as string", "schema_major", rawBatch(with(base, "schema_major", "1")...)},
		{"host as int", "host", rawBatch(with(base, "host", 5)...)},
		{"host as bin", "host", rawBatch(with(base, "host", []byte("h"))...)},
		{"bad direction", "conn_direction", rawBatch(with(base, "conn_direction", "sideways")...)},
		{"negative seq", "seq", rawBatch(with(base, "seq", -1)...)},
		{"missing prev_seq", "prev_seq", rawBatch(without(base, "prev_seq")...)},
		{"t0 overflow", "t0", rawBatch(with(base, "t0", uint64(math.MaxUint64))...)},
		{"drops not a map", "drops", rawBatch(with(base, "drops", []any{})...)},
		{"drops negative", "drops[\"queue\"]", rawBatch(with(base, "drops", map[string]any{"queue": -2})...)},
		{"events not array", "events", rawBatch(with(base, "events", "x")...)},
		{"short row", "events[0]", rawBatch(with(base, "events", []any{[]any{1, 0, 40000, 443, -5}})...)},
		{"src ref out of range", "events[0][0] (src_ref)", rawBatch(with(base, "events", []any{[]any{2, 0, 1, 2, 3, nil}})...)},
		{"dst ref negative", "events[0][1] (dst_ref)", rawBatch(with(base, "events", []any{[]any{0, -1, 1, 2, 3, nil}})...)},
		{"port too big", "events[0][3] (dst_port)", rawBatch(with(base, "events", []any{[]any{0, 0, 1, 70000, 3, nil}})...)},
		{"dt as float", "events[0][4] (dt_ns)", rawBatch(with(base, "events", []any{[]any{0, 0, 1, 2, 3.5, nil}})...)},
		{"ctx ref out of range", "events[0][5] (ctx_ref)", rawBatch(with(base, "events", []any{[]any{0, 0, 1, 2, 3, 1}})...)},
		{"ctx ref without ctx", "events[0][5] (ctx_ref)", rawBatch(with(without(base, "ctx"), "events", []any{[]any{0, 0, 1, 2, 3, 0}})...)},
		{"second row bad", "events[1]", rawBatch(with(base, "events", []any{[]any{0, 0, 1, 2, 3, nil}, "x"})...)},
		{"bad address", "endpoints[0][0] (address)", rawBatch(with(base, "endpoints", []any{[]any{"10.0.0.300", []any{}}})...)},
		{"endpoint too short", "endpoints[0]", rawBatch(with(base, "endpoints", []any{[]any{"10.0.0.3"}})...)},
		{"name not string", "endpoints[0][1][0] (name)", rawBatch(with(base, "endpoints", []any{[]any{"10.0.0.3", []any{1}}})...)},
		{"pid too big", "ctx[0][\"pid\"]", rawBatch(with(base, "ctx", []any{map[string]any{"pid": uint64(1) << 32}})...)},
		{"ctx not map", "ctx[0]", rawBatch(with(base, "ctx", []any{[]any{}})...)},
		{"huge events length", "events", rawBatch(with(base, "events", huge)...)},
		{"huge endpoints length", "endpoints", rawBatch(with(base, "endpoints", huge)...)},
		{"huge string", "host", rawBatch(with(base, "host", raw{0xdb, 0xff, 0xff, 0xff, 0xff, 'a'})...)},
		{"huge unknown map", "unknown key", rawBatch(append(base, kv("x", raw{0xdf, 0xff, 0xff, 0xff, 0xff}))...)},
		{"deep unknown value", "nested deeper", rawBatch(append(base, kv("x", deep))...)},
		{"reserved byte", "0xc1", rawBatch(append(base, kv("x", raw{0xc1}))...)},
	}
	for _, tc := range cases {
		var b Batch
		err := DecodeBatch(tc.data, &b)
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: got %v, want ErrMalformed", tc.name, err)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %q does not mention %q", tc.name, err, tc.want)
		}
	}
}

func TestTruncationsAndCorruptions(t *testing.T) {
	evs := randEvents(rand.New(rand.NewPCG(3, 4)), 30, Outgoing)
	data := encodeEvents("web-01", "run", Outgoing, 9, Drops{Kernel: 1, Spool: 300}, evs)
	var b Batch
	for i := 0; i < len(data); i++ {
		if err := DecodeBatch(data[:i], &b); !errors.Is(err, ErrMalformed) {
			t.Fatalf("truncated to %d of %d bytes: got %v", i, len(data), err)
		}
	}
	// Flipping single bytes must never panic; whatever decodes is fine.
	r := rand.New(rand.NewPCG(5, 6))
	c := make([]byte, len(data))
	for i := 0; i < 20000; i++ {
		copy(c, data)
		for range 1 + r.IntN(3) {
			c[r.IntN(len(c))] = byte(r.IntN(256))
		}
		_ = DecodeBatch(c, &b)
	}
}

func TestDecodeCapsPreallocation(t *testing.T) {
	// 2^32-1 declared events in a few bytes must fail fast without allocating for them.
	data := rawBatch(with(validPairs(), "events", raw{0xdd, 0xff, 0xff, 0xff, 0xf0, 0x96, 0, 0, 1, 2, 3, 0xc0})...)
	allocs := testing.AllocsPerRun(10, func() { _ = DecodeBatch(data, &Batch{}) })
	if allocs > 50 {
		t.Fatalf("%v allocations", allocs)
	}
}

func TestGenericDecoderSeesPlainTypes(t *testing.T) {
	data := encodeEvents("web-01", "run", Incoming, 1, Drops{Queue: 1}, randEvents(rand.New(rand.NewPCG(9, 9)), 50, Incoming))
	assertPlain(t, data)
}

// assertPlain decodes data with a generic msgpack library and checks it holds only maps with string keys,
// arrays, strings, integers and nil: what any language's decoder turns into native values.
func assertPlain(t *testing.T, data []byte) {
	t.Helper()
	var v any
	if err := msgpack.Unmarshal(data, &v); err != nil {
		t.Fatalf("generic decode: %v", err)
	}
	var walk func(v any, path string)
	walk = func(v any, path string) {
		switch x := v.(type) {
		case map[string]any:
			for k, e := range x {
				walk(e, path+"."+k)
			}
		case []any:
			for i, e := range x {
				walk(e, path+"["+strconv.Itoa(i)+"]")
			}
		case string, nil, int8, int16, int32, int64, uint8, uint16, uint32, uint64:
		default:
			t.Fatalf("%s: generic decoder produced %T", path, v)
		}
	}
	walk(v, "$")
	m, ok := v.(map[string]any)
	if !ok || m["schema_major"] == nil || m["events"] == nil {
		t.Fatalf("top level is %T without schema_major/events", v)
	}
}

func TestAppendJSONValid(t *testing.T) {
	evs := randEvents(rand.New(rand.NewPCG(11, 12)), 200, Incoming)
	evs = append(evs, Event{Direction: Outgoing, Comm: "a\"b\\c\n\t\x01\x7f\xff\u2028é", ContainerID: "</script>",
		Src: netip.MustParseAddr("fe80::1").WithZone("we\"ird"), SrcDNS: []string{}}, Event{})
	for i := range evs {
		e := &evs[i]
		line := e.AppendJSON(nil, "host\"x")
		var m map[string]any
		dec := json.NewDecoder(bytes.NewReader(line))
		dec.UseNumber()
		if err := dec.Decode(&m); err != nil {
			t.Fatalf("invalid JSON %s: %v", line, err)
		}
		keys := []string{"conn_direction", "src", "dst", "src_port", "dst_port", "src_dns", "dst_dns", "timestamp", "host"}
		for _, k := range keys {
			if _, ok := m[k]; !ok {
				t.Fatalf("%s lacks %q", line, k)
			}
		}
		if m["host"] != "host\"x" || m["conn_direction"] != e.Direction.String() || m["timestamp"].(json.Number).String() != strconv.FormatInt(e.Timestamp, 10) {
			t.Fatalf("bad values in %s", line)
		}
		if src, _ := m["src"].(string); src != string(e.Src.AppendTo(nil)) {
			t.Fatalf("src %q, want %q", src, e.Src)
		}
		for _, k := range []string{"src_dns", "dst_dns"} {
			if _, ok := m[k].([]any); !ok {
				t.Fatalf("%s is not an array in %s", k, line)
			}
		}
		if (m["pid"] != nil) != (e.PID != 0) || (m["comm"] != nil) != (e.Comm != "") ||
			(m["cgroup_id"] != nil) != (e.CgroupID != 0) || (m["container_id"] != nil) != (e.ContainerID != "") {
			t.Fatalf("context fields wrong in %s", line)
		}
		if e.Comm != "" && e.Comm == strings.ToValidUTF8(e.Comm, "\ufffd") && m["comm"] != e.Comm {
			t.Fatalf("comm %q, want %q", m["comm"], e.Comm)
		}
		if i == len(evs)-2 {
			var want struct{ Comm, Container_ID, Src string }
			_ = json.Unmarshal(line, &want)
			if want.Comm != "a\"b\\c\n\t\x01\x7f\ufffd\u2028é" || want.Src != "fe80::1%we\"ird" {
				t.Fatalf("escaping: %s -> %+v", line, want)
			}
		}
	}
	// Field order is part of the contract.
	line := string((&Event{Direction: Incoming, Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("::1"),
		SrcPort: 1, DstPort: 2, DstDNS: []string{"a"}, Timestamp: 3, PID: 4}).AppendJSON(nil, "h"))
	want := `{"conn_direction":"incoming","src":"10.0.0.1","dst":"::1","src_port":1,"dst_port":2,"src_dns":[],"dst_dns":["a"],"timestamp":3,"host":"h","pid":4}`
	if line != want {
		t.Fatalf("got  %s\nwant %s", line, want)
	}
}

func TestDirection(t *testing.T) {
	for _, d := range []Direction{Outgoing, Incoming} {
		p, err := ParseDirection(d.String())
		if err != nil || p != d {
			t.Fatalf("%v: %v %v", d, p, err)
		}
	}
	if Direction(0).String() != "unknown" || Direction(3).String() != "unknown" {
		t.Fatal("invalid directions must print unknown")
	}
	for _, s := range []string{"", "unknown", "Outgoing", "in"} {
		if _, err := ParseDirection(s); err == nil {
			t.Fatalf("%q parsed", s)
		}
	}
	defer func() {
		if recover() == nil {
			t.Fatal("NewBatchEncoder accepted direction 0")
		}
	}()
	NewBatchEncoder("h", "r", 0)
}
