package flowstat

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/flowbus/flowbus/schema"
)

// FuzzFoldEnd feeds arbitrary bodies on an end subject, as a foreign or broken publisher could: never a
// panic; a body the end decoder rejects counts nothing; a valid end batch counts each end once, with
// every sum within the database's signed 64-bit columns.
func FuzzFoldEnd(f *testing.F) {
	vectors, _ := filepath.Glob(filepath.Join("..", "..", "schema", "testdata", "end_*.msgpack"))
	for _, p := range vectors {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
			f.Add(b[:len(b)/2])
		}
	}
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		var b schema.EndBatch
		derr := schema.DecodeEndBatch(data, &b)
		a := newAggregator(time.Minute, "", 0)
		err := a.add(data, schema.EndSubject(schema.DefaultPrefix, b.Host, b.Direction), 1, time.Unix(1_800_000_000, 0))
		if wantErr := derr != nil || schema.ValidateHostToken(b.Host) != nil; (err != nil) != wantErr {
			t.Fatalf("aggregator error %v, decoder error %v, host %q", err, derr, b.Host)
		}
		if err != nil {
			if a.d.Messages != 0 || a.d.EndEvents != 0 || len(a.d.Ends)+len(a.d.Batches) != 0 {
				t.Fatalf("a rejected message was counted: %+v", a.d)
			}
			return
		}
		var n uint64
		for k, e := range a.d.Ends {
			n += e.Ends
			for _, v := range []uint64{e.SrcBytes, e.DstBytes, e.SrcSegs, e.DstSegs, e.Retrans, e.DurationSum, e.DurationMax, e.SRTTSum} {
				if v > 1<<63-1 {
					t.Fatalf("%+v: a sum beyond int64: %+v", k, e)
				}
			}
			if !cleanDB(k.Name) {
				t.Fatalf("text a database may refuse: %+v", k)
			}
		}
		if a.d.Messages != 1 || a.d.EndEvents != uint64(len(b.Events)) || n != a.d.EndEvents {
			t.Fatalf("%d ends in the batch, counted %d (%d in rows)", len(b.Events), a.d.EndEvents, n)
		}
	})
}
