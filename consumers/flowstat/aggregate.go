package flowstat

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/schema"
)

// aggregator folds decoded batches into a store.Delta. One aggregator lives for one Run or Replay.
// The state of a chain is, newest first: its entry in chains (bounded), the pending delta's, the
// database's (read by load). Whatever chains evicts is in one of the other two, so a failed commit must
// end the Run, whose successor reads the committed state again.
type aggregator struct {
	bucketS int64
	prefix  string // subject prefix: a batch must arrive on <prefix>.<its host>.<its direction>
	chains  *chainCache
	// load reads a chain's committed state and holes by key (nil: no database, nothing committed);
	// loads counts its calls.
	load     func(store.RunKey) (store.ChainState, []store.Hole, bool, error)
	loads    uint64
	d        *store.Delta
	batch    schema.Batch
	endBatch schema.EndBatch
	// hdr is the chain header of the batch being added, of either kind.
	hdr    header
	late   uint64 // batches below the last one seen of their chain that filled a hole (counted)
	dups   uint64 // batches that repeated a counted one (not counted)
	stream string // for the duplicates' records
	// dupSeqs, in a replay, are the stream sequences the live consumer found to be duplicates.
	dupSeqs map[uint64]bool
	// restarts are the run links of the batches added since the caller last took them (to log them);
	// recovered counts late batches of linked runs.
	restarts  []stream.Restart
	recovered uint64

	// replay restricts counting to buckets [fromS, toS) and skips the per-message facts (gaps, chain
	// state, dead letters) that the live consumer already recorded exactly once.
	replay     bool
	fromS, toS int64
}

// newAggregator returns an aggregator keeping chains in a cache of at most maxChains (DefaultMaxChains
// when 0), with nothing committed (set load to read a database).
func newAggregator(bucket time.Duration, prefix string, maxChains int) *aggregator {
	if maxChains <= 0 {
		maxChains = DefaultMaxChains
	}
	return &aggregator{bucketS: max(int64(bucket/time.Second), 1), prefix: prefix, chains: newChainCache(maxChains), d: store.NewDelta()}
}

// storeError is a database failure while reading chain state: not the message's fault, so it ends the
// Run instead of dead-lettering the message.
type storeError struct{ err error }

func (e *storeError) Error() string {
	return "read chain state: " + e.err.Error()
}
func (e *storeError) Unwrap() error { return e.err }

// lookup returns chain rk's state and holes and whether any batch or link made it known: from the
// cache, else the pending delta (changes since the last commit of a chain evicted meanwhile), else the
// database. The delta holds a chain's complete state, and its complete hole list when that changed.
func (a *aggregator) lookup(rk store.RunKey) (chainEntry, bool, error) {
	if e, ok := a.chains.get(rk); ok {
		return e, true, nil
	}
	if a.chains.complete {
		return chainEntry{}, false, nil
	}
	cs, inDelta := a.d.Runs[rk]
	hs, holesInDelta := a.d.Holes[rk]
	if inDelta && holesInDelta || a.load == nil {
		return chainEntry{cs: cs, holes: hs}, inDelta, nil
	}
	a.loads++
	dcs, dhs, found, err := a.load(rk)
	if err != nil {
		return chainEntry{}, false, &storeError{err}
	}
	if inDelta {
		dcs, found = cs, true
	}
	if holesInDelta {
		dhs = hs
	}
	return chainEntry{cs: dcs, holes: dhs}, found, nil
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
	case errors.Is(err, schema.ErrSubjectMismatch):
		return ReasonSubjectMismatch
	case strings.Contains(err.Error(), "truncated"):
		return ReasonTruncated
	}
	return ReasonMalformed
}

// header is what the chain logic needs of a batch of either kind.
type header struct {
	host, runID string
	dir         schema.Direction
	kind        schema.Kind
	seq         uint64
	prevSeq     uint64
	prevRun     *schema.RunLink
}

// add folds one stream message, stored on subject, in. It returns the decode error when the message is
// not a valid batch, or is not on its own host's and direction's subject; the caller dead-letters it and
// nothing of it is counted. A *storeError (chain state unreadable) is no fault of the message: the
// caller stops without committing. The subject tells the kind: an end subject
// (<prefix>.<host>.<direction>.end) is read by the end decoder only, any other by the begin decoder
// only, so a batch of one kind on the other's subject is refused as an unknown major.
func (a *aggregator) add(data []byte, subject string, streamSeq uint64, stored time.Time) error {
	if schema.SubjectKind(subject, a.prefix) == schema.KindEnd {
		return a.addEnd(data, subject, streamSeq, stored)
	}
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
	if err := schema.CheckSubject(subject, a.prefix, b.Host, b.Direction); err != nil {
		return err
	}
	b.RunID = cleanText(b.RunID)
	clampDrops(&b.Drops)
	a.hdr = header{host: b.Host, runID: b.RunID, dir: b.Direction, kind: schema.KindBegin, seq: b.Seq, prevSeq: b.PrevSeq, prevRun: b.PrevRun}
	if counted, err := a.admit(streamSeq, stored); err != nil || !counted {
		return err
	}
	a.d.Messages++
	if ba := a.batchRow(stored); ba != nil {
		ba.Batches++
		ba.Events += uint64(len(b.Events))
		ba.Drops.Add(b.Drops)
	}
	a.fold(b)
	return nil
}

// batchRow is the batch aggregate of a.hdr's host and direction in the bucket of the stored time, nil
// when that bucket is outside the range being counted.
func (a *aggregator) batchRow(stored time.Time) *store.BatchAgg {
	sb := a.bucketOf(stored.UnixNano())
	if !a.inRange(sb) {
		return nil
	}
	bk := store.BatchKey{Bucket: sb, Host: a.hdr.host, Dir: a.hdr.dir}
	ba := a.d.Batches[bk]
	if ba == nil {
		ba = &store.BatchAgg{}
		a.d.Batches[bk] = ba
	}
	return ba
}

// admit decides whether the batch in a.hdr is counted: in a replay, unless the live consumer found it
// a duplicate; live, by its chain.
func (a *aggregator) admit(streamSeq uint64, stored time.Time) (bool, error) {
	if a.replay {
		if a.dupSeqs[streamSeq] {
			a.dups++
			return false, nil
		}
		return true, nil
	}
	return a.chain(streamSeq, stored)
}

// chain follows the batch's prev_seq link (stream.Follow: per host, run and direction) and records a
// gap, and the hole of seqs it reveals, when it does not point at the last batch seen. It returns false
// when the batch must not be counted, and a *storeError when the chain's state could not be read.
//
// A batch at or below the last seq seen either arrived late (a publish retried after a later batch was
// stored) or repeats a counted batch (a retry the stream stored twice, having forgotten the first copy's
// message id after its duplicates window). A late batch lies in a hole: it is counted, shrinks the hole,
// records no gap and does not move the chain back. Anything else is a duplicate: recorded, not counted.
// Only late batches search the holes, so the common path costs one map read (the chain in memory).
//
// A counted batch adds to its chain's count of batches, which run links need: a batch carrying prev_run
// records a restart with K told from the previous run's count (link), and a counted batch of a run a
// link named lowers that link's K.
func (a *aggregator) chain(streamSeq uint64, stored time.Time) (bool, error) {
	b := &a.hdr
	rk := store.RunKey{Host: b.host, RunID: b.runID, Dir: b.dir, Kind: b.kind}
	e, seen, err := a.lookup(rk)
	if err != nil {
		return false, err
	}
	cs := e.cs
	last := cs.Last
	link := stream.Follow(seen, last, b.seq, b.prevSeq)
	if link == stream.LinkBehind {
		hs, filled := fillHole(e.holes, b.seq)
		if !filled {
			a.chains.put(rk, e) // unchanged: kept so that further copies need no lookup
			a.dups++
			a.d.Dups = append(a.d.Dups, store.Duplicate{RunKey: rk, Seq: b.seq, Stream: a.stream, StreamSeq: streamSeq, Stored: stored})
			return false, nil
		}
		e.holes = hs
		a.d.Holes[rk] = hs
		a.late++
		a.count(rk, e, stored)
		return true, nil
	}
	// Unlike a tail's warnings, a run first seen past its first batch is recorded as a gap: the
	// summary shows that its earlier batches were never read.
	if link == stream.LinkGap || link == stream.LinkBroken || link == stream.LinkFirst && b.prevSeq != 0 {
		a.d.Gaps = append(a.d.Gaps, store.Gap{RunKey: rk, AfterSeq: last, Seq: b.seq, PrevSeq: b.prevSeq, StreamSeq: streamSeq, Stored: stored})
		// The missing batches lie after the last one seen, up to the named predecessor (never at or
		// beyond this batch, whatever a broken agent says).
		if hi := min(b.prevSeq, b.seq-1); hi > last {
			// A new array: the pending delta or a loaded list may share the old one.
			e.holes = append(slices.Clip(e.holes), store.Hole{From: last + 1, To: hi})
			a.d.Holes[rk] = e.holes
		}
	}
	// A chain only a link named so far (Last 0) begins with this batch.
	if !seen || cs.Last == 0 && cs.Seen == 0 {
		cs.FromStart = b.prevSeq == 0
	}
	cs.Last = b.seq
	e.cs = cs
	a.count(rk, e, stored)
	if b.prevRun != nil {
		if err := a.link(rk, streamSeq, stored); err != nil {
			return false, err
		}
	}
	return true, nil
}

// count adds one counted batch, stored at stored, to chain rk (entry e), and to the K of a link that
// named it.
func (a *aggregator) count(rk store.RunKey, e chainEntry, stored time.Time) {
	e.cs.Seen++
	e.cs.Stored = max(e.cs.Stored, stored.UnixNano())
	a.chains.put(rk, e)
	a.d.Runs[rk] = e.cs
	if e.cs.Linked {
		a.d.Recovered[rk]++
		a.recovered++
	}
}

// link records the run link of the batch (chain rk), accounted against what this database counted of
// the previous run's chain, and marks that chain linked. A chain never seen gets a state row (Last 0),
// so its batches arriving later are counted for the link too.
func (a *aggregator) link(rk store.RunKey, streamSeq uint64, stored time.Time) error {
	b := &a.hdr
	l := *b.prevRun
	l.RunID, l.End = cleanText(l.RunID), cleanText(l.End)
	pk := store.RunKey{Host: b.host, RunID: l.RunID, Dir: b.dir, Kind: b.kind}
	pe, ok, err := a.lookup(pk)
	if err != nil {
		return err
	}
	pcs := pe.cs
	prev := stream.PrevChain{Known: ok && (pcs.Seen > 0 || pcs.Last > 0), FromStart: pcs.FromStart, Seen: pcs.Seen, Last: pcs.Last}
	r := stream.NewRestart(b.host, b.runID, b.dir, &l, prev)
	r.Kind = b.kind
	// The link makes the previous run's chain active again: its spooled batches may follow.
	pcs.Linked, pcs.Stored = true, max(pcs.Stored, stored.UnixNano())
	pe.cs = pcs
	a.chains.put(pk, pe)
	a.d.Runs[pk] = pcs
	missing := int64(-1)
	if k, told := r.Missing(); told {
		missing = int64(min(k, math.MaxInt64))
	}
	a.d.Restarts = append(a.d.Restarts, store.Restart{RunKey: rk, PrevRunID: l.RunID, PrevEnd: r.End(),
		PrevLastSeq: min(l.LastSeq, math.MaxInt64), PrevBatches: min(l.Batches, math.MaxInt64), PrevEvents: min(l.Events, math.MaxInt64),
		PrevSeen: r.Prev.String(), Seen: r.Seen, Missing: missing, DownFrom: l.LastNs, DownTo: l.StartNs, StreamSeq: streamSeq, Stored: stored})
	a.restarts = append(a.restarts, r)
	return nil
}

// fillHole returns hole list hs without seq, and whether seq was in a hole.
func fillHole(hs []store.Hole, seq uint64) ([]store.Hole, bool) {
	i := slices.IndexFunc(hs, func(h store.Hole) bool { return h.From <= seq && seq <= h.To })
	if i < 0 {
		return hs, false
	}
	h := hs[i]
	var parts []store.Hole
	if h.From < seq {
		parts = append(parts, store.Hole{From: h.From, To: seq - 1})
	}
	if seq < h.To {
		parts = append(parts, store.Hole{From: seq + 1, To: h.To})
	}
	// A new slice: the pending delta may share the old one's array.
	return slices.Concat(hs[:i], parts, hs[i+1:]), true
}

// fold counts the batch's events. The peer is the other end of the connection: the responder of an
// outgoing connection, the initiator of an incoming one; the port is always the responder's (the
// service). The peer's name in conn_agg and peer_seen is the first DNS name the agent attached, "" when
// none; conn_more_names counts it under each other name (each distinct one once), so that the view
// conn_names has it under every name.
func (a *aggregator) fold(b *schema.Batch) {
	ck := store.ConnKey{Host: b.Host, Dir: b.Direction}
	nk := store.NameKey{Host: b.Host, Dir: b.Direction}
	lk := store.LocalKey{Host: b.Host, Dir: b.Direction}
	sk := store.SeenKey{Host: b.Host, Dir: b.Direction}
	pk := store.ProcKey{Host: b.Host, Dir: b.Direction}
	for i := range b.Events {
		ev := &b.Events[i]
		bucket := a.bucketOf(ev.Timestamp)
		if !a.inRange(bucket) {
			continue
		}
		peer, names, local := ev.Dst, ev.DstDNS, ev.Src
		if b.Direction == schema.Incoming {
			peer, names, local = ev.Src, ev.SrcDNS, ev.Dst
		}
		name := ""
		if len(names) > 0 {
			name = cleanText(names[0])
		}
		peer, local = cleanZone(peer), cleanZone(local)
		a.d.Events++
		ck.Bucket, ck.Peer, ck.Name, ck.Port = bucket, peer, name, ev.DstPort
		a.d.Conns[ck]++
		nk.Bucket, nk.Peer, nk.Port = bucket, peer, ev.DstPort
		for j := 1; j < len(names); j++ {
			if n := cleanText(names[j]); n != "" && !repeatsName(names[:j], n) {
				nk.Name = n
				a.d.Names[nk]++
			}
		}
		lk.Bucket, lk.Local, lk.Peer, lk.Port = bucket, local, peer, ev.DstPort
		a.d.Locals[lk]++
		pk.Bucket, pk.Comm, pk.PID = bucket, cleanText(ev.Comm), ev.PID
		a.d.Procs[pk]++
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

// repeatsName reports whether name n (cleaned) is among the earlier names of an event, so that an
// agent listing a name twice does not count the connection twice under it. Events carry a handful of
// names at most: a scan is cheaper than a set.
func repeatsName(earlier []string, n string) bool {
	for _, e := range earlier {
		if cleanText(e) == n {
			return true
		}
	}
	return false
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

// cleanZone is a with its zone (from the stream: any bytes) cleaned as cleanText cleans text.
func cleanZone(a netip.Addr) netip.Addr {
	if z := a.Zone(); z != "" && cleanText(z) != z {
		return a.WithZone(cleanText(z))
	}
	return a
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
