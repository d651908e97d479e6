package bpf

import (
	"testing"

	"github.com/flowbus/flowbus/schema"
)

// BenchmarkDecodeFlow is the reader's per-event cost of turning a ring
// buffer record into an event; it must not allocate.
func BenchmarkDecodeFlow(b *testing.B) {
	rec := make([]byte, recSize)
	rec[offKind], rec[offFamily], rec[offDirection] = recKindFlow, 6, 2
	for i := 16; i < 48; i++ {
		rec[i] = byte(i)
	}
	clock := newWallClock()
	var ev schema.Event
	b.ReportAllocs()
	for b.Loop() {
		if !decodeFlow(rec, &ev, clock) {
			b.Fatal("record rejected")
		}
	}
}
