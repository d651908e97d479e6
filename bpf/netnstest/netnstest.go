// Package netnstest gives privileged tests two network namespaces joined by
// a veth pair, so that connections cross a real link (with link-local
// addresses) and each side has its own sysctls and TCP counters.
package netnstest

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// holders are processes that sit in a namespace so that its counters can be
// read from /proc/<pid>/net at once, without starting a process each time.
var (
	holdersMu sync.Mutex
	holders   = map[string]int{}
)

// Pair is two namespaces, A and B, and the veth pair between them.
type Pair struct {
	A, B     string     // namespace names (ip netns)
	IfA, IfB string     // the veth ends: IfA lives in A, IfB in B
	A4, B4   netip.Addr // IPv4 addresses of the ends
	A6, B6   netip.Addr // IPv6 (unique local) addresses
	LLA, LLB netip.Addr // link-local addresses, without zone
}

// New creates the pair; namespaces and links are removed when the test
// ends, also when it fails.
func New(t testing.TB) *Pair {
	t.Helper()
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatal("netnstest needs the ip command (iproute2): install it")
	}
	var r [3]byte
	if _, err := rand.Read(r[:]); err != nil {
		t.Fatal(err)
	}
	id := hex.EncodeToString(r[:])
	p := &Pair{
		A: "flowbus-" + id + "-a", B: "flowbus-" + id + "-b",
		IfA: "fba" + id, IfB: "fbb" + id,
		A4: netip.MustParseAddr("10.231.0.1"), B4: netip.MustParseAddr("10.231.0.2"),
		A6: netip.MustParseAddr("fd00:231::1"), B6: netip.MustParseAddr("fd00:231::2"),
		LLA: netip.MustParseAddr("fe80::231:a"), LLB: netip.MustParseAddr("fe80::231:b"),
	}
	t.Cleanup(func() {
		// Deleting one end deletes both; the namespaces go with their names
		// once no process is left inside.
		_ = exec.Command("ip", "-n", p.A, "link", "del", p.IfA).Run()
		_ = exec.Command("ip", "netns", "del", p.A).Run()
		_ = exec.Command("ip", "netns", "del", p.B).Run()
	})
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("netns", "add", p.A)
	run("netns", "add", p.B)
	run("link", "add", p.IfA, "netns", p.A, "type", "veth", "peer", "name", p.IfB, "netns", p.B)
	for _, s := range []struct {
		ns, dev string
		v4, v6  netip.Addr
		ll      netip.Addr
	}{{p.A, p.IfA, p.A4, p.A6, p.LLA}, {p.B, p.IfB, p.B4, p.B6, p.LLB}} {
		// No generated link-local address and no duplicate address
		// detection: the addresses below are usable at once.
		run("-n", s.ns, "link", "set", s.dev, "addrgenmode", "none")
		run("-n", s.ns, "addr", "add", s.v4.String()+"/24", "dev", s.dev)
		run("-n", s.ns, "addr", "add", s.v6.String()+"/64", "dev", s.dev, "nodad")
		run("-n", s.ns, "addr", "add", s.ll.String()+"/64", "dev", s.dev, "nodad")
		run("-n", s.ns, "link", "set", "lo", "up")
		run("-n", s.ns, "link", "set", s.dev, "up")
	}
	for _, ns := range []string{p.A, p.B} {
		hold := exec.Command("ip", "netns", "exec", ns, "sleep", "3600")
		if err := hold.Start(); err != nil {
			t.Fatalf("starting a process in %s: %v", ns, err)
		}
		holdersMu.Lock()
		holders[ns] = hold.Process.Pid
		holdersMu.Unlock()
		t.Cleanup(func() {
			holdersMu.Lock()
			delete(holders, ns)
			holdersMu.Unlock()
			_ = hold.Process.Kill()
			_ = hold.Wait()
		})
	}
	return p
}

// Sysctl sets a sysctl inside namespace ns (the net.* ones are per
// namespace).
func Sysctl(t testing.TB, ns, key, value string) {
	t.Helper()
	if out, err := exec.Command("ip", "netns", "exec", ns, "sysctl", "-qw", key+"="+value).CombinedOutput(); err != nil {
		t.Fatalf("sysctl %s=%s in %s: %v: %s", key, value, ns, err, out)
	}
}

// Netstat reads the kernel's TCP counters of namespace ns (/proc/net/netstat
// and /proc/net/snmp as seen from inside), keyed as nstat names them:
// "TcpExtSyncookiesSent", "TcpPassiveOpens", ...
func Netstat(t testing.TB, ns string) map[string]uint64 {
	t.Helper()
	out, err := readNet(ns, "netstat", "snmp")
	if err != nil {
		t.Fatalf("reading the TCP counters of %s: %v", ns, err)
	}
	m := map[string]uint64{}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	var head []string
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		prefix := strings.TrimSuffix(f[0], ":")
		if head == nil || head[0] != f[0] {
			head = f // a header line; its values follow
			continue
		}
		for i := 1; i < len(f) && i < len(head); i++ {
			if v, err := strconv.ParseUint(f[i], 10, 64); err == nil {
				m[prefix+head[i]] = v
			}
		}
		head = nil
	}
	return m
}

// readNet reads /proc/net/<name> as namespace ns sees it, for each name, concatenated: through the
// namespace's holder process when it has one (ip netns exec execs sleep in place, so its pid is in the
// namespace), else with ip netns exec cat.
func readNet(ns string, names ...string) ([]byte, error) {
	holdersMu.Lock()
	pid, ok := holders[ns]
	holdersMu.Unlock()
	if !ok {
		args := []string{"netns", "exec", ns, "cat"}
		for _, n := range names {
			args = append(args, "/proc/net/"+n)
		}
		return exec.Command("ip", args...).Output()
	}
	var out []byte
	for _, n := range names {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, n))
		if err != nil {
			return nil, err
		}
		out = append(out, b...)
	}
	return out, nil
}

// HalfOpen counts the handshakes of namespace ns that wait for their ACK:
// the request sockets (state 03, SYN_RECV) of /proc/net/tcp and tcp6.
func HalfOpen(t testing.TB, ns string) int {
	t.Helper()
	out, err := readNet(ns, "tcp", "tcp6")
	if err != nil {
		t.Fatalf("reading the TCP sockets of %s: %v", ns, err)
	}
	n := 0
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 3 && f[3] == "03" {
			n++
		}
	}
	return n
}

// Wrap makes cmd run inside namespace ns, keeping its environment and
// process attributes (a cgroup given with CLONE_INTO_CGROUP stays: ip netns
// exec changes the network and mount namespace, not the cgroup).
func Wrap(cmd *exec.Cmd, ns string) *exec.Cmd {
	ip, err := exec.LookPath("ip")
	if err != nil {
		ip = "ip"
	}
	args := append([]string{"ip", "netns", "exec", ns, cmd.Path}, cmd.Args[1:]...)
	cmd.Path = ip
	cmd.Args = args
	cmd.Err = nil
	return cmd
}

// Delta is after - before for each of names.
func Delta(before, after map[string]uint64, names ...string) map[string]uint64 {
	d := map[string]uint64{}
	for _, n := range names {
		d[n] = after[n] - before[n]
	}
	return d
}

// String formats counters in a stable order.
func String(m map[string]uint64, names ...string) string {
	var b strings.Builder
	for i, n := range names {
		if i > 0 {
			b.WriteString(" ")
		}
		fmt.Fprintf(&b, "%s=%d", n, m[n])
	}
	return b.String()
}

// Pace limits what leaves dev in namespace ns to rate (tc's units, e.g.
// "2mbit"), queueing the rest for up to a second: a burst then arrives at the
// other end spread out, and so do the answers to it.
func Pace(t testing.TB, ns, dev, rate string) {
	t.Helper()
	if out, err := exec.Command("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "1600", "latency", "1s").CombinedOutput(); err != nil {
		t.Fatalf("tc tbf on %s in %s: %v: %s", dev, ns, err, out)
	}
}

// Nft runs nft with args inside namespace ns (its tables go with the
// namespace).
func Nft(t testing.TB, ns string, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", append([]string{"netns", "exec", ns, "nft"}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("nft %s in %s: %v: %s", strings.Join(args, " "), ns, err, out)
	}
}
