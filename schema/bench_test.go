package schema

import (
	"math/rand/v2"
	"testing"
)

const benchBatch = 1000

// BenchmarkBatchEncode: B4. One op encodes a 1000-event batch of realistic events and finishes it into a
// reused buffer.
func BenchmarkBatchEncode(b *testing.B) {
	evs := realisticEvents(benchBatch, Outgoing)
	enc := NewBatchEncoder("web-01", "01jd8zq0m5", Outgoing)
	var dst []byte
	for i := range evs { // warm: buffers and maps at their steady-state capacity
		enc.Add(&evs[i])
	}
	dst = enc.Finish(dst, 0, Drops{})
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		for j := range evs {
			enc.Add(&evs[j])
		}
		dst = enc.Finish(dst[:0], uint64(i), Drops{})
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/benchBatch, "ns/event")
	b.ReportMetric(float64(len(dst))/benchBatch, "bytes/event")
}

// BenchmarkBatchDecode decodes the same batch, reusing the Events slice as a consumer would.
func BenchmarkBatchDecode(b *testing.B) {
	data := encodeEvents("web-01", "01jd8zq0m5", Outgoing, 1, Drops{}, realisticEvents(benchBatch, Outgoing))
	var batch Batch
	b.ReportAllocs()
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if err := DecodeBatch(data, &batch); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/benchBatch, "ns/event")
}

// BenchmarkJSONLines renders the same events as JSON lines (what flowtail --json prints), the size
// baseline of B4.
func BenchmarkJSONLines(b *testing.B) {
	evs := realisticEvents(benchBatch, Outgoing)
	var dst []byte
	b.ReportAllocs()
	for b.Loop() {
		dst = dst[:0]
		for j := range evs {
			dst = evs[j].AppendJSON(dst, "web-01")
			dst = append(dst, '\n')
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/benchBatch, "ns/event")
	b.ReportMetric(float64(len(dst))/benchBatch, "bytes/event")
}

// TestSizeRatioB4 checks the deterministic half of B4: a realistic batch in msgpack is at most a quarter
// of the same events as JSON lines.
func TestSizeRatioB4(t *testing.T) {
	evs := realisticEvents(benchBatch, Outgoing)
	mp := encodeEvents("web-01", "01jd8zq0m5", Outgoing, 1, Drops{}, evs)
	var js []byte
	for j := range evs {
		js = append(evs[j].AppendJSON(js, "web-01"), '\n')
	}
	ratio := float64(len(mp)) / float64(len(js))
	t.Logf("msgpack %d B (%.1f B/event), JSON lines %d B (%.1f B/event), ratio %.3f", len(mp),
		float64(len(mp))/benchBatch, len(js), float64(len(js))/benchBatch, ratio)
	if ratio > 0.25 {
		t.Fatalf("msgpack/JSON ratio %.3f > 0.25", ratio)
	}
}

// realisticEnds are the ends of realisticEvents' connections: each closes 0-60 s after it began, with
// a size mix from a few hundred bytes to megabytes, RTTs of 0.1-80 ms and mostly orderly closes.
func realisticEnds(n int, dir Direction) []EndEvent {
	r := rand.New(rand.NewPCG(43, 8))
	begins := realisticEvents(n, dir)
	out := make([]EndEvent, n)
	reasons := []EndReason{EndFIN, EndFIN, EndFIN, EndFIN, EndFIN, EndFIN, EndRSTReceived, EndRSTSent, EndTimeout, EndNeverEstablished}
	for i, b := range begins {
		sent := uint64(200 + r.IntN(2000))
		got := uint64(r.ExpFloat64() * 200_000)
		out[i] = EndEvent{Direction: dir, Src: b.Src, Dst: b.Dst, SrcPort: b.SrcPort, DstPort: b.DstPort,
			SrcDNS: b.SrcDNS, DstDNS: b.DstDNS, BeginNs: b.Timestamp - r.Int64N(60_000_000_000), EndNs: b.Timestamp,
			SrcBytes: sent, DstBytes: got, SrcSegs: 1 + sent/1448, DstSegs: 1 + got/1448, Retrans: uint64(r.IntN(3) / 2),
			SRTTus: uint32(100 + r.IntN(80_000)), Reason: reasons[r.IntN(len(reasons))],
			CgroupID: b.CgroupID, PID: b.PID, Comm: b.Comm, ContainerID: b.ContainerID}
	}
	return out
}

// BenchmarkEndBatchEncode is BenchmarkBatchEncode for end batches: ns/event and the size per event of
// a 1000-event end batch.
func BenchmarkEndBatchEncode(b *testing.B) {
	evs := realisticEnds(benchBatch, Outgoing)
	enc := NewEndBatchEncoder("web-01", "01jd8zq0m5", Outgoing)
	var dst []byte
	for i := range evs {
		enc.AddEnd(&evs[i])
	}
	dst = enc.Finish(dst, 0, Drops{})
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		for j := range evs {
			enc.AddEnd(&evs[j])
		}
		dst = enc.Finish(dst[:0], uint64(i), Drops{})
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/benchBatch, "ns/event")
	b.ReportMetric(float64(len(dst))/benchBatch, "bytes/event")
}

// BenchmarkEndBatchDecode decodes the same end batch, reusing the Events slice.
func BenchmarkEndBatchDecode(b *testing.B) {
	data := encodeEnds("web-01", "01jd8zq0m5", Outgoing, 1, Drops{}, realisticEnds(benchBatch, Outgoing))
	var batch EndBatch
	b.ReportAllocs()
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if err := DecodeEndBatch(data, &batch); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/benchBatch, "ns/event")
}

// TestEndSize logs the deterministic size of a realistic 1000-event end batch, against its JSON lines,
// and holds it to a quarter of them as B4 does for begins.
func TestEndSize(t *testing.T) {
	evs := realisticEnds(benchBatch, Outgoing)
	mp := encodeEnds("web-01", "01jd8zq0m5", Outgoing, 1, Drops{}, evs)
	var js []byte
	for j := range evs {
		js = append(evs[j].AppendJSON(js, "web-01"), '\n')
	}
	ratio := float64(len(mp)) / float64(len(js))
	t.Logf("end batch: msgpack %d B (%.1f B/event), JSON lines %d B (%.1f B/event), ratio %.3f", len(mp),
		float64(len(mp))/benchBatch, len(js), float64(len(js))/benchBatch, ratio)
	if ratio > 0.25 {
		t.Fatalf("msgpack/JSON ratio %.3f > 0.25", ratio)
	}
}
