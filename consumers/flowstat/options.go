package flowstat

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/schema"
)

// Defaults of Options.
const (
	DefaultDurable           = "flowstat"
	DefaultBucket            = time.Minute
	DefaultDeadLetterSubject = "flowbus.deadletter"
	// DefaultMaxChains bounds the chains (one per host, agent run and direction) kept in memory: about
	// 10 MB with 64-character ids, far above the chains a fleet keeps active at once.
	DefaultMaxChains = 65536
	// DefaultChainRetention is how long the state of a chain without any new batch is kept in the
	// database: longer than any agent run stays silent in a direction, or a stream keeps its backlog.
	DefaultChainRetention = 30 * 24 * time.Hour
)

// DefaultFilter is the subject filter used when neither filters nor a prefix are given: every subject
// under the default prefix.
var DefaultFilter = schema.DefaultPrefix + ".>"

// Options configures Run.
type Options struct {
	URLs    []string // NATS servers; empty means stream.DefaultURL
	Stream  string   // empty means stream.DefaultStream
	Durable string   // durable consumer name; also the checkpoint's key in the database
	Filters []string // subject filters; empty means <Prefix>.>
	// Prefix is the agents' subject prefix; empty means schema.DefaultPrefix. A batch not stored on
	// <Prefix>.<its host>.<its direction> is dead-lettered (ReasonSubjectMismatch).
	Prefix string

	// Start, Since and FromSeq apply only when the database has no checkpoint for Durable on Stream;
	// stream.StartDefault is stream.StartAll (aggregates want history).
	Start   stream.Start
	Since   time.Time
	FromSeq uint64

	Bucket            time.Duration // aggregation bucket; 0 means DefaultBucket
	DeadLetterSubject string        // empty means DefaultDeadLetterSubject

	// IdleExit stops Run (after committing) when no message arrives for this long; 0 means never.
	IdleExit time.Duration
	// ExitWhenCaughtUp stops Run (after committing) once it has read everything the stream held.
	ExitWhenCaughtUp bool
	// ConnectTimeout bounds connecting and each JetStream request at start; 0 means 5s.
	ConnectTimeout time.Duration
	// StreamWait is how long Run waits for a missing stream to appear (flowagent creates it when it
	// starts); 0 means fail at once.
	StreamWait time.Duration

	// Chunk bounds: a transaction is committed when it holds MaxChunkEvents events or MaxChunkMessages
	// messages, or its first message is MaxChunkAge old, or the consumer has caught up. Zero means
	// 1000000, 5000 and 2s. Large chunks amortise the commit: a busy row (one peer's connections in one
	// bucket) is written once per chunk, not once per message, which is what makes B6 reachable. A
	// chunk's memory is bounded by its distinct rows, far fewer than its events.
	MaxChunkEvents   int
	MaxChunkMessages int
	MaxChunkAge      time.Duration

	// MaxChains bounds the batch chains kept in memory (0 means DefaultMaxChains): at start the most
	// recently active ones are loaded; a batch of another chain reads that chain's state from the
	// database by key. Gap detection, late batches and run links are exact either way.
	MaxChains int
	// ChainRetention: the state of a chain (run_state, holes) inactive for longer, measured against
	// the newest stored time of any chain, is deleted at start and hourly; 0 means
	// DefaultChainRetention, negative keeps it forever.
	ChainRetention time.Duration

	// Monitor, if set, follows the run for health probes and metrics.
	Monitor *Monitor

	// Log receives notices (consumer created, dead letters, progress); nil discards them.
	Log io.Writer
	// ProgressEvery is how often Run logs its progress; 0 means 1 minute.
	ProgressEvery time.Duration

	// crashAfter makes Run return errCrashed right after folding that many messages in, without
	// committing the pending chunk, as if the process died; 0 disables. Tests set it (export_test.go).
	crashAfter int
	// chainsObserved, if set, is called with the number of chains in memory after every message
	// (tests, export_test.go).
	chainsObserved func(int)
}

func (o *Options) defaults() {
	if len(o.URLs) == 0 {
		o.URLs = []string{stream.DefaultURL}
	}
	if o.Stream == "" {
		o.Stream = stream.DefaultStream
	}
	if o.Durable == "" {
		o.Durable = DefaultDurable
	}
	if o.Prefix == "" {
		o.Prefix = schema.DefaultPrefix
	}
	o.Start = o.Start.Or(stream.StartAll)
	if len(o.Filters) == 0 {
		o.Filters = []string{o.Prefix + ".>"}
	}
	if o.Bucket == 0 {
		o.Bucket = DefaultBucket
	}
	if o.DeadLetterSubject == "" {
		o.DeadLetterSubject = DefaultDeadLetterSubject
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = 5 * time.Second
	}
	if o.MaxChunkEvents <= 0 {
		o.MaxChunkEvents = 1_000_000
	}
	if o.MaxChunkMessages <= 0 {
		o.MaxChunkMessages = 5000
	}
	if o.MaxChunkAge <= 0 {
		o.MaxChunkAge = 2 * time.Second
	}
	if o.MaxChains <= 0 {
		o.MaxChains = DefaultMaxChains
	}
	if o.ChainRetention == 0 {
		o.ChainRetention = DefaultChainRetention
	}
	if o.ProgressEvery <= 0 {
		o.ProgressEvery = time.Minute
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	// NATS calls back from its own goroutines (disconnects, refused publishes): serialise the writes.
	if _, ok := o.Log.(*lockedWriter); !ok {
		o.Log = &lockedWriter{w: o.Log}
	}
}

// lockedWriter makes a writer safe for concurrent use.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// Validate reports every problem of o at once (after defaults), each naming the setting.
func (o *Options) Validate() error {
	var errs []error
	if o.Durable != "" { // empty is DefaultDurable
		if err := stream.ValidateName("consumer name", o.Durable); err != nil {
			errs = append(errs, err)
		}
	}
	prefix := cmp.Or(o.Prefix, schema.DefaultPrefix)
	perr := schema.ValidatePrefix(prefix)
	if perr != nil {
		errs = append(errs, fmt.Errorf("subject prefix %v", perr))
	}
	for _, f := range o.Filters {
		if err := stream.ValidateFilter(f); err != nil {
			errs = append(errs, err)
		} else if perr == nil {
			if err := stream.CheckFilterPrefix(f, prefix); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := ValidateDeadLetterSubject(o.DeadLetterSubject); err != nil {
		errs = append(errs, err)
	}
	if o.Bucket < time.Second || o.Bucket%time.Second != 0 {
		errs = append(errs, fmt.Errorf("bucket %v: want a whole number of seconds, at least 1s (e.g. 1m, 10s, 1h)", o.Bucket))
	}
	if err := o.Start.Check(o.Since, o.FromSeq); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// ValidateDeadLetterSubject checks the subject dead letters are copied to: dot-separated tokens without
// wildcards.
func ValidateDeadLetterSubject(s string) error {
	if err := stream.ValidateFilter(s); err != nil || strings.ContainsAny(s, "*>") {
		return fmt.Errorf("dead-letter subject %q: want dot-separated tokens without wildcards", s)
	}
	return nil
}
