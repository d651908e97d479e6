package schema

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"strings"
)

// randAddr returns a random IPv4 (4-byte) or IPv6 address.
func randAddr(r *rand.Rand) netip.Addr {
	if r.IntN(2) == 0 {
		return netip.AddrFrom4([4]byte{byte(r.IntN(256)), byte(r.IntN(256)), byte(r.IntN(256)), byte(r.IntN(256))})
	}
	var b [16]byte
	for i := range b {
		if r.IntN(3) > 0 { // runs of zeros exercise "::" compression
			b[i] = byte(r.IntN(256))
		}
	}
	a := netip.AddrFrom16(b)
	if r.IntN(20) == 0 {
		a = a.WithZone("eth0")
	}
	return a
}

func randName(r *rand.Rand, minLen, maxLen int) string {
	const alpha = "abcdefghijklmnopqrstuvwxyz0123456789-"
	n := minLen + r.IntN(maxLen-minLen+1)
	var sb strings.Builder
	for i := 0; i < n; i++ {
		if i > 0 && i < n-1 && r.IntN(8) == 0 {
			sb.WriteByte('.')
			continue
		}
		sb.WriteByte(alpha[r.IntN(26)])
	}
	return sb.String()
}

func randNames(r *rand.Rand) []string {
	n := r.IntN(4)
	if n == 0 {
		return nil
	}
	s := make([]string, n)
	for i := range s {
		s[i] = randName(r, 10, 25)
	}
	return s
}

// randEvents returns n random events of direction dir, every field exercised.
func randEvents(r *rand.Rand, n int, dir Direction) []Event {
	evs := make([]Event, n)
	base := int64(1_700_000_000_000_000_000) + r.Int64N(1e15)
	pool := make([]netip.Addr, 1+r.IntN(8))
	for i := range pool {
		pool[i] = randAddr(r)
	}
	for i := range evs {
		e := &evs[i]
		e.Timestamp = base + r.Int64N(2e9) - 1e6
		e.Direction = dir
		e.Src, e.Dst = pool[r.IntN(len(pool))], randAddr(r)
		e.SrcPort, e.DstPort = uint16(r.IntN(65536)), uint16(r.IntN(65536))
		e.SrcDNS, e.DstDNS = randNames(r), randNames(r)
		if r.IntN(3) > 0 {
			e.CgroupID = r.Uint64() >> r.IntN(64)
			e.PID = r.Uint32() >> r.IntN(32)
			if r.IntN(2) == 0 {
				e.Comm = randName(r, 1, 15)
			}
			if r.IntN(2) == 0 {
				e.ContainerID = fmt.Sprintf("%016x%016x", r.Uint64(), r.Uint64())
			}
		}
	}
	return evs
}

// normalize makes empty DNS slices nil: the wire does not distinguish them.
func normalize(evs []Event) []Event {
	out := make([]Event, len(evs))
	for i, e := range evs {
		if len(e.SrcDNS) == 0 {
			e.SrcDNS = nil
		}
		if len(e.DstDNS) == 0 {
			e.DstDNS = nil
		}
		out[i] = e
	}
	return out
}

func eventsEqual(a, b []Event) (bool, string) {
	a, b = normalize(a), normalize(b)
	if len(a) != len(b) {
		return false, fmt.Sprintf("%d events vs %d", len(a), len(b))
	}
	for i := range a {
		if !reflect.DeepEqual(a[i], b[i]) {
			return false, fmt.Sprintf("event %d:\n got  %+v\n want %+v", i, a[i], b[i])
		}
	}
	return true, ""
}

// realisticEvents models one busy host: a few local addresses, ~50 remote peers (IPv4/IPv6 mix) with
// 0-3 DNS names of 10-25 characters each (slices shared as a DNS cache returns them), a dozen processes,
// and timestamps ~1 ms apart with slight reordering between CPUs.
func realisticEvents(n int, dir Direction) []Event {
	r := rand.New(rand.NewPCG(42, 7))
	local4 := []netip.Addr{netip.MustParseAddr("10.0.3.17"), netip.MustParseAddr("172.17.0.1")}
	local6 := []netip.Addr{netip.MustParseAddr("2001:db8:10::17")}
	type peer struct {
		addr  netip.Addr
		names []string
	}
	peers := make([]peer, 50)
	for i := range peers {
		if i%10 < 7 {
			peers[i].addr = netip.AddrFrom4([4]byte{byte(20 + r.IntN(200)), byte(r.IntN(256)), byte(r.IntN(256)), byte(1 + r.IntN(254))})
		} else {
			peers[i].addr = netip.AddrFrom16([16]byte{0x26, 0x06, 0x47, 0x00, byte(r.IntN(256)), byte(r.IntN(256)), 0, 0, 0, 0, 0, 0, 0x68, 0x10, byte(r.IntN(256)), byte(r.IntN(256))})
		}
		peers[i].names = randNames(r)
	}
	type proc struct {
		cg        uint64
		pid       uint32
		comm, cid string
	}
	procs := make([]proc, 12)
	for i := range procs {
		procs[i] = proc{cg: 4000 + uint64(r.IntN(100000)), pid: uint32(1 + r.IntN(4_000_000)), comm: randName(r, 3, 15)}
		if i%2 == 0 {
			procs[i].cid = fmt.Sprintf("%016x%016x%016x%016x", r.Uint64(), r.Uint64(), r.Uint64(), r.Uint64())
		}
	}
	ports := []uint16{443, 443, 443, 80, 5432, 6379, 8080, 53, 9092, 4222}
	evs := make([]Event, n)
	ts := int64(1_763_990_000_000_000_000)
	for i := range evs {
		ts += r.Int64N(2_000_000)
		p := peers[r.IntN(len(peers))]
		var l netip.Addr
		if p.addr.Is4() {
			l = local4[r.IntN(len(local4))]
		} else {
			l = local6[0]
		}
		e := Event{Timestamp: ts - r.Int64N(50_000), Direction: dir, SrcPort: uint16(32768 + r.IntN(28232)), DstPort: ports[r.IntN(len(ports))]}
		if dir == Outgoing {
			e.Src, e.Dst, e.DstDNS = l, p.addr, p.names
		} else {
			e.Src, e.Dst, e.SrcDNS = p.addr, l, p.names
		}
		if r.IntN(5) > 0 {
			pr := procs[r.IntN(len(procs))]
			e.CgroupID, e.PID, e.Comm, e.ContainerID = pr.cg, pr.pid, pr.comm, pr.cid
		}
		evs[i] = e
	}
	return evs
}

func encodeEvents(host, runID string, dir Direction, seq uint64, drops Drops, evs []Event) []byte {
	enc := NewBatchEncoder(host, runID, dir)
	for i := range evs {
		enc.Add(&evs[i])
	}
	return enc.Finish(nil, seq, drops)
}
