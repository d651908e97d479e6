package flowstat

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/internal/redact"
	"github.com/flowbus/flowbus/schema"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Run consumes until ctx ends (Reason "canceled", pending chunk committed), IdleExit passes, the stream
// is caught up with ExitWhenCaughtUp, or an error happens. Bad messages never end it.
func Run(ctx context.Context, st *store.Store, o Options) (Stats, error) {
	o.defaults()
	if err := o.Validate(); err != nil {
		return Stats{}, err
	}
	if err := st.EnsureBucket(ctx, o.Bucket); err != nil {
		return Stats{}, err
	}
	dbID, err := st.ID(ctx)
	if err != nil {
		return Stats{}, fmt.Errorf("read the identity of database %s: %w", st.Where(), err)
	}
	o.Monitor.setState("connecting to NATS at " + redact.URLs(o.URLs))
	defer o.Monitor.setState("stopped")
	nc, js, stream, err := connect(ctx, o.URLs, "flowstat-"+o.Durable, o.ConnectTimeout, o.StreamWait, o.Stream, o.Log, o.Monitor)
	if err != nil {
		return Stats{}, err
	}
	defer nc.Close()

	o.Monitor.setState(fmt.Sprintf("binding durable consumer %q on stream %q", o.Durable, o.Stream))
	cons, cp, err := ensureCheckpointAndConsumer(ctx, st, stream, &o, dbID)
	if err != nil {
		return Stats{}, err
	}
	if n, err := st.PurgeOverlongChains(ctx); err != nil {
		return Stats{}, fmt.Errorf("remove over-long chain state from database %s: %w", st.Where(), err)
	} else if n > 0 {
		fmt.Fprintf(o.Log, "flowstat: removed %d chain-state rows whose host or run id is longer than the bounds (host %d, run id %d characters), written by a flowstat from before them: their batches are refused now, so only the gap detection of those runs is lost; nothing to do\n",
			n, schema.MaxHostLen, schema.MaxRunIDLen)
	}
	runs, err := st.RunStates(ctx)
	if err != nil {
		return Stats{}, err
	}
	holes, err := st.Holes(ctx)
	if err != nil {
		return Stats{}, err
	}
	// Bounded by bytes, not messages: batches vary in size and memory must stay bounded. 16 MiB is
	// above any sane max_payload, so a single large message is always deliverable.
	it, err := cons.Messages(jetstream.PullMaxBytes(16 << 20))
	if err != nil {
		return Stats{}, fmt.Errorf("consume %s/%s: %w", o.Stream, o.Durable, err)
	}
	defer it.Stop()

	r := &runner{
		o: &o, st: st, nc: nc, cons: cons,
		dbCtx:     context.WithoutCancel(ctx),
		dl:        newDeadLetterer(ctx, nc, js, o.DeadLetterSubject, o.Stream, o.ConnectTimeout),
		agg:       newAggregator(o.Bucket, o.Prefix, runs, holes),
		committed: cp,
		last:      cp,
		lastLog:   time.Now(),
	}
	r.agg.stream = o.Stream
	r.stats.LastSeq = cp
	o.Monitor.setCheckpoint(cp)
	o.Monitor.bound(nc, st)
	fmt.Fprintf(o.Log, "flowstat: consuming %s as %q with filters %v from stream sequence %d into %s:%s (buckets of %v)\n",
		o.Stream, o.Durable, o.Filters, cp+1, st.Kind(), st.Where(), o.Bucket)
	return r.loop(ctx, it)
}

// runner is the state of one Run.
type runner struct {
	o  *Options
	st *store.Store
	// dbCtx is not canceled by Run's ctx: a commit that has started finishes even when a signal stops
	// Run, so an orderly stop never fails halfway (commit bounds each one in time instead).
	dbCtx context.Context
	nc    *nats.Conn
	cons  jetstream.Consumer
	dl    *deadLetterer
	agg   *aggregator
	stats Stats

	committed  uint64        // checkpoint in the database
	last       uint64        // last stream sequence folded into agg.d (or skipped)
	toAck      jetstream.Msg // last message of the pending chunk
	chunkStart time.Time
	folded     int
	pending    uint64 // messages left in the stream after the last one read
	lastLog    time.Time
	logged     Stats
}

func (r *runner) loop(ctx context.Context, it jetstream.MessagesContext) (Stats, error) {
	lastMsg := time.Now()
	for {
		if ctx.Err() != nil {
			return r.finish("canceled")
		}
		msg, err := it.Next(jetstream.NextMaxWait(100 * time.Millisecond))
		if errors.Is(err, nats.ErrTimeout) {
			// Caught up (or a slow stream): commit what we have so it is visible and acked.
			if err := r.commit(); err != nil {
				return r.stats, err
			}
			r.progress(false)
			if r.o.IdleExit > 0 && time.Since(lastMsg) >= r.o.IdleExit {
				return r.finish("idle")
			}
			if r.o.ExitWhenCaughtUp && r.caughtUp(ctx) {
				return r.finish("caught-up")
			}
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return r.finish("canceled")
			}
			return r.stats, fmt.Errorf("reading %s/%s: %w", r.o.Stream, r.o.Durable, err)
		}
		lastMsg = time.Now()
		if err := r.handle(ctx, msg); err != nil {
			return r.stats, err
		}
		if r.o.crashAfter > 0 && r.folded >= r.o.crashAfter {
			r.stats.Reason = "crash"
			return r.stats, errCrashed
		}
		d := r.agg.d
		full := d.Events >= uint64(r.o.MaxChunkEvents) || d.Messages+uint64(len(d.Dead)) >= uint64(r.o.MaxChunkMessages)
		if full || r.pending == 0 || (!r.chunkStart.IsZero() && time.Since(r.chunkStart) >= r.o.MaxChunkAge) {
			if err := r.commit(); err != nil {
				return r.stats, err
			}
			r.progress(false)
		}
		if r.o.ExitWhenCaughtUp && r.pending == 0 {
			return r.finish("caught-up")
		}
	}
}

// caughtUp asks the server whether anything is left for the consumer (an empty stream never delivers a
// message whose metadata could say so).
func (r *runner) caughtUp(ctx context.Context) bool {
	ictx, cancel := context.WithTimeout(ctx, r.o.ConnectTimeout)
	defer cancel()
	info, err := r.cons.Info(ictx)
	return err == nil && info.NumPending == 0
}

// handle folds one message into the pending chunk, or dead-letters it.
func (r *runner) handle(ctx context.Context, msg jetstream.Msg) error {
	md, err := msg.Metadata()
	if err != nil {
		return nil // not a JetStream message; cannot happen on a pull consumer
	}
	seq := md.Sequence.Stream
	r.pending = md.NumPending
	r.o.Monitor.setPending(md.NumPending)
	if seq <= r.last {
		r.stats.Skipped++
		if seq <= r.committed {
			_ = msg.Ack()
		}
		return nil
	}
	if msg.Subject() != r.o.DeadLetterSubject { // else our own dead letter, read back because a filter
		// also covers the dead-letter subject: copying it again would loop forever
		dups := r.agg.dups
		derr := r.agg.add(msg.Data(), msg.Subject(), seq, md.Timestamp)
		if r.agg.dups != dups {
			b := &r.agg.batch
			fmt.Fprintf(r.o.Log, "flowstat: stream sequence %d on %s repeats batch %d of host %s run %s %s, already counted: not counted again (a retry stored after the stream's duplicates window)\n",
				seq, stream.Escape(msg.Subject(), stream.MaxLog), b.Seq, stream.Escape(b.Host, stream.MaxLog), stream.Escape(b.RunID, stream.MaxLog), b.Direction)
		}
		for _, rs := range r.agg.restarts {
			fmt.Fprintf(r.o.Log, "flowstat: %s\n", rs.Text())
		}
		r.agg.restarts = r.agg.restarts[:0]
		if derr != nil {
			reason := deadReason(derr)
			dead := store.DeadLetter{Stream: r.o.Stream, StreamSeq: seq, Subject: cleanText(msg.Subject()), Reason: reason,
				Detail: cleanText(derr.Error()), Stored: md.Timestamp}
			if err := r.dl.send(ctx, msg, seq, reason, derr); err != nil {
				if ctx.Err() != nil {
					return nil // shutting down: leave the message for the next run
				}
				// The message stays in the stream and in the deadletters table; stopping would only
				// stop everything behind it.
				fmt.Fprintf(r.o.Log, "flowstat: stream sequence %d on %s is not a valid batch (%s: %v) and could not be copied to %s: %v\n",
					seq, stream.Escape(msg.Subject(), stream.MaxLog), reason, stream.Escape(derr.Error(), stream.MaxLog), r.o.DeadLetterSubject, err)
			} else {
				dead.Copied = true
				fmt.Fprintf(r.o.Log, "flowstat: stream sequence %d on %s is not a valid batch (%s: %v): copied to %s\n",
					seq, stream.Escape(msg.Subject(), stream.MaxLog), reason, stream.Escape(derr.Error(), stream.MaxLog), r.o.DeadLetterSubject)
			}
			r.agg.d.Dead = append(r.agg.d.Dead, dead)
		}
	}
	if r.chunkStart.IsZero() {
		r.chunkStart = time.Now()
	}
	r.last, r.toAck = seq, msg
	r.folded++
	return nil
}

// commit writes the pending chunk with the checkpoint, then acks its last message.
func (r *runner) commit() error {
	if r.last != r.committed {
		d := r.agg.d
		cp := store.Checkpoint{Consumer: r.o.Durable, Stream: r.o.Stream, Filters: r.o.Filters, Seq: r.last}
		ctx, cancel := context.WithTimeout(r.dbCtx, 5*time.Minute)
		r.o.Monitor.setCommitting(true)
		err := r.st.Commit(ctx, d, cp, r.committed)
		r.o.Monitor.setCommitting(false)
		cancel()
		if err != nil {
			if errors.Is(err, store.ErrCheckpointMoved) {
				return fmt.Errorf("commit up to stream sequence %d: %w: is another `flowstat run` using consumer %q with this database? run only one per consumer name",
					r.last, err, r.o.Durable)
			}
			return fmt.Errorf("commit up to stream sequence %d: %w", r.last, err)
		}
		r.o.Monitor.committed(d, r.last)
		r.stats.Commits++
		r.stats.Messages += d.Messages
		r.stats.Events += d.Events
		r.stats.Gaps += uint64(len(d.Gaps))
		r.stats.DeadLetters += uint64(len(d.Dead))
		for _, dl := range d.Dead {
			if !dl.Copied {
				r.stats.NotCopied++
			}
		}
		r.stats.Late = r.agg.late
		r.stats.Restarts += uint64(len(d.Restarts))
		r.stats.Recovered = r.agg.recovered
		r.stats.Duplicates += uint64(len(d.Dups))
		r.committed, r.stats.LastSeq = r.last, r.last
		d.Reset()
	}
	if r.toAck != nil {
		// A lost ack only means a redelivery, which the checkpoint filters out.
		_ = r.toAck.Ack()
		r.toAck = nil
	}
	r.chunkStart = time.Time{}
	return nil
}

// finish commits the pending chunk and flushes the acks before the connection closes.
func (r *runner) finish(reason string) (Stats, error) {
	r.stats.Reason = reason
	err := r.commit()
	_ = r.nc.FlushTimeout(2 * time.Second)
	r.progress(true)
	return r.stats, err
}

// progress logs what was committed since the last line, at most every ProgressEvery (or now if final).
func (r *runner) progress(final bool) {
	now := time.Now()
	if !final && now.Sub(r.lastLog) < r.o.ProgressEvery {
		return
	}
	s, p := r.stats, r.logged
	if final || s.Commits != p.Commits {
		fmt.Fprintf(r.o.Log, "flowstat: committed up to stream sequence %d: +%d events, +%d batches, +%d dead letters, +%d gaps in %v; %d messages pending\n",
			s.LastSeq, s.Events-p.Events, s.Messages-p.Messages, s.DeadLetters-p.DeadLetters, s.Gaps-p.Gaps, now.Sub(r.lastLog).Round(time.Millisecond), r.pending)
	}
	r.lastLog, r.logged = now, s
}
