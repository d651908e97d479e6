package flowstat

import (
	"strconv"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat/store"
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
