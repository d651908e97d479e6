package flowstat

import (
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/flowbus/flowbus/schema"
)

// FuzzFold feeds arbitrary message bodies to the aggregator, as a foreign or broken publisher could: it
// must never panic; a body the decoder rejects must count nothing and get a known dead-letter reason and
// a header-safe error text; a valid batch must be counted exactly once per event, with consistent first
// and last seen times.
func FuzzFold(f *testing.F) {
	vectors, _ := filepath.Glob(filepath.Join("..", "..", "schema", "testdata", "*.msgpack"))
	for _, p := range vectors {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
			f.Add(b[:len(b)/2])
		}
	}
	enc := schema.NewBatchEncoder("web-01", "run", schema.Incoming)
	ev := schema.Event{Timestamp: -1_500_000_000, SrcPort: 1, DstPort: 443}
	enc.Add(&ev)
	f.Add(enc.Finish(nil, 7, schema.Drops{Kernel: 1}))
	f.Add([]byte(`{"not":"msgpack"}`))
	f.Add([]byte{})

	hostile := schema.NewBatchEncoder("web-01", "r\x00\xff", schema.Outgoing)
	ev = schema.Event{Timestamp: 1, Dst: netip.MustParseAddr("fe80::1%\xff"), DstDNS: []string{"a\x00b", "\xff"}, DstPort: 1}
	hostile.Add(&ev)
	f.Add(hostile.Finish(nil, 1, schema.Drops{Kernel: math.MaxUint64}))
	// A well-formed batch whose host is no subject token: the decoder takes it, the aggregator must not.
	badHost := schema.NewBatchEncoder("Web.01", "run", schema.Outgoing)
	badHost.Add(&ev)
	f.Add(badHost.Finish(nil, 1, schema.Drops{}))

	f.Fuzz(func(t *testing.T, data []byte) {
		var b schema.Batch
		derr := schema.DecodeBatch(data, &b)
		// Published where its own host and direction say, as an agent does.
		a := newAggregator(time.Minute, "", 0)
		err := a.add(data, schema.Subject(schema.DefaultPrefix, b.Host, b.Direction), 1, time.Unix(1_800_000_000, 0))
		// The aggregator rejects what the decoder rejects, and also a batch whose host is not a valid
		// subject token.
		wantErr := derr != nil || schema.ValidateHostToken(b.Host) != nil
		if (err != nil) != wantErr {
			t.Fatalf("aggregator error %v, decoder error %v, host %q", err, derr, b.Host)
		}
		if err != nil {
			if a.d.Messages != 0 || a.d.Events != 0 || len(a.d.Conns)+len(a.d.Seen)+len(a.d.Batches)+len(a.d.Runs)+len(a.d.Gaps)+len(a.d.EndNames) != 0 {
				t.Fatalf("a rejected message was counted: %+v", a.d)
			}
			switch r := deadReason(err); r {
			case ReasonMalformed, ReasonTruncated, ReasonUnsupportedMajor:
			default:
				t.Fatalf("unknown reason %q", r)
			}
			if h := headerSafe(err.Error()); len(h) > 1024 || strings.ContainsAny(h, "\r\n\x00") {
				t.Fatalf("header value %q", h)
			}
			return
		}
		var conns uint64
		for _, n := range a.d.Conns {
			conns += n
		}
		if a.d.Messages != 1 || a.d.Events != uint64(len(b.Events)) || conns != a.d.Events {
			t.Fatalf("%d events in the batch, counted %d (%d in connections) from %d messages", len(b.Events), a.d.Events, conns, a.d.Messages)
		}
		for k := range a.d.Conns {
			if !cleanDB(k.Name) || !cleanDB(k.Peer.String()) {
				t.Fatalf("text a database may refuse: %+v", k)
			}
		}
		for k := range a.d.Runs {
			if !cleanDB(k.RunID) || schema.ValidateHostToken(k.Host) != nil {
				t.Fatalf("text a database may refuse: %+v", k)
			}
		}
		for k, sp := range a.d.Seen {
			if sp.First > sp.Last || sp.Name != "" && (sp.NameNS < sp.First || sp.NameNS > sp.Last) {
				t.Fatalf("%+v: inconsistent span %+v", k, sp)
			}
		}
		for k := range a.d.Conns {
			if k.Bucket%60 != 0 {
				t.Fatalf("bucket %d is not a minute boundary", k.Bucket)
			}
		}
	})
}

func cleanDB(s string) bool { return utf8.ValidString(s) && !strings.ContainsRune(s, 0) }
