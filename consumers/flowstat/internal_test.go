package flowstat

import (
	"errors"
	"math"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/schema"
)

func TestBucketOf(t *testing.T) {
	a := newAggregator(time.Minute, "", 0)
	for _, c := range []struct{ ns, want int64 }{
		{0, 0}, {59_999_999_999, 0}, {60e9, 60}, {-1, -60}, {-60e9, -60}, {-60e9 - 1, -120}, {1_800_000_030e9, 1_800_000_000},
	} {
		if got := a.bucketOf(c.ns); got != c.want {
			t.Errorf("bucketOf(%d) = %d, want %d", c.ns, got, c.want)
		}
	}
}

func TestCleanText(t *testing.T) {
	for in, want := range map[string]string{"api.example.com": "api.example.com", "é.example": "é.example", "a\x00b": "a\uFFFDb", "\xff\xfe": "\uFFFD", "ok\xffé\x00": "ok\uFFFDé\uFFFD"} {
		if got := cleanText(in); got != want {
			t.Errorf("cleanText(%q) = %q, want %q", in, got, want)
		}
	}
}

// The clock evicts the first chain not used since the hand last passed it, never more than the bound,
// and a chain that keeps being used survives a flood of chains used once.
func TestChainCacheClock(t *testing.T) {
	key := func(i int) store.RunKey { return store.RunKey{Host: "h", RunID: strconv.Itoa(i)} }
	c := newChainCache(3)
	for i := range 3 {
		c.put(key(i), chainEntry{cs: store.ChainState{Last: uint64(i)}})
	}
	c.get(key(0))
	c.put(key(3), chainEntry{}) // 0 is used: 1 goes
	if _, ok := c.get(key(1)); ok || c.len() != 3 || c.evictions != 1 {
		t.Fatalf("chain 1 kept (%v), %d chains, %d evictions", ok, c.len(), c.evictions)
	}
	for i := 4; i < 1000; i++ { // chain 0 used between every two new chains
		c.get(key(0))
		c.put(key(i), chainEntry{})
		if c.len() > 3 {
			t.Fatalf("%d chains, bound 3", c.len())
		}
	}
	if e, ok := c.get(key(0)); !ok || e.cs.Last != 0 {
		t.Errorf("the chain in use was evicted by chains used once")
	}
	c.put(key(0), chainEntry{cs: store.ChainState{Stored: 10}})
	c.dropBefore(5)
	if _, ok := c.get(key(0)); !ok || c.len() != 1 {
		t.Errorf("dropBefore: %d chains left, want chain 0 only", c.len())
	}
	c.put(key(7), chainEntry{})
	if c.len() != 2 {
		t.Errorf("after dropBefore: %d chains", c.len())
	}
}

// An end batch on its end subject is read by the end decoder and counted in the end aggregates,
// never as begins; the same bytes on a begin subject are refused as major 2, and a begin batch after
// it counts as before. Counters near 2^64 and a negative duration are capped, unknown reasons are
// "other".
func TestEndBatchesCounted(t *testing.T) {
	a := newAggregator(time.Minute, "flows", 0)
	enc := schema.NewEndBatchEncoder("web-01", "run1", schema.Outgoing)
	dst := netip.MustParseAddr("10.0.0.2")
	enc.AddEnd(&schema.EndEvent{Src: netip.MustParseAddr("10.0.0.1"), Dst: dst, DstDNS: []string{"db.example", "b.example"},
		SrcPort: 40000, DstPort: 443, BeginNs: 1e18, EndNs: 1e18 + 5e6, SrcBytes: 10, DstBytes: 20, SrcSegs: 1, DstSegs: 2,
		Retrans: 3, SRTTus: 70, Reason: schema.EndFIN})
	enc.AddEnd(&schema.EndEvent{Src: netip.MustParseAddr("10.0.0.1"), Dst: dst, DstDNS: []string{"db.example"},
		SrcPort: 40001, DstPort: 443, BeginNs: 1e18 + 7e6, EndNs: 1e18 + 6e6, SrcBytes: math.MaxUint64, Reason: 9})
	end := enc.Finish(nil, 1, schema.Drops{Kernel: 4})
	now := time.Unix(1e9, 0)
	if err := a.add(end, schema.EndSubject("flows", "web-01", schema.Outgoing), 1, now); err != nil {
		t.Fatalf("end batch: %v", err)
	}
	if a.d.Messages != 1 || a.d.Events != 0 || a.d.EndEvents != 2 || len(a.d.Conns) != 0 {
		t.Fatalf("after an end batch: messages %d, events %d, ends %d, conns %v; want 1, 0, 2, none", a.d.Messages, a.d.Events, a.d.EndEvents, a.d.Conns)
	}
	k := store.ConnKey{Bucket: a.bucketOf(1e18), Host: "web-01", Dir: schema.Outgoing, Peer: dst, Name: "db.example", Port: 443}
	want := store.EndAgg{Ends: 2, SrcBytes: 10 + maxEndCounter, DstBytes: 20, SrcSegs: 1, DstSegs: 2, Retrans: 3, DurationSum: 5e6, DurationMax: 5e6,
		SRTTSum: 70, SRTTCount: 1}
	want.Reasons[store.ReasonFin], want.Reasons[store.ReasonOther] = 1, 1
	if got := a.d.Ends[k]; got == nil || *got != want {
		t.Fatalf("end aggregate %+v, want %+v (all: %v)", got, want, a.d.Ends)
	}
	if ba := a.d.Batches[store.BatchKey{Bucket: a.bucketOf(now.UnixNano()), Host: "web-01", Dir: schema.Outgoing}]; ba == nil ||
		ba.EndBatches != 1 || ba.EndEvents != 2 || ba.EndDrops.Kernel != 4 || ba.Batches != 0 {
		t.Fatalf("batch aggregate %+v", ba)
	}
	if _, ok := a.chains.get(store.RunKey{Host: "web-01", RunID: "run1", Dir: schema.Outgoing, Kind: schema.KindEnd}); !ok {
		t.Fatal("the end chain is not followed")
	}
	// The same bytes on a begin subject are refused as major 2 (dead-lettered by the caller).
	if err := a.add(end, schema.Subject("flows", "web-01", schema.Outgoing), 2, now); !errors.Is(err, schema.ErrUnsupportedMajor) {
		t.Fatalf("end batch on a begin subject: %v, want ErrUnsupportedMajor", err)
	}
	benc := schema.NewBatchEncoder("web-01", "run1", schema.Outgoing)
	benc.Add(&schema.Event{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.2"), SrcPort: 40001, DstPort: 443, Timestamp: 1e18})
	begin := benc.Finish(nil, 3, schema.Drops{})
	// And a begin batch on an end subject.
	if err := a.add(begin, schema.EndSubject("flows", "web-01", schema.Outgoing), 3, now); !errors.Is(err, schema.ErrUnsupportedMajor) {
		t.Fatalf("begin batch on an end subject: %v, want ErrUnsupportedMajor", err)
	}
	if err := a.add(begin, schema.Subject("flows", "web-01", schema.Outgoing), 3, now); err != nil {
		t.Fatalf("begin batch: %v", err)
	}
	if a.d.Messages != 2 || a.d.Events != 1 {
		t.Fatalf("begin batch not counted: messages %d, events %d", a.d.Messages, a.d.Events)
	}
}
