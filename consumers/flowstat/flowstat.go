// Package flowstat is the aggregating consumer: it reads flowbus batches from the JetStream stream with a
// durable pull consumer, aggregates them per time bucket and persists the aggregates with the consumer's
// checkpoint in one database transaction (package store), so a crash, a redelivery or a replay never
// counts an event twice.
//
// Ordering and exactly-once: one pull consumer delivers in stream order; messages with a stream sequence
// at or below the last one folded into the pending transaction (or committed) are redeliveries and are
// skipped. A transaction covers many messages (bounded by events, messages and age); it stores the last
// stream sequence, and only after it commits is that message acked (AckAll acks everything before it).
// The database is the source of truth: on start the durable consumer is kept only if it stands exactly
// at the database's checkpoint, and is otherwise recreated from checkpoint+1.
//
// Bad input (not a batch, wrong major, truncated) is copied to the dead-letter subject with the reason in
// headers, recorded in the database, acked and otherwise skipped: it never stops the consumer.
//
// Files: options.go (Options and their checks), runner.go (Run and its loop), checkpoint.go (the durable
// consumer at the database's checkpoint), deadletter.go, aggregate.go (batches into a store.Delta),
// replay.go, monitor.go (health and metrics). Connecting and the stream are package stream's.
package flowstat

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/internal/redact"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// MetadataDatabase is the consumer metadata key holding the identity of the database (store.ID) whose
// checkpoint the durable consumer follows.
const MetadataDatabase = "flowstat_database"

// ConsumerSharedError is returned by Run when its durable consumer belongs to another database.
type ConsumerSharedError struct{ Durable, Stream string }

// Error names the consumer and the fix.
func (e *ConsumerSharedError) Error() string {
	return fmt.Sprintf("durable consumer %s (stream %s) is also used by another database; give each database its own --consumer (FLOWBUS_FLOWSTAT_CONSUMER), or, if that database is gone for good, delete the consumer first (nats consumer rm %s %s)",
		e.Durable, e.Stream, e.Stream, e.Durable)
}

// Stats summarises a Run or Replay.
type Stats struct {
	Messages    uint64 // valid batches folded in, of both kinds
	Events      uint64 // begin events counted
	Ends        uint64 // end events counted
	DeadLetters uint64 // messages that were not valid batches
	NotCopied   uint64 // dead letters whose copy could not be published
	Gaps        uint64 // breaks in batch chains recorded
	Late        uint64 // batches that arrived after a later batch of their chain
	Duplicates  uint64 // messages repeating a batch already counted (not counted again)
	Restarts    uint64 // run links recorded: first batches naming the previous run of their host
	Recovered   uint64 // batches of a previous run counted after a link named it (each lowered its K)
	Skipped     uint64 // redeliveries at or below the checkpoint
	// ChainsLoaded counts the chains loaded at start (at most Options.MaxChains); ChainLookups the
	// chains read from the database since, each for a batch or link of a chain not in memory.
	ChainsLoaded uint64
	ChainLookups uint64
	Commits      uint64
	LastSeq      uint64 // committed checkpoint
	Reason       string // "idle", "caught-up", "canceled", "crash" or "done"
}

// errCrashed is returned by Run when Options.crashAfter triggers.
var errCrashed = errors.New("simulated crash")

// connect dials NATS and opens the stream, waiting up to streamWait for a missing one and saying so in
// log and mon.
func connect(ctx context.Context, urls []string, name string, timeout, streamWait time.Duration, streamName string, log io.Writer, mon *Monitor) (*nats.Conn, jetstream.JetStream, jetstream.Stream, error) {
	// A notice can quote a server's error text: escaped and bounded like everything else in the log.
	notify := func(msg string) { fmt.Fprintf(log, "flowstat: %s\n", stream.Escape(msg, stream.MaxLog)) }
	nc, err := stream.Connect(ctx, stream.Dial{URLs: urls, Name: name, Timeout: timeout, Notify: notify,
		// Asynchronous server errors (a refused publish, a slow consumer) go to the log, not to stderr.
		AsyncErrors: true})
	if err != nil {
		return nil, nil, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, nil, err
	}
	urlText := redact.URLs(urls)
	s, err := stream.Open(ctx, js, stream.Lookup{Stream: streamName, URL: urlText, Timeout: timeout, Wait: streamWait, Notify: notify,
		Waiting: func() { mon.setState(fmt.Sprintf("waiting for stream %q to appear on %s", streamName, urlText)) }})
	if err != nil {
		nc.Close()
		return nil, nil, nil, err
	}
	return nc, js, s, nil
}
