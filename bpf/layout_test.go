package bpf

import (
	"testing"
	"unsafe"
)

// The reader decodes records by offset; this pins those offsets to the layout
// that bpf2go generated from the C struct.
func TestRecordLayout(t *testing.T) {
	var e flowbusFlowEvent
	checks := []struct {
		name      string
		got, want uintptr
	}{
		{"size", unsafe.Sizeof(e), recSize},
		{"ts_ns", unsafe.Offsetof(e.TsNs), offTs},
		{"cgroup_id", unsafe.Offsetof(e.CgroupId), offCgroup},
		{"src", unsafe.Offsetof(e.Src), offSrc},
		{"dst", unsafe.Offsetof(e.Dst), offDst},
		{"src_port", unsafe.Offsetof(e.SrcPort), offSrcPort},
		{"dst_port", unsafe.Offsetof(e.DstPort), offDstPort},
		{"kind", unsafe.Offsetof(e.Kind), offKind},
		{"family", unsafe.Offsetof(e.Family), offFamily},
		{"direction", unsafe.Offsetof(e.Direction), offDirection},
		{"origin", unsafe.Offsetof(e.Origin), offOrigin},
		{"ifindex", unsafe.Offsetof(e.Ifindex), offIfindex},
		{"netns_cookie", unsafe.Offsetof(e.NetnsCookie), offNetns},
	}
	var d flowbusDnsEvent
	checks = append(checks, []struct {
		name      string
		got, want uintptr
	}{
		{"dns size", unsafe.Sizeof(d), dnsRecSize},
		{"dnsq size", unsafe.Sizeof(flowbusDnsqEvent{}), dnsqRecSize},
		{"dns kind", unsafe.Offsetof(d.H.Kind), offDNSKind},
		{"dns proto", unsafe.Offsetof(d.H.Proto), offDNSProto},
		{"dns len", unsafe.Offsetof(d.H.Len), offDNSLen},
		{"dns orig_len", unsafe.Offsetof(d.H.OrigLen), offDNSOrig},
		{"dns cookie", unsafe.Offsetof(d.H.Cookie), offDNSCookie},
		{"dns client", unsafe.Offsetof(d.H.Client), offDNSClient},
		{"dns server", unsafe.Offsetof(d.H.Server), offDNSServer},
		{"dns client_port", unsafe.Offsetof(d.H.ClientPort), offDNSCPort},
		{"dns family", unsafe.Offsetof(d.H.Family), offDNSFamily},
		{"dns data", unsafe.Offsetof(d.Data), offDNSData},
		{"dnsq data", unsafe.Offsetof(flowbusDnsqEvent{}.Data), offDNSData},
	}...)
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s: generated struct has %d, reader uses %d", c.name, c.got, c.want)
		}
	}
}
