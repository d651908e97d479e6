package schema

import (
	"errors"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
)

func goldenLink() *RunLink {
	return &RunLink{RunID: "9c1e52f07ab3d446", LastSeq: 1841, Batches: 922, Events: 3_775_118,
		LastNs: 1763989998071000000, StartNs: 1763990000142000000, End: RunEndUnknown}
}

// The link goes into the first batch of the encoder only (prev_seq 0), and the size bound holds it.
func TestPrevRunFirstBatchOnly(t *testing.T) {
	enc := NewBatchEncoder("web-01", "r2", Outgoing)
	must(t, enc.SetPrevRun(goldenLink()))
	evs := randEvents(rand.New(rand.NewPCG(7, 8)), 3, Outgoing)
	for seq := uint64(1); seq <= 3; seq++ {
		for i := range evs {
			enc.Add(&evs[i])
		}
		bound := enc.Size()
		data := enc.Finish(nil, seq, Drops{})
		if len(data) > bound {
			t.Fatalf("batch %d: %d bytes, Size said at most %d", seq, len(data), bound)
		}
		var b Batch
		b.PrevRun = &RunLink{RunID: "stale"} // DecodeBatch must clear what into held
		must(t, DecodeBatch(data, &b))
		if seq == 1 {
			if b.PrevRun == nil || *b.PrevRun != *goldenLink() || b.PrevSeq != 0 {
				t.Fatalf("first batch: prev_seq %d, prev_run %+v, want %+v", b.PrevSeq, b.PrevRun, goldenLink())
			}
		} else if b.PrevRun != nil {
			t.Fatalf("batch %d (prev_seq %d) carries prev_run %+v", seq, b.PrevSeq, b.PrevRun)
		}
		if b.Minor != Minor {
			t.Fatalf("minor %d, want %d", b.Minor, Minor)
		}
	}
	// Extremes of every integer field survive.
	ext := &RunLink{RunID: strings.Repeat("r", MaxRunIDLen), LastSeq: math.MaxUint64, Batches: math.MaxUint64,
		Events: math.MaxUint64, LastNs: math.MinInt64, StartNs: math.MaxInt64, End: strings.Repeat("e", MaxRunEndLen)}
	enc = NewBatchEncoder("h", "r", Incoming)
	must(t, enc.SetPrevRun(ext))
	bound := enc.Size()
	data := enc.Finish(nil, 1, Drops{})
	if len(data) > bound {
		t.Fatalf("extreme link: %d bytes, Size said at most %d", len(data), bound)
	}
	var b Batch
	must(t, DecodeBatch(data, &b))
	if b.PrevRun == nil || *b.PrevRun != *ext {
		t.Fatalf("extreme link decoded as %+v", b.PrevRun)
	}
	assertPlain(t, data)
}

func TestPrevRunRefusedByEncoder(t *testing.T) {
	enc := NewBatchEncoder("h", "r", Outgoing)
	for _, l := range []*RunLink{{}, {RunID: strings.Repeat("r", MaxRunIDLen+1)}, {RunID: "x", End: strings.Repeat("e", MaxRunEndLen+1)}} {
		if err := enc.SetPrevRun(l); err == nil {
			t.Errorf("SetPrevRun(%+v) accepted", l)
		}
	}
	var b Batch
	must(t, DecodeBatch(enc.Finish(nil, 1, Drops{}), &b))
	if b.PrevRun != nil {
		t.Fatalf("a refused link was written: %+v", b.PrevRun)
	}
}

func linkPairs() map[string]any {
	return map[string]any{"run_id": "old", "last_seq": 9, "batches": 5, "events": 70, "last_ns": 1000, "start_ns": -3, "end": "stopped"}
}

func withLink(mod func(m map[string]any)) []byte {
	m := linkPairs()
	if mod != nil {
		mod(m)
	}
	return rawBatch(with(with(validPairs(), "prev_seq", 0), "prev_run", m)...)
}

func TestPrevRunDecode(t *testing.T) {
	var b Batch
	// Unknown keys (a later minor) and any order are fine; nil means absent.
	must(t, DecodeBatch(withLink(func(m map[string]any) { m["crash_reason"] = map[string]any{"sig": 9} }), &b))
	want := RunLink{RunID: "old", LastSeq: 9, Batches: 5, Events: 70, LastNs: 1000, StartNs: -3, End: "stopped"}
	if b.PrevRun == nil || *b.PrevRun != want {
		t.Fatalf("got %+v, want %+v", b.PrevRun, want)
	}
	must(t, DecodeBatch(rawBatch(with(with(validPairs(), "prev_seq", 0), "prev_run", nil)...), &b))
	if b.PrevRun != nil {
		t.Fatalf("nil prev_run decoded as %+v", b.PrevRun)
	}

	cases := []struct {
		name, want string
		data       []byte
	}{
		{"not a map", "prev_run", rawBatch(with(with(validPairs(), "prev_seq", 0), "prev_run", []any{1})...)},
		{"on a later batch", "prev_run: on a batch with prev_seq 3", rawBatch(with(validPairs(), "prev_run", linkPairs())...)},
		{"missing key", `prev_run["end"]: missing key`, withLink(func(m map[string]any) { delete(m, "end") })},
		{"empty run id", `prev_run["run_id"]: empty run id`, withLink(func(m map[string]any) { m["run_id"] = "" })},
		{"negative batches", `prev_run["batches"]`, withLink(func(m map[string]any) { m["batches"] = -1 })},
		{"float last_ns", `prev_run["last_ns"]`, withLink(func(m map[string]any) { m["last_ns"] = 1.5 })},
		{"bool end", `prev_run["end"]`, withLink(func(m map[string]any) { m["end"] = true })},
		{"uint64 start_ns", `prev_run["start_ns"]`, withLink(func(m map[string]any) { m["start_ns"] = uint64(math.MaxUint64) })},
		{"run id past its bound", `prev_run["run_id"]: string of 65 bytes is longer than the bound of 64`,
			withLink(func(m map[string]any) { m["run_id"] = strings.Repeat("r", 65) })},
		{"end past its bound", `prev_run["end"]: string of 17 bytes is longer than the bound of 16`,
			withLink(func(m map[string]any) { m["end"] = strings.Repeat("e", 17) })},
		{"key past its bound", "prev_run key #", withLink(func(m map[string]any) { m[strings.Repeat("k", 65)] = 1 })},
	}
	for _, tc := range cases {
		err := DecodeBatch(tc.data, &b)
		if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want ErrMalformed mentioning %q", tc.name, err, tc.want)
		}
	}
	// At the bounds: accepted.
	must(t, DecodeBatch(withLink(func(m map[string]any) {
		m["run_id"], m["end"], m[strings.Repeat("k", 64)] = strings.Repeat("r", 64), strings.Repeat("e", 16), 1
	}), &b))

	// A duplicated key: the generic encoder cannot write one, so splice the map by hand.
	dup := append(mustMarshal(map[string]any{"run_id": "a"}), mustMarshal("run_id")...)
	dup = append(dup, mustMarshal("b")...)
	dup[0] = 0x82
	err := DecodeBatch(rawBatch(with(with(validPairs(), "prev_seq", 0), "prev_run", raw(dup))...), &b)
	if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), `prev_run["run_id"]: duplicate key`) {
		t.Fatalf("duplicated prev_run key: %v", err)
	}
	dupTop := rawBatch(append(with(with(validPairs(), "prev_seq", 0), "prev_run", linkPairs()), kv("prev_run", linkPairs()))...)
	if err := DecodeBatch(dupTop, &b); !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), "prev_run: duplicate key") {
		t.Fatalf("duplicated prev_run: %v", err)
	}
}

// Keys of maps nested in unknown values are bounded too (FORMAT.md rule 4: every map key, at any level).
func TestNestedUnknownKeyBound(t *testing.T) {
	at := func(n int) []byte {
		return rawBatch(append(validPairs(), kv("future", []any{map[string]any{strings.Repeat("k", n): 1}}))...)
	}
	var b Batch
	must(t, DecodeBatch(at(MaxKeyLen), &b))
	err := DecodeBatch(at(MaxKeyLen+1), &b)
	if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), "map key: string of 65 bytes is longer than the bound of 64") {
		t.Fatalf("nested unknown key of 65 bytes: %v", err)
	}
}
