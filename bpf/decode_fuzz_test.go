package bpf

import (
	"testing"

	"github.com/flowbus/flowbus/schema"
)

// FuzzDecodeFlow feeds arbitrary records to the ring buffer decoder: it must
// reject what is not a flow record and never panic.
func FuzzDecodeFlow(f *testing.F) {
	ok := make([]byte, recSize)
	ok[offKind], ok[offFamily], ok[offDirection] = recKindFlow, 4, 1
	f.Add(ok)
	v6 := append([]byte(nil), ok...)
	v6[offFamily], v6[offDirection] = 6, 2
	f.Add(v6)
	f.Add([]byte{})
	f.Add(ok[:recSize-1])
	clock := newWallClock()
	f.Fuzz(func(t *testing.T, b []byte) {
		var ev schema.Event
		if !decodeFlow(b, &ev, clock) {
			return
		}
		if len(b) < recSize || (ev.Direction != schema.Outgoing && ev.Direction != schema.Incoming) || !ev.Src.IsValid() || !ev.Dst.IsValid() {
			t.Fatalf("accepted a bad record %x as %+v", b, ev)
		}
	})
}
