package schema

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Top-level keys, in the order the encoder writes them.
const (
	keySchemaMajor   = "schema_major"
	keySchemaMinor   = "schema_minor"
	keyHost          = "host"
	keyConnDirection = "conn_direction"
	keyRunID         = "run_id"
	keySeq           = "seq"
	keyPrevSeq       = "prev_seq"
	keyT0            = "t0"
	keyDrops         = "drops"
	keyEndpoints     = "endpoints"
	keyCtx           = "ctx"
	keyEvents        = "events"
	numTopKeys       = 13 // prev_run included: only the first batch of a direction may carry it
)

// Elements of an event row, in order; rows may carry more (minor versions), decoders ignore them.
const rowLen = 6

// epEntry is one endpoint dictionary entry. An address with several name sets has several entries,
// chained through next (-1 ends the chain) from the epIndex head.
type epEntry struct {
	names []string
	next  int32
}

type ctxKey struct {
	cgroupID    uint64
	pid         uint32
	comm        string
	containerID string
	uid         uint32
	hasUID      bool // uid 0 is root: known-ness needs its own bit
}

// BatchEncoder builds one batch for one host and direction. Zero allocations per Add in steady state:
// buffers and dictionaries keep their capacity across Reset. Not safe for concurrent use.
type BatchEncoder struct {
	head  []byte // fixed start of every batch after the map header: schema_major .. run_id value
	dir   Direction
	nKeys int // top-level keys with prev_run: numTopKeys, one more for an end batch's event

	// prevRun is the encoded prev_run value, written into the next batch with prev_seq 0.
	prevRun []byte

	n  int
	t0 int64

	// lastSeq is the seq of the batch this encoder finished last: the next
	// batch's prev_seq, so a consumer of one direction can tell a gap.
	lastSeq uint64

	epIndex   map[netip.Addr]int32
	epEntries []epEntry
	epBuf     []byte // encoded endpoint entries, concatenated
	addrText  []byte // scratch for an address' text

	ctxIndex map[ctxKey]int32
	ctxBuf   []byte // encoded ctx maps, concatenated

	rows []byte // encoded event rows, concatenated

	// Direct-mapped caches in front of the maps: hashing netip.Addr and ctxKey (two strings) through a Go
	// map cost ~3/4 of Add; a cheap hash of the numbers plus an equality check that is fast for identical
	// string and slice data (the DNS cache and process table hand out the same ones) is several times
	// faster. An entry is valid only if its gen equals the encoder's gen, so Reset is O(1); stale
	// entries keep at most a few thousand references to old names slices and strings alive, which is
	// cheaper than clearing 60 KiB per batch.
	gen      uint32
	epCache  *[epCacheSize]epCacheEntry
	ctxCache *[ctxCacheSize]ctxCacheEntry
}

const (
	epCacheBits  = 10
	epCacheSize  = 1 << epCacheBits
	ctxCacheBits = 8
	ctxCacheSize = 1 << ctxCacheBits
)

type epCacheEntry struct {
	addr  netip.Addr
	names *string // data pointer of the names slice: same pointer and length means the same names
	n     int
	ref   int32
	gen   uint32
}

type ctxCacheEntry struct {
	key ctxKey
	ref int32
	gen uint32
}

func addrHash(a netip.Addr) uint64 {
	if a.Is4() { // As4 is several times cheaper than As16
		b := a.As4()
		return uint64(binary.BigEndian.Uint32(b[:])) * 0xBF58476D1CE4E5B9
	}
	b := a.As16()
	lo, hi := binary.LittleEndian.Uint64(b[:8]), binary.LittleEndian.Uint64(b[8:])
	return (lo*0x9E3779B97F4A7C15 ^ hi) * 0xBF58476D1CE4E5B9
}

func namesPtr(names []string) *string {
	if len(names) == 0 {
		return nil
	}
	return &names[0]
}

// NewBatchEncoder returns an encoder for batches of host (a validated subject token), agent run runID and
// direction dir. It panics on an invalid direction: such batches could never be decoded.
func NewBatchEncoder(host, runID string, dir Direction) *BatchEncoder {
	return newEncoder(host, runID, dir, KindBegin)
}

// newEncoder returns the encoder of batches of kind: the same dictionaries, header and tail for both
// kinds; an end batch has schema_major EndMajor and one more key, event, right after the version.
func newEncoder(host, runID string, dir Direction, kind Kind) *BatchEncoder {
	if dir != Outgoing && dir != Incoming {
		panic(fmt.Sprintf("schema.NewBatchEncoder: invalid direction %d", dir))
	}
	b := &BatchEncoder{
		dir:      dir,
		nKeys:    numTopKeys,
		epIndex:  make(map[netip.Addr]int32),
		ctxIndex: make(map[ctxKey]int32),
		addrText: make([]byte, 0, 64),
		gen:      1,
		epCache:  new([epCacheSize]epCacheEntry),
		ctxCache: new([ctxCacheSize]ctxCacheEntry),
	}
	major, minor := Major, Minor
	if kind == KindEnd {
		major, minor = EndMajor, EndMinor
	}
	h := appendStr(nil, keySchemaMajor)
	h = appendInt(h, int64(major))
	h = appendStr(h, keySchemaMinor)
	h = appendInt(h, int64(minor))
	if kind == KindEnd {
		b.nKeys++
		h = appendStr(h, keyEvent)
		h = appendStr(h, EndEventName)
	}
	h = appendStr(h, keyHost)
	h = appendStr(h, host)
	h = appendStr(h, keyConnDirection)
	h = appendStr(h, dir.String())
	h = appendStr(h, keyRunID)
	h = appendStr(h, runID)
	b.head = h
	return b
}

// Len is the number of events added since the last Reset.
func (b *BatchEncoder) Len() int { return b.n }

// tailMax bounds what Finish writes besides head and the three buffers.
var tailMax = len(keySeq) + len(keyPrevSeq) + 1 + maxUintLen + len(keyT0) + len(keyDrops) + len(keyEndpoints) + len(keyCtx) + len(keyEvents) +
	6 + maxUintLen*2 + // key headers (all fixstr), seq, t0
	1 + len("kernel")*5 + 5*(1+maxUintLen) + // drops: fixmap, keys (<= 7 bytes each with header), values
	3*maxHeaderLen // array headers

// Size is an upper bound of the encoded size of the batch so far, header included, so the caller can
// cut batches at a byte limit before encoding them.
func (b *BatchEncoder) Size() int {
	n := 1 + len(b.head) + tailMax + len(b.epBuf) + len(b.ctxBuf) + len(b.rows)
	if b.lastSeq == 0 && b.prevRun != nil {
		n += runLinkMax
	}
	return n
}

// SetPrevRun makes the next batch with prev_seq 0 (the first this encoder finishes) carry l as
// prev_run; nil carries none. It fails, changing nothing, when l cannot be written (Validate).
func (b *BatchEncoder) SetPrevRun(l *RunLink) error {
	if l == nil {
		b.prevRun = nil
		return nil
	}
	if err := l.Validate(); err != nil {
		return err
	}
	b.prevRun = appendRunLink(nil, l)
	return nil
}

// Add appends one event. The batch keeps references to ev's DNS slices (not copies) until Reset, so
// their contents must not change before Finish. ev.Direction is ignored: the batch has one direction.
func (b *BatchEncoder) Add(ev *Event) {
	if b.n == 0 {
		b.t0 = ev.Timestamp
	}
	b.n++
	src := b.endpoint(ev.Src, ev.SrcDNS)
	dst := b.endpoint(ev.Dst, ev.DstDNS)
	r := append(b.rows, 0x90|rowLen)
	r = appendUint(r, uint64(src))
	r = appendUint(r, uint64(dst))
	r = appendUint(r, uint64(ev.SrcPort))
	r = appendUint(r, uint64(ev.DstPort))
	r = appendInt(r, ev.Timestamp-b.t0) // wraps for absurd inputs; the decoder's t0+dt wraps back
	if ev.hasContext() {
		r = appendUint(r, uint64(b.context(ev.ctx())))
	} else {
		r = append(r, mpNil)
	}
	b.rows = r
}

func sameNames(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	if len(a) == 0 || &a[0] == &b[0] {
		return true // the usual case: the same slice from the DNS cache
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// maxEndpointChain bounds the name sets compared per address in endpoint.
const maxEndpointChain = 8

// endpoint returns the dictionary ref of (addr, names), adding an entry when this pair is new.
func (b *BatchEncoder) endpoint(addr netip.Addr, names []string) int32 {
	c := &b.epCache[addrHash(addr)>>(64-epCacheBits)]
	np := namesPtr(names)
	if c.gen == b.gen && c.addr == addr && c.names == np && c.n == len(names) {
		return c.ref
	}
	ref := b.endpointSlow(addr, names)
	*c = epCacheEntry{addr: addr, names: np, n: len(names), ref: ref, gen: b.gen}
	return ref
}

func (b *BatchEncoder) endpointSlow(addr netip.Addr, names []string) int32 {
	head, ok := b.epIndex[addr]
	if ok {
		// Walk at most maxEndpointChain entries (newest first): an address whose names keep changing
		// must not make Add quadratic; past the bound a duplicate entry costs a few bytes, not time.
		for i, k := head, 0; i >= 0 && k < maxEndpointChain; i, k = b.epEntries[i].next, k+1 {
			if sameNames(b.epEntries[i].names, names) {
				return i
			}
		}
	} else {
		head = -1
	}
	ref := int32(len(b.epEntries))
	b.epEntries = append(b.epEntries, epEntry{names: names, next: head})
	b.epIndex[addr] = ref

	e := append(b.epBuf, 0x92)
	b.addrText = addr.AppendTo(b.addrText[:0]) // "" for the zero Addr
	e = appendStrHeader(e, len(b.addrText))
	e = append(e, b.addrText...)
	e = appendArrayHeader(e, len(names))
	for _, n := range names {
		e = appendStr(e, n)
	}
	b.epBuf = e
	return ref
}

// context returns the ctx dictionary ref of a process context (which must be known).
func (b *BatchEncoder) context(k ctxKey) int32 {
	h := (k.cgroupID*0x9E3779B97F4A7C15 ^ uint64(k.pid) ^ uint64(k.uid)<<32) * 0xBF58476D1CE4E5B9
	c := &b.ctxCache[h>>(64-ctxCacheBits)]
	if c.gen == b.gen && c.key == k {
		return c.ref
	}
	ref, ok := b.ctxIndex[k]
	if !ok {
		ref = int32(len(b.ctxIndex))
		b.ctxIndex[k] = ref
		b.ctxBuf = appendCtx(b.ctxBuf, &k)
	}
	*c = ctxCacheEntry{key: k, ref: ref, gen: b.gen}
	return ref
}

func appendCtx(c []byte, k *ctxKey) []byte {
	n := 0
	if k.cgroupID != 0 {
		n++
	}
	if k.pid != 0 {
		n++
	}
	if k.comm != "" {
		n++
	}
	if k.containerID != "" {
		n++
	}
	if k.hasUID {
		n++
	}
	c = appendMapHeader(c, n)
	if k.cgroupID != 0 {
		c = appendStr(c, "cgroup_id")
		c = appendUint(c, k.cgroupID)
	}
	if k.pid != 0 {
		c = appendStr(c, "pid")
		c = appendUint(c, uint64(k.pid))
	}
	if k.comm != "" {
		c = appendStr(c, "comm")
		c = appendStr(c, k.comm)
	}
	if k.containerID != "" {
		c = appendStr(c, "container_id")
		c = appendStr(c, k.containerID)
	}
	if k.hasUID { // schema 1.2
		c = appendStr(c, "uid")
		c = appendUint(c, uint64(k.uid))
	}
	return c
}

// Finish appends the whole batch, with sequence number seq and the drops since the previous batch, to
// dst and returns it; then it Resets the encoder. A batch with no events is valid (it may carry drops).
func (b *BatchEncoder) Finish(dst []byte, seq uint64, drops Drops) []byte {
	link := b.lastSeq == 0 && b.prevRun != nil
	if link {
		dst = appendMapHeader(dst, b.nKeys)
	} else {
		dst = appendMapHeader(dst, b.nKeys-1)
	}
	dst = append(dst, b.head...)
	dst = appendStr(dst, keySeq)
	dst = appendUint(dst, seq)
	dst = appendStr(dst, keyPrevSeq)
	dst = appendUint(dst, b.lastSeq)
	if link {
		dst = appendStr(dst, keyPrevRun)
		dst = append(dst, b.prevRun...)
		b.prevRun = nil
	}
	b.lastSeq = seq
	dst = appendStr(dst, keyT0)
	dst = appendInt(dst, b.t0)
	dst = appendStr(dst, keyDrops)
	dst = appendDrops(dst, drops)
	dst = appendStr(dst, keyEndpoints)
	dst = appendArrayHeader(dst, len(b.epEntries))
	dst = append(dst, b.epBuf...)
	dst = appendStr(dst, keyCtx)
	dst = appendArrayHeader(dst, len(b.ctxIndex))
	dst = append(dst, b.ctxBuf...)
	dst = appendStr(dst, keyEvents)
	dst = appendArrayHeader(dst, b.n)
	dst = append(dst, b.rows...)
	b.Reset()
	return dst
}

func appendDrops(dst []byte, d Drops) []byte {
	vals := [5]uint64{d.Kernel, d.Reader, d.Queue, d.Spool, d.Publish}
	n := 0
	for _, v := range vals {
		if v != 0 {
			n++
		}
	}
	dst = appendMapHeader(dst, n)
	for i, v := range vals {
		if v != 0 {
			dst = appendStr(dst, dropKeys[i])
			dst = appendUint(dst, v)
		}
	}
	return dst
}

var dropKeys = [5]string{"kernel", "reader", "queue", "spool", "publish"}

// Reset discards the events added so far, keeping buffer and dictionary capacity for the next batch.
func (b *BatchEncoder) Reset() {
	b.n = 0
	b.t0 = 0
	clear(b.epIndex)
	clear(b.epEntries) // drop references to callers' DNS slices (the bounded caches may keep a few)
	b.epEntries = b.epEntries[:0]
	b.epBuf = b.epBuf[:0]
	clear(b.ctxIndex)
	b.ctxBuf = b.ctxBuf[:0]
	b.gen++
	if b.gen == 0 { // wrapped: stale entries could look valid again
		clear(b.epCache[:])
		clear(b.ctxCache[:])
		b.gen = 1
	}
	b.rows = b.rows[:0]
}
