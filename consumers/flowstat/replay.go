package flowstat

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// ReplayOptions configures Replay.
type ReplayOptions struct {
	URLs    []string
	Stream  string
	Durable string // whose checkpoint and filters the replay follows
	// Prefix is the agents' subject prefix, as given to Run; empty means schema.DefaultPrefix.
	Prefix string

	// From and To delimit the rebuilt range; both are widened to whole buckets.
	From, To time.Time
	// Margin is how long before From a batch may have been stored and still hold events of the range
	// (clock skew between an agent and the NATS server). Reading starts at the first message stored at
	// or after From-Margin. 0 means 10 minutes.
	Margin time.Duration
	// Force rebuilds even when the stream no longer holds every message the range may need (it
	// deleted messages stored after From-Margin): the rebuilt range then lacks their events.
	Force bool

	ConnectTimeout time.Duration
	MaxChunkEvents int // events per transaction; 0 means 1000000, as for Run
	Log            io.Writer
}

// ErrStreamTooShort is returned by Replay when the stream no longer holds the start of the range.
var ErrStreamTooShort = errors.New("the stream no longer holds every message of the range")

// Replay rebuilds the connection, end, process and batch aggregates of the buckets in [From, To) from
// the stream.
//
// Semantics: in one transaction the range's conn_agg, conn_more_names, conn_local, end_agg, end_more_names, proc_agg and batch_agg rows are deleted and the durable
// consumer's checkpoint C is read. Then the stream is re-read with an ordered consumer under the same
// filters, from the first message stored at or after From-Margin up to C, and only events (by event
// time) and batches (by stored time) inside the range are added back, one transaction per chunk.
// Messages after C are the live consumer's: it may run concurrently, and what it commits meanwhile lands
// on top of the rebuilt rows, so nothing is counted twice or lost. First/last seen are min/max, so they
// are left as they are; gaps and dead letters were recorded once by the live consumer and are left
// alone. The consumer's current filters apply. While a replay runs (or if it failed) the range is
// incomplete and `flowstat summary` says so; running the replay again repairs it. A database written by
// several consumers is refused: their counts share the rows, and only one's messages would be read back.
func Replay(ctx context.Context, st *store.Store, o ReplayOptions) (Stats, error) {
	var stats Stats
	ro := Options{URLs: o.URLs, Stream: o.Stream, Durable: o.Durable, Prefix: o.Prefix, ConnectTimeout: o.ConnectTimeout, MaxChunkEvents: o.MaxChunkEvents, Log: o.Log}
	ro.defaults()
	if o.Margin <= 0 {
		o.Margin = 10 * time.Minute
	}
	if !o.To.After(o.From) {
		return stats, fmt.Errorf("the end %v is not after the start %v", o.To.UTC(), o.From.UTC())
	}
	width, err := st.BucketWidth(ctx)
	if err != nil {
		return stats, err
	}
	if width == 0 {
		return stats, fmt.Errorf("database %s holds no aggregates yet: run `flowstat run` first", st.Where())
	}
	agg := newAggregator(width, ro.Prefix, 1) // a replay follows no chain
	agg.replay = true
	agg.fromS = agg.bucketOf(o.From.UnixNano())
	agg.toS = agg.bucketOf(o.To.UnixNano())
	if agg.toS*1e9 < o.To.UnixNano() {
		agg.toS += agg.bucketS // To rounds up to a bucket boundary
	}
	cps, err := st.Checkpoints(ctx)
	if err != nil {
		return stats, err
	}
	found := false
	var names []string
	for _, c := range cps {
		found = found || c.Consumer == ro.Durable && c.Stream == ro.Stream
		names = append(names, c.Consumer+"@"+c.Stream)
	}
	switch {
	case !found:
		return stats, fmt.Errorf("database %s has no checkpoint of consumer %q on stream %q: run `flowstat run` first, or set --consumer and --stream to the ones it uses",
			st.Where(), ro.Durable, ro.Stream)
	case len(cps) > 1:
		// The range's rows hold every consumer's counts, but only one consumer's messages would be
		// read back: the others' would be lost.
		return stats, fmt.Errorf("database %s is written by several consumers (%s) and a replay can rebuild only one's: give each consumer its own database (or delete the checkpoint rows of consumers no longer used)",
			st.Where(), strings.Join(names, ", "))
	}
	nc, js, stream, err := connect(ctx, ro.URLs, "flowstat-replay", ro.ConnectTimeout, 0, ro.Stream, ro.Log, nil)
	if err != nil {
		return stats, err
	}
	defer nc.Close()

	start := time.Unix(agg.fromS, 0).Add(-o.Margin)
	// Refuse to delete what cannot be rebuilt: the stream's first message must be stored before the
	// replay's start, or the stream must never have deleted anything.
	sinfo, err := stream.Info(ctx)
	if err != nil {
		return stats, fmt.Errorf("look up stream %q: %w", ro.Stream, err)
	}
	if ss := sinfo.State; ss.FirstSeq > 1 && (ss.Msgs == 0 || ss.FirstTime.After(start)) && !o.Force {
		first := "holds no message any more"
		if ss.Msgs > 0 {
			first = fmt.Sprintf("starts at sequence %d stored %s", ss.FirstSeq, ss.FirstTime.UTC().Format(time.RFC3339))
		}
		return stats, fmt.Errorf("%w: stream %s %s, after %s (the range start minus the %v margin) and it deleted older messages; replay a later range, or pass --force to rebuild from what is left",
			ErrStreamTooShort, ro.Stream, first, start.UTC().Format(time.RFC3339), o.Margin)
	}

	id, upto, filters, err := st.BeginReplay(ctx, ro.Durable, ro.Stream, agg.fromS, agg.toS)
	if err != nil {
		return stats, err
	}
	stats.LastSeq = upto
	// Loaded after the checkpoint was read: every duplicate up to it is committed by then.
	if agg.dupSeqs, err = st.DuplicateStreamSeqs(ctx, ro.Stream); err != nil {
		return stats, err
	}
	if len(filters) == 0 {
		filters = ro.Filters
	}
	commit := func() error {
		if agg.d.Messages == 0 && agg.d.Events == 0 && agg.d.EndEvents == 0 {
			return nil
		}
		if err := st.ApplyReplay(ctx, agg.d); err != nil {
			return fmt.Errorf("%w (the range is incomplete until a replay of it succeeds)", err)
		}
		stats.Commits++
		stats.Messages += agg.d.Messages
		stats.Events += agg.d.Events
		stats.Ends += agg.d.EndEvents
		agg.d.Reset()
		return nil
	}
	oc, err := js.OrderedConsumer(ctx, ro.Stream, jetstream.OrderedConsumerConfig{
		FilterSubjects: filters, DeliverPolicy: jetstream.DeliverByStartTimePolicy, OptStartTime: &start,
		InactiveThreshold: 30 * time.Second,
	})
	if err != nil {
		return stats, fmt.Errorf("read stream %q from %s on: %w", ro.Stream, start.UTC().Format(time.RFC3339), err)
	}
	info, err := oc.Info(ctx)
	if err != nil {
		return stats, err
	}
	// The consumer's starting point, found from the time: nothing to read if it is past the checkpoint.
	if info.NumPending > 0 && info.AckFloor.Stream < upto {
		it, err := oc.Messages(jetstream.PullMaxBytes(16 << 20))
		if err != nil {
			return stats, err
		}
		defer it.Stop()
		var read uint64
		for {
			if ctx.Err() != nil {
				return stats, ctx.Err()
			}
			msg, err := it.Next(jetstream.NextMaxWait(5 * time.Second))
			if errors.Is(err, nats.ErrTimeout) {
				// The messages up to the checkpoint were deleted from the stream meanwhile (age limit).
				fmt.Fprintf(ro.Log, "flowstat: replay: no message after %d: the stream deleted the rest up to %d meanwhile\n", read, upto)
				break
			}
			if err != nil {
				return stats, fmt.Errorf("reading stream %q: %w", ro.Stream, err)
			}
			md, err := msg.Metadata()
			if err != nil {
				continue
			}
			seq := md.Sequence.Stream
			if seq > upto {
				break
			}
			read = seq
			if derr := agg.add(msg.Data(), msg.Subject(), seq, md.Timestamp); derr != nil {
				stats.DeadLetters++ // already dead-lettered by the live consumer
			}
			if agg.d.Events+agg.d.EndEvents >= uint64(ro.MaxChunkEvents) {
				if err := commit(); err != nil {
					return stats, err
				}
			}
			if seq == upto || md.NumPending == 0 {
				break
			}
		}
	}
	if err := commit(); err != nil {
		return stats, err
	}
	stats.Reason = "done"
	stats.Duplicates = agg.dups
	return stats, st.FinishReplay(ctx, id)
}
