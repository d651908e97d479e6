package bpf

import (
	"net/netip"
	"reflect"
	"testing"
	"time"
	"unsafe"

	"github.com/flowbus/flowbus/schema"
)

func halfOpenBegin(i int) schema.Event {
	return schema.Event{
		Timestamp: int64(1000 + i), Direction: schema.Incoming,
		Src: netip.MustParseAddr("fe80::1").WithZone("eth0"), Dst: netip.MustParseAddr("fe80::2").WithZone("eth0"),
		SrcPort: uint16(40000 + i), DstPort: 80, CgroupID: 7, PID: 9, Comm: "srv",
	}
}

// TestHalfOpenExpire: unconfirmed begins get a never_established end with
// the begin's connection, in arrival order, once the timeout has passed
// since the reader saw them; confirmed ones get none; past the bound a
// begin is not tracked.
func TestHalfOpenExpire(t *testing.T) {
	t0 := time.Now()
	h := newHalfOpen(time.Second, 3)
	for i := range 4 {
		ev := halfOpenBegin(i)
		h.add(&ev, uint32(i), t0.Add(time.Duration(i)*time.Millisecond))
	}
	if h.len() != 3 || h.overflow != 1 {
		t.Fatalf("len %d overflow %d, want 3 and 1", h.len(), h.overflow)
	}
	h.confirm(netip.AddrPortFrom(netip.MustParseAddr("fe80::1"), 40001), 1)
	var ends []schema.EndEvent
	collect := func(e *schema.EndEvent) { ends = append(ends, *e) }
	h.expire(t0.Add(time.Second-time.Millisecond), collect)
	if len(ends) != 0 {
		t.Fatalf("%d ends before the timeout", len(ends))
	}
	now := t0.Add(time.Second + 2*time.Millisecond)
	h.expire(now, collect)
	if len(ends) != 2 || h.len() != 0 || h.expired != 2 || h.confirmed != 1 {
		t.Fatalf("ends %d len %d expired %d confirmed %d, want 2 0 2 1", len(ends), h.len(), h.expired, h.confirmed)
	}
	for j, i := range []int{0, 2} {
		b := halfOpenBegin(i)
		want := schema.EndEvent{Direction: b.Direction, Src: b.Src, Dst: b.Dst, SrcPort: b.SrcPort, DstPort: b.DstPort,
			BeginNs: b.Timestamp, EndNs: now.UnixNano(), Reason: schema.EndNeverEstablished, CgroupID: b.CgroupID}
		if !reflect.DeepEqual(ends[j], want) {
			t.Errorf("end %d = %+v, want %+v", j, ends[j], want)
		}
	}
}

// TestHalfOpenSteadyState: handshakes that complete within a poll cost no
// allocation once the table and its queue have grown, and the queue does
// not outgrow what waits.
func TestHalfOpenSteadyState(t *testing.T) {
	if n := unsafe.Sizeof(halfOpenEntry{}); n > 128 {
		t.Fatalf("halfOpenEntry is %d bytes: the map stores values over 128 bytes out of place, one allocation per add", n)
	}
	h := newHalfOpen(time.Minute, 1<<16)
	now := time.Now()
	ev := halfOpenBegin(0)
	peer := netip.AddrPortFrom(ev.Src.WithZone(""), ev.SrcPort)
	poll := func() {
		for seq := range uint32(500) {
			h.add(&ev, seq, now)
		}
		for seq := range uint32(500) {
			h.confirm(peer, seq)
		}
		h.expire(now, func(*schema.EndEvent) { t.Fatal("an end for a confirmed handshake") })
	}
	poll()
	if a := testing.AllocsPerRun(20, poll); a != 0 {
		t.Errorf("%.1f allocations per poll of 500 handshakes, want 0", a)
	}
	if len(h.q) != 0 || cap(h.q) > 1024 {
		t.Errorf("queue len %d cap %d after every handshake completed", len(h.q), cap(h.q))
	}
	// One handshake that never completes holds the head: the confirmed
	// keys behind it wait in the queue, within twice the table.
	h = newHalfOpen(time.Minute, 1024)
	h.add(&ev, 1<<20, now)
	for range 50 {
		poll()
	}
	if h.len() != 1 || len(h.q) > 2*1024 {
		t.Errorf("%d waiting, queue len %d, behind one waiting handshake", h.len(), len(h.q))
	}
}

// TestHalfOpenFreshCollision: a begin whose slot among the fresh ones is
// taken goes to the map, and is confirmed or expired from there like one
// that waited past its poll.
func TestHalfOpenFreshCollision(t *testing.T) {
	t0 := time.Now()
	h := newHalfOpen(time.Second, 10)
	a, b, c := halfOpenBegin(1), halfOpenBegin(2), halfOpenBegin(3)
	h.add(&a, 7, t0)
	h.add(&b, 7+freshSlots, t0) // a's slot
	h.add(&c, 7+2*freshSlots, t0)
	if h.len() != 3 || len(h.m) != 2 {
		t.Fatalf("len %d, %d in the map: want 3 and 2", h.len(), len(h.m))
	}
	h.confirm(netip.AddrPortFrom(b.Src, b.SrcPort), 7+freshSlots)
	h.confirm(netip.AddrPortFrom(a.Src, a.SrcPort), 7)
	if h.len() != 1 || h.confirmed != 2 {
		t.Fatalf("len %d confirmed %d after two confirmations: want 1 and 2", h.len(), h.confirmed)
	}
	d := halfOpenBegin(4)
	h.add(&d, 7, t0.Add(time.Millisecond)) // a's slot, free again
	var ends []schema.EndEvent
	collect := func(e *schema.EndEvent) { ends = append(ends, *e) }
	h.expire(t0.Add(time.Second/2), collect)
	if h.len() != 2 || len(h.m) != 2 || len(ends) != 0 {
		t.Fatalf("len %d, %d in the map, %d ends after a poll: want 2, 2, 0", h.len(), len(h.m), len(ends))
	}
	h.expire(t0.Add(2*time.Second), collect)
	if len(ends) != 2 || ends[0].SrcPort != c.SrcPort || ends[1].SrcPort != d.SrcPort || h.len() != 0 {
		t.Fatalf("ends %+v, len %d: want c's then d's, none left", ends, h.len())
	}
}

// BenchmarkHalfOpenHandshake: one incoming begin and its confirmation, as
// the reader handles a handshake that completes within a poll.
func BenchmarkHalfOpenHandshake(b *testing.B) {
	h := newHalfOpen(time.Minute, 1<<16)
	now := time.Now()
	ev := halfOpenBegin(0)
	peer := netip.AddrPortFrom(ev.Src.WithZone(""), ev.SrcPort)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		seq := uint32(i) * 2654435761
		h.add(&ev, seq, now)
		h.confirm(peer, seq)
		if i%500 == 499 {
			h.expire(now, func(*schema.EndEvent) {})
		}
	}
}
