package bpf

import (
	"net/netip"
	"time"

	"github.com/flowbus/flowbus/schema"
)

// halfOpen is the table of incoming begins taken at a SYN-ACK whose
// handshake has not been seen to complete yet. The sock_ops program confirms
// each one that completes (REC_CONFIRM); one still unconfirmed when the
// kernel has given up retrying its SYN-ACK never completed (a spoofed or
// abandoned SYN, or one the peer reset) and gets an end with reason
// never_established. Entries expire in the order they came (one timeout for
// all), so a queue is all the order needed. Used on the reader goroutine
// only.
type halfOpen struct {
	timeout time.Duration
	max     int
	m       map[halfOpenKey]halfOpenEntry
	// q[head:] is in arrival order; it may hold keys already confirmed.
	// The head moves instead of q being resliced, so that the array is
	// reused rather than grown again every poll.
	q    []halfOpenKey
	head int
	base time.Time       // what halfOpenEntry.at counts from
	end  schema.EndEvent // what expire hands over, reused

	// fresh holds the begins added since the last expire, direct-mapped
	// by sequence number (random per connection): nearly all are
	// confirmed before the reader's next poll, and then never touch the
	// map or the queue. expire moves what is left into them first.
	fresh     *[freshSlots]freshSlot
	freshUsed []uint32 // slots filled since the last expire, in arrival order
	freshLive int

	overflow  uint64 // begins not tracked: the table was full
	expired   uint64 // never_established ends made
	confirmed uint64
}

// freshSlots is the size of halfOpen.fresh (224 KiB), four times the 500
// begins of a 20 ms poll at 25,000 incoming connections/s: few of them meet
// a slot in use, and those go to the map.
const freshSlots = 1 << 11

type freshSlot struct {
	k    halfOpenKey
	e    halfOpenEntry
	live bool
}

// halfOpenKeep is the queue capacity kept while it is empty (24 bytes a
// key): a busy host's polls reuse it, a flood's does not stay.
const halfOpenKeep = 4096

// halfOpenKey names a handshake as both the begin and the confirmation can:
// the peer's address and port and the SYN-ACK's sequence number (random per
// connection). The local address is not in it: the sock_ops program's view
// of it differs from the wire's under a redirect. The address is its 16
// bytes, without the zone (the sock_ops program's has none), so that the
// key holds no pointer and the map hashes it in one pass.
type halfOpenKey struct {
	addr [16]byte // IPv4 as IPv4-mapped: both sides unmap, so no clash
	port uint16
	seq  uint32
}

// halfOpenEntry is what the never_established end needs of the begin. It
// stays under the map's 128 bytes for a value stored in place: a whole
// schema.Event would make every add a heap allocation.
type halfOpenEntry struct {
	src, dst netip.Addr
	srcPort  uint16
	dstPort  uint16
	dir      schema.Direction
	begin    int64 // the begin's timestamp
	cgroup   uint64
	at       time.Duration // when the reader saw the begin, since halfOpen.base
}

func newHalfOpen(timeout time.Duration, max int) *halfOpen {
	return &halfOpen{timeout: timeout, max: max, m: map[halfOpenKey]halfOpenEntry{}, base: time.Now(), fresh: new([freshSlots]freshSlot)}
}

// add tracks an incoming begin taken at its SYN-ACK, seen by the reader at
// now.
func (h *halfOpen) add(ev *schema.Event, seq uint32, now time.Time) {
	k := halfOpenKey{ev.Src.As16(), ev.SrcPort, seq}
	e := halfOpenEntry{
		src: ev.Src, dst: ev.Dst, srcPort: ev.SrcPort, dstPort: ev.DstPort, dir: ev.Direction,
		begin: ev.Timestamp, cgroup: ev.CgroupID, at: now.Sub(h.base),
	}
	i := seq % freshSlots
	f := &h.fresh[i]
	if f.live && f.k == k {
		f.e = e // the same handshake again: as the map would
		return
	}
	_, inMap := h.m[k]
	if !inMap && h.len() >= h.max {
		h.overflow++
		return
	}
	if !f.live && !inMap {
		*f = freshSlot{k: k, e: e, live: true}
		h.freshUsed = append(h.freshUsed, i)
		h.freshLive++
		return
	}
	h.put(k, e)
}

// put adds an entry to the map and its key to the queue.
func (h *halfOpen) put(k halfOpenKey, e halfOpenEntry) {
	h.m[k] = e
	if len(h.q)-h.head >= 2*h.max {
		// Confirmed keys wait in the queue behind older unconfirmed ones:
		// drop them, so that the queue stays within twice the table.
		q := h.q[:0]
		for _, qk := range h.q[h.head:] {
			if _, ok := h.m[qk]; ok {
				q = append(q, qk)
			}
		}
		clear(h.q[len(q):])
		h.q, h.head = q, 0
	}
	h.q = append(h.q, k)
}

// confirm forgets a handshake that completed.
func (h *halfOpen) confirm(peer netip.AddrPort, seq uint32) {
	k := halfOpenKey{peer.Addr().As16(), peer.Port(), seq}
	if f := &h.fresh[seq%freshSlots]; f.live && f.k == k {
		f.live = false
		h.freshLive--
		h.confirmed++
		return
	}
	if _, ok := h.m[k]; ok {
		delete(h.m, k)
		h.confirmed++
	}
}

// expire hands every entry older than the timeout to f as a
// never_established end, and drops confirmed keys from the queue's head.
func (h *halfOpen) expire(now time.Time, f func(*schema.EndEvent)) {
	for _, i := range h.freshUsed {
		if s := &h.fresh[i]; s.live {
			h.put(s.k, s.e)
		}
		h.fresh[i] = freshSlot{}
	}
	h.freshUsed, h.freshLive = h.freshUsed[:0], 0
	end := &h.end
	age := now.Sub(h.base)
	for h.head < len(h.q) {
		k := h.q[h.head]
		e, ok := h.m[k]
		if ok && age-e.at < h.timeout {
			break
		}
		h.q[h.head] = halfOpenKey{}
		h.head++
		if !ok {
			continue
		}
		delete(h.m, k)
		h.expired++
		*end = schema.EndEvent{
			Direction: e.dir,
			Src:       e.src, Dst: e.dst,
			SrcPort: e.srcPort, DstPort: e.dstPort,
			BeginNs:  e.begin,
			EndNs:    now.UnixNano(),
			Reason:   schema.EndNeverEstablished,
			CgroupID: e.cgroup,
		}
		f(end)
	}
	switch {
	case h.head == len(h.q) && cap(h.q) > halfOpenKeep:
		// Let a flood's array go (it only grows otherwise).
		h.q, h.head = nil, 0
	case h.head == len(h.q):
		h.q, h.head = h.q[:0], 0
	case h.head > 0 && h.head >= len(h.q)/2:
		// Move the waiting keys to the front: the dead head is never
		// more than the live tail, and append does not copy it.
		n := copy(h.q, h.q[h.head:])
		clear(h.q[n:])
		h.q, h.head = h.q[:n], 0
	}
}

// len is the number of handshakes waiting.
func (h *halfOpen) len() int { return len(h.m) + h.freshLive }
