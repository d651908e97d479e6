package schema

import (
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func goldenEndEvents() []EndEvent {
	names := []string{"api.example.com", "edge-7.cdn.example.net"}
	v4a, v4b := netip.MustParseAddr("10.0.3.17"), netip.MustParseAddr("93.184.215.14")
	v6a, v6b := netip.MustParseAddr("2001:db8:10::17"), netip.MustParseAddr("2606:4700::6810:84e5")
	const t0 = 1763990005123456789
	return []EndEvent{
		{Src: v4a, Dst: v4b, SrcPort: 51234, DstPort: 443, DstDNS: names, BeginNs: t0 - 5_000_000_000, EndNs: t0,
			SrcBytes: 517, DstBytes: 1_234_567, SrcSegs: 3, DstSegs: 860, Retrans: 2, SRTTus: 11_250, Reason: EndFIN,
			CgroupID: 4711, PID: 1234, Comm: "curl", ContainerID: "3f2a9c0d1e5b"},
		{Src: v6a, Dst: v6b, SrcPort: 40000, DstPort: 80, DstDNS: names[:1], BeginNs: t0 - 120, EndNs: t0 - 20,
			Reason: EndRSTReceived},
		{Src: v4a, Dst: v4b, SrcPort: 60999, DstPort: 8443, BeginNs: t0 - 3_600_000_000_000, EndNs: t0 + 3_000_000_000,
			SrcBytes: 1 << 40, DstBytes: 18446744073709551615, SrcSegs: 1 << 33, DstSegs: 70000, Retrans: 4_000_000_000,
			SRTTus: 4294967295, Reason: EndTimeout, PID: 99, Comm: "weird \"comm\"\n\x01é"},
		{Src: v4b, Dst: v4a, SrcPort: 1, DstPort: 65535, BeginNs: t0 + 10, EndNs: t0 + 10, Reason: EndRSTSent,
			CgroupID: 18446744073709551615, PID: 4294967295},
		{Src: netip.MustParseAddr("fe80::1%eth0"), Dst: netip.MustParseAddr("::1"), SrcPort: 2, DstPort: 22,
			BeginNs: t0 + 70_000 - 63_000_000_000, EndNs: t0 + 70_000, Reason: EndNeverEstablished},
	}
}

func encodeEnds(host, runID string, dir Direction, seq uint64, drops Drops, evs []EndEvent) []byte {
	enc := NewEndBatchEncoder(host, runID, dir)
	for i := range evs {
		enc.AddEnd(&evs[i])
	}
	return enc.Finish(nil, seq, drops)
}

func endsEqual(a, b []EndEvent) (bool, string) {
	if len(a) != len(b) {
		return false, "lengths differ"
	}
	for i := range a {
		x, y := a[i], b[i]
		for _, e := range []*EndEvent{&x, &y} {
			if len(e.SrcDNS) == 0 {
				e.SrcDNS = nil
			}
			if len(e.DstDNS) == 0 {
				e.DstDNS = nil
			}
		}
		if !reflect.DeepEqual(x, y) {
			return false, "event differs:\n got  " + strings.TrimSpace(jsonOf(&x)) + "\n want " + jsonOf(&y)
		}
	}
	return true, ""
}

func jsonOf(e *EndEvent) string { return string(e.AppendJSON(nil, "h")) }

func TestEndRoundTrip(t *testing.T) {
	want := goldenEndEvents()
	data := encodeEnds("web-01", "01jd8zq0m5", Incoming, 43, Drops{Kernel: 1}, want)
	var b EndBatch
	must(t, DecodeEndBatch(data, &b))
	for i := range want {
		want[i].Direction = Incoming
	}
	if ok, why := endsEqual(b.Events, want); !ok {
		t.Fatal(why)
	}
	if b.Major != 2 || b.Minor != 0 || b.Host != "web-01" || b.Seq != 43 || b.Direction != Incoming || b.Drops.Kernel != 1 {
		t.Fatalf("%+v", b)
	}
	// A begin decoder refuses it as an unknown major, naming 2 and who reads it.
	var bb Batch
	err := DecodeBatch(data, &bb)
	if !errors.Is(err, ErrUnsupportedMajor) || !strings.Contains(err.Error(), "major 2") || !strings.Contains(err.Error(), "DecodeEndBatch") {
		t.Fatalf("DecodeBatch of an end batch: %v", err)
	}
	if len(bb.Events) != 0 {
		t.Fatalf("begin decoder produced %d events from an end batch", len(bb.Events))
	}
}
