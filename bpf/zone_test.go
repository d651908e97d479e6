package bpf

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/flowbus/flowbus/schema"
)

// flowRecord is a flow record whose zone fields are ifindex and netns.
func flowRecord(ifindex uint32, netns uint64) []byte {
	b := make([]byte, recSize)
	binary.NativeEndian.PutUint32(b[offIfindex:], ifindex)
	binary.NativeEndian.PutUint64(b[offNetns:], netns)
	return b
}

func TestZoneNames(t *testing.T) {
	own, err := ownNetnsCookie()
	if err != nil {
		t.Skipf("SO_NETNS_COOKIE: %v (kernel before 5.14)", err)
	}
	ll, gl := netip.MustParseAddr("fe80::1"), netip.MustParseAddr("2001:db8::1")
	var z zoneNames
	cases := []struct {
		name     string
		src, dst netip.Addr
		ifindex  uint32
		netns    uint64
		wantSrc  string
		wantDst  string
	}{
		{"link-local both ends, our namespace", ll, netip.MustParseAddr("fe80::2"), 1, own, "fe80::1%lo", "fe80::2%lo"},
		{"only the link-local end gets a zone", gl, ll, 1, own, "2001:db8::1", "fe80::1%lo"},
		{"no index: no zone", ll, ll, 0, own, "fe80::1", "fe80::1"},
		{"namespace unknown: the number, not our interface", ll, ll, 1, 0, "fe80::1%1", "fe80::1%1"},
		{"global addresses: none", gl, gl, 1, own, "2001:db8::1", "2001:db8::1"},
		{"ipv4: none", netip.MustParseAddr("169.254.0.1"), netip.MustParseAddr("169.254.0.2"), 1, own, "169.254.0.1", "169.254.0.2"},
		{"an index nobody has: the number", ll, ll, 1 << 30, own, "fe80::1%1073741824", "fe80::1%1073741824"},
		{"a namespace nobody has: the number", ll, ll, 1, own + 1<<40, "fe80::1%1", "fe80::1%1"},
	}
	for _, c := range cases {
		ev := schema.Event{Src: c.src, Dst: c.dst}
		z.apply(&ev, flowRecord(c.ifindex, c.netns))
		if ev.Src.String() != c.wantSrc || ev.Dst.String() != c.wantDst {
			t.Errorf("%s: got %s -> %s, want %s -> %s", c.name, ev.Src, ev.Dst, c.wantSrc, c.wantDst)
		}
	}

	// A name older than the TTL is looked up again (a renamed interface).
	k := zoneKey{own, 1}
	z.names[k] = zoneName{"old-name", time.Now().Add(-2 * zoneTTL)}
	if got := z.name(own, 1); got != "lo" {
		t.Errorf("expired entry: got %q, want lo", got)
	}
	z.names[k] = zoneName{"cached", time.Now()}
	if got := z.name(own, 1); got != "cached" {
		t.Errorf("fresh entry: got %q, want the cached name", got)
	}
	// The cache is bounded: full, it starts over.
	for i := len(z.names); i < zoneCacheMax; i++ {
		z.names[zoneKey{uint64(i) + 1<<50, 1}] = zoneName{"x", time.Now()}
	}
	z.name(own, 2)
	if len(z.names) != 1 {
		t.Errorf("cache of %d entries after reaching its bound, want 1", len(z.names))
	}
}
