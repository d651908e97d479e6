package stream

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/flowbus/flowbus/schema"
)

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

// PrevChain is what a consumer knows of the chain a run link names: the batches of one direction of
// the previous run.
type PrevChain struct {
	// Known: the consumer saw at least one batch of the chain.
	Known bool
	// FromStart: the first batch it saw of the chain was the chain's first (prev_seq 0), so Seen counts
	// every batch that reached it. Without it the consumer began reading after the run began (or the
	// stream lost the run's first batches), and how many never arrived cannot be told.
	FromStart bool
	// Seen counts the distinct batches of the chain it saw (duplicates not counted); Last is the
	// highest seq among them.
	Seen, Last uint64
}

// PrevSeen says how much of the previous run a consumer saw, which decides whether K can be told.
type PrevSeen int

const (
	// PrevAll: the consumer saw the chain from its first batch; K is exact (and shrinks as late
	// batches arrive).
	PrevAll PrevSeen = iota
	// PrevPartial: it saw the chain only from a later batch on; K cannot be told.
	PrevPartial
	// PrevUnseen: it saw no batch of the previous run in this direction; K cannot be told.
	PrevUnseen
)

// String is the spelling stored in flowstat's database: all, partial, unseen.
func (p PrevSeen) String() string {
	switch p {
	case PrevAll:
		return "all"
	case PrevPartial:
		return "partial"
	case PrevUnseen:
		return "unseen"
	}
	return "prevseen(" + strconv.Itoa(int(p)) + ")"
}

// ParsePrevSeen parses String's spellings; anything else is PrevUnseen (nothing claimed).
func ParsePrevSeen(s string) PrevSeen {
	switch s {
	case "all":
		return PrevAll
	case "partial":
		return PrevPartial
	}
	return PrevUnseen
}

// Restart is a run link accounted by a consumer: the first batch of a direction of run RunID of Host
// named the previous run (Link), of which the consumer saw Seen batches of this direction.
type Restart struct {
	Host  string
	Dir   schema.Direction
	Kind  schema.Kind // the chain's kind: begin batches, or end batches (their own chain)
	RunID string      // the new run
	Link  schema.RunLink
	Prev  PrevSeen
	Seen  uint64
	// PrevLast is the highest seq of the previous run (this direction) the consumer had seen at the link.
	PrevLast uint64
}

// NewRestart accounts link, carried by the first batch of direction dir of run runID of host, against
// what the consumer knows of the chain it names. A previous run that sealed no batch of this direction
// has nothing to miss, whatever the consumer saw.
func NewRestart(host, runID string, dir schema.Direction, link *schema.RunLink, prev PrevChain) Restart {
	r := Restart{Host: host, Dir: dir, RunID: runID, Link: *link, Seen: prev.Seen, PrevLast: prev.Last}
	switch {
	case link.Batches == 0 || prev.Known && prev.FromStart:
		r.Prev = PrevAll
	case prev.Known:
		r.Prev = PrevPartial
	default:
		r.Prev = PrevUnseen
	}
	return r
}

// Missing is K, the batches of the previous run (this direction) that never reached the consumer, and
// whether it is known (Prev is PrevAll).
func (r *Restart) Missing() (uint64, bool) {
	if r.Prev != PrevAll {
		return 0, false
	}
	if r.Seen >= r.Link.Batches {
		return 0, true
	}
	return r.Link.Batches - r.Seen, true
}

// Down is the capture downtime, T2 - T1 (negative only if the agent's clock went back).
func (r *Restart) Down() time.Duration { return time.Duration(r.Link.StartNs - r.Link.LastNs) }

// End is how the previous run ended, as the format says to read it: "stopped", else "unknown".
func (r *Restart) End() string {
	if r.Link.End == schema.RunEndStopped {
		return schema.RunEndStopped
	}
	return schema.RunEndUnknown
}

// timeLayout is RFC3339 in UTC with milliseconds, as flowtail's table prints times.
const timeLayout = "2006-01-02T15:04:05.000Z07:00"

// Text is the one line a consumer prints or logs for the link, without a prefix or newline; every
// string from the stream in it is escaped and bounded (Escape).
func (r *Restart) Text() string {
	var b strings.Builder
	fmt.Fprintf(&b, "host %s direction %s%s restarted as run %s: run %s ended (%s) after seq %d", Escape(r.Host, MaxCell), r.Dir,
		kindNote(r.Kind), Escape(r.RunID, MaxCell), Escape(r.Link.RunID, MaxCell), r.End(), r.Link.LastSeq)
	switch k, known := r.Missing(); {
	case known && k > 0:
		fmt.Fprintf(&b, "; %d %s (of %d) never arrived", k, plural(k, "batch", "batches"), r.Link.Batches)
	case known && r.Link.Batches == 0:
		b.WriteString("; it sealed no batch in this direction")
	case known && r.Link.Batches == 1:
		b.WriteString("; its one batch arrived")
	case known:
		fmt.Fprintf(&b, "; all %d batches arrived", r.Link.Batches)
	case r.Prev == PrevPartial:
		// The end of the chain still tells something: what came after the last batch seen.
		end := "its last"
		if r.PrevLast < r.Link.LastSeq {
			end = fmt.Sprintf("so its batches after that one, up to seq %d, have not arrived", r.Link.LastSeq)
		}
		fmt.Fprintf(&b, "; it sealed %d batches, of which this consumer saw %d, not from the first, the last at seq %d (%s); how many never arrived before that is unknown",
			r.Link.Batches, r.Seen, r.PrevLast, end)
	default:
		fmt.Fprintf(&b, "; it sealed %d batches; previous run not seen by this consumer, so how many never arrived is unknown", r.Link.Batches)
	}
	fmt.Fprintf(&b, "; capture stopped %s → %s (%s)", time.Unix(0, r.Link.LastNs).UTC().Format(timeLayout),
		time.Unix(0, r.Link.StartNs).UTC().Format(timeLayout), seconds(r.Down()))
	return b.String()
}

// RecoveredText is the line for a late batch seq of the previous run that arrived after the link:
// K shrank by one.
func (r *Restart) RecoveredText(seq uint64) string {
	k, _ := r.Missing()
	rest := fmt.Sprintf("%d %s (of %d) still missing", k, plural(k, "batch", "batches"), r.Link.Batches)
	if k == 0 {
		rest = "none is missing now"
	}
	return fmt.Sprintf("host %s direction %s%s: batch %d of previous run %s arrived late (recovered); %s",
		Escape(r.Host, MaxCell), r.Dir, kindNote(r.Kind), seq, Escape(r.Link.RunID, MaxCell), rest)
}

// kindNote names the end chain in a line: "" for begins (as before end events), " (end events)".
func kindNote(k schema.Kind) string {
	if k == schema.KindEnd {
		return " (end events)"
	}
	return ""
}

func plural(n uint64, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// seconds formats d as seconds with milliseconds, e.g. "2.072 s".
func seconds(d time.Duration) string {
	return strconv.FormatFloat(d.Seconds(), 'f', 3, 64) + " s"
}

// ChainKey identifies a batch chain: one direction of one run of a host, for one kind of batch. Begin
// and end batches of a direction chain separately (each names in prev_seq the previous batch of its
// own kind), while their seqs come from the run's one counter.
type ChainKey struct {
	Host, RunID string
	Dir         schema.Direction
	Kind        schema.Kind // zero: begin batches
}

// Hole is a range of seqs [From, To] of a chain that a gap showed missing and no batch filled yet.
type Hole struct{ From, To uint64 }

// Bounds of Chains: a stream can hold any number of runs (agents restart forever, a hostile publisher
// makes up run ids), and a consumer without a database must not grow with it.
const (
	// MaxChains is how many chains (and, separately, how many run links) Chains remembers; past it,
	// it forgets them all and starts afresh.
	MaxChains = 4096
	// MaxHoles is how many holes it keeps per chain; past it the oldest is forgotten, and a batch
	// filling it later is taken for a duplicate.
	MaxHoles = 32
)

type chainState struct {
	last, seen uint64
	fromStart  bool
	holes      []Hole
}

// Chains follows batch chains in memory for a consumer without a database (flowtail): the last seq,
// the distinct batches seen and the holes of each chain, and the run links (prev_run) that named a
// chain, so a late batch of a previous run shrinks the K reported for it. Memory is bounded by
// MaxChains and MaxHoles whatever the stream holds. Not safe for concurrent use.
type Chains struct {
	chains map[ChainKey]*chainState
	links  map[ChainKey]*Restart // keyed by the previous run's chain
}

// NewChains returns an empty tracker.
func NewChains() *Chains {
	return &Chains{chains: map[ChainKey]*chainState{}, links: map[ChainKey]*Restart{}}
}

// Observed is what one batch did to its chain.
type Observed struct {
	Link Link
	// Last is the chain's last seq before this batch (valid unless Link is LinkFirst).
	Last uint64
	// Late: a batch at or below Last (LinkBehind) that filled a hole; counted. LinkBehind without Late
	// is a duplicate (or a batch whose hole was forgotten): not counted.
	Late bool
	// Restart is the batch's own prev_run, accounted; nil when it carries none (or is a duplicate).
	Restart *Restart
	// Recovered is set when the batch belongs to a previous run that a link named, that the consumer
	// saw from its start and of which batches were missing: the link, with K lowered by this batch.
	Recovered *Restart
}

// Counted reports whether the batch is new to its chain (not a duplicate).
func (o *Observed) Counted() bool { return o.Link != LinkBehind || o.Late }

// Observe follows begin batch b in its chain and accounts its run link, if any.
func (c *Chains) Observe(b *schema.Batch) Observed {
	return c.observe(ChainKey{b.Host, b.RunID, b.Direction, schema.KindBegin}, b.Seq, b.PrevSeq, b.PrevRun)
}

// ObserveEnd follows end batch b in its chain (the end batches of its host, run and direction) and
// accounts its run link, which names the previous run's end chain.
func (c *Chains) ObserveEnd(b *schema.EndBatch) Observed {
	return c.observe(ChainKey{b.Host, b.RunID, b.Direction, schema.KindEnd}, b.Seq, b.PrevSeq, b.PrevRun)
}

// batchRef is what observe needs of a batch of either kind.
type batchRef struct{ Seq, PrevSeq uint64 }

func (c *Chains) observe(k ChainKey, seq, prevSeq uint64, prevRun *schema.RunLink) Observed {
	b := batchRef{seq, prevSeq}
	st := c.chains[k]
	var o Observed
	if st == nil {
		o.Link = LinkFirst
	} else {
		o.Last = st.last
		o.Link = Follow(true, st.last, b.Seq, b.PrevSeq)
	}
	switch o.Link {
	case LinkFirst:
		if len(c.chains) >= MaxChains {
			clear(c.chains)
		}
		st = &chainState{last: b.Seq, seen: 1, fromStart: b.PrevSeq == 0}
		c.chains[k] = st
	case LinkBehind:
		i := -1
		for j, h := range st.holes {
			if h.From <= b.Seq && b.Seq <= h.To {
				i = j
				break
			}
		}
		if i < 0 {
			return o
		}
		o.Late = true
		h := st.holes[i]
		var parts []Hole
		if h.From < b.Seq {
			parts = append(parts, Hole{h.From, b.Seq - 1})
		}
		if b.Seq < h.To {
			parts = append(parts, Hole{b.Seq + 1, h.To})
		}
		st.holes = slices.Concat(st.holes[:i], parts, st.holes[i+1:])
		if len(st.holes) > MaxHoles {
			st.holes = st.holes[len(st.holes)-MaxHoles:]
		}
		st.seen++
	default:
		// The missing batches lie after the last one seen, up to the named predecessor (never at or
		// beyond this batch, whatever a broken agent says).
		if hi := min(b.PrevSeq, b.Seq-1); o.Link == LinkGap && hi > st.last {
			st.holes = append(st.holes, Hole{st.last + 1, hi})
			if len(st.holes) > MaxHoles {
				st.holes = st.holes[1:]
			}
		}
		st.last = b.Seq
		st.seen++
	}
	if r := c.links[k]; r != nil {
		if missing, known := r.Missing(); known && missing > 0 {
			o.Recovered = r
		}
		r.Seen++
	}
	if prevRun != nil {
		pk := ChainKey{k.Host, prevRun.RunID, k.Dir, k.Kind}
		var prev PrevChain
		if ps := c.chains[pk]; ps != nil {
			prev = PrevChain{Known: true, FromStart: ps.fromStart, Seen: ps.seen, Last: ps.last}
		}
		r := NewRestart(k.Host, k.RunID, k.Dir, prevRun, prev)
		r.Kind = k.Kind
		if len(c.links) >= MaxChains {
			clear(c.links)
		}
		c.links[pk] = &r
		o.Restart = &r
	}
	return o
}
