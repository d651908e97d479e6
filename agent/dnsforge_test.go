package agent

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"golang.org/x/sys/unix"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
)

func init() {
	cgrouptest.Register("forge-target", forgeTargetHelper)
}

// forgeTargetHelper runs inside the watched cgroup: a UDP listener and an
// echoing TCP service for forgers to aim at, and a listener on the address
// svc.flowbus.test resolves to. It prints their ports, then obeys lines on
// stdin, answering each with a JSON line:
//
//	query SERVER NAME ID  a query from a new socket, kept open: {"port"}
//	connect               a connection to the target: {"client","server"}
//	resolve SERVER        resolve svc.flowbus.test, connect at once
//	ask SERVER            resolve svc.flowbus.test from a socket kept open
//	resolve-tcp SERVER NAME  resolve NAME over TCP, connect at once to a
//	                      listener on its address
//	edns SERVER NAME      ask for NAME's A records with EDNS (4,096-byte
//	                      UDP), connect at once to listeners on the first
//	                      and the last address: {"size","addrs","conns"}
func forgeTargetHelper([]string) error {
	udp, err := net.ListenPacket("udp", ":0")
	if err != nil {
		return err
	}
	svc, err := net.Listen("tcp", ":0")
	if err != nil {
		return err
	}
	target, err := net.Listen("tcp", "127.1.2.3:0")
	if err != nil {
		return err
	}
	go func() {
		buf := make([]byte, 2048)
		for {
			if _, _, err := udp.ReadFrom(buf); err != nil {
				return
			}
		}
	}()
	go func() {
		for {
			c, err := svc.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); c.Close() }()
		}
	}()
	go func() {
		for {
			c, err := target.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	enc := json.NewEncoder(os.Stdout)
	targetAddr := target.Addr().String()
	if err := enc.Encode(map[string]int{"udp": udp.LocalAddr().(*net.UDPAddr).Port, "tcp": svc.Addr().(*net.TCPAddr).Port,
		"target": target.Addr().(*net.TCPAddr).Port}); err != nil {
		return err
	}
	var kept []net.Conn
	defer func() {
		for _, c := range kept {
			c.Close()
		}
	}()
	connect := func(addr string) error {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		return enc.Encode(cgrouptest.Conn{Client: c.LocalAddr().String(), Server: c.RemoteAddr().String()})
	}
	// ask sends one query from a socket that stays open and waits a little
	// for the reply.
	ask := func(server, name string, id uint16) (int, error) {
		c, err := net.Dial("udp", server)
		if err != nil {
			return 0, err
		}
		kept = append(kept, c)
		q, err := (&dnsmessage.Message{Header: dnsmessage.Header{ID: id, RecursionDesired: true},
			Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}}}).Pack()
		if err != nil {
			return 0, err
		}
		if _, err := c.Write(q); err != nil {
			return 0, err
		}
		_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		_, _ = c.Read(make([]byte, 1500))
		return c.LocalAddr().(*net.UDPAddr).Port, nil
	}
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		var err error
		switch {
		case len(f) == 4 && f[0] == "query":
			id, _ := strconv.ParseUint(f[3], 0, 16)
			var port int
			if port, err = ask(f[1], f[2], uint16(id)); err == nil {
				err = enc.Encode(map[string]int{"port": port})
			}
		case len(f) == 1 && f[0] == "connect":
			err = connect(targetAddr)
		case len(f) == 2 && f[0] == "resolve":
			r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "udp", f[1])
			}}
			var ips []netip.Addr
			if ips, err = r.LookupNetIP(context.Background(), "ip4", "svc.flowbus.test."); err == nil {
				err = connect(net.JoinHostPort(ips[0].String(), strconv.Itoa(target.Addr().(*net.TCPAddr).Port)))
			}
		case len(f) == 3 && f[0] == "resolve-tcp":
			r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", f[1])
			}}
			var ips []netip.Addr
			if ips, err = r.LookupNetIP(context.Background(), "ip4", f[2]); err == nil {
				var ln net.Listener
				if ln, err = net.Listen("tcp", net.JoinHostPort(ips[0].String(), "0")); err == nil {
					go func() {
						if c, err := ln.Accept(); err == nil {
							c.Close()
						}
						ln.Close()
					}()
					err = connect(ln.Addr().String())
				}
			}
		case len(f) == 3 && f[0] == "edns":
			err = ednsConnect(enc, f[1], f[2])
		case len(f) == 2 && f[0] == "ask":
			var port int
			if port, err = ask(f[1], "svc.flowbus.test.", 0x5151); err == nil {
				err = enc.Encode(map[string]int{"port": port})
			}
		default:
			err = fmt.Errorf("unknown command %q", sc.Text())
		}
		if err != nil {
			return err
		}
	}
	return sc.Err()
}

// ednsConnect asks server for name's A records in one EDNS query from a
// socket of its own, as a resolver that advertises 4,096 bytes does, reads
// every address of the answer, and connects at once to listeners on the
// first and the last.
func ednsConnect(enc *json.Encoder, server, name string) error {
	c, err := net.Dial("udp", server)
	if err != nil {
		return err
	}
	defer c.Close()
	var opt dnsmessage.ResourceHeader
	if err := opt.SetEDNS0(4096, dnsmessage.RCodeSuccess, false); err != nil {
		return err
	}
	q, err := (&dnsmessage.Message{Header: dnsmessage.Header{ID: 0x6161, RecursionDesired: true},
		Questions:   []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}},
		Additionals: []dnsmessage.Resource{{Header: opt, Body: &dnsmessage.OPTResource{}}}}).Pack()
	if err != nil {
		return err
	}
	if _, err := c.Write(q); err != nil {
		return err
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	if err != nil {
		return err
	}
	var m dnsmessage.Message
	if err := m.Unpack(buf[:n]); err != nil {
		return err
	}
	var addrs []netip.Addr
	for _, r := range m.Answers {
		if a, ok := r.Body.(*dnsmessage.AResource); ok {
			addrs = append(addrs, netip.AddrFrom4(a.A))
		}
	}
	if len(addrs) == 0 {
		return fmt.Errorf("the answer for %s has no A record", name)
	}
	var conns []cgrouptest.Conn
	for _, a := range []netip.Addr{addrs[0], addrs[len(addrs)-1]} {
		ln, err := net.Listen("tcp", net.JoinHostPort(a.String(), "0"))
		if err != nil {
			return err
		}
		go func() {
			if c, err := ln.Accept(); err == nil {
				c.Close()
			}
		}()
		conn, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
		if err != nil {
			ln.Close()
			return err
		}
		conns = append(conns, cgrouptest.Conn{Client: conn.LocalAddr().String(), Server: conn.RemoteAddr().String()})
		conn.Close()
		ln.Close()
	}
	return enc.Encode(struct {
		Size  int
		Addrs []netip.Addr
		Conns []cgrouptest.Conn
	}{n, addrs, conns})
}

// forgeServer is the real DNS server of these tests: not TestDNSEnrichment's,
// so that the two never compete for the port.
const forgeServer = "127.77.1.53:53"

// lockPort53 serializes the tests that bind port 53 on fixed addresses
// (the forgers', ::1 among them) with those of any other run of this
// package on the machine.
func lockPort53(t *testing.T) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(os.TempDir(), "flowbus-agent-test-port53.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() }) // closing releases the lock
}

// forgery is a DNS answer for question (name, A) with id, whose records put
// the names of chain on addr (a CNAME from name to each hop, an A record
// for the last), with a 6 h TTL.
func forgery(t *testing.T, id uint16, name string, addr netip.Addr, chain ...string) []byte {
	t.Helper()
	m := dnsmessage.Message{Header: dnsmessage.Header{ID: id, Response: true, Authoritative: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}}}
	owner := name
	for _, next := range chain {
		m.Answers = append(m.Answers, dnsmessage.Resource{Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(owner), Class: dnsmessage.ClassINET, TTL: 6 * 3600},
			Body: &dnsmessage.CNAMEResource{CNAME: dnsmessage.MustNewName(next)}})
		owner = next
	}
	m.Answers = append(m.Answers, dnsmessage.Resource{Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(owner), Class: dnsmessage.ClassINET, TTL: 6 * 3600},
		Body: &dnsmessage.AResource{A: addr.As4()}})
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// recordingServer is the test zone's DNS server on UDP addr that also
// remembers where each name's last query came from, so that a test can
// forge from the very server address and port.
type recordingServer struct {
	pc   net.PacketConn
	mu   sync.Mutex
	last map[string]struct {
		from net.Addr
		id   uint16
	}
}

func newRecordingServer(t *testing.T, addr string) *recordingServer {
	t.Helper()
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		t.Fatalf("test DNS server on %s: %v", addr, err)
	}
	t.Cleanup(func() { pc.Close() })
	s := &recordingServer{pc: pc, last: map[string]struct {
		from net.Addr
		id   uint16
	}{}}
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			var p dnsmessage.Parser
			if h, err := p.Start(buf[:n]); err == nil {
				if q, err := p.Question(); err == nil {
					s.mu.Lock()
					s.last[strings.ToLower(q.Name.String())] = struct {
						from net.Addr
						id   uint16
					}{from, h.ID}
					s.mu.Unlock()
				}
			}
			if resp, err := answer(buf[:n]); err == nil {
				_, _ = pc.WriteTo(resp, from)
			}
		}
	}()
	return s
}

// serveTCP answers the test zone over TCP on the server's address too.
func (s *recordingServer) serveTCP(t *testing.T) {
	t.Helper()
	ln, err := net.Listen("tcp", s.pc.LocalAddr().String())
	if err != nil {
		t.Fatalf("test DNS server over TCP: %v", err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				for {
					var n uint16
					if err := binary.Read(c, binary.BigEndian, &n); err != nil {
						return
					}
					q := make([]byte, n)
					if _, err := io.ReadFull(c, q); err != nil {
						return
					}
					resp, err := answer(q)
					if err != nil {
						return
					}
					if _, err := c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(resp))), resp...)); err != nil {
						return
					}
				}
			}()
		}
	}()
}

// rawTCP6 sends one TCP segment from src to dst over IPv6 through a raw
// socket; the kernel fills in the checksum.
func rawTCP6(t *testing.T, src, dst netip.AddrPort, flags byte, payload []byte) {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET6, syscall.SOCK_RAW, syscall.IPPROTO_TCP)
	if err != nil {
		t.Fatalf("raw socket: %v", err)
	}
	defer syscall.Close(fd)
	if err := syscall.SetsockoptInt(fd, syscall.IPPROTO_IPV6, unix.IPV6_CHECKSUM, 16); err != nil {
		t.Fatalf("IPV6_CHECKSUM: %v", err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrInet6{Addr: src.Addr().As16()}); err != nil {
		t.Fatalf("raw bind: %v", err)
	}
	tcp := make([]byte, 20, 20+len(payload))
	binary.BigEndian.PutUint16(tcp[0:], src.Port())
	binary.BigEndian.PutUint16(tcp[2:], dst.Port())
	binary.BigEndian.PutUint32(tcp[4:], 0x01020304)
	binary.BigEndian.PutUint32(tcp[8:], 0x05060708)
	tcp[12] = 5 << 4
	tcp[13] = flags
	binary.BigEndian.PutUint16(tcp[14:], 65535)
	if err := syscall.Sendto(fd, append(tcp, payload...), 0, &syscall.SockaddrInet6{Addr: dst.Addr().As16()}); err != nil {
		t.Fatalf("raw send: %v", err)
	}
}

// rawTCP sends one TCP segment with flags and payload from src to dst
// through a raw socket: no handshake, no socket of the sender.
func rawTCP(t *testing.T, src, dst netip.AddrPort, flags byte, payload []byte) {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_RAW)
	if err != nil {
		t.Fatalf("raw socket: %v", err)
	}
	defer syscall.Close(fd)
	tcp := make([]byte, 20, 20+len(payload))
	binary.BigEndian.PutUint16(tcp[0:], src.Port())
	binary.BigEndian.PutUint16(tcp[2:], dst.Port())
	binary.BigEndian.PutUint32(tcp[4:], 0x01020304)
	binary.BigEndian.PutUint32(tcp[8:], 0x05060708)
	tcp[12] = 5 << 4
	tcp[13] = flags
	binary.BigEndian.PutUint16(tcp[14:], 65535)
	tcp = append(tcp, payload...)
	s, d := src.Addr().As4(), dst.Addr().As4()
	pseudo := append(append(append([]byte{}, s[:]...), d[:]...), 0, syscall.IPPROTO_TCP, byte(len(tcp)>>8), byte(len(tcp)))
	binary.BigEndian.PutUint16(tcp[16:], checksum(append(pseudo, tcp...)))
	ip := make([]byte, 20, 20+len(tcp))
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(tcp)))
	ip[8] = 64
	ip[9] = syscall.IPPROTO_TCP
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	binary.BigEndian.PutUint16(ip[10:], checksum(ip))
	if err := syscall.Sendto(fd, append(ip, tcp...), 0, &syscall.SockaddrInet4{Addr: d}); err != nil {
		t.Fatalf("raw send: %v", err)
	}
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// peerNetns makes a network namespace joined to this one by a veth pair
// (10.99.N.1 and fd00:77:N::1 here, 10.99.N.2 and fd00:77:N::2 there) and
// returns UDP sockets bound to port 53 inside it, IPv4 and IPv6, with this
// side's addresses.
func peerNetns(t *testing.T) (peer4, peer6 net.PacketConn, local4, local6 netip.Addr) {
	t.Helper()
	n := os.Getpid()%200 + 20
	ns, here, there := fmt.Sprintf("fbforge%d", os.Getpid()), fmt.Sprintf("fbf%da", os.Getpid()%100000), fmt.Sprintf("fbf%db", os.Getpid()%100000)
	local, peer := fmt.Sprintf("10.99.%d.1", n), fmt.Sprintf("10.99.%d.2", n)
	localV6, peerV6 := fmt.Sprintf("fd00:77:%x::1", n), fmt.Sprintf("fd00:77:%x::2", n)
	run := func(args ...string) {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	run("link", "add", here, "type", "veth", "peer", "name", there, "netns", ns)
	// Deleting the namespace deletes its end, and with it this one; this is
	// for a test that fails between the two.
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", here).Run() })
	run("addr", "add", local+"/24", "dev", here)
	// nodad: the addresses are usable at once, not after duplicate address detection.
	run("addr", "add", localV6+"/64", "dev", here, "nodad")
	run("link", "set", here, "up")
	run("-n", ns, "addr", "add", peer+"/24", "dev", there)
	run("-n", ns, "addr", "add", peerV6+"/64", "dev", there, "nodad")
	run("-n", ns, "link", "set", there, "up")

	// A socket keeps the namespace it was made in.
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	target, err := os.Open("/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		t.Fatalf("entering %s: %v", ns, err)
	}
	pc4, lerr4 := net.ListenPacket("udp", peer+":53")
	pc6, lerr6 := net.ListenPacket("udp", "["+peerV6+"]:53")
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		t.Fatalf("leaving %s: %v", ns, err) // the thread stays locked: it dies with the test
	}
	runtime.UnlockOSThread()
	for _, pc := range []net.PacketConn{pc4, pc6} {
		if pc != nil {
			t.Cleanup(func() { pc.Close() })
		}
	}
	if lerr4 != nil {
		t.Fatal(lerr4)
	}
	if lerr6 != nil {
		t.Fatal(lerr6)
	}
	return pc4, pc6, netip.MustParseAddr(local), netip.MustParseAddr(localV6)
}

// Issue 14's forgeries, from outside the watched cgroup, each putting a
// name on the address a watched process then connects to: none labels the
// connection, and each is counted as unsolicited where it was dropped. The
// real answer from the real server labels the same connection at once,
// and forgeries after it, from the server's own address and port with the
// query's id and question, change nothing.
func TestDNSForgeriesNeverLabel(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs the ip command for the network namespace")
	}
	lockPort53(t)
	const server = forgeServer
	srv := newRecordingServer(t, server)
	cg := cgrouptest.NewChild(t)
	a := startAgent(t, testConfig(t, cg.Path))
	target := netip.MustParseAddr("127.1.2.3")

	ft := startForgeTarget(t, cg)
	ports := ft.ports
	do := func(line string, out any) { t.Helper(); ft.do(t, line, out) }
	// waitCounts waits for the kernel's and user space's unsolicited counts.
	waitCounts := func(kind string, kernel, user uint64) {
		t.Helper()
		deadline := time.Now().Add(3 * time.Second)
		for {
			s := a.Snapshot()
			if s.Kernel.DNSUnsolicited == kernel && s.DNSMatch.Unsolicited == user {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("after %s: unsolicited %d in the kernel, %d in user space; want %d, %d", kind, s.Kernel.DNSUnsolicited, s.DNSMatch.Unsolicited, kernel, user)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	bank := func(id uint16, name string) []byte { return forgery(t, id, name, target, "bank.example.") }

	// 1. Unsolicited UDP from port 53 to a listener that never asked, IPv4 and IPv6.
	for _, c := range []struct{ from, to string }{{"127.66.0.53:53", "127.0.0.1"}, {"[::1]:53", "::1"}} {
		pc, err := net.ListenPacket("udp", c.from)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := pc.WriteTo(bank(0x4242, "bank.example."), net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(c.to), uint16(ports.UDP)))); err != nil {
			t.Fatal(err)
		}
		pc.Close()
	}
	waitCounts("kind 1", 2, 0)

	// 2. A real query (0x1234, shop.example) to a server that answers with
	// another id (dropped in the kernel), and with the right id but another
	// question (dropped here), IPv4 and IPv6.
	var q struct{ Port int }
	for i, evilAddr := range []string{"127.66.0.53:53", "[::1]:53"} {
		evil, err := net.ListenPacket("udp", evilAddr)
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			buf := make([]byte, 1500)
			_ = evil.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, from, err := evil.ReadFrom(buf); err == nil {
				_, _ = evil.WriteTo(bank(0x9999, "bank.example."), from)
				_, _ = evil.WriteTo(bank(0x1234, "bank.example."), from)
			}
		}()
		do("query "+evilAddr+" shop.example. 0x1234", &q)
		waitCounts("kind 2 from "+evilAddr, uint64(3+i), uint64(1+i))
		evil.Close() // [::1]:53 is the real IPv6 server's below
	}

	// 3. A TCP connection from port 53 into the cgroup's service, carrying
	// a DNS message, IPv4 and IPv6; the service echoes it back to port 53.
	for _, c := range []struct{ from, to string }{{"127.66.0.53", "127.0.0.1"}, {"::1", "::1"}} {
		// SO_REUSEADDR: the last run's connection from port 53 may be in TIME_WAIT.
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(c.from), Port: 53}, Timeout: 5 * time.Second,
			Control: func(_, _ string, rc syscall.RawConn) error {
				var serr error
				if err := rc.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1) }); err != nil {
					return err
				}
				return serr
			}}
		conn, err := d.Dial("tcp", net.JoinHostPort(c.to, strconv.Itoa(ports.TCP)))
		if err != nil {
			t.Fatal(err)
		}
		m := bank(0x4343, "bank.example.")
		framed := append(binary.BigEndian.AppendUint16(nil, uint16(len(m))), m...)
		if _, err := conn.Write(framed); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(conn, make([]byte, len(framed))); err != nil {
			t.Fatalf("echo: %v", err)
		}
		_ = conn.(*net.TCPConn).SetLinger(0) // a reset, not TIME_WAIT on port 53
		conn.Close()
	}
	waitCounts("kind 3", 6, 2)

	// 4. One raw PSH|ACK segment from port 53, no handshake, to the
	// listening port, IPv4 and IPv6.
	m := bank(0x4444, "bank.example.")
	framedM := append(binary.BigEndian.AppendUint16(nil, uint16(len(m))), m...)
	rawTCP(t, netip.MustParseAddrPort("127.66.0.54:53"), netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(ports.TCP)), 0x18, framedM)
	rawTCP6(t, netip.MustParseAddrPort("[::1]:53"), netip.AddrPortFrom(netip.MustParseAddr("::1"), uint16(ports.TCP)), 0x18, framedM)
	waitCounts("kind 4", 8, 2)

	// 5. A peer in another network namespace, IPv4 and IPv6.
	peer4, peer6, local4, local6 := peerNetns(t)
	for _, c := range []struct {
		from net.PacketConn
		to   netip.Addr
	}{{peer4, local4}, {peer6, local6}} {
		if _, err := c.from.WriteTo(bank(0x4545, "bank.example."), net.UDPAddrFromAddrPort(netip.AddrPortFrom(c.to, uint16(ports.UDP)))); err != nil {
			t.Fatalf("from the peer namespace to %s: %v", c.to, err)
		}
	}
	waitCounts("kind 5", 10, 2)

	// None of it labels a connection to the forged address.
	var forged, real cgrouptest.Conn
	do("connect", &forged)
	// The same connection after a real answer from the real server is labelled.
	do("resolve "+server, &real)

	// 6. Eight forged answers, 6 h TTL, from the real server's address and
	// port with the id and question of a real query already answered, over
	// IPv4 and over IPv6 (a real server on [::1]:53 too).
	srv6 := newRecordingServer(t, "[::1]:53")
	for i, c := range []struct {
		addr string
		srv  *recordingServer
	}{{server, srv}, {"[::1]:53", srv6}} {
		do("ask "+c.addr, &q)
		c.srv.mu.Lock()
		asked := c.srv.last["svc.flowbus.test."]
		c.srv.mu.Unlock()
		if asked.from == nil || asked.from.(*net.UDPAddr).Port != q.Port {
			t.Fatalf("the server on %s saw the query from %v, the helper asked from port %d", c.addr, asked.from, q.Port)
		}
		for i := range 8 {
			f := forgery(t, asked.id, "svc.flowbus.test.", target, fmt.Sprintf("bank%d.example.", i))
			if _, err := c.srv.pc.WriteTo(f, asked.from); err != nil {
				t.Fatal(err)
			}
		}
		// The kernel lets one answer through per query: the real one.
		waitCounts("kind 6 from "+c.addr, uint64(18+8*i), 2)
	}
	var after cgrouptest.Conn
	do("connect", &after)

	realNames := []string{"e1.cdn.flowbus.test", "edge.cdn.flowbus.test", "svc.flowbus.test"}
	want := map[string][]string{forged.Client: nil, real.Client: realNames, after.Client: realNames}
	got := readStream(t, a.ClientURL(), "FLOWS", 6, 300*time.Millisecond)
	seen := 0
	for _, r := range got {
		for _, n := range append(slices.Clone(r.Ev.SrcDNS), r.Ev.DstDNS...) {
			if strings.Contains(n, "example") {
				t.Errorf("event %s:%d -> %s:%d carries the forged name %q", r.Ev.Src, r.Ev.SrcPort, r.Ev.Dst, r.Ev.DstPort, n)
			}
		}
		if r.Ev.Dst != target {
			continue
		}
		names, ok := want[netip.AddrPortFrom(r.Ev.Src, r.Ev.SrcPort).String()]
		if !ok {
			t.Errorf("unexpected event %+v", r.Ev)
			continue
		}
		seen++
		if dst := slices.Sorted(slices.Values(r.Ev.DstDNS)); !slices.Equal(dst, names) {
			t.Errorf("%s event %s:%d -> %s: dst_dns %q, want %q", r.Ev.Direction, r.Ev.Src, r.Ev.SrcPort, r.Ev.Dst, dst, names)
		}
	}
	if seen != 6 {
		t.Errorf("%d events of the three connections to %s, want 6", seen, target)
	}
	s := a.Snapshot()
	if s.DNS.Answers != 3 || s.DNSMatch.Answered != 3 || s.DNSMatch.Unsolicited != 2 || s.Kernel.DNSUnsolicited != 26 {
		t.Errorf("counters %+v %+v, kernel %+v: want the 3 real answers learned, 2 unsolicited here, 26 in the kernel", s.DNS, s.DNSMatch, s.Kernel)
	}
}

// DNS over TCP on a connection the watched process opened to port 53: the
// real answer passes the kernel and the matcher and labels the connection
// made at once.
func TestDNSOverTCPLabels(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	lockPort53(t)
	const server = forgeServer
	newRecordingServer(t, server).serveTCP(t)
	cg := cgrouptest.NewChild(t)
	a := startAgent(t, testConfig(t, cg.Path))
	var conn cgrouptest.Conn
	startForgeTarget(t, cg).do(t, "resolve-tcp "+server+" client.flowbus.test.", &conn)
	got := readStream(t, a.ClientURL(), "FLOWS", 2, 300*time.Millisecond)
	n := 0
	for _, r := range got {
		if r.Ev.Dst.String() != "127.4.5.6" {
			continue
		}
		n++
		if !slices.Equal(r.Ev.DstDNS, []string{"client.flowbus.test"}) {
			t.Errorf("%s event to %s: dst_dns %q, want client.flowbus.test", r.Ev.Direction, r.Ev.Dst, r.Ev.DstDNS)
		}
	}
	if n != 2 {
		t.Errorf("%d events of the connection to 127.4.5.6, want 2", n)
	}
	if s := a.Snapshot(); s.DNSMatch.Answered != 1 || s.DNSMatch.Unsolicited != 0 || s.Kernel.DNSUnsolicited != 0 || s.DNS.Answers != 1 {
		t.Errorf("counters %+v %+v, kernel %+v: want the one TCP answer matched and learned", s.DNS, s.DNSMatch, s.Kernel)
	}
}

// A flood of forged answers at the rate this test can make, while the
// watched cgroup makes connections through a ring buffer of the smallest
// size allowed: the kernel drops every forged answer before the ring, so no
// connection event is lost, and counts each one.
func TestDNSFloodCostsNoEvent(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	lockPort53(t)
	cg := cgrouptest.NewChild(t)
	cfg := testConfig(t, cg.Path)
	cfg.RingbufBytes = 64 << 10 // 32 answer records would fill it
	a := startAgent(t, cfg)

	ports := startForgeTarget(t, cg).ports
	to := net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(ports.UDP)))
	pc, err := net.ListenPacket("udp", "127.66.0.53:53")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	forged := forgery(t, 0x4646, "bank.example.", netip.MustParseAddr("127.1.2.3"), "bank.example.")

	drops0 := softnetDrops(t)
	stop := make(chan struct{})
	sent := make(chan int)
	start := time.Now()
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				sent <- n
				return
			default:
			}
			for range 64 {
				if _, err := pc.WriteTo(forged, to); err == nil {
					n++
				}
			}
		}
	}()
	const rounds, perRound, conns = 10, 200, 10 * 200
	for range rounds {
		cg.Traffic(t, "127.0.0.1", perRound, false)
	}
	close(stop)
	n := <-sent
	elapsed := time.Since(start)
	dropped := softnetDrops(t) - drops0

	deadline := time.Now().Add(5 * time.Second)
	var s Snapshot
	for {
		s = a.Snapshot()
		if (s.Captured >= 2*conns && s.Kernel.DNSUnsolicited+dropped >= uint64(n)) || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("%d forged answers in %v (%.0f/s), %d dropped by the backlog before the programs; %d connections", n, elapsed, float64(n)/elapsed.Seconds(), dropped, conns)
	if s.Captured != 2*conns || s.Kernel.RingbufFull != 0 || s.Kernel.DNSFull != 0 {
		t.Errorf("captured %d events of %d, ring buffer full %d (flow) %d (DNS): want none lost", s.Captured, 2*conns, s.Kernel.RingbufFull, s.Kernel.DNSFull)
	}
	if s.Kernel.DNSUnsolicited+dropped != uint64(n) || s.DNSRecords != 0 || s.DNS.Answers != 0 {
		t.Errorf("unsolicited %d + %d dropped before the kernel's programs, of %d sent; %d answers reached user space, %d learned: want all counted, none passed on",
			s.Kernel.DNSUnsolicited, dropped, n, s.DNSRecords, s.DNS.Answers)
	}
}

// softnetDrops sums the packets the CPUs' input backlogs dropped
// (/proc/net/softnet_stat, second column): on loopback those never reach
// a socket, nor the cgroup programs.
func softnetDrops(t *testing.T) uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/net/softnet_stat")
	if err != nil {
		t.Fatal(err)
	}
	var sum uint64
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, err := strconv.ParseUint(f[1], 16, 64)
		if err != nil {
			t.Fatalf("softnet_stat %q: %v", line, err)
		}
		sum += v
	}
	return sum
}

// A real EDNS answer of 120 A records (about 1,960 bytes over UDP, under
// the 2,047 bytes the kernel copies) from a real DNS server to a real
// query of the watched cgroup: every address is learned, the answer lands
// in exactly one outcome (learned), and connections to the first and the
// last address carry the name.
func TestDNSLargeEDNSAnswerLearnsAll(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	lockPort53(t)
	const server, name, records = "127.77.3.53:53", "many.flowbus.test.", 120
	addrs := make([]netip.Addr, records)
	for i := range addrs {
		addrs[i] = netip.AddrFrom4([4]byte{127, 88, byte((i + 1) >> 8), byte(i + 1)})
	}
	pc, err := net.ListenPacket("udp", server)
	if err != nil {
		t.Fatalf("test DNS server on %s: %v", server, err)
	}
	t.Cleanup(func() { pc.Close() })
	sizes := make(chan int, 1)
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			resp, err := manyAnswer(buf[:n], name, addrs)
			if err != nil {
				t.Errorf("test DNS server: %v", err)
				return
			}
			select {
			case sizes <- len(resp):
			default:
			}
			_, _ = pc.WriteTo(resp, from)
		}
	}()

	cg := cgrouptest.NewChild(t)
	a := startAgent(t, testConfig(t, cg.Path))
	var res struct {
		Size  int
		Addrs []netip.Addr
		Conns []cgrouptest.Conn
	}
	startForgeTarget(t, cg).do(t, "edns "+server+" "+name, &res)
	if sent := <-sizes; res.Size != sent || sent <= 1900 || sent > 2047 {
		t.Fatalf("the client read %d bytes of a %d-byte answer: want the whole answer, 1,901 to 2,047 bytes", res.Size, sent)
	}
	t.Logf("answer of %d A records: %d bytes over UDP", records, res.Size)
	if !slices.Equal(res.Addrs, addrs) {
		t.Fatalf("the client read %d addresses %v, want the %d served", len(res.Addrs), res.Addrs, records)
	}

	first, last := addrs[0], addrs[records-1]
	got := readStream(t, a.ClientURL(), "FLOWS", 4, 300*time.Millisecond)
	seen := map[netip.Addr]int{}
	for _, r := range got {
		if r.Ev.Dst != first && r.Ev.Dst != last {
			t.Errorf("unexpected event %+v", r.Ev)
			continue
		}
		seen[r.Ev.Dst]++
		if !slices.Equal(r.Ev.DstDNS, []string{strings.TrimSuffix(name, ".")}) {
			t.Errorf("%s event to %s: dst_dns %q, want %s", r.Ev.Direction, r.Ev.Dst, r.Ev.DstDNS, name)
		}
	}
	if seen[first] != 2 || seen[last] != 2 {
		t.Errorf("events per address %v: want 2 (outgoing and incoming) to each of %s and %s", seen, first, last)
	}
	s := a.Snapshot()
	if s.DNS.Records != records || s.DNS.Entries != records {
		t.Errorf("%d records learned, %d addresses cached: want %d of each", s.DNS.Records, s.DNS.Entries, records)
	}
	if s.DNS.Answers != 1 || s.DNS.Partial != 0 || s.DNS.Truncated != 0 || s.DNS.Malformed != 0 || s.DNS.Ignored != 0 ||
		s.DNS.DroppedCut != 0 || s.DNS.DroppedMalformed != 0 {
		t.Errorf("DNS outcomes %+v: want the answer learned once, in no other outcome, no record dropped", s.DNS)
	}
	if s.DNSMatch.Answered != 1 || s.DNSMatch.Unsolicited != 0 || s.Kernel.DNSUnsolicited != 0 || s.Kernel.DNSCut != 0 || s.Kernel.DNSFull != 0 {
		t.Errorf("matcher %+v, kernel %+v: want the one answer matched, none unsolicited, cut or lost", s.DNSMatch, s.Kernel)
	}
}

// manyAnswer answers query, which must ask for name's A records, with one
// A record of name for each of addrs and an EDNS OPT record, compressed as
// a real server does.
func manyAnswer(query []byte, name string, addrs []netip.Addr) ([]byte, error) {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil {
		return nil, err
	}
	q, err := p.Question()
	if err != nil {
		return nil, err
	}
	if !strings.EqualFold(q.Name.String(), name) || q.Type != dnsmessage.TypeA {
		return nil, fmt.Errorf("asked %s %s, serving only %s A", q.Name, q.Type, name)
	}
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired})
	b.EnableCompression()
	_ = b.StartQuestions()
	_ = b.Question(q)
	_ = b.StartAnswers()
	for _, a := range addrs {
		if err := b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 300}, dnsmessage.AResource{A: a.As4()}); err != nil {
			return nil, err
		}
	}
	_ = b.StartAdditionals()
	var opt dnsmessage.ResourceHeader
	if err := opt.SetEDNS0(4096, dnsmessage.RCodeSuccess, false); err != nil {
		return nil, err
	}
	if err := b.OPTResource(opt, dnsmessage.OPTResource{}); err != nil {
		return nil, err
	}
	return b.Finish()
}

// forgeTarget is the forge-target helper running inside the watched cgroup:
// it reports its listening ports, then answers one JSON value per command.
type forgeTarget struct {
	stdin io.Writer
	dec   *json.Decoder
	ports struct{ UDP, TCP, Target int }
}

// startForgeTarget starts the helper in cg and reads its ports; it is
// stopped when the test ends.
func startForgeTarget(t *testing.T, cg *cgrouptest.Cgroup) *forgeTarget {
	t.Helper()
	cmd := cg.Command("forge-target")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); _ = cmd.Wait() })
	ft := &forgeTarget{stdin: stdin, dec: json.NewDecoder(stdout)}
	if err := ft.dec.Decode(&ft.ports); err != nil {
		t.Fatalf("helper ports: %v", err)
	}
	return ft
}

// do sends one command line and decodes its answer into out.
func (ft *forgeTarget) do(t *testing.T, line string, out any) {
	t.Helper()
	if _, err := fmt.Fprintln(ft.stdin, line); err != nil {
		t.Fatal(err)
	}
	if err := ft.dec.Decode(out); err != nil {
		t.Fatalf("helper %q: %v", line, err)
	}
}
