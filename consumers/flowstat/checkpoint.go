package flowstat

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/nats-io/nats.go/jetstream"
)

// ensureCheckpointAndConsumer makes the durable consumer stand at the database's checkpoint and returns
// that checkpoint. An existing consumer is kept only if it is exactly there (same filters, ack floor and
// delivered sequence at the checkpoint, nothing in flight); otherwise it is recreated from
// checkpoint+1, so messages delivered to a process that died are read again at once instead of after
// the ack wait. Without a checkpoint the consumer is created by the start policy and its starting point
// is recorded as the checkpoint before anything is read.
func ensureCheckpointAndConsumer(ctx context.Context, st *store.Store, s jetstream.Stream, o *Options, dbID string) (jetstream.Consumer, uint64, error) {
	cp, cpFilters, found, err := st.CheckpointOf(ctx, o.Durable, o.Stream)
	if err != nil {
		return nil, 0, err
	}
	if found && !slices.Equal(sorted(cpFilters), sorted(o.Filters)) {
		fmt.Fprintf(o.Log, "flowstat: filters changed from %v to %v: continuing after stream sequence %d with the new ones\n", cpFilters, o.Filters, cp)
	}
	// The server would refuse the consumer with a terse error; say which setting to fix instead. A
	// stream without subjects (a mirror) cannot be checked.
	for _, f := range o.Filters {
		if err := stream.CheckFilter(o.Stream, f, s.CachedInfo().Config.Subjects); err != nil {
			return nil, 0, fmt.Errorf("%w: set --filter (FLOWBUS_FLOWSTAT_FILTER) or --prefix (FLOWBUS_SUBJECT_PREFIX) to what the agents publish", err)
		}
	}
	cctx, cancel := context.WithTimeout(ctx, o.ConnectTimeout)
	defer cancel()
	// What the stream deleted (age, size or count limits, a purge) after the checkpoint before it was
	// read. Checked whether the consumer is kept or recreated: a surviving consumer simply skips what
	// is gone, so only this check tells.
	var lossFrom, lossTo uint64
	if found {
		sinfo, err := s.Info(cctx)
		if err != nil {
			return nil, 0, fmt.Errorf("look up stream %q: %w", o.Stream, err)
		}
		// An emptied stream has FirstSeq = LastSeq+1, so the range is exact then too.
		if sinfo.State.FirstSeq > cp+1 {
			lossFrom, lossTo = cp+1, sinfo.State.FirstSeq-1
		}
	}
	cons, err := s.Consumer(cctx, o.Durable)
	switch {
	case errors.Is(err, jetstream.ErrConsumerNotFound):
	case err != nil:
		return nil, 0, fmt.Errorf("look up consumer %q on stream %q: %w", o.Durable, o.Stream, err)
	default:
		info := cons.CachedInfo()
		// Two databases on one durable consumer take its messages from each other: each sees a
		// position it never committed and, recreating the consumer, resets the other's.
		if owner := info.Config.Metadata[MetadataDatabase]; owner != "" && owner != dbID {
			return nil, 0, &ConsumerSharedError{Durable: o.Durable, Stream: o.Stream}
		}
		have := info.Config.FilterSubjects
		if info.Config.FilterSubject != "" {
			have = []string{info.Config.FilterSubject}
		}
		why := ""
		switch {
		case !found:
			why = "this database has no checkpoint for it (a new database?)"
		case !slices.Equal(sorted(have), sorted(o.Filters)):
			why = fmt.Sprintf("its filters %v differ from %v", have, o.Filters)
		case info.Config.AckPolicy != jetstream.AckAllPolicy:
			why = "it is not an ack-all consumer"
		case info.AckFloor.Stream > cp && lossTo > 0 && info.AckFloor.Stream <= lossTo:
			// The server moves a consumer past messages the stream deleted; the loss is logged below.
			why = fmt.Sprintf("its ack floor %d moved past the database checkpoint %d because the stream deleted unread messages", info.AckFloor.Stream, cp)
		case info.AckFloor.Stream > cp:
			why = fmt.Sprintf("its ack floor %d is ahead of the database checkpoint %d (this database restored from a backup, or another database using consumer %q? give each database its own --consumer)", info.AckFloor.Stream, cp, o.Durable)
		case info.Delivered.Stream != cp || info.NumAckPending > 0:
			why = "" // messages in flight to a previous process: silently start again at the checkpoint
		default:
			if info.Config.Metadata[MetadataDatabase] == "" {
				// Made by a flowstat that did not mark its consumers yet: mark it now, so another
				// database reusing the name is recognised from now on.
				c := info.Config
				c.Metadata = map[string]string{MetadataDatabase: dbID}
				for k, v := range info.Config.Metadata {
					c.Metadata[k] = v
				}
				if updated, err := s.UpdateConsumer(cctx, c); err == nil {
					cons = updated
				}
			}
			if err := recordLoss(ctx, st, o, lossFrom, lossTo); err != nil {
				return nil, 0, err
			}
			return cons, cp, nil
		}
		if why != "" {
			fmt.Fprintf(o.Log, "flowstat: recreating consumer %q: %s\n", o.Durable, why)
		}
		if err := s.DeleteConsumer(cctx, o.Durable); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
			return nil, 0, fmt.Errorf("delete consumer %q: %w", o.Durable, err)
		}
	}
	cfg := jetstream.ConsumerConfig{
		Durable:     o.Durable,
		Description: "flowstat aggregates (its position is kept in the flowstat database)",
		AckPolicy:   jetstream.AckAllPolicy,
		// A chunk's commit must finish before redelivery starts; redeliveries are harmless but wasteful.
		AckWait:       2 * time.Minute,
		MaxAckPending: max(4*o.MaxChunkMessages, 10_000),
		MaxDeliver:    -1,
		Metadata:      map[string]string{MetadataDatabase: dbID},
	}
	if len(o.Filters) == 1 {
		cfg.FilterSubject = o.Filters[0]
	} else {
		cfg.FilterSubjects = o.Filters
	}
	if found {
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, cp+1
	} else {
		cfg.DeliverPolicy, cfg.OptStartTime, cfg.OptStartSeq = o.Start.Deliver(o.Since, o.FromSeq)
	}
	cons, err = createConsumer(cctx, s, cfg)
	if err != nil {
		return nil, 0, fmt.Errorf("create consumer %q on stream %q with filters %v: %w", o.Durable, o.Stream, o.Filters, err)
	}
	info := cons.CachedInfo()
	if !found {
		// The server puts a new consumer's ack floor just before its first message.
		cp, err = st.InitCheckpoint(ctx, store.Checkpoint{Consumer: o.Durable, Stream: o.Stream, Filters: o.Filters, Seq: info.AckFloor.Stream})
		if err != nil {
			return nil, 0, fmt.Errorf("record the checkpoint of new consumer %q: %w", o.Durable, err)
		}
		fmt.Fprintf(o.Log, "flowstat: created consumer %q on %s (start %v) at stream sequence %d\n", o.Durable, o.Stream, o.Start, cp+1)
		return cons, cp, nil
	}
	if err := recordLoss(ctx, st, o, lossFrom, lossTo); err != nil {
		return nil, 0, err
	}
	return cons, cp, nil
}

// recordLoss logs and records that the stream deleted sequences from..to (none when to is 0) before
// the consumer read them.
func recordLoss(ctx context.Context, st *store.Store, o *Options, from, to uint64) error {
	if to == 0 {
		return nil
	}
	fmt.Fprintf(o.Log, "flowstat: warning: stream %s deleted sequences %d..%d (its age, size or message limits, or a purge) before consumer %q read them: their events are missing from the aggregates\n",
		o.Stream, from, to, o.Durable)
	if err := st.RecordLoss(ctx, o.Durable, o.Stream, from, to); err != nil {
		return fmt.Errorf("record the loss of stream sequences %d..%d: %w", from, to, err)
	}
	return nil
}

func sorted(s []string) []string {
	c := slices.Clone(s)
	slices.Sort(c)
	return c
}

// createConsumer creates the durable consumer, trying again a few times when
// the server answers with an internal error: right after the consumer of the
// same name was deleted, the server can still be writing the old one's state
// file in that directory, and the create fails with a storage error (seen as
// code 500, "rename .../o.dat.tmp: no such file or directory").
func createConsumer(ctx context.Context, s jetstream.Stream, cfg jetstream.ConsumerConfig) (jetstream.Consumer, error) {
	for attempt := 1; ; attempt++ {
		cons, err := s.CreateConsumer(ctx, cfg)
		var apiErr *jetstream.APIError
		if err == nil || attempt == 5 || !errors.As(err, &apiErr) || apiErr.Code != 500 {
			return cons, err
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(time.Duration(attempt) * 50 * time.Millisecond):
		}
	}
}
