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
	q       []halfOpenKey // in arrival order; may hold keys already confirmed

	overflow  uint64 // begins not tracked: the table was full
	expired   uint64 // never_established ends made
	confirmed uint64
}

// halfOpenKey names a handshake as both the begin and the confirmation can:
// the peer's address and port and the SYN-ACK's sequence number (random per
// connection). The local address is not in it: the sock_ops program's view
// of it differs from the wire's under a redirect.
type halfOpenKey struct {
	peer netip.AddrPort
	seq  uint32
}

type halfOpenEntry struct {
	ev schema.Event
	at time.Time // when the reader saw the begin
}

func newHalfOpen(timeout time.Duration, max int) *halfOpen {
	return &halfOpen{timeout: timeout, max: max, m: map[halfOpenKey]halfOpenEntry{}}
}

// add tracks an incoming begin taken at its SYN-ACK.
func (h *halfOpen) add(ev *schema.Event, seq uint32, now time.Time) {
	k := halfOpenKey{netip.AddrPortFrom(ev.Src.WithZone(""), ev.SrcPort), seq}
	if _, ok := h.m[k]; !ok && len(h.m) >= h.max {
		h.overflow++
		return
	}
	e := halfOpenEntry{ev: *ev, at: now}
	e.ev.SrcDNS, e.ev.DstDNS = nil, nil
	h.m[k] = e
	if len(h.q) >= 2*h.max {
		// Confirmed keys wait in the queue behind older unconfirmed ones:
		// drop them, so that the queue stays within twice the table.
		q := h.q[:0]
		for _, qk := range h.q {
			if _, ok := h.m[qk]; ok {
				q = append(q, qk)
			}
		}
		clear(h.q[len(q):])
		h.q = q
	}
	h.q = append(h.q, k)
}

// confirm forgets a handshake that completed.
func (h *halfOpen) confirm(peer netip.AddrPort, seq uint32) {
	k := halfOpenKey{netip.AddrPortFrom(peer.Addr().WithZone(""), peer.Port()), seq}
	if _, ok := h.m[k]; ok {
		delete(h.m, k)
		h.confirmed++
	}
}

// expire hands every entry older than the timeout to f as a
// never_established end, and drops confirmed keys from the queue's head.
func (h *halfOpen) expire(now time.Time, f func(*schema.EndEvent)) {
	var end schema.EndEvent
	for len(h.q) > 0 {
		k := h.q[0]
		e, ok := h.m[k]
		if ok && now.Sub(e.at) < h.timeout {
			break
		}
		h.q[0] = halfOpenKey{}
		h.q = h.q[1:]
		if !ok {
			continue
		}
		delete(h.m, k)
		h.expired++
		end = schema.EndEvent{
			Direction: e.ev.Direction,
			Src:       e.ev.Src, Dst: e.ev.Dst,
			SrcPort: e.ev.SrcPort, DstPort: e.ev.DstPort,
			BeginNs:  e.ev.Timestamp,
			EndNs:    now.UnixNano(),
			Reason:   schema.EndNeverEstablished,
			CgroupID: e.ev.CgroupID,
		}
		f(&end)
	}
	// Let the backing array go once the queue is empty (it only grows
	// otherwise).
	if len(h.q) == 0 && cap(h.q) > 1024 {
		h.q = nil
	}
}

// len is the number of handshakes waiting.
func (h *halfOpen) len() int { return len(h.m) }
