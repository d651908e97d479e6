package flowstat

import (
	"errors"
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

// An end batch on its end subject is skipped and counted: never dead-lettered
// as an unknown major, never read as begins. A begin batch after it counts.
func TestEndBatchesSkipped(t *testing.T) {
	a := newAggregator(time.Minute, "flows", 0)
	enc := schema.NewEndBatchEncoder("web-01", "run1", schema.Outgoing)
	enc.AddEnd(&schema.EndEvent{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.2"),
		SrcPort: 40000, DstPort: 443, BeginNs: 1e18, EndNs: 1e18 + 5e6, SrcBytes: 10, DstBytes: 20, Reason: schema.EndFIN})
	end := enc.Finish(nil, 1, schema.Drops{})
	now := time.Unix(1e9, 0)
	if err := a.add(end, schema.EndSubject("flows", "web-01", schema.Outgoing), 1, now); err != nil {
		t.Fatalf("end batch: %v", err)
	}
	if a.ignoredEnds != 1 || a.d.Messages != 0 {
		t.Fatalf("after an end batch: ignored %d, messages %d; want 1, 0", a.ignoredEnds, a.d.Messages)
	}
	// The same bytes on a begin subject are refused as major 2 (dead-lettered by the caller).
	if err := a.add(end, schema.Subject("flows", "web-01", schema.Outgoing), 2, now); !errors.Is(err, schema.ErrUnsupportedMajor) {
		t.Fatalf("end batch on a begin subject: %v, want ErrUnsupportedMajor", err)
	}
	benc := schema.NewBatchEncoder("web-01", "run1", schema.Outgoing)
	benc.Add(&schema.Event{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.2"), SrcPort: 40001, DstPort: 443, Timestamp: 1e18})
	if err := a.add(benc.Finish(nil, 3, schema.Drops{}), schema.Subject("flows", "web-01", schema.Outgoing), 3, now); err != nil {
		t.Fatalf("begin batch: %v", err)
	}
	if a.d.Messages != 1 {
		t.Fatalf("begin batch not counted: messages %d", a.d.Messages)
	}
}
