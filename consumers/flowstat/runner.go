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
	if _, err := pruneChains(ctx, st, &o); err != nil {
		return Stats{}, err
	}
	// Memory for chains is bounded whatever the database holds: the most recent ones are loaded, the
	// others read by key when a batch of theirs arrives.
	agg := newAggregator(o.Bucket, o.Prefix, o.MaxChains)
	recent, err := st.RecentChains(ctx, o.MaxChains)
	if err != nil {
		return Stats{}, fmt.Errorf("load chain state from database %s: %w", st.Where(), err)
	}
	for _, c := range recent {
		agg.chains.put(c.Key, chainEntry{cs: c.State, holes: c.Holes})
	}
	// Fewer than asked for: that is every chain of the database.
	agg.chains.complete = len(recent) < o.MaxChains
	if o.chainsObserved != nil {
		o.chainsObserved(agg.chains.len())
	}
	reader, err := st.ChainReader(ctx)
	if err != nil {
		return Stats{}, fmt.Errorf("prepare chain-state lookups in database %s: %w", st.Where(), err)
	}
	defer reader.Close()
	dbCtx := context.WithoutCancel(ctx)
	agg.load = func(k store.RunKey) (store.ChainState, []store.Hole, bool, error) {
		lctx, cancel := context.WithTimeout(dbCtx, time.Minute)
		defer cancel()
		return reader.Chain(lctx, k)
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
		dbCtx:     dbCtx,
		dl:        newDeadLetterer(ctx, nc, js, o.DeadLetterSubject, o.Stream, o.ConnectTimeout),
		agg:       agg,
		committed: cp,
		last:      cp,
		lastLog:   time.Now(),
		lastPrune: time.Now(),
	}
	r.agg.stream = o.Stream
	r.stats.LastSeq = cp
	r.stats.ChainsLoaded = uint64(len(recent))
	fmt.Fprintf(o.Log, "flowstat: loaded the state of the %d most recently active chains (at most %d kept in memory; the others are read from the database when a batch of theirs arrives)\n",
		len(recent), o.MaxChains)
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
	lastPrune  time.Time
}

// chainPruneEvery is how often a running consumer prunes inactive chain state (it also does at start);
// a variable for the tests.
var chainPruneEvery = time.Hour

// pruneChains deletes the state of chains inactive for longer than o.ChainRetention, with one log line
// when it deleted any.
func pruneChains(ctx context.Context, st *store.Store, o *Options) (store.Pruned, error) {
	if o.ChainRetention < 0 {
		return store.Pruned{}, nil
	}
	p, err := st.PruneChains(ctx, o.ChainRetention)
	if err != nil {
		return p, fmt.Errorf("prune the state of chains inactive for more than %v in database %s: %w", o.ChainRetention, st.Where(), err)
	}
	if p.Chains+p.Holes > 0 {
		fmt.Fprintf(o.Log, "flowstat: pruned the state of chains inactive for more than %v (no batch stored since %s): %d run_state and %d holes rows; a batch continuing one of them would be recorded as a run first seen mid-way; nothing to do\n",
			o.ChainRetention, time.Unix(0, p.Before).UTC().Format(time.RFC3339), p.Chains, p.Holes)
	}
	return p, nil
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
		full := d.Events+d.EndEvents >= uint64(r.o.MaxChunkEvents) || d.Messages+uint64(len(d.Dead)) >= uint64(r.o.MaxChunkMessages)
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
		if r.o.chainsObserved != nil {
			r.o.chainsObserved(r.agg.chains.len())
		}
		var se *storeError
		if errors.As(derr, &se) {
			// Nothing of this chunk is committed; the next Run reads it again.
			return fmt.Errorf("stream sequence %d: %w (database %s)", seq, derr, r.st.Where())
		}
		if r.agg.dups != dups {
			b := &r.agg.hdr
			kind := ""
			if b.kind == schema.KindEnd {
				kind = "end "
			}
			fmt.Fprintf(r.o.Log, "flowstat: stream sequence %d on %s repeats %sbatch %d of host %s run %s %s, already counted: not counted again (a retry stored after the stream's duplicates window)\n",
				seq, stream.Escape(msg.Subject(), stream.MaxLog), kind, b.seq, stream.Escape(b.host, stream.MaxLog), stream.Escape(b.runID, stream.MaxLog), b.dir)
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
		r.stats.Ends += d.EndEvents
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
		r.stats.ChainLookups = r.agg.loads
		r.committed, r.stats.LastSeq = r.last, r.last
		d.Reset()
		if time.Since(r.lastPrune) >= chainPruneEvery {
			r.prune()
		}
	}
	if r.toAck != nil {
		// A lost ack only means a redelivery, which the checkpoint filters out.
		_ = r.toAck.Ack()
		r.toAck = nil
	}
	r.chunkStart = time.Time{}
	return nil
}

// prune deletes inactive chain state between chunks (the delta is empty, so every chain's state is
// committed) and forgets those chains in memory too. A failure is logged and retried later: it must not
// stop the consumption.
func (r *runner) prune() {
	r.lastPrune = time.Now()
	ctx, cancel := context.WithTimeout(r.dbCtx, 5*time.Minute)
	defer cancel()
	p, err := pruneChains(ctx, r.st, r.o)
	if err != nil {
		fmt.Fprintf(r.o.Log, "flowstat: %v; trying again in %v\n", err, chainPruneEvery)
		return
	}
	if p.Before > 0 {
		r.agg.chains.dropBefore(p.Before)
	}
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
