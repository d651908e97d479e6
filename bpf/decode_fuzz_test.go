package bpf

import (
	"testing"

	"github.com/flowbus/flowbus/schema"
)

// FuzzDecodeFlow feeds arbitrary records to the ring buffer's begin decoder
// (both forms): it must reject what is not a begin record and never panic.
func FuzzDecodeFlow(f *testing.F) {
	ok := make([]byte, recSize)
	ok[offKind], ok[offFamily], ok[offDirection] = recKindFlow, 4, 1
	f.Add(ok)
	v6 := append([]byte(nil), ok...)
	v6[offFamily], v6[offDirection] = 6, 2
	f.Add(v6)
	f.Add([]byte{})
	f.Add(ok[:recSize-1])
	v4 := make([]byte, rec4ProcSize)
	v4[off4Kind], v4[off4Family], v4[off4Direction] = recKindFlow4, 4, 2
	v4[off4Proc+offProcSource] = 1
	f.Add(v4)
	f.Add(v4[:rec4Size])
	f.Add(v4[:rec4Size+1])
	clock := newWallClock()
	f.Fuzz(func(t *testing.T, b []byte) {
		var ev schema.Event
		var r beginRec
		if !decodeBegin(b, &ev, clock, &r) {
			return
		}
		if (len(b) != recSize && len(b) != rec4Size && len(b) != rec4ProcSize) || (ev.Direction != schema.Outgoing && ev.Direction != schema.Incoming) || !ev.Src.IsValid() || !ev.Dst.IsValid() {
			t.Fatalf("accepted a bad record %x as %+v", b, ev)
		}
		if len(b) != recSize && !ev.Src.Is4() {
			t.Fatalf("a compact record gave a non-IPv4 address: %x as %+v", b, ev)
		}
		if r.proc != nil && len(r.proc) != procSize {
			t.Fatalf("process bytes of %d, want %d", len(r.proc), procSize)
		}
		var p procNames
		p.apply(&ev, r.proc)
	})
}
