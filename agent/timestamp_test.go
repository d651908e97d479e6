package agent

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/schema"
)

// Event timestamps against the time tcpdump (libpcap, the kernel's packet
// tap) gives the SYN-ACK that revealed each: ground truth that nobody here
// wrote. On loopback the tap sees the SYN-ACK between the egress hook (the
// incoming event) and the ingress hook (the outgoing one).
func TestTimestampsMatchTcpdump(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	tcpdump, err := exec.LookPath("tcpdump")
	if err != nil {
		if os.Getenv("FLOWBUS_REQUIRE_PRIVILEGED") == "1" {
			t.Fatal("tcpdump not found: deploy/install-deps.sh installs it")
		}
		t.Skip("tcpdump not found (deploy/install-deps.sh installs it)")
	}
	const conns = 300
	cg := cgrouptest.NewChild(t)
	a := startAgent(t, testConfig(t, cg.Path))

	pcap := filepath.Join(t.TempDir(), "synack.pcap")
	cmd := exec.Command(tcpdump, "-i", "lo", "-n", "-U", "--immediate-mode", "-s", "128", "--time-stamp-precision=nano", "-w", pcap,
		"tcp[tcpflags] & (tcp-syn|tcp-ack|tcp-rst|tcp-fin) == (tcp-syn|tcp-ack)")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	listening := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "listening on") {
				listening <- nil
				break
			}
		}
		listening <- errors.New("tcpdump ended before it listened")
		for sc.Scan() {
		}
	}()
	select {
	case err := <-listening:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("tcpdump did not start listening within 10 s")
	}

	cg.Traffic(t, "127.0.0.1", conns, false)
	got := readStream(t, a.ClientURL(), "FLOWS", 2*conns, 200*time.Millisecond)
	if len(got) != 2*conns {
		t.Fatalf("got %d events, want %d", len(got), 2*conns)
	}
	// --immediate-mode and -U: each packet is written as it comes; let the
	// last land before the interrupt, which drops what is still unread.
	time.Sleep(200 * time.Millisecond)
	_ = cmd.Process.Signal(syscall.SIGINT)
	_ = cmd.Wait()

	synacks, err := readSynAcks(pcap)
	if err != nil {
		t.Fatal(err)
	}
	// Causality is exact: the egress hook (incoming event) runs before the
	// tap and the ingress hook (outgoing event) after it, so an event on the
	// wrong side of tcpdump's time by more than the clocks' disagreement
	// (tcpdump's CLOCK_REALTIME against the kernel's CLOCK_MONOTONIC plus
	// the agent's offset) is a conversion error. How far after or before
	// is the packet's own time between hook and tap: microseconds, up to a
	// few milliseconds on a busy 2-core host (softirq backlog, steal time),
	// so that bound is on the median.
	const (
		clockSlack  = 10 * time.Microsecond
		medianBound = 20 * time.Microsecond
	)
	var diffs []time.Duration
	for _, r := range got {
		// The SYN-ACK goes from the responder (dst) to the initiator (src).
		k := netip.AddrPortFrom(r.Ev.Dst, r.Ev.DstPort).String() + ">" + netip.AddrPortFrom(r.Ev.Src, r.Ev.SrcPort).String()
		ts, ok := synacks[k]
		if !ok {
			t.Errorf("event %s %s: tcpdump saw no such SYN-ACK", r.Ev.Direction, k)
			continue
		}
		d := time.Duration(r.Ev.Timestamp - ts)
		diffs = append(diffs, d)
		if (r.Ev.Direction == schema.Incoming && d > clockSlack) || (r.Ev.Direction == schema.Outgoing && d < -clockSlack) {
			t.Errorf("event %s %s: %+v from tcpdump's time, on the wrong side of it: the wall-clock conversion is off", r.Ev.Direction, k, d)
		}
	}
	if len(diffs) != len(got) {
		t.Fatalf("%d of %d events matched a SYN-ACK (tcpdump saw %d)", len(diffs), len(got), len(synacks))
	}
	abs := func(d time.Duration) time.Duration { return max(d, -d) }
	slices.SortFunc(diffs, func(x, y time.Duration) int { return int(abs(x) - abs(y)) })
	median := abs(diffs[len(diffs)/2])
	t.Logf("%d events against tcpdump: |diff| median %v, p99 %v, max %v", len(diffs), median, abs(diffs[len(diffs)*99/100]), abs(diffs[len(diffs)-1]))
	if median > medianBound {
		t.Errorf("median %v from tcpdump's time, want at most %v", median, medianBound)
	}
}

// readSynAcks reads a nanosecond pcap of an Ethernet (loopback) capture and
// returns the time of the first SYN-ACK of each "src:port>dst:port".
func readSynAcks(path string) (map[string]int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(b) < 24 || binary.LittleEndian.Uint32(b) != 0xa1b23c4d {
		return nil, fmt.Errorf("%s: not a little-endian nanosecond pcap", path)
	}
	if lt := binary.LittleEndian.Uint32(b[20:]); lt != 1 {
		return nil, fmt.Errorf("%s: link type %d, want Ethernet (1)", path, lt)
	}
	out := map[string]int64{}
	for off := 24; off+16 <= len(b); {
		sec := int64(binary.LittleEndian.Uint32(b[off:]))
		nsec := int64(binary.LittleEndian.Uint32(b[off+4:]))
		caplen := int(binary.LittleEndian.Uint32(b[off+8:]))
		off += 16
		if off+caplen > len(b) {
			return nil, fmt.Errorf("%s: truncated record", path)
		}
		pkt := b[off : off+caplen]
		off += caplen
		if len(pkt) < 14 {
			continue
		}
		var src, dst netip.Addr
		var tcp []byte
		switch binary.BigEndian.Uint16(pkt[12:]) {
		case 0x0800:
			ip := pkt[14:]
			if len(ip) < 20 || ip[9] != 6 {
				continue
			}
			ihl := int(ip[0]&0xf) * 4
			src, dst = netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
			if len(ip) < ihl+20 {
				continue
			}
			tcp = ip[ihl:]
		case 0x86dd:
			ip := pkt[14:]
			if len(ip) < 60 || ip[6] != 6 {
				continue
			}
			src, dst = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
			tcp = ip[40:]
		default:
			continue
		}
		if tcp[13]&0x17 != 0x12 { // SYN and ACK, no RST or FIN
			continue
		}
		k := netip.AddrPortFrom(src, binary.BigEndian.Uint16(tcp)).String() + ">" + netip.AddrPortFrom(dst, binary.BigEndian.Uint16(tcp[2:])).String()
		if _, seen := out[k]; !seen {
			out[k] = sec*1e9 + nsec
		}
	}
	return out, nil
}
