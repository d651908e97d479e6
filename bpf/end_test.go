package bpf

import (
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/bpf/netnstest"
	"github.com/flowbus/flowbus/schema"
)

// waitEnds returns the ends once at least n have arrived and quiet passed
// without another, or at the deadline.
func (c *collector) waitEnds(n int, quiet, max time.Duration) []schema.EndEvent {
	deadline := time.Now().Add(max)
	last, lastChange := -1, time.Now()
	for time.Now().Before(deadline) {
		c.mu.Lock()
		got := len(c.ends)
		c.mu.Unlock()
		if got != last {
			last, lastChange = got, time.Now()
		}
		if got >= n && time.Since(lastChange) >= quiet {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]schema.EndEvent(nil), c.ends...)
}

func endTuple(e schema.EndEvent) flowTuple {
	return flowTuple{e.Direction, netip.AddrPortFrom(e.Src, e.SrcPort), netip.AddrPortFrom(e.Dst, e.DstPort)}
}

// checkEnd compares an end with what tcpdump saw of its connection.
func checkEnd(t *testing.T, e schema.EndEvent, f netnstest.Flow, begins []schema.Event, want schema.EndReason, exactBytes bool) {
	t.Helper()
	tu := endTuple(e)
	if e.Reason != want {
		t.Errorf("%v: reason %v, want %v", tu, e.Reason, want)
	}
	if exactBytes && (e.SrcBytes != f.ClientBytes || e.DstBytes != f.ServerBytes) {
		t.Errorf("%v: bytes %d/%d (initiator/responder), tcpdump saw %d/%d (each byte once; %d/%d with retransmissions)",
			tu, e.SrcBytes, e.DstBytes, f.ClientBytes, f.ServerBytes, f.ClientSent, f.ServerSent)
	}
	if (f.ClientBytes > 0 && e.SrcSegs == 0) || (f.ServerBytes > 0 && exactBytes && e.DstSegs == 0) {
		t.Errorf("%v: data segments %d/%d for %d/%d bytes", tu, e.SrcSegs, e.DstSegs, f.ClientBytes, f.ServerBytes)
	}
	nb := 0
	for _, b := range begins {
		if tupleOf(b) == tu {
			nb++
			// One kernel time, converted to wall-clock time at two polls:
			// the conversion's own error apart (well under a microsecond).
			if d := b.Timestamp - e.BeginNs; d > 5000 || d < -5000 {
				t.Errorf("%v: end's begin time %d, the begin's timestamp %d: want the same within 5 us", tu, e.BeginNs, b.Timestamp)
			}
		}
	}
	if nb != 1 {
		t.Errorf("%v: %d begins for this end, want 1", tu, nb)
	}
	span := f.Last.Sub(f.SYN)
	// The begin is at the SYN-ACK, or at the handshake's ACK for a SYN
	// cookie: up to the handshake's time (tcpdump's SYN to ACK, several
	// milliseconds on a loaded machine) after the SYN.
	hs := time.Duration(0)
	if !f.Established.IsZero() {
		hs = f.Established.Sub(f.SYN)
	}
	if d := time.Duration(e.Duration()) - span; d > time.Millisecond || d < -time.Millisecond-hs {
		t.Errorf("%v: duration %v, tcpdump's SYN to last FIN/RST %v (handshake %v): off by %v", tu, time.Duration(e.Duration()), span, hs, d)
	}
	t.Logf("%v: %v, %v (tcpdump %v), bytes %d/%d (tcpdump %d/%d, sent %d/%d), segs %d/%d, retrans %d (tcpdump: %d/%d packets), srtt %d us",
		tu, e.Reason, time.Duration(e.Duration()), span, e.SrcBytes, e.DstBytes, f.ClientBytes, f.ServerBytes, f.ClientSent, f.ServerSent,
		e.SrcSegs, e.DstSegs, e.Retrans, f.ClientRetrans, f.ServerRetrans, e.SRTTus)
}

// TestEndReasons: one connection per way of ending, between a client in
// namespace B and a server in namespace A, both in the watched cgroup: each
// endpoint's end carries the reason the kernel's state says, the payload
// bytes tcpdump saw on the link each way, the begin's own timestamp and a
// duration within 1 ms of tcpdump's SYN to last FIN or RST. With
// tcp_syncookies=2 (the begin taken at established) the same. With every
// 7th data packet dropped each way, the bytes are still exact and both
// sides count retransmissions.
func TestEndReasons(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	for _, tc := range []struct {
		name               string
		mode               string
		v6, cookies, lossy bool
		req, resp          int
		server, client     schema.EndReason
	}{
		{name: "fin", mode: netnstest.EndFIN, req: 3000, resp: 70000, server: schema.EndFIN, client: schema.EndFIN},
		{name: "fin-ipv6", mode: netnstest.EndFIN, v6: true, req: 100, resp: 5000, server: schema.EndFIN, client: schema.EndFIN},
		{name: "fin-syncookies", mode: netnstest.EndFIN, cookies: true, req: 1000, resp: 1000, server: schema.EndFIN, client: schema.EndFIN},
		{name: "server-rst", mode: netnstest.EndServerRST, req: 5000, resp: 0, server: schema.EndRSTSent, client: schema.EndRSTReceived},
		{name: "client-rst", mode: netnstest.EndClientRST, req: 200, resp: 20000, server: schema.EndRSTReceived, client: schema.EndRSTSent},
		{name: "lossy", mode: netnstest.EndFIN, lossy: true, req: 400000, resp: 400000, server: schema.EndFIN, client: schema.EndFIN},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pair := netnstest.New(t)
			if tc.cookies {
				netnstest.Sysctl(t, pair.A, "net.ipv4.tcp_syncookies", "2")
			}
			if tc.lossy {
				for _, ns := range []string{pair.A, pair.B} {
					netnstest.Nft(t, ns, "add", "table", "inet", "fb")
					netnstest.Nft(t, ns, "add", "chain", "inet", "fb", "in", "{ type filter hook input priority 0; }")
					netnstest.Nft(t, ns, "add", "rule", "inet", "fb", "in", "tcp", "flags", "&", "(fin|syn|rst)", "==", "0", "meta", "length", ">", "200", "numgen", "inc", "mod", "7", "==", "0", "drop")
				}
			}
			watched := cgrouptest.NewChild(t)
			_, col := runCapture(t, watched)
			srv := netnstest.StartConnServer(t, watched, pair.A, tc.mode, tc.req, tc.resp)
			stop := netnstest.Tcpdump(t, pair.A, pair.IfA, "tcp port "+strconv.Itoa(srv.Port))
			a, b := pair.A4, pair.B4
			if tc.v6 {
				a, b = pair.A6, pair.B6
			}
			wait := netnstest.StartConnClient(t, watched, pair.B, tc.mode, net.JoinHostPort(a.String(), strconv.Itoa(srv.Port)), tc.req, tc.resp)
			cout := wait()
			sout := srv.Line(t)
			ends := col.waitEnds(2, 200*time.Millisecond, 5*time.Second)
			pk := stop()
			t.Logf("client: %q; server: %q; %d packets", cout, sout, len(pk))
			begins := col.wait(2, 0)
			var client netip.AddrPort
			for _, p := range pk {
				if p.Flags&netnstest.FlagSYN != 0 && p.Src.Addr().Unmap() == b {
					client = netip.AddrPortFrom(b, p.Src.Port())
					break
				}
			}
			server := netip.AddrPortFrom(a, uint16(srv.Port))
			f := netnstest.Summarize(pk, client, server)
			if len(ends) != 2 {
				t.Fatalf("%d ends, want 2 (one per endpoint): %+v", len(ends), ends)
			}
			for _, e := range ends {
				if e.CgroupID != watched.ID() {
					t.Errorf("%v: cgroup %d, want %d", endTuple(e), e.CgroupID, watched.ID())
				}
				if netip.AddrPortFrom(e.Src, e.SrcPort) != client || netip.AddrPortFrom(e.Dst, e.DstPort) != server {
					t.Errorf("end %v is not the connection %s -> %s", endTuple(e), client, server)
					continue
				}
				want := tc.client
				if e.Direction == schema.Incoming {
					want = tc.server
				}
				checkEnd(t, e, f, begins, want, true)
				if tc.lossy && e.Retrans == 0 {
					t.Errorf("%v: no retransmissions counted with every 7th data packet dropped (tcpdump: %d/%d)", endTuple(e), f.ClientRetrans, f.ServerRetrans)
				}
			}
			if ends[0].Direction == ends[1].Direction {
				t.Errorf("two ends of direction %v, want one incoming and one outgoing", ends[0].Direction)
			}
		})
	}
}

// TestEndTimeout: the server's peer vanishes (all its packets dropped in A)
// while the server has data to send; with tcp_retries2=2 the kernel gives
// up within seconds, and the end says timeout, with retransmissions, the
// request's bytes exact and none of the response's (never acknowledged).
func TestEndTimeout(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	pair := netnstest.New(t)
	netnstest.Sysctl(t, pair.A, "net.ipv4.tcp_retries2", "2")
	watched := cgrouptest.NewChild(t)
	other := cgrouptest.NewChild(t)
	_, col := runCapture(t, watched)
	srv := netnstest.StartConnServer(t, watched, pair.A, netnstest.EndStall, 1000, 30000)
	stop := netnstest.Tcpdump(t, pair.A, pair.IfA, "tcp port "+strconv.Itoa(srv.Port))
	netnstest.StartConnClient(t, other, pair.B, netnstest.EndStall, net.JoinHostPort(pair.A4.String(), strconv.Itoa(srv.Port)), 1000, 30000)
	if l := srv.Line(t); l != "ready" {
		t.Fatalf("server: %q", l)
	}
	netnstest.Nft(t, pair.A, "add", "table", "inet", "fb")
	netnstest.Nft(t, pair.A, "add", "chain", "inet", "fb", "in", "{ type filter hook input priority 0; }")
	netnstest.Nft(t, pair.A, "add", "rule", "inet", "fb", "in", "ip", "saddr", pair.B4.String(), "drop")
	srv.Go()
	sout := srv.Line(t)
	ends := col.waitEnds(1, 100*time.Millisecond, 20*time.Second)
	pk := stop()
	if !strings.Contains(sout, "timed out") {
		t.Errorf("server: %q, want a timeout", sout)
	}
	if len(ends) != 1 {
		t.Fatalf("%d ends, want 1", len(ends))
	}
	e := ends[0]
	f := netnstest.Summarize(pk, netip.AddrPortFrom(e.Src, e.SrcPort), netip.AddrPortFrom(e.Dst, e.DstPort))
	if e.Reason != schema.EndTimeout || e.Retrans == 0 || e.SrcBytes != f.ClientBytes || e.DstBytes != 0 {
		t.Errorf("end %v: reason %v, retrans %d, bytes %d/%d: want timeout, retransmissions, %d/0", endTuple(e), e.Reason, e.Retrans, e.SrcBytes, e.DstBytes, f.ClientBytes)
	}
	// The last packet on the wire is the last retransmission; the kernel
	// gives up one RTO after it: the duration is not tcpdump's span here.
	t.Logf("end %v: %v after %v, retrans %d (tcpdump: %d data packets retransmitted), bytes %d/%d (tcpdump %d/%d unique, the response never acked)",
		endTuple(e), e.Reason, time.Duration(e.Duration()), e.Retrans, f.ServerRetrans, e.SrcBytes, e.DstBytes, f.ClientBytes, f.ServerBytes)
}

// TestHalfOpenNeverEstablished: 20 handshakes to a listener in the watched
// cgroup whose SYN-ACKs B drops (so they never complete: a spoofed SYN
// looks the same to A), and 5 that complete, to another listener. With
// tcp_synack_retries=1 in A the kernel gives up after 3 s; the capture, told
// so (HalfOpenTimeout 3 s + slack), ends each of the 20 begins with
// never_established, and nothing else; the 5 get their fin ends and no
// never_established.
func TestHalfOpenNeverEstablished(t *testing.T) {
	halfOpenNeverEstablished(t, Options{})
}

// TestHalfOpenBeyondTheHotTable is TestHalfOpenNeverEstablished with a hot
// seen table of one bucket (4 entries) and a cold one of 512: the 20
// handshakes that never complete overflow the hot table into the cold one,
// where their retransmitted SYN-ACKs must still be found (one begin each),
// and at the end the two tables hold exactly those 20, none evicted.
func TestHalfOpenBeyondTheHotTable(t *testing.T) {
	c := halfOpenNeverEstablished(t, Options{SeenEntries: 512, seenHot: 1})
	hot, cold := seenUsed(t, c.objs.SeenHot), seenUsed(t, c.objs.SeenOcc)
	var occ int
	for _, n := range cold {
		occ += n
	}
	var inCold int
	iter := c.objs.Seen.Iterate()
	var k uint32
	var b flowbusSeenBucket
	for iter.Next(&k, &b) {
		for _, w := range b.Way {
			inCold += int(w.Used)
		}
	}
	if err := iter.Err(); err != nil {
		t.Fatal(err)
	}
	cnt, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("seen tables after the test: %d entries hot, %d cold (occupancy bytes sum to %d), %d evicted, %d retransmissions suppressed", hot[0], inCold, occ, cnt.SeenEvicted, cnt.Duplicates)
	if hot[0]+inCold != 20 || occ != inCold || inCold < 16 || cnt.SeenEvicted != 0 || cnt.Duplicates < 20 {
		t.Errorf("want the 20 half-open handshakes in the tables (at most 4 hot), the occupancy bytes matching the cold table, none evicted and each retransmission suppressed")
	}
}

// seenUsed counts the used entries of a seen table's buckets (SeenHot), or
// sums the occupancy bytes of SeenOcc, by element.
func seenUsed(t *testing.T, m *ebpf.Map) []int {
	t.Helper()
	var out []int
	iter := m.Iterate()
	var k uint32
	if m.ValueSize() == 8 {
		var v uint64
		for iter.Next(&k, &v) {
			n := 0
			for i := 0; i < 8; i++ {
				n += int(v >> (8 * i) & 0xff)
			}
			out = append(out, n)
		}
	} else {
		var b flowbusSeenBucket
		n := 0
		for iter.Next(&k, &b) {
			for _, w := range b.Way {
				n += int(w.Used)
			}
		}
		out = append(out, n)
	}
	if err := iter.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// halfOpenSetup is the setting of the half-open tests: A gives a handshake
// up after one SYN-ACK retransmission (3 s), B a SYN after one retry; two
// listeners in A's watched cgroup, the dead one's SYN-ACKs dropped by B (its
// handshakes never complete), the live one's not; the capture runs with o
// (the half-open timeout set to A's window) on the watched cgroup.
type halfOpenSetup struct {
	pair               *netnstest.Pair
	other              *cgrouptest.Cgroup
	c                  *Capture
	col                *collector
	timeout            time.Duration
	dead, live         int
	stopDead, stopLive func() []cgrouptest.Conn
}

func newHalfOpenSetup(t *testing.T, o Options) *halfOpenSetup {
	cgrouptest.RequirePrivileged(t)
	s := &halfOpenSetup{pair: netnstest.New(t), timeout: SynAckWindow(1) + HalfOpenSlack}
	netnstest.Sysctl(t, s.pair.A, "net.ipv4.tcp_synack_retries", "1")
	netnstest.Sysctl(t, s.pair.B, "net.ipv4.tcp_syn_retries", "1")
	watched := cgrouptest.NewChild(t)
	s.other = cgrouptest.NewChild(t)
	o.CgroupPath, o.HalfOpenTimeout = watched.Path, s.timeout
	s.c, s.col = runCaptureWith(t, o)
	s.dead, s.stopDead = netnstest.Server(t, watched, s.pair.A, 128)
	s.live, s.stopLive = netnstest.Server(t, watched, s.pair.A, 128)
	netnstest.Nft(t, s.pair.B, "add", "table", "inet", "fb")
	netnstest.Nft(t, s.pair.B, "add", "chain", "inet", "fb", "in", "{ type filter hook input priority 0; }")
	netnstest.Nft(t, s.pair.B, "add", "rule", "inet", "fb", "in", "tcp", "sport", strconv.Itoa(s.dead), "drop")
	return s
}

func halfOpenNeverEstablished(t *testing.T, o Options) *Capture {
	s := newHalfOpenSetup(t, o)
	pair, other, c, col, timeout := s.pair, s.other, s.c, s.col, s.timeout
	dead, stopDead, live, stopLive := s.dead, s.stopDead, s.live, s.stopLive
	const n, m = 20, 5
	start := time.Now()
	res := make(chan netnstest.ClientsResult, 1)
	go func() {
		res <- netnstest.Clients(t, other, pair.B, strconv.Itoa(n), net.JoinHostPort(pair.A4.String(), strconv.Itoa(dead)))
	}()
	lr := netnstest.Clients(t, other, pair.B, strconv.Itoa(m), net.JoinHostPort(pair.A4.String(), strconv.Itoa(live)))
	stopLive()
	if len(lr.Conns) != m {
		t.Fatalf("%d of %d live connections (%s)", len(lr.Conns), m, lr.Err)
	}
	dr := <-res
	stopDead()
	if len(dr.Conns) != 0 {
		t.Fatalf("%d connections to the dead listener completed", len(dr.Conns))
	}
	ends := col.waitEnds(n+m, 500*time.Millisecond, timeout+5*time.Second)
	evs := col.wait(n+m, 0)
	byPort := map[uint16]int{}
	for _, ev := range evs {
		byPort[ev.DstPort]++
	}
	never, fin := 0, 0
	var latest time.Duration
	for _, e := range ends {
		switch {
		case e.DstPort == uint16(dead) && e.Reason == schema.EndNeverEstablished:
			never++
			if d := time.Duration(e.Duration()); d > latest {
				latest = d
			}
			if d := time.Duration(e.Duration()); d < SynAckWindow(1) || d > timeout+time.Second {
				t.Errorf("%v: never_established after %v, want from the kernel's window %v to the timeout %v (+1 s)", endTuple(e), d, SynAckWindow(1), timeout)
			}
		case e.DstPort == uint16(live) && e.Reason == schema.EndFIN:
			fin++
		default:
			t.Errorf("unexpected end %v reason %v", endTuple(e), e.Reason)
		}
	}
	ho := c.HalfOpen()
	t.Logf("begins: %d to the dead listener, %d to the live one; ends: %d never_established (the last %v after its begin; %v after the first SYN), %d fin; half-open table: %+v",
		byPort[uint16(dead)], byPort[uint16(live)], never, latest, time.Since(start).Round(time.Millisecond), fin, ho)
	if byPort[uint16(dead)] != n || never != n || fin != m || ho.Pending != 0 || ho.NeverEstablished != n {
		t.Errorf("want %d begins and %d never_established ends for the dead listener, %d fin ends for the live one, nothing pending", n, n, m)
	}
	return c
}
