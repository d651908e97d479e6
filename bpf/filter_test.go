package bpf

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/bpf/cgroupv2"
	"github.com/flowbus/flowbus/bpf/netnstest"
	"github.com/flowbus/flowbus/schema"
)

func init() {
	cgrouptest.Register("filter-dial", filterDialHelper)
	cgrouptest.Register("filter-listen", filterListenHelper)
}

// plainListen listens on addr with plain TCP (Go's listeners default to
// Multipath TCP, whose subflows the programs do not see as TCP).
func plainListen(addr string) (net.Listener, error) {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	return lc.Listen(context.Background(), "tcp", addr)
}

// filterDialHelper: addr... Connects to each address in turn, reads the
// server's byte and closes, then reports the local addresses (comma
// separated, in order).
func filterDialHelper(args []string) error {
	var locals []string
	for _, a := range args {
		var d net.Dialer
		d.SetMultipathTCP(false)
		c, err := d.Dial("tcp", a)
		if err != nil {
			return err
		}
		locals = append(locals, c.LocalAddr().String())
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			return err
		}
		c.Close()
	}
	report(procReport{Pid: os.Getpid(), Local: strings.Join(locals, ",")})
	waitStdin()
	return nil
}

// filterListenHelper listens on 127.0.0.1 and ::1 and reports both
// addresses (comma separated).
func filterListenHelper([]string) error {
	var addrs []string
	for _, a := range []string{"127.0.0.1:0", "[::1]:0"} {
		ln, err := plainListen(a)
		if err != nil {
			return err
		}
		go serveConns(ln)
		addrs = append(addrs, ln.Addr().String())
	}
	report(procReport{Pid: os.Getpid(), Addr: strings.Join(addrs, ",")})
	waitStdin()
	return nil
}

// filterConn is a connection the test made, as the reference sees it.
type filterConn struct {
	dir      schema.Direction
	src, dst netip.AddrPort // initiator, responder
	comm     string         // the process of the watched socket
}

func (c filterConn) remote() netip.Addr {
	if c.dir == schema.Outgoing {
		return c.dst.Addr()
	}
	return c.src.Addr()
}

// refReason is the reference the kernel's filters are held to, written
// from the documented rules rather than from the C: "" keeps the begin,
// else the reason it is dropped for (the first test that fails).
func refReason(f Filter, c filterConn) string {
	inPorts := func(rs []PortRange, p uint16) bool {
		return slices.ContainsFunc(rs, func(r PortRange) bool { return r.First <= p && p <= r.Last })
	}
	inCIDRs := func(ps []netip.Prefix, a netip.Addr) bool {
		return slices.ContainsFunc(ps, func(p netip.Prefix) bool { return p.Contains(a) })
	}
	switch {
	case f.Direction == "outgoing" && c.dir != schema.Outgoing, f.Direction == "incoming" && c.dir != schema.Incoming:
		return "direction"
	case len(f.Ports) > 0 && !inPorts(f.Ports, c.dst.Port()), inPorts(f.ExcludePorts, c.dst.Port()):
		return "port"
	case len(f.CIDRs) > 0 && !inCIDRs(f.CIDRs, c.remote()), inCIDRs(f.ExcludeCIDRs, c.remote()):
		return "cidr"
	case len(f.Comms) > 0 && !slices.Contains(f.Comms, c.comm), slices.Contains(f.ExcludeComms, c.comm):
		return "comm"
	}
	return ""
}

// Filters drop exactly what the reference says: connections on several
// ports, over IPv4 (two loopback addresses) and IPv6, outgoing from two
// programs and incoming to a third, under each filter in turn; the begins
// and ends that came out are those of the connections kept, and each
// reason's counter is the number the reference dropped for it.
func TestFilters(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	exes := helperExes(t, "fbfilt-a", "fbfilt-b", "fbfilt-l")

	// Servers in the test process, outside the watched cgroups: only the
	// helpers' sockets are watched.
	var p1, p2, p1b, p1v6, p2v6 string
	for _, x := range []struct {
		dst  *string
		addr string
	}{{&p1, "127.0.0.1:0"}, {&p2, "127.0.0.1:0"}, {&p1b, "127.0.0.2:0"}, {&p1v6, "[::1]:0"}, {&p2v6, "[::1]:0"}} {
		ln, err := plainListen(x.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go serveConns(ln)
		*x.dst = ln.Addr().String()
	}
	port := func(a string) uint16 { return netip.MustParseAddrPort(a).Port() }
	targets := []string{p1, p2, p1b, p1v6, p2v6}

	cases := []struct {
		name string
		f    Filter
	}{
		{"none", Filter{}},
		{"incoming only", Filter{Direction: "incoming"}},
		{"outgoing only", Filter{Direction: "outgoing"}},
		{"ports", Filter{Ports: []PortRange{{port(p1), port(p1)}, {port(p2v6), port(p2v6)}}}},
		{"exclude ports", Filter{ExcludePorts: []PortRange{{port(p2), port(p2)}}}},
		{"cidrs", Filter{CIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/31"), netip.MustParsePrefix("::1/128")},
			ExcludeCIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}}},
		{"ipv4 only", Filter{CIDRs: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}}},
		{"comms", Filter{Comms: []string{"fbfilt-a", "fbfilt-l"}}},
		{"exclude comms", Filter{ExcludeComms: []string{"fbfilt-b"}}},
		{"all together", Filter{Direction: "", ExcludePorts: []PortRange{{port(p2), port(p2)}},
			CIDRs:        []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::/0")},
			ExcludeCIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}, ExcludeComms: []string{"fbfilt-b"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cg := cgrouptest.NewChild(t)
			c, col := runCaptureWith(t, Options{CgroupPath: cg.Path, Filter: tc.f})

			var conns []filterConn
			for _, comm := range []string{"fbfilt-a", "fbfilt-b"} {
				h := startHelper(t, cg, exes[comm], -1, "filter-dial", targets...)
				for i, l := range strings.Split(h.r.Local, ",") {
					conns = append(conns, filterConn{schema.Outgoing, netip.MustParseAddrPort(l), netip.MustParseAddrPort(targets[i]), comm})
				}
			}
			lh := startHelper(t, cg, exes["fbfilt-l"], -1, "filter-listen")
			for _, a := range strings.Split(lh.r.Addr, ",") {
				for range 2 {
					cn, err := net.Dial("tcp", a)
					if err != nil {
						t.Fatal(err)
					}
					if _, err := io.ReadFull(cn, make([]byte, 1)); err != nil {
						t.Fatal(err)
					}
					conns = append(conns, filterConn{schema.Incoming, netip.MustParseAddrPort(cn.LocalAddr().String()), netip.MustParseAddrPort(a), "fbfilt-l"})
					cn.Close()
				}
			}

			wantBegins := map[string]bool{}
			wantDrops := map[string]uint64{}
			for _, cn := range conns {
				if r := refReason(tc.f, cn); r != "" {
					wantDrops[r]++
				} else {
					wantBegins[fmt.Sprintf("%v %s -> %s", cn.dir, cn.src, cn.dst)] = true
				}
			}
			if tc.f.Active() && len(wantBegins) == len(conns) {
				t.Fatalf("filter %s drops nothing of the %d connections: the case tests nothing", tc.f.String(), len(conns))
			}

			// Every begin, end and drop has happened once the counts add up;
			// a quiet 300 ms then shows any extra.
			got := func() (begins, ends map[string]int, k Counters) {
				col.mu.Lock()
				defer col.mu.Unlock()
				begins, ends = map[string]int{}, map[string]int{}
				for _, ev := range col.evs {
					begins[tupleOf(ev).String()]++
				}
				for _, e := range col.ends {
					ends[flowTuple{e.Direction, netip.AddrPortFrom(e.Src, e.SrcPort), netip.AddrPortFrom(e.Dst, e.DstPort)}.String()]++
				}
				k, err := c.Counters()
				if err != nil {
					t.Fatal(err)
				}
				return begins, ends, k
			}
			dropped := func(k Counters) (n uint64) {
				for _, r := range FilterReasons {
					n += k.Filtered(r)
				}
				return n
			}
			var wantDropped uint64
			for _, n := range wantDrops {
				wantDropped += n
			}
			deadline := time.Now().Add(15 * time.Second)
			for {
				b, e, k := got()
				if (len(b) >= len(wantBegins) && len(e) >= len(wantBegins) && dropped(k) >= wantDropped) || time.Now().After(deadline) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			time.Sleep(300 * time.Millisecond)
			begins, ends, k := got()
			for tu, n := range begins {
				if !wantBegins[tu] || n != 1 {
					t.Errorf("begin %s seen %d times, want %d", tu, n, map[bool]int{true: 1}[wantBegins[tu]])
				}
			}
			for tu, n := range ends {
				if !wantBegins[tu] || n != 1 {
					t.Errorf("end %s seen %d times, want %d", tu, n, map[bool]int{true: 1}[wantBegins[tu]])
				}
			}
			for tu := range wantBegins {
				if begins[tu] == 0 {
					t.Errorf("no begin for kept connection %s", tu)
				}
				if ends[tu] == 0 {
					t.Errorf("no end for kept connection %s", tu)
				}
			}
			for _, r := range FilterReasons {
				if k.Filtered(r) != wantDrops[r] {
					t.Errorf("filtered by %s: kernel counted %d, reference %d", r, k.Filtered(r), wantDrops[r])
				}
			}
			if k.RingbufFull != 0 {
				t.Errorf("kernel counters %+v: a loss muddles the counts", k)
			}
			t.Logf("filter %s: %d connections, %d kept, dropped %v", tc.f.String(), len(conns), len(wantBegins), wantDrops)
		})
	}
}

// Begins taken at the end of the handshake (SYN cookies: the egress
// program sees no SYN-ACK) are filtered there, and counted once: with
// every SYN answered by a cookie, IPv6 peers skipped by prefix, the IPv4
// connections have their begins and ends and the IPv6 ones none, and the
// cidr counter is the count of IPv6 connections the kernel completed.
func TestFilterAtEstablished(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	pair := netnstest.New(t)
	netnstest.Sysctl(t, pair.A, "net.ipv4.tcp_syncookies", "2")
	watched := cgrouptest.NewChild(t)
	other := cgrouptest.NewChild(t)
	f := Filter{ExcludeCIDRs: []netip.Prefix{netip.PrefixFrom(pair.B6, 128)}}
	c, col := runCaptureWith(t, Options{CgroupPath: watched.Path, Filter: f})

	const n = 50 // per family
	before := netnstest.Netstat(t, pair.A)
	port, stop := netnstest.Server(t, watched, pair.A, 1024)
	p := strconv.Itoa(port)
	res := netnstest.Clients(t, other, pair.B, strconv.Itoa(n), net.JoinHostPort(pair.A4.String(), p), net.JoinHostPort(pair.A6.String(), p))
	accepted := stop()
	d := netnstest.Delta(before, netnstest.Netstat(t, pair.A), "TcpExtSyncookiesRecv", "TcpPassiveOpens")
	if len(res.Conns) != 2*n || len(accepted) != 2*n || d["TcpExtSyncookiesRecv"] != 2*n || d["TcpPassiveOpens"] != 2*n {
		t.Fatalf("%d echoed, %d accepted, kernel: %s; want %d each: the test did not make what it meant to",
			len(res.Conns), len(accepted), netnstest.String(d, "TcpExtSyncookiesRecv", "TcpPassiveOpens"), 2*n)
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		col.mu.Lock()
		nb, ne := len(col.evs), len(col.ends)
		col.mu.Unlock()
		if nb >= n && ne >= n {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	k, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	col.mu.Lock()
	defer col.mu.Unlock()
	begins, ends := map[netip.AddrPort]int{}, map[netip.AddrPort]int{}
	for _, ev := range col.evs {
		if ev.Src != pair.B4 || ev.Direction != schema.Incoming {
			t.Errorf("begin %s:%d -> %s:%d %v: want IPv4 incoming only", ev.Src, ev.SrcPort, ev.Dst, ev.DstPort, ev.Direction)
		}
		begins[netip.AddrPortFrom(ev.Src, ev.SrcPort)]++
	}
	for _, e := range col.ends {
		if e.Src != pair.B4 {
			t.Errorf("end %s:%d -> %s:%d: want IPv4 only", e.Src, e.SrcPort, e.Dst, e.DstPort)
		}
		ends[netip.AddrPortFrom(e.Src, e.SrcPort)]++
	}
	for _, cn := range res.Conns {
		ap := netip.MustParseAddrPort(cn.Client)
		want := 0
		if ap.Addr() == pair.B4 {
			want = 1
		}
		if begins[ap] != want || ends[ap] != want {
			t.Errorf("%s: %d begins and %d ends, want %d each", ap, begins[ap], ends[ap], want)
		}
	}
	if k.FilteredCIDR != n || k.BeginsAtEstablished != n || k.FilteredPort+k.FilteredComm+k.FilteredDirection+k.FilteredSelf != 0 {
		t.Errorf("kernel counters %+v: want %d filtered by cidr, %d begins at established, no other drop", k, n, n)
	}
}

// moveSelf moves this whole process into the cgroup directory dir and
// returns the function that moves it back where it was.
func moveSelf(t *testing.T, dir string) (back func()) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	var rel string
	for _, l := range strings.Split(string(b), "\n") {
		if r, ok := strings.CutPrefix(l, "0::"); ok {
			rel = r
		}
	}
	root, err := cgroupv2.DetectRoot()
	if err != nil || rel == "" {
		t.Fatalf("this process's cgroup v2: %q, %v", rel, err)
	}
	orig := filepath.Join(root, rel)
	pid := []byte(strconv.Itoa(os.Getpid()))
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), pid, 0o644); err != nil {
		t.Fatalf("moving the test into %s: %v", dir, err)
	}
	return func() {
		if err := os.WriteFile(filepath.Join(orig, "cgroup.procs"), pid, 0o644); err != nil {
			t.Fatalf("moving the test back into %s: %v", orig, err)
		}
	}
}

// The loading process's own outgoing connections are dropped in the kernel
// (reason self) when ExcludeSelf is set: the test, moved into the watched
// cgroup, connects 5 times and a helper there 3 times; only the helper's
// begins and ends come out.
func TestFilterSelf(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	exes := helperExes(t, "fbfilt-a")
	ln, err := plainListen("127.0.0.1:0") // before the move: its side is not watched
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go serveConns(ln)
	srv := ln.Addr().String()

	cg := cgrouptest.NewChild(t)
	c, col := runCaptureWith(t, Options{CgroupPath: cg.Path, Filter: Filter{ExcludeSelf: true}})

	const own, theirs = 5, 3
	back := moveSelf(t, cg.Path)
	for range own {
		var d net.Dialer
		d.SetMultipathTCP(false)
		cn, err := d.Dial("tcp", srv)
		if err != nil {
			back()
			t.Fatal(err)
		}
		_, _ = io.ReadFull(cn, make([]byte, 1))
		cn.Close()
	}
	back()
	h := startHelper(t, cg, exes["fbfilt-a"], -1, "filter-dial", slices.Repeat([]string{srv}, theirs)...)
	want := map[string]bool{}
	for _, l := range strings.Split(h.r.Local, ",") {
		want[l] = true
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		col.mu.Lock()
		nb, ne := len(col.evs), len(col.ends)
		col.mu.Unlock()
		k, _ := c.Counters()
		if nb >= theirs && ne >= theirs && k.FilteredSelf >= own {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	k, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	col.mu.Lock()
	defer col.mu.Unlock()
	for _, ev := range col.evs {
		if src := netip.AddrPortFrom(ev.Src, ev.SrcPort).String(); !want[src] || ev.Comm != "fbfilt-a" {
			t.Errorf("begin from %s (%s[%d]): want only the helper's %v", src, ev.Comm, ev.PID, want)
		}
	}
	for _, e := range col.ends {
		if src := netip.AddrPortFrom(e.Src, e.SrcPort).String(); !want[src] {
			t.Errorf("end from %s: want only the helper's", src)
		}
	}
	if len(col.evs) != theirs || len(col.ends) != theirs || k.FilteredSelf != own {
		t.Errorf("%d begins, %d ends, %d filtered as self: want %d, %d, %d", len(col.evs), len(col.ends), k.FilteredSelf, theirs, theirs, own)
	}
}
