package stream

// Link is how a batch continues its chain: the batches of one (host, run, direction), each naming in
// PrevSeq the Seq of the previous batch of the same direction (batch seqs are shared by both directions
// of a run, so they are not consecutive within a chain).
type Link int

const (
	// LinkFirst: no batch of the chain was seen before. Whether that is a gap is the caller's call: a
	// reader that started mid-stream sees runs begin at any batch.
	LinkFirst Link = iota
	// LinkNext: PrevSeq is the last Seq seen; nothing is missing.
	LinkNext
	// LinkBehind: Seq is at or below the last Seq seen: a batch that arrived late (a retried publish)
	// or a duplicate.
	LinkBehind
	// LinkGap: PrevSeq is after the last Seq seen; the batches last+1..PrevSeq are missing (the range
	// may include seqs of the other direction).
	LinkGap
	// LinkBroken: PrevSeq is before the last Seq seen, yet Seq is after it; the chain contradicts
	// itself.
	LinkBroken
)

// Follow classifies the batch seq with predecessor prev against its chain's last seen seq (seen false
// when none was).
func Follow(seen bool, last, seq, prev uint64) Link {
	switch {
	case !seen:
		return LinkFirst
	case seq <= last:
		return LinkBehind
	case prev == last:
		return LinkNext
	case prev > last:
		return LinkGap
	}
	return LinkBroken
}
