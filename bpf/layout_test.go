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
		{"seq", unsafe.Offsetof(e.Seq), offSeq},
		{"netns_cookie", unsafe.Offsetof(e.NetnsCookie), offNetns},
		{"proc", unsafe.Offsetof(e.Proc), offProc},
		{"proc size", unsafe.Sizeof(e.Proc), procSize},
		{"proc tgid", unsafe.Offsetof(e.Proc.Tgid), offProcTgid},
		{"proc uid", unsafe.Offsetof(e.Proc.Uid), offProcUID},
		{"proc comm", unsafe.Offsetof(e.Proc.Comm), offProcComm},
		{"proc source", unsafe.Offsetof(e.Proc.Source), offProcSource},
		{"proc self", unsafe.Offsetof(e.Proc.Self), offProcSelf},
	}
	var f4 flowbusFlow4Event
	checks = append(checks, []struct {
		name      string
		got, want uintptr
	}{
		{"flow4 size", unsafe.Sizeof(f4), rec4ProcSize},
		{"flow4 size without proc", unsafe.Offsetof(f4.Proc), rec4Size},
		{"flow4 ts_ns", unsafe.Offsetof(f4.TsNs), offTs},
		{"flow4 cgroup_id", unsafe.Offsetof(f4.CgroupId), offCgroup},
		{"flow4 src", unsafe.Offsetof(f4.Src), off4Src},
		{"flow4 dst", unsafe.Offsetof(f4.Dst), off4Dst},
		{"flow4 src_port", unsafe.Offsetof(f4.SrcPort), off4SrcPort},
		{"flow4 dst_port", unsafe.Offsetof(f4.DstPort), off4DstPort},
		{"flow4 kind", unsafe.Offsetof(f4.Kind), off4Kind},
		{"flow4 family", unsafe.Offsetof(f4.Family), off4Family},
		{"flow4 direction", unsafe.Offsetof(f4.Direction), off4Direction},
		{"flow4 origin", unsafe.Offsetof(f4.Origin), off4Origin},
		{"flow4 seq", unsafe.Offsetof(f4.Seq), off4Seq},
		{"flow4 proc", unsafe.Offsetof(f4.Proc), off4Proc},
	}...)
	var ce flowbusConfirmEvent
	checks = append(checks, []struct {
		name      string
		got, want uintptr
	}{
		{"confirm size", unsafe.Sizeof(ce), confirmRecSize},
		{"confirm src", unsafe.Offsetof(ce.Src), offConfirmSrc},
		{"confirm src_port", unsafe.Offsetof(ce.SrcPort), offConfirmSrcPort},
		{"confirm kind", unsafe.Offsetof(ce.Kind), offConfirmKind},
		{"confirm family", unsafe.Offsetof(ce.Family), offConfirmFamily},
		{"confirm seq", unsafe.Offsetof(ce.Seq), offConfirmSeq},
	}...)
	var x flowbusEndEvent
	checks = append(checks, []struct {
		name      string
		got, want uintptr
	}{
		{"end size", unsafe.Sizeof(x), endRecSize},
		{"end ts", unsafe.Offsetof(x.TsNs), offEndTs},
		{"end begin", unsafe.Offsetof(x.BeginNs), offEndBegin},
		{"end cgroup", unsafe.Offsetof(x.CgroupId), offEndCgroup},
		{"end bytes_received", unsafe.Offsetof(x.BytesReceived), offEndBytesRcvd},
		{"end bytes_acked", unsafe.Offsetof(x.BytesAcked), offEndBytesAcked},
		{"end src", unsafe.Offsetof(x.Src), offEndSrc},
		{"end dst", unsafe.Offsetof(x.Dst), offEndDst},
		{"end src_port", unsafe.Offsetof(x.SrcPort), offEndSrcPort},
		{"end dst_port", unsafe.Offsetof(x.DstPort), offEndDstPort},
		{"end kind", unsafe.Offsetof(x.Kind), offEndKind},
		{"end family", unsafe.Offsetof(x.Family), offEndFamily},
		{"end direction", unsafe.Offsetof(x.Direction), offEndDirection},
		{"end old_state", unsafe.Offsetof(x.OldState), offEndOldState},
		{"end segs_in", unsafe.Offsetof(x.DataSegsIn), offEndSegsIn},
		{"end segs_out", unsafe.Offsetof(x.DataSegsOut), offEndSegsOut},
		{"end retrans", unsafe.Offsetof(x.TotalRetrans), offEndRetrans},
		{"end srtt", unsafe.Offsetof(x.SrttUs), offEndSRTT},
		{"end sk_err", unsafe.Offsetof(x.SkErr), offEndSkErr},
		{"end fin_rcvd", unsafe.Offsetof(x.FinRcvd), offEndFinRcvd},
		{"end ifindex", unsafe.Offsetof(x.Ifindex), offEndIfindex},
		{"end netns", unsafe.Offsetof(x.NetnsCookie), offEndNetns},
		{"end proc", unsafe.Offsetof(x.Proc), offEndProc},
	}...)
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
