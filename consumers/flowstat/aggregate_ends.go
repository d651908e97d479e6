package flowstat

import (
	"fmt"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/schema"
)

// Caps of one end event's counters, so that no sum of them overflows before it saturates (store.SatAdd):
// no TCP connection moves 2^48 bytes (256 TiB) or lasts 2^62 ns (146 years); a hostile publisher's
// values near 2^64 are cut there.
const (
	maxEndCounter  = 1 << 48
	maxEndDuration = 1 << 62
)

// addEnd folds one end batch, stored on end subject subject, in: the same checks, chain rules (its own
// chain per host, run and direction), duplicate and replay handling as a begin batch.
func (a *aggregator) addEnd(data []byte, subject string, streamSeq uint64, stored time.Time) error {
	b := &a.endBatch
	if err := schema.DecodeEndBatch(data, b); err != nil {
		return err
	}
	if err := schema.ValidateHostToken(b.Host); err != nil {
		return fmt.Errorf("%w: host: %v", schema.ErrMalformed, err)
	}
	if err := schema.CheckEndSubject(subject, a.prefix, b.Host, b.Direction); err != nil {
		return err
	}
	b.RunID = cleanText(b.RunID)
	clampDrops(&b.Drops)
	a.hdr = header{host: b.Host, runID: b.RunID, dir: b.Direction, kind: schema.KindEnd, seq: b.Seq, prevSeq: b.PrevSeq, prevRun: b.PrevRun}
	if counted, err := a.admit(streamSeq, stored); err != nil || !counted {
		return err
	}
	a.d.Messages++
	if ba := a.batchRow(stored); ba != nil {
		ba.EndBatches++
		ba.EndEvents += uint64(len(b.Events))
		ba.EndDrops.Add(b.Drops)
	}
	a.foldEnds(b)
	return nil
}

// foldEnds counts the batch's end events per bucket of end time and the dimensions of begins: the
// peer is the other end, the port the responder's, the name the first DNS name of the peer; as fold
// does for begins, end_more_names sums it under each other name (each distinct one once).
func (a *aggregator) foldEnds(b *schema.EndBatch) {
	ck := store.ConnKey{Host: b.Host, Dir: b.Direction}
	nk := store.NameKey{Host: b.Host, Dir: b.Direction}
	for i := range b.Events {
		ev := &b.Events[i]
		bucket := a.bucketOf(ev.EndNs)
		if !a.inRange(bucket) {
			continue
		}
		peer, names := ev.Dst, ev.DstDNS
		if b.Direction == schema.Incoming {
			peer, names = ev.Src, ev.SrcDNS
		}
		name := ""
		if len(names) > 0 {
			name = cleanText(names[0])
		}
		peer = cleanZone(peer)
		a.d.EndEvents++
		ck.Bucket, ck.Peer, ck.Name, ck.Port = bucket, peer, name, ev.DstPort
		e := a.d.Ends[ck]
		if e == nil {
			e = &store.EndAgg{}
			a.d.Ends[ck] = e
		}
		addEnd(e, ev)
		nk.Bucket, nk.Peer, nk.Port = bucket, peer, ev.DstPort
		for j := 1; j < len(names); j++ {
			if n := cleanText(names[j]); n != "" && !repeatsName(names[:j], n) {
				nk.Name = n
				en := a.d.EndNames[nk]
				if en == nil {
					en = &store.EndNameAgg{}
					a.d.EndNames[nk] = en
				}
				en.Ends = store.SatAdd(en.Ends, 1)
				en.SrcBytes = store.SatAdd(en.SrcBytes, min(ev.SrcBytes, maxEndCounter))
				en.DstBytes = store.SatAdd(en.DstBytes, min(ev.DstBytes, maxEndCounter))
			}
		}
	}
}

// addEnd adds one end event to e, its counters capped.
func addEnd(e *store.EndAgg, ev *schema.EndEvent) {
	e.Ends = store.SatAdd(e.Ends, 1)
	e.SrcBytes = store.SatAdd(e.SrcBytes, min(ev.SrcBytes, maxEndCounter))
	e.DstBytes = store.SatAdd(e.DstBytes, min(ev.DstBytes, maxEndCounter))
	e.SrcSegs = store.SatAdd(e.SrcSegs, min(ev.SrcSegs, maxEndCounter))
	e.DstSegs = store.SatAdd(e.DstSegs, min(ev.DstSegs, maxEndCounter))
	e.Retrans = store.SatAdd(e.Retrans, min(ev.Retrans, maxEndCounter))
	d := uint64(min(max(ev.Duration(), 0), maxEndDuration))
	e.DurationSum = store.SatAdd(e.DurationSum, d)
	e.DurationMax = max(e.DurationMax, d)
	if ev.SRTTus > 0 {
		e.SRTTSum = store.SatAdd(e.SRTTSum, uint64(ev.SRTTus))
		e.SRTTCount = store.SatAdd(e.SRTTCount, 1)
	}
	r := store.ReasonIndex(ev.Reason)
	e.Reasons[r] = store.SatAdd(e.Reasons[r], 1)
}
