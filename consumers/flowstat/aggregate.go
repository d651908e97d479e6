package flowstat

import (
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/tail"
	"github.com/flowbus/flowbus/schema"
)

// aggregator folds decoded batches into a store.Delta. One aggregator lives for one Run or Replay; its
// chain state (runs) is the committed run_state plus what the pending delta adds, so a failed commit
// must end the Run (the caller reloads everything on restart).
type aggregator struct {
	bucketS int64
	prefix  string // subject prefix: a batch must arrive on <prefix>.<its host>.<its direction>
	runs    map[store.RunKey]uint64
	d       *store.Delta
	batch   schema.Batch
	late    uint64 // batches whose seq was not above the last one seen of their chain

	// replay restricts counting to buckets [fromS, toS) and skips the per-message facts (gaps, chain
	// state, dead letters) that the live consumer already recorded exactly once.
	replay     bool
	fromS, toS int64
}

func newAggregator(bucket time.Duration, prefix string, runs map[store.RunKey]uint64) *aggregator {
	if runs == nil {
		runs = map[store.RunKey]uint64{}
	}
	return &aggregator{bucketS: max(int64(bucket/time.Second), 1), prefix: prefix, runs: runs, d: store.NewDelta()}
}

// bucketOf is the start (unix seconds) of the bucket holding unix-ns timestamp ns, flooring correctly
// for times before 1970 too.
func (a *aggregator) bucketOf(ns int64) int64 {
	s := ns / 1e9
	if ns < 0 && ns%1e9 != 0 {
		s--
	}
	b := s / a.bucketS * a.bucketS
	if s < 0 && s%a.bucketS != 0 {
		b -= a.bucketS
	}
	return b
}

func (a *aggregator) inRange(b int64) bool { return !a.replay || (b >= a.fromS && b < a.toS) }

// Dead-letter reasons: short, stable tokens for the reason header and the database.
const (
	ReasonUnsupportedMajor = "unsupported_major" // a schema major this consumer does not know
	ReasonTruncated        = "truncated"         // the message ends inside a value
	ReasonMalformed        = "malformed"         // anything else that is not a flowbus batch
	// ReasonSubjectMismatch: a valid batch whose host or direction is not the one its subject names.
	ReasonSubjectMismatch = "subject_mismatch"
)

// deadReason classifies a decode error. The decoder reports truncation only in its message text, so
// that is what is matched; anything unrecognised is "malformed".
func deadReason(err error) string {
	switch {
	case errors.Is(err, schema.ErrUnsupportedMajor):
		return ReasonUnsupportedMajor
	case errors.Is(err, tail.ErrSubjectMismatch):
		return ReasonSubjectMismatch
	case strings.Contains(err.Error(), "truncated"):
		return ReasonTruncated
	}
	return ReasonMalformed
}

// add folds one stream message, stored on subject, in. It returns the decode error when the message is
// not a valid batch, or is not on its own host's and direction's subject; the caller dead-letters it and
// nothing of it is counted.
func (a *aggregator) add(data []byte, subject string, streamSeq uint64, stored time.Time) error {
	b := &a.batch
	if err := schema.DecodeBatch(data, b); err != nil {
		return err
	}
	// The decoder takes the host as any string; the wire format says it is a subject token. Anything
	// else would end up as a host row nobody can query (or, with NUL or invalid UTF-8, one PostgreSQL
	// refuses, stopping the consumer).
	if err := schema.ValidateHostToken(b.Host); err != nil {
		return fmt.Errorf("%w: host: %v", schema.ErrMalformed, err)
	}
	// The subject is what the server's publish permissions vouch for; the payload is the publisher's word.
	if err := tail.CheckSubject(subject, a.prefix, b.Host, b.Direction); err != nil {
		return err
	}
	b.RunID = cleanText(b.RunID)
	clampDrops(&b.Drops)
	a.d.Messages++
	if sb := a.bucketOf(stored.UnixNano()); a.inRange(sb) {
		bk := store.BatchKey{Bucket: sb, Host: b.Host, Dir: b.Direction}
		ba := a.d.Batches[bk]
		if ba == nil {
			ba = &store.BatchAgg{}
			a.d.Batches[bk] = ba
		}
		ba.Batches++
		ba.Events += uint64(len(b.Events))
		ba.Drops.Kernel += b.Drops.Kernel
		ba.Drops.Reader += b.Drops.Reader
		ba.Drops.Queue += b.Drops.Queue
		ba.Drops.Spool += b.Drops.Spool
		ba.Drops.Publish += b.Drops.Publish
	}
	if !a.replay {
		a.chain(streamSeq, stored)
	}
	a.fold(b)
	return nil
}

// chain follows the batch's prev_seq link (SPEC wire format: per host, run and direction) and records a
// gap when it does not point at the last batch seen. A batch at or below the last seq seen arrived late
// (a publish retried after a later batch was stored): it is counted, it records no gap and does not move
// the chain back.
func (a *aggregator) chain(streamSeq uint64, stored time.Time) {
	b := &a.batch
	rk := store.RunKey{Host: b.Host, RunID: b.RunID, Dir: b.Direction}
	last, seen := a.runs[rk]
	if seen && b.Seq <= last {
		a.late++
		return
	}
	if (seen && b.PrevSeq != last) || (!seen && b.PrevSeq != 0) {
		a.d.Gaps = append(a.d.Gaps, store.Gap{RunKey: rk, AfterSeq: last, Seq: b.Seq, PrevSeq: b.PrevSeq, StreamSeq: streamSeq, Stored: stored})
	}
	a.runs[rk] = b.Seq
	a.d.Runs[rk] = b.Seq
}

// fold counts the batch's events. The peer is the other end of the connection: the responder of an
// outgoing connection, the initiator of an incoming one; the port is always the responder's (the
// service). The peer's name is the first DNS name the agent attached, "" when none.
func (a *aggregator) fold(b *schema.Batch) {
	ck := store.ConnKey{Host: b.Host, Dir: b.Direction}
	sk := store.SeenKey{Host: b.Host, Dir: b.Direction}
	for i := range b.Events {
		ev := &b.Events[i]
		bucket := a.bucketOf(ev.Timestamp)
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
		if z := peer.Zone(); z != "" && cleanText(z) != z {
			peer = peer.WithZone(cleanText(z))
		}
		a.d.Events++
		ck.Bucket, ck.Peer, ck.Name, ck.Port = bucket, peer, name, ev.DstPort
		a.d.Conns[ck]++
		sk.Peer, sk.Port = peer, ev.DstPort
		if sp, ok := a.d.Seen[sk]; ok {
			sp.Merge(ev.Timestamp, name)
			a.d.Seen[sk] = sp
		} else {
			sp := store.Span{First: ev.Timestamp, Last: ev.Timestamp}
			if name != "" {
				sp.Name, sp.NameNS = name, ev.Timestamp
			}
			a.d.Seen[sk] = sp
		}
	}
}

// cleanText makes s storable as text in both databases: invalid UTF-8 becomes U+FFFD and NUL, which
// PostgreSQL refuses in text, becomes U+FFFD too. Sanitising before aggregation keeps keys that differ
// only in such bytes from colliding in one upsert. Clean strings (all of them, from a real agent) are
// returned as they are, without allocating.
func cleanText(s string) string {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c == 0 || c >= utf8.RuneSelf {
			if c == 0 || !utf8.ValidString(s[i:]) || strings.IndexByte(s[i:], 0) >= 0 {
				return strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "\uFFFD")
			}
			return s
		}
	}
	return s
}

// maxDrops caps one batch's drop counter: no agent loses a trillion events between two batches, and a
// hostile value near 2^64 must not overflow the database's 64-bit sums (PostgreSQL would refuse the
// commit, stopping the consumer).
const maxDrops = 1 << 40

func clampDrops(d *schema.Drops) {
	for _, v := range []*uint64{&d.Kernel, &d.Reader, &d.Queue, &d.Spool, &d.Publish} {
		*v = min(*v, maxDrops)
	}
}
