package dnscache

import (
	"encoding/binary"
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
	"unsafe"
)

// floodMsg is a forged-style answer as measured against the agent: 64 A
// records, each with its own name of 251 characters and its own address.
// Each owner is a 4-character label and a pointer to the 246-character
// question name, so the message (1,416 bytes) fits the kernel's copy whole.
func floodMsg(i int) []byte {
	qname := longName(246, "q")
	b := hdr(respFlags, 1, 64, 0, 0)
	for _, l := range strings.Split(qname, ".") {
		b = append(b, byte(len(l)))
		b = append(b, l...)
	}
	b = append(b, 0, 0, 1, 0, 1)
	for r := range 64 {
		n := i*64 + r
		a := addrN(n).As4()
		label := fmt.Sprintf("%04x", n&0xffff)
		b = append(b, 4)
		b = append(b, label...)
		b = append(b, 0xc0, 12, 0, 1, 0, 1, 0, 0, 0x54, 0x60, 0, 4) // pointer to the question; A IN, TTL 6 h
		b = append(b, a[:]...)
		binary.BigEndian.PutUint16(b[0:], uint16(i)) // a different id per message, as a flood would
	}
	// The label above repeats every 1024 messages: make each message's
	// names distinct by its own question name's first label.
	copy(b[headerLen+1:], fmt.Sprintf("%01x", i>>10&0xf))
	return b
}

// heapAlloc is the live heap after a collection.
func heapAlloc() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// procKiB is a size of this process from /proc/self/status: field VmRSS
// (resident now) or VmHWM (resident at most); 0 where there is none.
func procKiB(field string) int {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			var n int
			fmt.Sscan(v, &n)
			return n
		}
	}
	return 0
}

// heapFactor bounds the live heap the cache may hold, over what it
// accounts: the accounting counts the allocator's size classes and map
// slots at twice their size, so the heap should not exceed it by much;
// 1.5 leaves room for the maps' growth steps.
const heapFactor = 1.5

// A flood of 8,192 forged-style answers (524,288 distinct names of 251
// characters) stays within the byte budget by its own account and by the
// heap the runtime reports; the real name learned before the flood is
// evicted, and that shows in the counters.
func TestFloodBytesBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("floods 8,192 answers")
	}
	const budget = 4 << 20
	c := New(Config{MaxBytes: budget})
	real := addrN(1 << 23)
	c.Add(real, "bank.example", time.Hour, t0)
	before := heapAlloc()
	const msgs = 8192
	for i := range msgs {
		m := floodMsg(i)
		c.AddPayload(ProtoUDP, m, len(m), t0)
		if i%1024 == 0 {
			if b := c.Stats().Bytes; b > budget {
				t.Fatalf("after %d answers: %d bytes accounted > budget %d", i, b, budget)
			}
		}
	}
	after := heapAlloc()
	checkInvariants(t, c)
	st := c.Stats()
	if st.Answers != msgs || outcomes(st) != msgs || st.Records != 64*msgs {
		t.Fatalf("stats %+v, want %d answers, %d records", st, msgs, 64*msgs)
	}
	if st.Bytes > budget || st.BytesEvictions == 0 || st.Evictions != 0 {
		t.Fatalf("stats %+v: want under the %d byte budget, by evictions for bytes", st, budget)
	}
	if c.Lookup(real, t0) != nil {
		t.Fatalf("the real name survived a flood far larger than the budget")
	}
	grown := int64(after) - int64(before)
	t.Logf("%d answers, %d records: %d entries, %d names, %d bytes accounted (budget %d), heap grew %d bytes (%.2f x accounted), %d evictions for bytes",
		msgs, st.Records, st.Entries, st.Names, st.Bytes, budget, grown, float64(grown)/float64(st.Bytes), st.BytesEvictions)
	if float64(grown) > heapFactor*float64(budget) {
		t.Fatalf("heap grew %d bytes, more than %.1f x the %d byte budget", grown, heapFactor, budget)
	}
	runtime.KeepAlive(c)
}

// One name shared by 1,000 addresses is stored and accounted once.
func TestInterning(t *testing.T) {
	long, short := longName(250, "shared"), "s.example"
	cost := func(nm func(i int) string) (int64, *Cache) {
		c := New(Config{})
		for i := range 1000 {
			c.Add(addrN(i), nm(i), time.Hour, t0)
		}
		checkInvariants(t, c)
		return c.Stats().Bytes, c
	}
	// strings.Clone: every Add gets its own copy, as from a parse.
	longBytes, c := cost(func(int) string { return strings.Clone(long) })
	shortBytes, _ := cost(func(int) string { return strings.Clone(short) })
	if d := longBytes - shortBytes; d != nameCost(long)-nameCost(short) {
		t.Fatalf("1000 addresses of a 250-char name cost %d bytes more than of a 9-char one, want %d (the name once)", d, nameCost(long)-nameCost(short))
	}
	if st := c.Stats(); st.Names != 1 || st.Entries != 1000 {
		t.Fatalf("stats %+v, want 1 name, 1000 entries", st)
	}
	p := unsafe.StringData(c.Lookup(addrN(0), t0)[0])
	for i := range 1000 {
		if q := unsafe.StringData(c.Lookup(addrN(i), t0)[0]); q != p {
			t.Fatalf("address %d holds its own copy of the name", i)
		}
	}
	distinct, _ := cost(func(i int) string { return fmt.Sprintf("%s%04d", long[:246], i) })
	if distinct < longBytes+999*sizeClass(250) {
		t.Fatalf("1000 distinct names cost %d bytes, one shared %d: distinct names are not all counted", distinct, longBytes)
	}
	// Releasing the last holder frees the name.
	c2 := New(Config{MaxEntries: 1})
	c2.Add(addrA, long, time.Hour, t0)
	c2.Add(addrB, short, time.Hour, t0) // evicts A
	if st := c2.Stats(); st.Names != 1 {
		t.Fatalf("stats %+v: the evicted address's name is still held", st)
	}
	checkInvariants(t, c2)
}

// A budget too small for any entry holds no entry, and is never exceeded.
func TestTinyBudget(t *testing.T) {
	c := New(Config{MaxBytes: 100})
	c.Add(addrA, "a.example", time.Hour, t0)
	if st := c.Stats(); st.Entries != 0 || st.Bytes != 0 || st.BytesEvictions != 1 {
		t.Fatalf("stats %+v", st)
	}
	checkInvariants(t, c)
}

// The budget evicts least recently used first: a name looked up survives a
// flood that pushes out the ones not used.
func TestBytesLRU(t *testing.T) {
	c := New(Config{MaxBytes: 64 << 10})
	c.Add(addrA, "kept.example", time.Hour, t0)
	c.Add(addrB, "lost.example", time.Hour, t0)
	for i := range 2000 {
		c.Add(addrN(i), longName(200, fmt.Sprintf("f%d", i)), time.Hour, t0)
		c.Lookup(addrA, t0)
	}
	wantNames(t, c, addrA, t0, "kept.example")
	wantNames(t, c, addrB, t0)
	checkInvariants(t, c)
}
