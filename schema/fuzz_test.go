package schema

import (
	"os"
	"path/filepath"
	"testing"
)

func FuzzDecodeBatch(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "*.msgpack"))
	for _, p := range files {
		data, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
		for _, n := range []int{0, 1, len(data) / 3, len(data) / 2, len(data) - 1} {
			if n >= 0 && n <= len(data) {
				f.Add(data[:n])
			}
		}
	}
	f.Add(rawBatch(validPairs()...))
	f.Fuzz(func(t *testing.T, data []byte) {
		var b1 Batch
		if err := DecodeBatch(data, &b1); err != nil {
			return
		}
		// Whatever decodes holds only strings within their bounds.
		if len(b1.Host) > MaxHostLen || len(b1.RunID) > MaxRunIDLen {
			t.Fatalf("header string past its bound: %d, %d bytes", len(b1.Host), len(b1.RunID))
		}
		for _, e := range b1.Events {
			for _, n := range append(append([]string(nil), e.SrcDNS...), e.DstDNS...) {
				if len(n) > MaxDNSNameLen {
					t.Fatalf("name of %d bytes", len(n))
				}
			}
			if len(e.Comm) > MaxCommLen || len(e.ContainerID) > MaxContainerIDLen || len(e.Src.String()) > MaxAddrLen || len(e.Dst.String()) > MaxAddrLen {
				t.Fatalf("event string past its bound: %+v", e)
			}
		}
		// Whatever decodes must survive a re-encode unchanged.
		if l := b1.PrevRun; l != nil && (len(l.RunID) > MaxRunIDLen || len(l.End) > MaxRunEndLen || b1.PrevSeq != 0) {
			t.Fatalf("prev_run past its bounds or on a later batch: %+v (prev_seq %d)", l, b1.PrevSeq)
		}
		enc := NewBatchEncoder(b1.Host, b1.RunID, b1.Direction)
		if err := enc.SetPrevRun(b1.PrevRun); err != nil {
			t.Fatalf("decoded prev_run cannot be re-encoded: %v", err)
		}
		for i := range b1.Events {
			enc.Add(&b1.Events[i])
		}
		out := enc.Finish(nil, b1.Seq, b1.Drops)
		var b2 Batch
		if err := DecodeBatch(out, &b2); err != nil {
			t.Fatalf("re-encoded batch does not decode: %v", err)
		}
		if (b1.PrevRun == nil) != (b2.PrevRun == nil) || b1.PrevRun != nil && *b1.PrevRun != *b2.PrevRun {
			t.Fatalf("prev_run changed: %+v vs %+v", b1.PrevRun, b2.PrevRun)
		}
		if b2.Host != b1.Host || b2.RunID != b1.RunID || b2.Direction != b1.Direction || b2.Seq != b1.Seq || b2.Drops != b1.Drops {
			t.Fatalf("header changed: %+v vs %+v", b1, b2)
		}
		if ok, why := eventsEqual(b2.Events, b1.Events); !ok {
			t.Fatal(why)
		}
	})
}

// FuzzDecodeEndBatch: whatever DecodeEndBatch accepts holds only bounded strings, and survives a
// re-encode by EndBatchEncoder unchanged; nothing makes it panic or DecodeBatch accept an end batch.
func FuzzDecodeEndBatch(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "end_*.msgpack"))
	for _, p := range files {
		data, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
		for _, n := range []int{0, 1, len(data) / 3, len(data) / 2, len(data) - 1} {
			if n >= 0 && n <= len(data) {
				f.Add(data[:n])
			}
		}
	}
	f.Add(rawBatch(validEndPairs()...))
	f.Fuzz(func(t *testing.T, data []byte) {
		var b1 EndBatch
		if err := DecodeEndBatch(data, &b1); err != nil {
			return
		}
		var begin Batch
		if err := DecodeBatch(data, &begin); err == nil {
			t.Fatalf("an end batch decodes as a begin batch too: %+v", begin)
		}
		if len(b1.Host) > MaxHostLen || len(b1.RunID) > MaxRunIDLen {
			t.Fatalf("header string past its bound: %d, %d bytes", len(b1.Host), len(b1.RunID))
		}
		for _, e := range b1.Events {
			for _, n := range append(append([]string(nil), e.SrcDNS...), e.DstDNS...) {
				if len(n) > MaxDNSNameLen {
					t.Fatalf("name of %d bytes", len(n))
				}
			}
			if len(e.Comm) > MaxCommLen || len(e.ContainerID) > MaxContainerIDLen || len(e.Src.String()) > MaxAddrLen || len(e.Dst.String()) > MaxAddrLen {
				t.Fatalf("event string past its bound: %+v", e)
			}
		}
		if l := b1.PrevRun; l != nil && (len(l.RunID) > MaxRunIDLen || len(l.End) > MaxRunEndLen || b1.PrevSeq != 0) {
			t.Fatalf("prev_run past its bounds or on a later batch: %+v (prev_seq %d)", l, b1.PrevSeq)
		}
		enc := NewEndBatchEncoder(b1.Host, b1.RunID, b1.Direction)
		if err := enc.SetPrevRun(b1.PrevRun); err != nil {
			t.Fatalf("decoded prev_run cannot be re-encoded: %v", err)
		}
		for i := range b1.Events {
			enc.AddEnd(&b1.Events[i])
		}
		out := enc.Finish(nil, b1.Seq, b1.Drops)
		var b2 EndBatch
		if err := DecodeEndBatch(out, &b2); err != nil {
			t.Fatalf("re-encoded batch does not decode: %v", err)
		}
		if (b1.PrevRun == nil) != (b2.PrevRun == nil) || b1.PrevRun != nil && *b1.PrevRun != *b2.PrevRun {
			t.Fatalf("prev_run changed: %+v vs %+v", b1.PrevRun, b2.PrevRun)
		}
		if b2.Host != b1.Host || b2.RunID != b1.RunID || b2.Direction != b1.Direction || b2.Seq != b1.Seq || b2.Drops != b1.Drops {
			t.Fatalf("header changed: %+v vs %+v", b1, b2)
		}
		if ok, why := endsEqual(b2.Events, b1.Events); !ok {
			t.Fatal(why)
		}
	})
}
