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
	var perEntry, accounted float64
	for b.Loop() {
		b.StopTimer()
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		b.StartTimer()

		c := New(Config{MaxEntries: n, MaxBytes: 1 << 30})
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
		accounted = float64(c.Stats().Bytes) / n
		b.StartTimer()
	}
	b.ReportMetric(perEntry, "bytes/entry")
	b.ReportMetric(accounted, "accounted-bytes/entry")
}

// BenchmarkFlood feeds 8,192 forged-style answers (64 A records of 251-
// character names each, see floodMsg) through a cache at the agent's
// defaults, one at a time as the kernel hands them over, and reports the
// live heap the cache holds after it, what the cache accounts, and the
// resident set of the whole test process.
func BenchmarkFlood(b *testing.B) {
	const msgs = 8192
	var heap, accounted float64
	rssBefore := procKiB("VmRSS")
	for b.Loop() {
		b.StopTimer()
		before := heapAlloc()
		b.StartTimer()
		c := New(Config{})
		for i := range msgs {
			m := floodMsg(i)
			c.AddPayload(ProtoUDP, m, len(m), t0)
		}
		b.StopTimer()
		heap = float64(int64(heapAlloc())-int64(before)) / (1 << 20)
		accounted = float64(c.Stats().Bytes) / (1 << 20)
		runtime.KeepAlive(c)
		b.StartTimer()
	}
	b.ReportMetric(float64(msgs*b.N)/b.Elapsed().Seconds(), "answers/s")
	b.ReportMetric(heap, "heap-MiB")
	b.ReportMetric(accounted, "accounted-MiB")
	b.ReportMetric(float64(rssBefore)/1024, "rss-before-MiB")
	b.ReportMetric(float64(procKiB("VmRSS"))/1024, "rss-MiB")
	b.ReportMetric(float64(procKiB("VmHWM"))/1024, "rss-peak-MiB")
}
