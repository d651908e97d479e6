package bpf

import (
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/flowbus/flowbus/schema"
)

// The direct ring reader reads every record once and in order while the
// ring wraps around many times: 3,000 SYN-ACKs through a ring of 4 pages,
// drained after every fifth packet (IPv4 begins without a process: records
// of 48 bytes with their header; the ring holds 341 and a third), so
// records straddle the end of the data area.
func TestRingMapWrapsInOrder(t *testing.T) {
	c := loadForTestWith(t, Options{RingBytes: 4 * os.Getpagesize(), PollInterval: time.Millisecond})
	r := c.ring
	if r == nil {
		t.Fatal("the ring buffer could not be mapped")
	}
	clock := newWallClock()
	const n = 3000
	var got []uint16
	drain := func() {
		r.drain(func(b []byte) {
			var ev schema.Event
			var r beginRec
			if !decodeBegin(b, &ev, clock, &r) {
				t.Fatalf("undecodable record of %d bytes", len(b))
			}
			got = append(got, ev.SrcPort)
		})
	}
	for i := 0; i < n; i++ {
		pkt := ipv4("10.2.2.2", "10.1.1.1", 6, 0, tcpHdr(443, uint16(10000+i), uint32(i+1), fSYN|fACK))
		if _, err := c.objs.FlowbusIngress.Run(&ebpf.RunOptions{Data: pkt}); err != nil {
			t.Fatal(err)
		}
		if i%5 == 0 {
			drain()
		}
	}
	drain()
	cnt, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != n || cnt.RingbufFull != 0 {
		t.Fatalf("%d records of %d (ring full %d)", len(got), n, cnt.RingbufFull)
	}
	for i, p := range got {
		if p != uint16(10000+i) {
			t.Fatalf("record %d is port %d, want %d: out of order", i, p, 10000+i)
		}
	}
}
