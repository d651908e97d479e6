package dnscache

import (
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// t0 is an arbitrary but realistic unix-ns clock origin.
const t0 = int64(1_700_000_000) * int64(time.Second)

func sec(n int64) int64 { return n * int64(time.Second) }

var (
	addrA = netip.MustParseAddr("192.0.2.1")
	addrB = netip.MustParseAddr("192.0.2.2")
	addrC = netip.MustParseAddr("192.0.2.3")
	addrD = netip.MustParseAddr("192.0.2.4")
	addr6 = netip.MustParseAddr("2001:db8::1")
)

// addrN returns a distinct IPv4 address for i < 2^24.
func addrN(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
}

func wantNames(t *testing.T, c *Cache, a netip.Addr, now int64, want ...string) {
	t.Helper()
	got := c.Lookup(a, now)
	if !sameSet(got, want) {
		t.Fatalf("Lookup(%v, t0%+ds) = %q, want %q", a, (now-t0)/int64(time.Second), got, want)
	}
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

// checkInvariants verifies the internal structure: map and LRU list agree,
// views mirror names, and the bounds hold.
func checkInvariants(t testing.TB, c *Cache) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) > c.cfg.MaxEntries {
		t.Fatalf("%d entries > MaxEntries %d", len(c.m), c.cfg.MaxEntries)
	}
	n := 0
	var prev *entry
	for e := c.head; e != nil; e = e.next {
		n++
		if n > len(c.m) {
			t.Fatalf("LRU list longer than map (%d) or cyclic", len(c.m))
		}
		if e.prev != prev {
			t.Fatalf("LRU list: broken prev link at %v", e.addr)
		}
		if c.m[e.addr] != e {
			t.Fatalf("LRU list entry %v not in map", e.addr)
		}
		if len(e.names) == 0 || len(e.names) > c.cfg.MaxNamesPerAddr {
			t.Fatalf("%v holds %d names (max %d)", e.addr, len(e.names), c.cfg.MaxNamesPerAddr)
		}
		if len(e.view) != len(e.names) {
			t.Fatalf("%v: view %q does not mirror names %v", e.addr, e.view, e.names)
		}
		for i := range e.names {
			if e.view[i] != e.names[i].name {
				t.Fatalf("%v: view %q does not mirror names %v", e.addr, e.view, e.names)
			}
		}
		prev = e
	}
	if c.tail != prev {
		t.Fatalf("LRU tail is not the last element")
	}
	if n != len(c.m) {
		t.Fatalf("LRU list has %d elements, map %d", n, len(c.m))
	}
	// The byte account is the sum of what is held, and within the budget;
	// every interned name is held as often as its count says.
	refs := map[string]int{}
	var bytes int64
	for _, e := range c.m {
		bytes += e.cost
		for _, nm := range e.names {
			refs[nm.name]++
		}
	}
	if len(refs) != len(c.names) {
		t.Fatalf("%d distinct names held, %d interned", len(refs), len(c.names))
	}
	for s, in := range c.names {
		if in.refs != refs[s] || in.s != s {
			t.Fatalf("interned %q: refs %d, held %d times", s, in.refs, refs[s])
		}
		bytes += nameCost(s)
	}
	if bytes != c.bytes {
		t.Fatalf("accounted %d bytes, entries and names sum to %d", c.bytes, bytes)
	}
	if c.bytes > c.cfg.MaxBytes {
		t.Fatalf("accounted %d bytes > MaxBytes %d", c.bytes, c.cfg.MaxBytes)
	}
}

func TestConfigDefaults(t *testing.T) {
	c := New(Config{})
	want := Config{MaxEntries: DefaultMaxEntries, MaxBytes: DefaultMaxBytes, MaxNamesPerAddr: DefaultMaxNamesPerAddr, MinTTL: DefaultMinTTL, MaxTTL: DefaultMaxTTL}
	if c.cfg != want {
		t.Fatalf("defaults: %+v, want %+v", c.cfg, want)
	}
	c = New(Config{MinTTL: time.Hour, MaxTTL: time.Minute})
	if c.cfg.MaxTTL != time.Hour {
		t.Fatalf("MaxTTL < MinTTL not raised: %+v", c.cfg)
	}
}

func TestTTLExpiry(t *testing.T) {
	c := New(Config{MinTTL: 10 * time.Second, MaxTTL: time.Hour})
	c.Add(addrA, "short.example", 30*time.Second, t0)
	c.Add(addrA, "long.example", 90*time.Second, t0)

	wantNames(t, c, addrA, t0, "short.example", "long.example")
	wantNames(t, c, addrA, t0+sec(30)-1, "short.example", "long.example")
	// Exactly when the TTL has passed the name is gone.
	wantNames(t, c, addrA, t0+sec(30), "long.example")
	wantNames(t, c, addrA, t0+sec(90)-1, "long.example")
	if got := c.Lookup(addrA, t0+sec(90)); got != nil {
		t.Fatalf("after all TTLs: %q, want nil", got)
	}
	if c.Len() != 0 {
		t.Fatalf("expired entry not removed: Len %d", c.Len())
	}
	if st := c.Stats(); st.Expired != 2 {
		t.Fatalf("Expired = %d, want 2", st.Expired)
	}
	checkInvariants(t, c)
}

func TestTTLRefresh(t *testing.T) {
	c := New(Config{MinTTL: time.Second, MaxTTL: time.Hour})
	c.Add(addrA, "a.example", 60*time.Second, t0)
	// A later answer extends the name's life.
	c.Add(addrA, "a.example", 60*time.Second, t0+sec(50))
	wantNames(t, c, addrA, t0+sec(100), "a.example")
	// A shorter TTL learned later never shortens it.
	c.Add(addrA, "a.example", 1*time.Second, t0+sec(100))
	wantNames(t, c, addrA, t0+sec(109), "a.example")
	if got := c.Lookup(addrA, t0+sec(110)); got != nil {
		t.Fatalf("after refreshed TTL: %q, want nil", got)
	}
}

func TestTTLClamp(t *testing.T) {
	c := New(Config{MinTTL: 60 * time.Second, MaxTTL: 10 * time.Minute})
	c.Add(addrA, "zero.example", 0, t0)
	c.Add(addrB, "one.example", time.Second, t0)
	c.Add(addrC, "day.example", 24*time.Hour, t0)
	c.Add(addrD, "neg.example", -5*time.Second, t0)

	// Floor: 0 s, 1 s and negative TTLs live MinTTL.
	for _, a := range []netip.Addr{addrA, addrB, addrD} {
		if got := c.Lookup(a, t0+sec(60)-1); len(got) != 1 {
			t.Fatalf("%v before MinTTL: %q", a, got)
		}
		if got := c.Lookup(a, t0+sec(60)); got != nil {
			t.Fatalf("%v at MinTTL: %q, want nil", a, got)
		}
	}
	// Ceiling: a day-long TTL lives MaxTTL.
	wantNames(t, c, addrC, t0+sec(600)-1, "day.example")
	if got := c.Lookup(addrC, t0+sec(600)); got != nil {
		t.Fatalf("at MaxTTL: %q, want nil", got)
	}
}

func TestMappedAddresses(t *testing.T) {
	c := New(Config{})
	mapped := netip.MustParseAddr("::ffff:192.0.2.1")
	c.Add(mapped, "m.example", time.Minute, t0)
	wantNames(t, c, addrA, t0, "m.example")
	wantNames(t, c, mapped, t0, "m.example")
	if c.Len() != 1 {
		t.Fatalf("mapped and plain address are two entries: Len %d", c.Len())
	}
}

// A link-local address from a packet carries its zone; the answer that
// named it did not. The names are found either way.
func TestZonedAddresses(t *testing.T) {
	c := New(Config{})
	c.Add(netip.MustParseAddr("fe80::1"), "router.example", time.Minute, t0)
	wantNames(t, c, netip.MustParseAddr("fe80::1%eth0"), t0, "router.example")
	wantNames(t, c, netip.MustParseAddr("fe80::1"), t0, "router.example")
}

func TestLRUBound(t *testing.T) {
	c := New(Config{MaxEntries: 3, MinTTL: time.Minute, MaxTTL: time.Hour})
	c.Add(addrA, "a", time.Minute, t0)
	c.Add(addrB, "b", time.Minute, t0)
	c.Add(addrC, "c", time.Minute, t0)
	// A is the oldest, but a lookup makes it the most recently used.
	wantNames(t, c, addrA, t0+1, "a")
	c.Add(addrD, "d", time.Minute, t0+2)
	if c.Len() != 3 {
		t.Fatalf("Len %d, want 3", c.Len())
	}
	if got := c.Lookup(addrB, t0+3); got != nil {
		t.Fatalf("B should have been evicted (least recently used), got %q", got)
	}
	wantNames(t, c, addrA, t0+3, "a")
	wantNames(t, c, addrC, t0+3, "c")
	wantNames(t, c, addrD, t0+3, "d")

	// Order of use now: D, C, A, most recent first (the lookups above). An
	// Add to an existing address is a use too.
	c.Add(addrC, "c2", time.Minute, t0+4) // order now C, D, A
	c.Add(addrB, "b", time.Minute, t0+5)  // evicts A
	if got := c.Lookup(addrA, t0+6); got != nil {
		t.Fatalf("A should have been evicted, got %q", got)
	}
	wantNames(t, c, addrC, t0+6, "c", "c2")
	wantNames(t, c, addrD, t0+6, "d")
	if st := c.Stats(); st.Evictions != 2 {
		t.Fatalf("Evictions = %d, want 2", st.Evictions)
	}
	checkInvariants(t, c)
}

func TestLRUMany(t *testing.T) {
	const max = 100
	c := New(Config{MaxEntries: max})
	for i := range 1000 {
		c.Add(addrN(i), fmt.Sprintf("h%d.example", i), time.Minute, t0)
		if i%7 == 0 {
			// keep address 0 hot
			c.Lookup(addrN(0), t0)
		}
	}
	checkInvariants(t, c)
	if c.Len() != max {
		t.Fatalf("Len %d, want %d", c.Len(), max)
	}
	wantNames(t, c, addrN(0), t0, "h0.example")
	for i := 901; i < 1000; i++ {
		wantNames(t, c, addrN(i), t0, fmt.Sprintf("h%d.example", i))
	}
	if st := c.Stats(); st.Evictions != 1000-max {
		t.Fatalf("Evictions = %d, want %d", st.Evictions, 1000-max)
	}
}

func TestNamesPerAddrBound(t *testing.T) {
	const max = 8
	c := New(Config{MaxNamesPerAddr: max, MinTTL: time.Second, MaxTTL: time.Hour})
	cdn := netip.MustParseAddr("93.184.215.14")
	// 20 names, each expiring later than the one before.
	for i := range 20 {
		c.Add(cdn, fmt.Sprintf("site%02d.example", i), time.Duration(100+i)*time.Second, t0)
	}
	var want []string
	for i := 20 - max; i < 20; i++ {
		want = append(want, fmt.Sprintf("site%02d.example", i))
	}
	wantNames(t, c, cdn, t0, want...)
	checkInvariants(t, c)
	if st := c.Stats(); st.Displaced != 20-max || st.Names != max {
		t.Fatalf("stats %+v, want %d names displaced, %d held", st, 20-max, max)
	}

	// Names learned at different times: the soonest-expiring goes.
	c = New(Config{MaxNamesPerAddr: 3, MinTTL: time.Second, MaxTTL: time.Hour})
	c.Add(cdn, "long", 1000*time.Second, t0)
	c.Add(cdn, "short", 10*time.Second, t0)
	c.Add(cdn, "mid", 500*time.Second, t0)
	c.Add(cdn, "new", 300*time.Second, t0+sec(1))
	wantNames(t, c, cdn, t0+sec(2), "long", "mid", "new")

	// The name just learned is always kept, even if it expires first: the
	// connection that follows the answer must carry it.
	c.Add(cdn, "newest", 2*time.Second, t0+sec(3))
	wantNames(t, c, cdn, t0+sec(3), "long", "mid", "newest")

	// Re-adding a held name does not evict anything.
	c.Add(cdn, "mid", 500*time.Second, t0+sec(4))
	wantNames(t, c, cdn, t0+sec(4), "long", "mid", "newest")
	checkInvariants(t, c)
	if st := c.Stats(); st.Displaced != 2 || st.Names != 3 {
		t.Fatalf("stats %+v, want 2 names displaced (short, new), 3 held", st)
	}
}

func TestViewImmutable(t *testing.T) {
	c := New(Config{MaxEntries: 2, MaxNamesPerAddr: 2, MinTTL: time.Second, MaxTTL: time.Hour})
	c.Add(addrA, "one", 10*time.Second, t0)
	c.Add(addrA, "two", 20*time.Second, t0)
	v := c.Lookup(addrA, t0)
	snap := slices.Clone(v)

	check := func(step string) {
		t.Helper()
		if !slices.Equal(v, snap) {
			t.Fatalf("after %s: view changed from %q to %q", step, snap, v)
		}
	}
	c.Add(addrA, "three", 30*time.Second, t0) // replaces "one"
	check("Add over the name bound")
	c.Add(addrA, "two", 40*time.Second, t0) // refresh
	check("refresh")
	v2 := c.Lookup(addrA, t0+sec(31)) // "three" expired
	check("expiry")
	snap2 := slices.Clone(v2)
	c.Add(addrB, "b", time.Minute, t0+sec(31))
	c.Add(addrC, "c", time.Minute, t0+sec(31)) // evicts A
	check("eviction")
	if !slices.Equal(v2, snap2) {
		t.Fatalf("second view changed from %q to %q", snap2, v2)
	}
	c.Add(addrA, "again", time.Minute, t0+sec(32))
	check("re-add after eviction")
}

// TestViewImmutableConcurrent lets the race detector see any write to a view
// that a reader holds.
func TestViewImmutableConcurrent(t *testing.T) {
	c := New(Config{MaxEntries: 4, MaxNamesPerAddr: 3, MinTTL: time.Second, MaxTTL: 3 * time.Second})
	var writers, readers sync.WaitGroup
	stop := make(chan struct{})
	for g := range 4 {
		writers.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				now := t0 + int64(i)*int64(100*time.Millisecond)
				c.Add(addrN(i%6), fmt.Sprintf("g%d-%d", g, i%5), time.Second, now)
			}
		})
	}
	for range 4 {
		readers.Go(func() {
			for i := range 20000 {
				v := c.Lookup(addrN(i%6), t0+int64(i)*int64(100*time.Millisecond))
				snap := slices.Clone(v)
				for range 3 {
					if !slices.Equal(v, snap) {
						t.Errorf("view mutated: %q -> %q", snap, v)
						return
					}
				}
			}
		})
	}
	readers.Wait()
	close(stop)
	writers.Wait()
	checkInvariants(t, c)
}

func TestConcurrent(t *testing.T) {
	c := New(Config{MaxEntries: 500, MaxNamesPerAddr: 4, MinTTL: time.Second, MaxTTL: time.Minute})
	msgs := [][]byte{
		buildMsg(t, respHeader(), "www.example.com.", dnsmessage.TypeA,
			cnameRR("www.example.com.", "edge.cdn.example.net.", 300),
			aRR("edge.cdn.example.net.", 60, "93.184.215.14")),
		buildMsg(t, respHeader(), "v6.example.org.", dnsmessage.TypeAAAA,
			aaaaRR("v6.example.org.", 120, "2001:db8::53")),
	}
	lookups := []netip.Addr{netip.MustParseAddr("93.184.215.14"), netip.MustParseAddr("2001:db8::53"), addrA}
	const G, N = 16, 2000
	var wg sync.WaitGroup
	for g := range G {
		wg.Go(func() {
			for i := range N {
				now := t0 + int64(i)*int64(10*time.Millisecond)
				switch (g + i) % 5 {
				case 0:
					c.Add(addrN(g*N+i), fmt.Sprintf("g%d.i%d.example", g, i), time.Duration(i%90)*time.Second, now)
				case 1:
					if err := c.AddMessage(msgs[i%len(msgs)], now); err != nil {
						t.Errorf("AddMessage: %v", err)
						return
					}
				case 2:
					c.AddPayload(ProtoTCP, frame(msgs...), 0, now)
				case 3:
					for _, n := range c.Lookup(lookups[i%len(lookups)], now) {
						if n == "" {
							t.Errorf("empty name")
						}
					}
				case 4:
					c.Lookup(addrN((g*N+i)/2), now)
					_ = c.Stats()
				}
			}
		})
	}
	wg.Wait()
	checkInvariants(t, c)
	st := c.Stats()
	if st.Entries > 500 || st.Hits+st.Misses == 0 || st.Answers == 0 {
		t.Fatalf("implausible stats %+v", st)
	}
}

func TestLookupAllocs(t *testing.T) {
	c := New(Config{})
	for i := range 1000 {
		c.Add(addrN(i), fmt.Sprintf("h%d.example", i), time.Hour, t0)
	}
	present, absent := addrN(500), netip.MustParseAddr("198.51.100.7")
	mapped := netip.AddrFrom16(present.As16())
	if got := c.Lookup(present, t0); len(got) != 1 {
		t.Fatalf("present address: %q", got)
	}
	for _, tc := range []struct {
		name string
		addr netip.Addr
	}{{"present", present}, {"absent", absent}, {"mapped", mapped}, {"v6 absent", addr6}} {
		if n := testing.AllocsPerRun(1000, func() { c.Lookup(tc.addr, t0+sec(1)) }); n != 0 {
			t.Errorf("Lookup(%s) allocates %v times", tc.name, n)
		}
	}
}

func TestStats(t *testing.T) {
	c := New(Config{MaxEntries: 2, MinTTL: 10 * time.Second, MaxTTL: time.Hour})
	c.Add(addrA, "a1", 10*time.Second, t0)
	c.Add(addrA, "a2", 20*time.Second, t0)
	c.Add(addrB, "b", 10*time.Second, t0)
	c.Lookup(addrA, t0)         // hit
	c.Lookup(addrB, t0)         // hit
	c.Lookup(addrC, t0)         // miss
	c.Lookup(addrA, t0+sec(10)) // a1 expires: hit (a2)
	c.Lookup(addrB, t0+sec(10)) // b expires: miss, entry removed
	c.Add(addrC, "c", 0, t0+sec(10))
	c.Add(addrD, "d", 0, t0+sec(10)) // evicts A (B already gone)
	c.Lookup(addrA, t0+sec(11))      // miss
	st := c.Stats()
	want := Stats{Entries: 2, Bytes: st.Bytes, Names: 2, Hits: 3, Misses: 3, Evictions: 1, TTLEvictions: 1, Expired: 2}
	if st != want || st.Bytes <= 0 {
		t.Fatalf("Stats = %+v\nwant    %+v", st, want)
	}
}
