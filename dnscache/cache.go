// Package dnscache maps IP addresses to the DNS names that resolved to them,
// learned from the DNS answers the host receives. It is how flow events get
// src_dns and dst_dns.
//
// The cache is keyed by address, bounded in entries (least recently used
// goes first) and in names per address, and every name expires with its TTL
// clamped to [MinTTL, MaxTTL]. Lookups do not allocate: they return an
// immutable slice that is replaced, never changed, when the names change.
package dnscache

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Config bounds the cache. Zero values take the defaults.
type Config struct {
	MaxEntries      int           // addresses kept
	MaxNamesPerAddr int           // names kept per address (a CDN address serves many)
	MinTTL          time.Duration // floor: clients often connect after a 0 or 1 s TTL ran out
	MaxTTL          time.Duration // ceiling: addresses get reused
}

// Defaults for Config.
const (
	DefaultMaxEntries      = 65536
	DefaultMaxNamesPerAddr = 8
	DefaultMinTTL          = 60 * time.Second
	DefaultMaxTTL          = 6 * time.Hour
)

func (c *Config) fill() {
	if c.MaxEntries <= 0 {
		c.MaxEntries = DefaultMaxEntries
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

// Stats are the cache's counters since it was made.
type Stats struct {
	Entries   int    // addresses held now
	Hits      uint64 // lookups that found names
	Misses    uint64 // lookups that found none
	Evictions uint64 // addresses pushed out by the entry bound
	Expired   uint64 // names dropped when their TTL ran out
	Answers   uint64 // DNS answers parsed
	Records   uint64 // A/AAAA records learned
	Malformed uint64 // payloads that were not a parsable DNS answer
	Truncated uint64 // answers cut in the kernel or split over TCP segments
	Ignored   uint64 // well-formed messages with nothing to learn (queries, errors, no A/AAAA)
}

type name struct {
	name    string
	expires int64 // unix ns
}

type entry struct {
	addr       netip.Addr
	names      []name
	view       []string // immutable: what Lookup hands out
	viewExpiry int64    // earliest expiry among names: the view must be rebuilt then
	prev, next *entry   // LRU list, most recent at head
}

// Cache is safe for concurrent use.
type Cache struct {
	cfg Config

	mu         sync.Mutex
	m          map[netip.Addr]*entry
	head, tail *entry

	hits, misses, evictions, expired            atomic.Uint64
	answers, records, malformed, truncated, ign atomic.Uint64
}

// New returns an empty cache.
func New(cfg Config) *Cache {
	cfg.fill()
	return &Cache{cfg: cfg, m: make(map[netip.Addr]*entry)}
}

// Lookup returns the names that map to addr at time now (unix ns), or nil.
// The slice must not be modified; it stays valid after later updates.
func (c *Cache) Lookup(addr netip.Addr, now int64) []string {
	addr = addr.Unmap() // Add stores IPv4-mapped addresses unmapped
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
	ttl = min(max(ttl, c.cfg.MinTTL), c.cfg.MaxTTL)
	exp := now + int64(ttl)
	addr = addr.Unmap()
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.m[addr]
	if e == nil {
		if len(c.m) >= c.cfg.MaxEntries {
			c.remove(c.tail)
			c.evictions.Add(1)
		}
		e = &entry{addr: addr}
		c.m[addr] = e
		c.pushFront(e)
	} else {
		c.toFront(e)
		c.expire(e, now)
	}
	found := false
	for i := range e.names {
		if e.names[i].name == nm {
			e.names[i].expires = max(e.names[i].expires, exp)
			found = true
			break
		}
	}
	if !found {
		if len(e.names) >= c.cfg.MaxNamesPerAddr {
			// Make room by dropping the name that expires first.
			oldest := 0
			for i := range e.names {
				if e.names[i].expires < e.names[oldest].expires {
					oldest = i
				}
			}
			e.names = append(e.names[:oldest], e.names[oldest+1:]...)
		}
		e.names = append(e.names, name{nm, exp})
	}
	c.rebuild(e)
}

// expire drops e's names that are no longer valid and rebuilds its view.
func (c *Cache) expire(e *entry, now int64) {
	kept := e.names[:0]
	for _, n := range e.names {
		if n.expires > now {
			kept = append(kept, n)
		} else {
			c.expired.Add(1)
		}
	}
	clear(e.names[len(kept):])
	e.names = kept
	c.rebuild(e)
}

// rebuild makes a new view: the old one may be held by events in flight.
func (c *Cache) rebuild(e *entry) {
	view := make([]string, len(e.names))
	e.viewExpiry = int64(1<<63 - 1)
	for i, n := range e.names {
		view[i] = n.name
		e.viewExpiry = min(e.viewExpiry, n.expires)
	}
	e.view = view
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

func (c *Cache) remove(e *entry) {
	c.unlink(e)
	delete(c.m, e.addr)
}

// Len is the number of addresses held.
func (c *Cache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}

// Stats returns the counters.
func (c *Cache) Stats() Stats {
	return Stats{
		Entries:   c.Len(),
		Hits:      c.hits.Load(),
		Misses:    c.misses.Load(),
		Evictions: c.evictions.Load(),
		Expired:   c.expired.Load(),
		Answers:   c.answers.Load(),
		Records:   c.records.Load(),
		Malformed: c.malformed.Load(),
		Truncated: c.truncated.Load(),
		Ignored:   c.ign.Load(),
	}
}
