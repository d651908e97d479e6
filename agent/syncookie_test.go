package agent

import (
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/bpf/netnstest"
	"github.com/flowbus/flowbus/schema"
)

// TestSynCookieBeginsEndToEnd: a server in the watched cgroup in network
// namespace A answers every SYN with a cookie (tcp_syncookies=2), clients in
// namespace B (not watched) connect over IPv4, IPv6 and link-local IPv6.
// The stream holds exactly one incoming event per connection, with its
// 4-tuple, the link-local ones with the zone of A's interface, through the
// enrichment, the batch encoding and JetStream.
func TestSynCookieBeginsEndToEnd(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	pair := netnstest.New(t)
	netnstest.Sysctl(t, pair.A, "net.ipv4.tcp_syncookies", "2")
	cg := cgrouptest.NewChild(t)
	other := cgrouptest.NewChild(t)
	a := startAgent(t, testConfig(t, cg.Path))

	port, stop := netnstest.Server(t, cg, pair.A, 128)
	p := strconv.Itoa(port)
	const n = 20 // per address
	res := netnstest.Clients(t, other, pair.B, strconv.Itoa(n),
		net.JoinHostPort(pair.A4.String(), p), net.JoinHostPort(pair.A6.String(), p),
		net.JoinHostPort(pair.LLA.WithZone(pair.IfB).String(), p))
	stop()
	if len(res.Conns) != 3*n {
		t.Fatalf("%d connections (%d failed: %s), want %d", len(res.Conns), res.Failed, res.Err, 3*n)
	}
	want := map[tuple]bool{}
	for _, c := range res.Conns {
		cl, sv := netip.MustParseAddrPort(c.Client), netip.MustParseAddrPort(c.Server)
		if cl.Addr().IsLinkLocalUnicast() {
			// The client printed B's zone; the event is A's side.
			cl = netip.AddrPortFrom(cl.Addr().WithZone(pair.IfA), cl.Port())
			sv = netip.AddrPortFrom(sv.Addr().WithZone(pair.IfA), sv.Port())
		}
		want[tuple{schema.Incoming, cl, sv}] = true
	}

	got := readStream(t, a.ClientURL(), "FLOWS", len(want), 500*time.Millisecond)
	seen := map[tuple]int{}
	for _, r := range got {
		ev := r.Ev
		tu := tuple{ev.Direction, netip.AddrPortFrom(ev.Src, ev.SrcPort), netip.AddrPortFrom(ev.Dst, ev.DstPort)}
		seen[tu]++
		if !want[tu] {
			t.Errorf("event %v %s -> %s is none of the test's connections", tu.dir, tu.src, tu.dst)
		}
		if ev.CgroupID != cg.ID() {
			t.Errorf("event %s -> %s: cgroup id %d, want %d", tu.src, tu.dst, ev.CgroupID, cg.ID())
		}
	}
	for tu := range want {
		if seen[tu] != 1 {
			t.Errorf("%d events for %s -> %s, want 1", seen[tu], tu.src, tu.dst)
		}
	}
	k, err := a.capture.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if k.BeginsAtEstablished != uint64(len(want)) {
		t.Errorf("begins at established %d, want %d (every one a cookie)", k.BeginsAtEstablished, len(want))
	}
	t.Logf("%d connections, %d events, begins at established %d", len(want), len(got), k.BeginsAtEstablished)
}
