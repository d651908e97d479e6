package bpf

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/schema"
)

const (
	fFIN = 0x01
	fSYN = 0x02
	fRST = 0x04
	fPSH = 0x08
	fACK = 0x10
)

// tcpHdr is a 20-byte TCP header.
func tcpHdr(sport, dport uint16, seq uint32, flags byte) []byte {
	h := make([]byte, 20)
	binary.BigEndian.PutUint16(h[0:], sport)
	binary.BigEndian.PutUint16(h[2:], dport)
	binary.BigEndian.PutUint32(h[4:], seq)
	h[12] = 5 << 4
	h[13] = flags
	return h
}

// eth prefixes the Ethernet header that BPF_PROG_TEST_RUN expects (and strips
// for cgroup skb programs).
func eth(proto uint16, l3 []byte) []byte {
	b := make([]byte, 14, 14+len(l3))
	binary.BigEndian.PutUint16(b[12:], proto)
	return append(b, l3...)
}

func ipv4(src, dst string, proto byte, fragOff uint16, payload []byte) []byte {
	h := make([]byte, 20)
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[2:], uint16(20+len(payload)))
	binary.BigEndian.PutUint16(h[6:], fragOff)
	h[8] = 64
	h[9] = proto
	s, d := netip.MustParseAddr(src).As4(), netip.MustParseAddr(dst).As4()
	copy(h[12:], s[:])
	copy(h[16:], d[:])
	return eth(0x0800, append(h, payload...))
}

// ipv6 builds an IPv6 packet; ext is a chain of (type, body) extension headers.
func ipv6(src, dst string, ext [][2][]byte, final byte, payload []byte) []byte {
	var chain []byte
	next := final
	for i := len(ext) - 1; i >= 0; i-- {
		body := append([]byte{next}, ext[i][1]...)
		chain = append(body, chain...)
		next = ext[i][0][0]
	}
	h := make([]byte, 40)
	h[0] = 0x60
	binary.BigEndian.PutUint16(h[4:], uint16(len(chain)+len(payload)))
	h[6] = next
	h[7] = 64
	s, d := netip.MustParseAddr(src).As16(), netip.MustParseAddr(dst).As16()
	copy(h[8:], s[:])
	copy(h[24:], d[:])
	return eth(0x86dd, append(append(h, chain...), payload...))
}

func loadForTest(t *testing.T) *Capture {
	t.Helper()
	cgrouptest.RequirePrivileged(t)
	c := &Capture{opts: Options{PollInterval: time.Millisecond}}
	c.opts.fill()
	if err := c.load(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// runPacket feeds one packet to a program and returns the events it emitted.
func runPacket(t *testing.T, c *Capture, prog *ebpf.Program, pkt []byte) []schema.Event {
	t.Helper()
	ret, err := prog.Run(&ebpf.RunOptions{Data: pkt})
	if err != nil {
		t.Fatalf("BPF_PROG_TEST_RUN: %v", err)
	}
	if ret != 1 {
		t.Fatalf("program returned %d: it must never drop a packet", ret)
	}
	var out []schema.Event
	var rec ringbuf.Record
	clock := newWallClock()
	c.reader.SetDeadline(time.Now())
	for {
		err := c.reader.ReadInto(&rec)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		var ev schema.Event
		if !decodeFlow(rec.RawSample, &ev, clock) {
			t.Fatalf("undecodable record %x", rec.RawSample)
		}
		out = append(out, ev)
	}
}

func TestKernelFlagClassification(t *testing.T) {
	c := loadForTest(t)
	in, eg := c.objs.FlowbusIngress, c.objs.FlowbusEgress
	const cli, srv = "10.1.1.1", "10.2.2.2"
	cases := []struct {
		name  string
		prog  *ebpf.Program
		pkt   []byte
		want  int
		dir   schema.Direction
		src   string
		sport uint16
	}{
		{"syn-ack on ingress is outgoing", in, ipv4(srv, cli, 6, 0, tcpHdr(443, 40000, 1000, fSYN|fACK)), 1, schema.Outgoing, cli, 40000},
		{"syn-ack on egress is incoming", eg, ipv4(srv, cli, 6, 0, tcpHdr(443, 40001, 1000, fSYN|fACK)), 1, schema.Incoming, cli, 40001},
		{"syn-ack with ECN bits", in, ipv4(srv, cli, 6, 0, tcpHdr(443, 40002, 7, fSYN|fACK|0x40|0x80)), 1, schema.Outgoing, cli, 40002},
		{"syn-ack retransmitted: no second event", in, ipv4(srv, cli, 6, 0, tcpHdr(443, 40000, 1000, fSYN|fACK)), 0, 0, "", 0},
		{"egress syn-ack retransmitted: no second event", eg, ipv4(srv, cli, 6, 0, tcpHdr(443, 40001, 1000, fSYN|fACK)), 0, 0, "", 0},
		{"same 4-tuple, new connection (new ISN)", in, ipv4(srv, cli, 6, 0, tcpHdr(443, 40000, 5555, fSYN|fACK)), 1, schema.Outgoing, cli, 40000},
		{"bare syn", eg, ipv4(cli, srv, 6, 0, tcpHdr(40003, 443, 1, fSYN)), 0, 0, "", 0},
		{"syn-ack-rst", in, ipv4(srv, cli, 6, 0, tcpHdr(443, 40004, 1, fSYN|fACK|fRST)), 0, 0, "", 0},
		{"syn-ack-fin", in, ipv4(srv, cli, 6, 0, tcpHdr(443, 40005, 1, fSYN|fACK|fFIN)), 0, 0, "", 0},
		{"rst-ack (refused)", in, ipv4(srv, cli, 6, 0, tcpHdr(443, 40006, 0, fRST|fACK)), 0, 0, "", 0},
		{"ack", in, ipv4(srv, cli, 6, 0, tcpHdr(443, 40007, 1, fACK)), 0, 0, "", 0},
		{"psh-ack", eg, ipv4(srv, cli, 6, 0, tcpHdr(443, 40008, 1, fPSH|fACK)), 0, 0, "", 0},
		{"fin-ack", eg, ipv4(srv, cli, 6, 0, tcpHdr(443, 40009, 1, fFIN|fACK)), 0, 0, "", 0},
		{"udp with syn-ack-looking byte", in, ipv4(srv, cli, 17, 0, tcpHdr(443, 40010, 1, fSYN|fACK)), 0, 0, "", 0},
		{"non-first ipv4 fragment", in, ipv4(srv, cli, 6, 185, tcpHdr(443, 40011, 1, fSYN|fACK)), 0, 0, "", 0},
		{"truncated tcp header", in, ipv4(srv, cli, 6, 0, tcpHdr(443, 40012, 1, fSYN|fACK)[:10]), 0, 0, "", 0},
		{"ipv6 syn-ack", in, ipv6("2001:db8::2", "2001:db8::1", nil, 6, tcpHdr(443, 40013, 9, fSYN|fACK)), 1, schema.Outgoing, "2001:db8::1", 40013},
		{"ipv6 hop-by-hop then dest opts", eg, ipv6("2001:db8::2", "2001:db8::1", [][2][]byte{{{0}, make([]byte, 7)}, {{60}, append([]byte{1}, make([]byte, 14)...)}}, 6, tcpHdr(443, 40014, 9, fSYN|fACK)), 1, schema.Incoming, "2001:db8::1", 40014},
		{"ipv6 first fragment", in, ipv6("2001:db8::2", "2001:db8::1", [][2][]byte{{{44}, make([]byte, 7)}}, 6, tcpHdr(443, 40015, 9, fSYN|fACK)), 1, schema.Outgoing, "2001:db8::1", 40015},
		{"ipv6 later fragment", in, ipv6("2001:db8::2", "2001:db8::1", [][2][]byte{{{44}, {0, 0x10, 0, 0, 0, 0, 1}}}, 6, tcpHdr(443, 40016, 9, fSYN|fACK)), 0, 0, "", 0},
		{"ipv6 ack", in, ipv6("2001:db8::2", "2001:db8::1", nil, 6, tcpHdr(443, 40017, 9, fACK)), 0, 0, "", 0},
		{"ipv4-mapped stays ipv4 text", in, ipv4("192.0.2.9", "192.0.2.8", 6, 0, tcpHdr(22, 40018, 3, fSYN|fACK)), 1, schema.Outgoing, "192.0.2.8", 40018},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			evs := runPacket(t, c, tc.prog, tc.pkt)
			if len(evs) != tc.want {
				t.Fatalf("got %d events, want %d", len(evs), tc.want)
			}
			if tc.want == 0 {
				return
			}
			ev := evs[0]
			if ev.Direction != tc.dir || ev.Src.String() != tc.src || ev.SrcPort != tc.sport {
				t.Errorf("got %v %s:%d -> %s:%d, want %v src %s:%d", ev.Direction, ev.Src, ev.SrcPort, ev.Dst, ev.DstPort, tc.dir, tc.src, tc.sport)
			}
			// The responder is always dst, so dst_port is the service port.
			if ev.DstPort != 443 && ev.DstPort != 22 {
				t.Errorf("dst port %d, want the service port", ev.DstPort)
			}
		})
	}
	k, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if k.Duplicates != 2 {
		t.Errorf("suppressed retransmits: got %d, want 2", k.Duplicates)
	}
	if k.Truncated != 1 {
		t.Errorf("truncated headers counted: got %d, want 1", k.Truncated)
	}
}

func udpHdr(sport, dport uint16, payload []byte) []byte {
	h := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(h[0:], sport)
	binary.BigEndian.PutUint16(h[2:], dport)
	binary.BigEndian.PutUint16(h[4:], uint16(8+len(payload)))
	return append(h, payload...)
}

type dnsRec struct {
	proto   uint8
	payload []byte
	orig    int
}

// runPacketDNS feeds one packet and returns the DNS records it produced
// (failing on any flow record).
func runPacketDNS(t *testing.T, c *Capture, prog *ebpf.Program, pkt []byte) []dnsRec {
	t.Helper()
	if _, err := prog.Run(&ebpf.RunOptions{Data: pkt}); err != nil {
		t.Fatal(err)
	}
	var out []dnsRec
	var rec ringbuf.Record
	c.reader.SetDeadline(time.Now())
	for {
		err := c.reader.ReadInto(&rec)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		b := rec.RawSample
		if len(b) != dnsRecSize || b[offDNSKind] != recKindDNS {
			t.Fatalf("unexpected record of %d bytes", len(b))
		}
		n := int(binary.NativeEndian.Uint16(b[offDNSLen:]))
		out = append(out, dnsRec{b[offDNSProto], append([]byte(nil), b[offDNSData:offDNSData+n]...), int(binary.NativeEndian.Uint32(b[offDNSOrig:]))})
	}
}

func TestKernelDNSCapture(t *testing.T) {
	c := loadForTest(t)
	in, eg := c.objs.FlowbusIngress, c.objs.FlowbusEgress
	payload := []byte("\x12\x34\x81\x80 a DNS answer, opaque to the kernel")
	big := make([]byte, 3000)
	for i := range big {
		big[i] = byte(i)
	}
	tcpDNS := append(tcpHdr(53, 40000, 1, fPSH|fACK), append([]byte{0, byte(len(payload))}, payload...)...)
	cases := []struct {
		name    string
		prog    *ebpf.Program
		pkt     []byte
		want    int
		proto   uint8
		payload []byte
		orig    int
	}{
		{"udp from 53 on ingress", in, ipv4("10.0.0.53", "10.0.0.1", 17, 0, udpHdr(53, 33333, payload)), 1, 17, payload, len(payload)},
		{"udp6 from 53 on ingress", in, ipv6("2001:db8::53", "2001:db8::1", nil, 17, udpHdr(53, 33333, payload)), 1, 17, payload, len(payload)},
		{"udp from 53 on egress (a local server's answer)", eg, ipv4("10.0.0.53", "10.0.0.1", 17, 0, udpHdr(53, 33333, payload)), 0, 0, nil, 0},
		{"udp query to 53", in, ipv4("10.0.0.1", "10.0.0.53", 17, 0, udpHdr(33333, 53, payload)), 0, 0, nil, 0},
		{"udp from another port", in, ipv4("10.0.0.53", "10.0.0.1", 17, 0, udpHdr(5353, 33333, payload)), 0, 0, nil, 0},
		{"tcp segment from 53", in, ipv4("10.0.0.53", "10.0.0.1", 6, 0, tcpDNS), 1, 6, append([]byte{0, byte(len(payload))}, payload...), len(payload) + 2},
		{"tcp ack from 53 without data", in, ipv4("10.0.0.53", "10.0.0.1", 6, 0, tcpHdr(53, 40000, 1, fACK)), 0, 0, nil, 0},
		{"answer longer than the kernel copies", in, ipv4("10.0.0.53", "10.0.0.1", 17, 0, udpHdr(53, 33333, big)), 1, 17, big[:2047], len(big)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			recs := runPacketDNS(t, c, tc.prog, tc.pkt)
			if len(recs) != tc.want {
				t.Fatalf("got %d DNS records, want %d", len(recs), tc.want)
			}
			if tc.want == 0 {
				return
			}
			r := recs[0]
			if r.proto != tc.proto || string(r.payload) != string(tc.payload) || r.orig != tc.orig {
				t.Errorf("got proto %d, %d bytes of %d, want proto %d, %d bytes of %d", r.proto, len(r.payload), r.orig, tc.proto, len(tc.payload), tc.orig)
			}
		})
	}
	k, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if k.DNSCut != 1 {
		t.Errorf("answers cut in the kernel: got %d, want 1", k.DNSCut)
	}
}
