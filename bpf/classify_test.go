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
	return loadForTestWith(t, Options{PollInterval: time.Millisecond})
}

// loadForTestWith loads the programs with o, unattached.
func loadForTestWith(t *testing.T, o Options) *Capture {
	t.Helper()
	cgrouptest.RequirePrivileged(t)
	c := &Capture{opts: o}
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
	clock := newWallClock()
	for _, b := range readRecords(t, c) {
		var ev schema.Event
		var r beginRec
		if !decodeBegin(b, &ev, clock, &r) {
			t.Fatalf("undecodable record %x", b)
		}
		out = append(out, ev)
	}
	return out
}

// readRecords returns (copies of) the records waiting in the ring.
func readRecords(t *testing.T, c *Capture) [][]byte {
	t.Helper()
	var out [][]byte
	if c.ring != nil {
		c.ring.drain(func(b []byte) { out = append(out, append([]byte(nil), b...)) })
		return out
	}
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
		out = append(out, append([]byte(nil), rec.RawSample...))
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

// runPacketDNS feeds one packet and returns the DNS records it produced
// (failing on any flow record).
func runPacketDNS(t *testing.T, c *Capture, prog *ebpf.Program, pkt []byte) []dnsRec {
	t.Helper()
	if _, err := prog.Run(&ebpf.RunOptions{Data: pkt}); err != nil {
		t.Fatal(err)
	}
	var out []dnsRec
	for _, b := range readRecords(t, c) {
		var d dnsRec
		if !decodeDNS(b, &d) {
			t.Fatalf("unexpected record of %d bytes", len(b))
		}
		out = append(out, d)
	}
	return out
}

// dnsMsg is a DNS header with the given id and flags, then text.
func dnsMsg(id uint16, flags uint16, text string) []byte {
	b := make([]byte, 12, 12+len(text))
	binary.BigEndian.PutUint16(b, id)
	binary.BigEndian.PutUint16(b[2:], flags)
	return append(b, text...)
}

// TestKernelDNSCapture feeds queries and answers in order: an answer passes
// only when the same socket (test runs make one per packet, so the test
// turns that check off: cookie 0) sent its query
// from the same client address and port to the same server, with the same
// id (UDP) or on a connection it opened to port 53 (TCP), within the
// timeout. Everything else from port 53 is counted and never reaches the
// ring buffer.
func TestKernelDNSCapture(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	c := &Capture{opts: Options{PollInterval: time.Millisecond, QueryTimeout: 300 * time.Millisecond}, anySocket: true}
	c.opts.fill()
	if err := c.load(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	in, eg := c.objs.FlowbusIngress, c.objs.FlowbusEgress
	const cli, srv, cli6, srv6 = "10.0.0.1", "10.0.0.53", "2001:db8::1", "2001:db8::53"
	query := dnsMsg(0x1234, 0x0100, " a query")
	ans := dnsMsg(0x1234, 0x8180, " a DNS answer, opaque to the kernel")
	other := dnsMsg(0x9999, 0x8180, " a forged answer")
	big := append(dnsMsg(0x1234, 0x8180, ""), make([]byte, 3000)...)
	for i := 12; i < len(big); i++ {
		big[i] = byte(i)
	}
	framed := func(m []byte) []byte { return append([]byte{byte(len(m) >> 8), byte(len(m))}, m...) }
	seg := func(sport, dport uint16, flags byte, data []byte) []byte {
		return append(tcpHdr(sport, dport, 1, flags), data...)
	}
	type want struct {
		query   bool
		proto   uint8
		client  string
		payload []byte
		orig    int
	}
	steps := []struct {
		name        string
		prog        *ebpf.Program
		pkt         []byte
		want        []want
		unsolicited uint64 // the kernel's count after the step
		sleep       time.Duration
	}{
		{"answer before any query", in, ipv4(srv, cli, 17, 0, udpHdr(53, 33333, ans)), nil, 1, 0},
		{"udp query", eg, ipv4(cli, srv, 17, 0, udpHdr(33333, 53, query)), []want{{true, 17, cli + ":33333", query, len(query)}}, 1, 0},
		{"its answer", in, ipv4(srv, cli, 17, 0, udpHdr(53, 33333, ans)), []want{{false, 17, cli + ":33333", ans, len(ans)}}, 1, 0},
		{"its answer again: one per query", in, ipv4(srv, cli, 17, 0, udpHdr(53, 33333, ans)), nil, 2, 0},
		{"the query again", eg, ipv4(cli, srv, 17, 0, udpHdr(33333, 53, query)), []want{{true, 17, cli + ":33333", query, len(query)}}, 2, 0},
		{"another id", in, ipv4(srv, cli, 17, 0, udpHdr(53, 33333, other)), nil, 3, 0},
		{"another server", in, ipv4("10.0.0.54", cli, 17, 0, udpHdr(53, 33333, ans)), nil, 4, 0},
		{"another client port", in, ipv4(srv, cli, 17, 0, udpHdr(53, 33334, ans)), nil, 5, 0},
		{"another client address", in, ipv4(srv, "10.0.0.2", 17, 0, udpHdr(53, 33333, ans)), nil, 6, 0},
		{"over tcp", in, ipv4(srv, cli, 6, 0, seg(53, 33333, fPSH|fACK, framed(ans))), nil, 7, 0},
		{"shorter than a DNS header", in, ipv4(srv, cli, 17, 0, udpHdr(53, 33333, ans[:11])), nil, 8, 0},
		{"udp from another port", in, ipv4(srv, cli, 17, 0, udpHdr(5353, 33333, ans)), nil, 8, 0},
		{"udp from 53 on egress (a local server's answer)", eg, ipv4(srv, cli, 17, 0, udpHdr(53, 33333, ans)), nil, 8, 0},
		{"another query", eg, ipv4(cli, srv, 17, 0, udpHdr(33333, 53, query)), []want{{true, 17, cli + ":33333", query, len(query)}}, 8, 0},
		{"answer longer than the kernel copies", in, ipv4(srv, cli, 17, 0, udpHdr(53, 33333, big)), []want{{false, 17, cli + ":33333", big[:2047], len(big)}}, 8, 0},
		{"udp6 query", eg, ipv6(cli6, srv6, nil, 17, udpHdr(40001, 53, query)), []want{{true, 17, "[" + cli6 + "]:40001", query, len(query)}}, 8, 0},
		{"udp6 answer", in, ipv6(srv6, cli6, nil, 17, udpHdr(53, 40001, ans)), []want{{false, 17, "[" + cli6 + "]:40001", ans, len(ans)}}, 8, 0},
		{"udp6 answer with another id", in, ipv6(srv6, cli6, nil, 17, udpHdr(53, 40001, other)), nil, 9, 0},
		// Kind 4 of issue 14: data from port 53 without our SYN.
		{"tcp segment from 53 on no connection of ours", in, ipv4(srv, cli, 6, 0, seg(53, 40000, fPSH|fACK, framed(ans))), nil, 10, 0},
		{"tcp syn to 53", eg, ipv4(cli, srv, 6, 0, seg(40000, 53, fSYN, nil)), nil, 10, 0},
		{"tcp query", eg, ipv4(cli, srv, 6, 0, seg(40000, 53, fPSH|fACK, framed(query))), []want{{true, 6, cli + ":40000", framed(query), len(query) + 2}}, 10, 0},
		{"tcp answer", in, ipv4(srv, cli, 6, 0, seg(53, 40000, fPSH|fACK, framed(ans))), []want{{false, 6, cli + ":40000", framed(ans), len(ans) + 2}}, 10, 0},
		{"tcp ack from 53 without data", in, ipv4(srv, cli, 6, 0, seg(53, 40000, fACK, nil)), nil, 10, 0},
		// Kind 3: a peer connects from port 53 to a service of ours; what
		// the service sends back is no query, what the peer sends no answer.
		{"service reply to a peer's port 53", eg, ipv4(cli, "10.0.0.66", 6, 0, seg(8080, 53, fPSH|fACK, framed(query))), nil, 10, 0},
		{"peer data from port 53 to a service", in, ipv4("10.0.0.66", cli, 6, 0, seg(53, 8080, fPSH|fACK, framed(ans))), nil, 11, 0},
		{"tcp6 syn to 53", eg, ipv6(cli6, srv6, nil, 6, seg(40002, 53, fSYN, nil)), nil, 11, 0},
		{"tcp6 answer", in, ipv6(srv6, cli6, nil, 6, seg(53, 40002, fPSH|fACK, framed(ans))), []want{{false, 6, "[" + cli6 + "]:40002", framed(ans), len(ans) + 2}}, 11, 0},
		{"tcp6 answer to another port", in, ipv6(srv6, cli6, nil, 6, seg(53, 40003, fPSH|fACK, framed(ans))), nil, 12, 0},
		{"a query left unanswered", eg, ipv4(cli, srv, 17, 0, udpHdr(33333, 53, query)), []want{{true, 17, cli + ":33333", query, len(query)}}, 12, 0},
		{"udp answer after the timeout", in, ipv4(srv, cli, 17, 0, udpHdr(53, 33333, ans)), nil, 13, 400 * time.Millisecond},
	}
	for _, st := range steps {
		time.Sleep(st.sleep)
		recs := runPacketDNS(t, c, st.prog, st.pkt)
		if len(recs) != len(st.want) {
			t.Fatalf("%s: got %d DNS records, want %d", st.name, len(recs), len(st.want))
		}
		for i, w := range st.want {
			r := recs[i]
			if r.query != w.query || r.proto != w.proto || r.client.String() != w.client || r.server.Port() != 53 ||
				string(r.data) != string(w.payload) || r.origLen != w.orig || r.cookie != 0 {
				t.Errorf("%s: got query %v proto %d %s -> %s cookie %d, %d bytes of %d; want query %v proto %d client %s, %d bytes of %d",
					st.name, r.query, r.proto, r.client, r.server, r.cookie, len(r.data), r.origLen, w.query, w.proto, w.client, len(w.payload), w.orig)
			}
		}
		k, err := c.Counters()
		if err != nil {
			t.Fatal(err)
		}
		if k.DNSUnsolicited != st.unsolicited {
			t.Errorf("%s: unsolicited count %d, want %d", st.name, k.DNSUnsolicited, st.unsolicited)
		}
	}
	k, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if k.DNSCut != 1 || k.DNSFull != 0 || k.DNSQueryFull != 0 {
		t.Errorf("counters %+v: want 1 answer cut, none lost", k)
	}
}
