package tail

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/schema"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

type reader struct {
	o     *Options
	h     Handler
	w     *warner
	st    *Stats
	seqs  *stream.Chains
	batch schema.Batch
	end   schema.EndBatch
	meta  Meta
}

var errDone = errors.New("done")

func (r *reader) loop(ctx context.Context, it jetstream.MessagesContext) error {
	lastMsg := time.Now()
	for {
		wait := r.o.IdleInterval
		if r.o.IdleExit > 0 {
			left := r.o.IdleExit - time.Since(lastMsg)
			if left <= 0 {
				r.st.Reason = "idle"
				return r.idle()
			}
			wait = min(wait, left)
		}
		nctx, cancel := context.WithTimeout(ctx, wait)
		msg, err := it.Next(jetstream.NextContext(nctx))
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				r.st.Reason = "canceled"
				return r.idle()
			}
			if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) {
				if err := r.idle(); err != nil {
					return err
				}
				continue
			}
			return fmt.Errorf("reading stream %q: %w", r.o.Stream, err)
		}
		lastMsg = time.Now()
		err = r.handle(msg)
		if errors.Is(err, errDone) {
			r.st.Reason = "count"
			return r.idle()
		}
		if err != nil {
			return err
		}
		// Caught up with the stream: flush now rather than after IdleInterval, so live output is prompt
		// while a replay still gets buffered writes.
		if md, err := msg.Metadata(); err == nil && md.NumPending == 0 {
			if err := r.idle(); err != nil {
				return err
			}
		}
	}
}

func (r *reader) idle() error {
	if r.o.OnIdle == nil {
		return nil
	}
	return r.o.OnIdle()
}

func (r *reader) handle(msg jetstream.Msg) error {
	subject := msg.Subject()
	m := &r.meta
	*m = Meta{Subject: subject}
	if md, err := msg.Metadata(); err == nil {
		m.StreamSeq = md.Sequence.Stream
		m.Stored = md.Timestamp
		r.st.LastSeq = m.StreamSeq
	}
	if schema.SubjectKind(subject, r.o.Prefix) == schema.KindEnd {
		if !r.o.Events.ends() {
			r.st.IgnoredEnds++
			return nil
		}
		return r.handleEnd(m, msg.Data())
	}
	// Only the begin decoder reads a begin subject: an end batch published there is refused by it as
	// major 2 (skipped with a warning), never shown as a begin.
	if err := schema.DecodeBatch(msg.Data(), &r.batch); err != nil {
		r.st.Skipped++
		r.w.skip(subject, m.StreamSeq, err)
		return nil
	}
	b := &r.batch
	if err := schema.CheckSubject(subject, r.o.Prefix, b.Host, b.Direction); err != nil {
		r.st.Skipped++
		r.st.Mismatched++
		r.w.skip(subject, m.StreamSeq, err)
		return nil
	}
	r.st.Batches++
	m.Host, m.Direction, m.RunID, m.Seq, m.PrevSeq, m.Drops = b.Host, b.Direction, b.RunID, b.Seq, b.PrevSeq, b.Drops
	r.checkSeq(m, r.seqs.Observe(b))
	r.drops(m)
	for i := range b.Events {
		if err := r.h(m, &b.Events[i]); err != nil {
			return err
		}
		if err := r.counted(); err != nil {
			return err
		}
	}
	return nil
}

// handleEnd is handle for a message on an end subject: the end decoder, the end subject check, the
// end chain of (host, run, direction).
func (r *reader) handleEnd(m *Meta, data []byte) error {
	m.Kind = schema.KindEnd
	if err := schema.DecodeEndBatch(data, &r.end); err != nil {
		r.st.Skipped++
		r.w.skip(m.Subject, m.StreamSeq, err)
		return nil
	}
	b := &r.end
	if err := schema.CheckEndSubject(m.Subject, r.o.Prefix, b.Host, b.Direction); err != nil {
		r.st.Skipped++
		r.st.Mismatched++
		r.w.skip(m.Subject, m.StreamSeq, err)
		return nil
	}
	r.st.Batches++
	m.Host, m.Direction, m.RunID, m.Seq, m.PrevSeq, m.Drops = b.Host, b.Direction, b.RunID, b.Seq, b.PrevSeq, b.Drops
	r.checkSeq(m, r.seqs.ObserveEnd(b))
	r.drops(m)
	for i := range b.Events {
		if err := r.o.OnEnd(m, &b.Events[i]); err != nil {
			return err
		}
		r.st.Ends++
		if err := r.counted(); err != nil {
			return err
		}
	}
	return nil
}

// counted counts one delivered event and says when Count is reached.
func (r *reader) counted() error {
	r.st.Events++
	if r.o.Count > 0 && r.st.Events >= uint64(r.o.Count) {
		return errDone
	}
	return nil
}

// drops warns of the events the agent lost before the batch.
func (r *reader) drops(m *Meta) {
	if n := m.Drops.Total(); n > 0 {
		r.st.Dropped += n
		d := m.Drops
		r.w.printf("warning: drops: host %s direction %s lost %d events before batch %d (kernel=%d reader=%d queue=%d spool=%d publish=%d)\n",
			m.Host, dirText(m), n, m.Seq, d.Kernel, d.Reader, d.Queue, d.Spool, d.Publish)
	}
}

// dirText is the direction as warnings name it; an end batch's chain is its own: "outgoing (end events)".
func dirText(m *Meta) string {
	if m.Kind == schema.KindEnd {
		return m.Direction.String() + " (end events)"
	}
	return m.Direction.String()
}

// checkSeq reports holes in the batch chain of a (host, run, direction), following it through PrevSeq
// (stream.Chains), and the run links: a batch naming the previous run of its host (how that run ended,
// how many of its batches never arrived, how long capture was down), and each late batch of such a run.
// The range printed is where the missing batches lie (it may include seqs of the other direction). The
// first batch seen of a run is not a gap: the reader may have started mid-stream, or old batches may
// have aged out.
func (r *reader) checkSeq(m *Meta, o stream.Observed) {
	last, prev := o.Last, m.PrevSeq
	switch o.Link {
	case stream.LinkBehind:
		if o.Late {
			r.w.printf("warning: host %s direction %s run %s batch %d arrived late, after batch %d: it fills a gap reported before\n",
				m.Host, dirText(m), m.RunID, m.Seq, last)
		} else {
			// Not a loss, but worth knowing: a duplicate the stream's dedupe window did not catch.
			r.w.printf("warning: host %s direction %s run %s batch %d arrived after batch %d (duplicate or reordered)\n",
				m.Host, dirText(m), m.RunID, m.Seq, last)
		}
	case stream.LinkGap:
		r.st.Gaps++
		if prev == last+1 {
			r.w.printf("warning: gap: host %s direction %s run %s missing batch %d\n", m.Host, dirText(m), m.RunID, prev)
		} else {
			r.w.printf("warning: gap: host %s direction %s run %s missing batches %d..%d\n", m.Host, dirText(m), m.RunID, last+1, prev)
		}
	case stream.LinkBroken:
		r.st.Gaps++
		r.w.printf("warning: gap: host %s direction %s run %s batch %d says its predecessor is %d, but %d was seen last\n",
			m.Host, dirText(m), m.RunID, m.Seq, prev, last)
	}
	if o.Recovered != nil {
		r.st.Recovered++
		r.w.line("warning: " + o.Recovered.RecoveredText(m.Seq))
	}
	if o.Restart != nil {
		r.st.Restarts++
		if k, known := o.Restart.Missing(); known {
			r.st.NeverArrived += k
		}
		r.w.line("warning: " + o.Restart.Text())
	}
}
