package dnscache

import (
	"fmt"
	"net/netip"
	"runtime"
	"testing"
	"time"
)

const benchEntries = 10_000

func benchCache(b *testing.B) (*Cache, []netip.Addr) {
	b.Helper()
	c := New(Config{MaxEntries: 2 * benchEntries})
	addrs := make([]netip.Addr, benchEntries)
	for i := range addrs {
		addrs[i] = addrN(i)
		c.Add(addrs[i], fmt.Sprintf("host-%05d.example.com", i), time.Hour, t0)
		if i%3 == 0 {
			c.Add(addrs[i], fmt.Sprintf("alias-%05d.example.net", i), time.Hour, t0)
		}
	}
	return c, addrs
}

func BenchmarkLookupHit(b *testing.B) {
	c, addrs := benchCache(b)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if c.Lookup(addrs[i%benchEntries], t0) == nil {
			b.Fatal("miss")
		}
		i++
	}
}

func BenchmarkLookupMiss(b *testing.B) {
	c, _ := benchCache(b)
	miss := make([]netip.Addr, benchEntries)
	for i := range miss {
		miss[i] = netip.AddrFrom4([4]byte{172, 16, byte(i >> 8), byte(i)})
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if c.Lookup(miss[i%benchEntries], t0) != nil {
			b.Fatal("hit")
		}
		i++
	}
}

func BenchmarkLookupParallel(b *testing.B) {
	c, addrs := benchCache(b)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			c.Lookup(addrs[i%benchEntries], t0)
			i += 7
		}
	})
}

func BenchmarkAddMessage(b *testing.B) {
	msg := cnameChainMsg(b)
	c := New(Config{})
	b.ReportAllocs()
	b.SetBytes(int64(len(msg)))
	for b.Loop() {
		if err := c.AddMessage(msg, t0); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkMemoryPerEntry fills a cache with 100k addresses holding one or
// two names of about 20 characters and reports the live heap per address.
func BenchmarkMemoryPerEntry(b *testing.B) {
	const n = 100_000
	var perEntry float64
	for b.Loop() {
		b.StopTimer()
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		b.StartTimer()

		c := New(Config{MaxEntries: n})
		for i := range n {
			a := addrN(i)
			c.Add(a, fmt.Sprintf("host-%06d.example.com", i), time.Hour, t0) // 22 chars
			if i%2 == 0 {
				c.Add(a, fmt.Sprintf("cdn-%06d.edge.net", i), time.Hour, t0) // 19 chars
			}
		}

		b.StopTimer()
		runtime.GC()
		runtime.ReadMemStats(&after)
		if c.Len() != n {
			b.Fatalf("Len %d", c.Len())
		}
		runtime.KeepAlive(c)
		perEntry = float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / n
		b.StartTimer()
	}
	b.ReportMetric(perEntry, "bytes/entry")
}
