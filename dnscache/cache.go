// Package dnscache maps IP addresses to the DNS names that resolved to them,
// learned from the DNS answers the host receives. It is how flow events get
// src_dns and dst_dns.
//
// The cache is keyed by address and bounded three ways: in entries and in
// bytes (least recently used goes first), and in names per address. Every
// name expires with its TTL clamped to [MinTTL, MaxTTL]. Names are interned:
// one name shared by many addresses is stored, and counted, once. Lookups do
// not allocate: they return an immutable slice that is replaced, never
// changed, when the names change.
package dnscache

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
)

// Config bounds the cache. Zero values take the defaults.
type Config struct {
	MaxEntries      int           // addresses kept
	MaxBytes        int64         // memory the cache may hold, as Stats.Bytes accounts it
	MaxNamesPerAddr int           // names kept per address (a CDN address serves many)
	MinTTL          time.Duration // floor: clients often connect after a 0 or 1 s TTL ran out
	MaxTTL          time.Duration // ceiling: addresses get reused
}

// Defaults for Config. DefaultMaxBytes holds some 20,000 addresses of one or
// two names of 20 characters (more where addresses share names), and keeps a
// flood of long names from growing the agent's resident set by more than
// about 22 MiB (BenchmarkFlood), inside the 64 MiB it should run in.
const (
	DefaultMaxEntries      = 65536
	DefaultMaxBytes        = 8 << 20
	DefaultMaxNamesPerAddr = 8
	DefaultMinTTL          = 60 * time.Second
	DefaultMaxTTL          = 6 * time.Hour
)

func (c *Config) fill() {
	if c.MaxEntries <= 0 {
		c.MaxEntries = DefaultMaxEntries
	}
	if c.MaxBytes <= 0 {
		c.MaxBytes = DefaultMaxBytes
	}
	if c.MaxNamesPerAddr <= 0 {
		c.MaxNamesPerAddr = DefaultMaxNamesPerAddr
	}
	if c.MinTTL <= 0 {
		c.MinTTL = DefaultMinTTL
	}
	if c.MaxTTL <= 0 {
		c.MaxTTL = DefaultMaxTTL
	}
	if c.MaxTTL < c.MinTTL {
		c.MaxTTL = c.MinTTL
	}
}

// Stats are the cache's counters since it was made. Every message given to
// AddMessage or found in an AddPayload lands in exactly one of Answers,
// Partial, Truncated, Malformed and Ignored.
type Stats struct {
	Entries int   // addresses held now
	Bytes   int64 // memory held now, as accounted (see Config.MaxBytes)
	Names   int   // distinct names held now

	Hits           uint64 // lookups that found names
	Misses         uint64 // lookups that found none
	Evictions      uint64 // addresses pushed out by the entry bound (MaxEntries)
	BytesEvictions uint64 // addresses pushed out by the byte bound (MaxBytes)
	TTLEvictions   uint64 // addresses removed because all their names expired
	Expired        uint64 // names dropped when their TTL ran out
	Displaced      uint64 // names pushed out of an address by MaxNamesPerAddr

	Answers   uint64 // answers whose every answer record was read: all addresses learned
	Partial   uint64 // answers cut or broken after some addresses, which were learned
	Truncated uint64 // answers cut (in the kernel or at a TCP segment's end) before any address
	Malformed uint64 // payloads that were not a parsable DNS message, nothing learned
	Ignored   uint64 // well-formed messages with nothing to learn (queries, errors, no A/AAAA)

	Records          uint64 // A/AAAA records learned
	DroppedCut       uint64 // answer records not read: they lay past a cut
	DroppedMalformed uint64 // answer records not read: unparsable, or after one that was
}

type name struct {
	name    string // interned: shared with every other entry holding it
	expires int64  // unix ns
}

type entry struct {
	addr       netip.Addr
	names      []name
	view       []string // immutable: what Lookup hands out
	viewExpiry int64    // earliest expiry among names: the view must be rebuilt then
	cost       int64    // bytes accounted for this entry (its names' strings apart)
	prev, next *entry   // LRU list, most recent at head
}

// interned is one distinct name and how many entries hold it.
type interned struct {
	s    string
	refs int
}

// Bytes accounted, on a 64-bit platform. The map costs are a slot (key,
// value, control byte) times two: Go maps double when they grow, so a map
// is between half and seven eighths full. BenchmarkMemoryPerEntry and
// TestFloodHeapBounded check the sum against the heap the runtime reports.
const (
	entrySize    = int64(unsafe.Sizeof(entry{}))
	nameSize     = int64(unsafe.Sizeof(name{}))
	viewSize     = int64(unsafe.Sizeof(""))
	entryMapCost = 2 * (int64(unsafe.Sizeof(netip.Addr{})) + 8 + 1)
	nameMapCost  = 2*(int64(unsafe.Sizeof(""))+8+1) + int64(unsafe.Sizeof(interned{}))
)

// sizeClass rounds an allocation up as Go's allocator does for small
// sizes (to 8 up to 64 bytes, to 16 up to 256, to 32 above), close enough
// for names, which are at most 253 bytes.
func sizeClass(n int64) int64 {
	switch {
	case n <= 0:
		return 0
	case n <= 64:
		return (n + 7) &^ 7
	case n <= 256:
		return (n + 15) &^ 15
	default:
		return (n + 31) &^ 31
	}
}

// nameCost is what holding string s once costs.
func nameCost(s string) int64 { return sizeClass(int64(len(s))) + nameMapCost }

// Cache is safe for concurrent use.
type Cache struct {
	cfg Config

	mu         sync.Mutex
	m          map[netip.Addr]*entry
	names      map[string]*interned
	head, tail *entry
	bytes      int64

	hits, misses, evictions, byteEvictions, ttlEvictions, expired, displaced atomic.Uint64
	answers, partial, truncated, malformed, ign                              atomic.Uint64
	records, droppedCut, droppedMalformed                                    atomic.Uint64
}

// New returns an empty cache.
func New(cfg Config) *Cache {
	cfg.fill()
	return &Cache{cfg: cfg, m: make(map[netip.Addr]*entry), names: make(map[string]*interned)}
}

// Lookup returns the names that map to addr at time now (unix ns), or nil.
// The slice must not be modified; it stays valid after later updates.
func (c *Cache) Lookup(addr netip.Addr, now int64) []string {
	// Add stores IPv4-mapped addresses unmapped, and DNS answers carry no
	// zone: a link-local address from a packet (fe80::1%eth0) has its names.
	addr = addr.Unmap().WithZone("")
	c.mu.Lock()
	e := c.m[addr]
	if e == nil {
		c.mu.Unlock()
		c.misses.Add(1)
		return nil
	}
	if now >= e.viewExpiry {
		c.expire(e, now)
		if len(e.names) == 0 {
			c.remove(e)
			c.ttlEvictions.Add(1)
			c.mu.Unlock()
			c.misses.Add(1)
			return nil
		}
	}
	c.toFront(e)
	v := e.view
	c.mu.Unlock()
	c.hits.Add(1)
	return v
}

// Add records that name resolved to addr, valid for ttl from now (unix ns).
func (c *Cache) Add(addr netip.Addr, nm string, ttl time.Duration, now int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entry(addr.Unmap(), now)
	c.addName(e, nm, ttl, now)
	c.settle(e)
}

// addNames is Add for several names of one address, under one lock.
func (c *Cache) addNames(addr netip.Addr, names []string, ttls []uint32, now int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entry(addr.Unmap(), now)
	for i, nm := range names {
		c.addName(e, nm, ttlDur(ttls[i]), now)
	}
	c.settle(e)
}

// entry returns addr's entry, made most recent, with its expired names gone;
// a new one if there is none, making room under the entry bound.
func (c *Cache) entry(addr netip.Addr, now int64) *entry {
	e := c.m[addr]
	if e != nil {
		c.toFront(e)
		c.expire(e, now)
		return e
	}
	if len(c.m) >= c.cfg.MaxEntries {
		c.remove(c.tail)
		c.evictions.Add(1)
	}
	e = &entry{addr: addr}
	c.m[addr] = e
	c.pushFront(e)
	return e
}

func (c *Cache) addName(e *entry, nm string, ttl time.Duration, now int64) {
	ttl = min(max(ttl, c.cfg.MinTTL), c.cfg.MaxTTL)
	exp := now + int64(ttl)
	for i := range e.names {
		if e.names[i].name == nm {
			e.names[i].expires = max(e.names[i].expires, exp)
			return
		}
	}
	if len(e.names) >= c.cfg.MaxNamesPerAddr {
		// Make room by dropping the name that expires first.
		oldest := 0
		for i := range e.names {
			if e.names[i].expires < e.names[oldest].expires {
				oldest = i
			}
		}
		c.release(e.names[oldest].name)
		e.names = append(e.names[:oldest], e.names[oldest+1:]...)
		clear(e.names[len(e.names) : len(e.names)+1]) // the copy left past the end
		c.displaced.Add(1)
	}
	e.names = append(e.names, name{c.intern(nm), exp})
}

// settle rebuilds e's view, accounts its cost, and evicts the least recently
// used entries while the byte bound is exceeded: e itself last, so that a
// budget too small for even one entry still holds.
func (c *Cache) settle(e *entry) {
	c.rebuild(e)
	for c.bytes > c.cfg.MaxBytes && c.tail != nil {
		c.remove(c.tail)
		c.byteEvictions.Add(1)
	}
}

// intern returns the cache's copy of s, counting one more holder.
func (c *Cache) intern(s string) string {
	in := c.names[s]
	if in == nil {
		in = &interned{s: s}
		c.names[s] = in
		c.bytes += nameCost(s)
	}
	in.refs++
	return in.s
}

// release drops one holder of the interned s, and s when it was the last.
func (c *Cache) release(s string) {
	in := c.names[s]
	if in.refs--; in.refs == 0 {
		delete(c.names, s)
		c.bytes -= nameCost(s)
	}
}

// expire drops e's names that are no longer valid and rebuilds its view.
func (c *Cache) expire(e *entry, now int64) {
	kept := e.names[:0]
	for _, n := range e.names {
		if n.expires > now {
			kept = append(kept, n)
		} else {
			c.release(n.name)
			c.expired.Add(1)
		}
	}
	clear(e.names[len(kept):])
	e.names = kept
	c.rebuild(e)
}

// rebuild makes a new view, the old one may be held by events in flight,
// and accounts e's new cost.
func (c *Cache) rebuild(e *entry) {
	view := make([]string, len(e.names))
	e.viewExpiry = int64(1<<63 - 1)
	for i, n := range e.names {
		view[i] = n.name
		e.viewExpiry = min(e.viewExpiry, n.expires)
	}
	e.view = view
	cost := sizeClass(entrySize) + entryMapCost + sizeClass(int64(cap(e.names))*nameSize) + sizeClass(int64(len(view))*viewSize)
	c.bytes += cost - e.cost
	e.cost = cost
}

func (c *Cache) pushFront(e *entry) {
	e.prev, e.next = nil, c.head
	if c.head != nil {
		c.head.prev = e
	}
	c.head = e
	if c.tail == nil {
		c.tail = e
	}
}

func (c *Cache) unlink(e *entry) {
	if e.prev != nil {
		e.prev.next = e.next
	} else {
		c.head = e.next
	}
	if e.next != nil {
		e.next.prev = e.prev
	} else {
		c.tail = e.prev
	}
	e.prev, e.next = nil, nil
}

func (c *Cache) toFront(e *entry) {
	if c.head == e {
		return
	}
	c.unlink(e)
	c.pushFront(e)
}

// remove drops e, its names and its cost.
func (c *Cache) remove(e *entry) {
	c.unlink(e)
	delete(c.m, e.addr)
	for _, n := range e.names {
		c.release(n.name)
	}
	c.bytes -= e.cost
	e.names, e.cost = nil, 0
}

// Len is the number of addresses held.
func (c *Cache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}

// Stats returns the counters.
func (c *Cache) Stats() Stats {
	c.mu.Lock()
	entries, bytes, names := len(c.m), c.bytes, len(c.names)
	c.mu.Unlock()
	return Stats{
		Entries:          entries,
		Bytes:            bytes,
		Names:            names,
		Hits:             c.hits.Load(),
		Misses:           c.misses.Load(),
		Evictions:        c.evictions.Load(),
		BytesEvictions:   c.byteEvictions.Load(),
		TTLEvictions:     c.ttlEvictions.Load(),
		Expired:          c.expired.Load(),
		Displaced:        c.displaced.Load(),
		Answers:          c.answers.Load(),
		Partial:          c.partial.Load(),
		Truncated:        c.truncated.Load(),
		Malformed:        c.malformed.Load(),
		Ignored:          c.ign.Load(),
		Records:          c.records.Load(),
		DroppedCut:       c.droppedCut.Load(),
		DroppedMalformed: c.droppedMalformed.Load(),
	}
}
