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
package flowstat

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/tail"
	"github.com/flowbus/flowbus/schema"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Defaults of Options.
const (
	DefaultDurable           = "flowstat"
	DefaultBucket            = time.Minute
	DefaultDeadLetterSubject = "flowbus.deadletter"
)

// DefaultFilter is the subject filter used when neither filters nor a prefix are given: every subject
// under the default prefix.
var DefaultFilter = schema.DefaultPrefix + ".>"

// Dead-letter headers. The original message's headers are kept, except Nats-Msg-Id which is replaced by
// "<stream>.<seq>" so a stream capturing dead letters dedupes a copy sent again after a crash.
const (
	HeaderDLReason  = "Flowbus-Deadletter-Reason"   // reason token: malformed, truncated, unsupported_major, subject_mismatch
	HeaderDLError   = "Flowbus-Deadletter-Error"    // the decoder's message
	HeaderDLSubject = "Flowbus-Deadletter-Subject"  // the original subject
	HeaderDLStream  = "Flowbus-Deadletter-Stream"   // the stream it was read from
	HeaderDLSeq     = "Flowbus-Deadletter-Sequence" // its stream sequence
)

// Start says where a new durable consumer begins when the database holds no checkpoint for it.
type Start int

const (
	// StartAll reads the whole stream (the default: aggregates want history).
	StartAll Start = iota
	// StartNew reads only messages published after the consumer is created.
	StartNew
	// StartTime reads messages stored at or after Options.Since.
	StartTime
	// StartSeq reads from stream sequence Options.FromSeq.
	StartSeq
)

// String is the spelling ParseStart accepts.
func (s Start) String() string {
	switch s {
	case StartAll:
		return "all"
	case StartNew:
		return "new"
	case StartTime:
		return "time"
	case StartSeq:
		return "seq"
	}
	return "start(" + strconv.Itoa(int(s)) + ")"
}

// ParseStart parses all, new, time or seq.
func ParseStart(s string) (Start, error) {
	switch s {
	case "all", "":
		return StartAll, nil
	case "new":
		return StartNew, nil
	case "time":
		return StartTime, nil
	case "seq":
		return StartSeq, nil
	}
	return 0, fmt.Errorf("start policy %q: want all, new, time (with a start time) or seq (with a stream sequence)", s)
}

// Options configures Run.
type Options struct {
	URLs    []string // NATS servers; empty means tail.DefaultURL
	Stream  string   // empty means tail.DefaultStream
	Durable string   // durable consumer name; also the checkpoint's key in the database
	Filters []string // subject filters; empty means <Prefix>.>
	// Prefix is the agents' subject prefix; empty means schema.DefaultPrefix. A batch not stored on
	// <Prefix>.<its host>.<its direction> is dead-lettered (ReasonSubjectMismatch).
	Prefix string

	// Start, Since and FromSeq apply only when the database has no checkpoint for Durable on Stream.
	Start   Start
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

	// CrashAfter, for tests, makes Run return ErrCrashed right after folding that many messages in,
	// without committing the pending chunk, as if the process died. 0 disables.
	CrashAfter int

	// Monitor, if set, follows the run for health probes and metrics.
	Monitor *Monitor

	// Log receives notices (consumer created, dead letters, progress); nil discards them.
	Log io.Writer
	// ProgressEvery is how often Run logs its progress; 0 means 1 minute.
	ProgressEvery time.Duration
}

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

// ErrCrashed is returned by Run when Options.CrashAfter triggers.
var ErrCrashed = errors.New("simulated crash")

// Stats summarises a Run or Replay.
type Stats struct {
	Messages    uint64 // valid batches folded in
	Events      uint64 // events counted
	DeadLetters uint64 // messages that were not valid batches
	NotCopied   uint64 // dead letters whose copy could not be published
	Gaps        uint64 // breaks in batch chains recorded
	Late        uint64 // batches that arrived after a later batch of their chain
	Duplicates  uint64 // messages repeating a batch already counted (not counted again)
	Skipped     uint64 // redeliveries at or below the checkpoint
	Commits     uint64
	LastSeq     uint64 // committed checkpoint
	Reason      string // "idle", "caught-up", "canceled", "crash" or "done"
}

func (o *Options) defaults() {
	if len(o.URLs) == 0 {
		o.URLs = []string{tail.DefaultURL}
	}
	if o.Stream == "" {
		o.Stream = tail.DefaultStream
	}
	if o.Durable == "" {
		o.Durable = DefaultDurable
	}
	if o.Prefix == "" {
		o.Prefix = schema.DefaultPrefix
	}
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
	if strings.ContainsAny(o.Durable, ".*> \t\r\n/\\") {
		errs = append(errs, fmt.Errorf("consumer name %q: JetStream names cannot contain '.', '*', '>', '/', '\\' or spaces", o.Durable))
	}
	prefix := cmp.Or(o.Prefix, schema.DefaultPrefix)
	perr := schema.ValidatePrefix(prefix)
	if perr != nil {
		errs = append(errs, fmt.Errorf("subject prefix %v", perr))
	}
	for _, f := range o.Filters {
		if err := ValidateFilter(f); err != nil {
			errs = append(errs, err)
		} else if perr == nil {
			if err := CheckFilterPrefix(f, prefix); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := ValidateFilter(o.DeadLetterSubject); err != nil || strings.ContainsAny(o.DeadLetterSubject, "*>") {
		errs = append(errs, fmt.Errorf("dead-letter subject %q: want dot-separated tokens without wildcards", o.DeadLetterSubject))
	}
	if o.Bucket < time.Second || o.Bucket%time.Second != 0 {
		errs = append(errs, fmt.Errorf("bucket %v: want a whole number of seconds, at least 1s (e.g. 1m, 10s, 1h)", o.Bucket))
	}
	switch o.Start {
	case StartAll, StartNew:
	case StartTime:
		if o.Since.IsZero() {
			errs = append(errs, errors.New("start policy time needs a start time"))
		}
	case StartSeq:
		if o.FromSeq == 0 {
			errs = append(errs, errors.New("start policy seq needs a stream sequence >= 1"))
		}
	default:
		errs = append(errs, fmt.Errorf("invalid start policy %d", o.Start))
	}
	return errors.Join(errs...)
}

// ValidateFilter checks a consumer subject filter: dot-separated non-empty tokens, '*' only as a whole
// token, '>' only as the last token (e.g. flows.>, flows.*.incoming, flows.web-01.outgoing).
func ValidateFilter(f string) error {
	if f == "" {
		return errors.New("subject filter is empty: use e.g. flows.> or flows.*.incoming")
	}
	toks := strings.Split(f, ".")
	for i, t := range toks {
		switch {
		case t == "":
			return fmt.Errorf("subject filter %q has an empty token (leading, trailing or doubled '.')", f)
		case t == ">" && i != len(toks)-1:
			return fmt.Errorf("subject filter %q: '>' must be the last token", f)
		case t != "*" && t != ">" && strings.ContainsAny(t, "*> \t\r\n"):
			return fmt.Errorf("subject filter %q: token %q mixes a wildcard or space with other characters", f, t)
		}
	}
	return nil
}

// CheckFilterPrefix refuses a subject filter that selects no subject <prefix>.<host>.<direction>:
// every batch it selects would be dead-lettered as on the wrong subject. filter and prefix must be
// valid (ValidateFilter, schema.ValidatePrefix).
func CheckFilterPrefix(filter, prefix string) error {
	if overlap(filter, prefix+".*.*") {
		return nil
	}
	return fmt.Errorf("subject filter %q selects no subject %s.<host>.<direction>: give a filter under %s. (e.g. %s.>, %s.*.incoming), or set the prefix (--prefix, FLOWBUS_SUBJECT_PREFIX) to the one the agents publish under",
		filter, prefix, prefix, prefix, prefix)
}

// connect dials NATS and opens the stream, with the same error types as flowtail. A missing stream is
// waited for up to streamWait, logging what it waits for.
func connect(ctx context.Context, urls []string, stream string, timeout, streamWait time.Duration, name string, log io.Writer, mon *Monitor) (*nats.Conn, jetstream.JetStream, jetstream.Stream, error) {
	urlText := tail.RedactURLs(urls)
	nc, err := nats.Connect(strings.Join(urls, ","), nats.Name(name),
		nats.Timeout(max(timeout/time.Duration(len(urls)), time.Second)),
		// Once connected, survive server restarts: the pull consumer resumes where it was.
		nats.MaxReconnects(-1),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				fmt.Fprintf(log, "flowstat: disconnected from NATS: %v; reconnecting\n", err)
			}
		}),
		nats.ReconnectHandler(func(c *nats.Conn) {
			fmt.Fprintf(log, "flowstat: reconnected to NATS at %s\n", tail.RedactURLs([]string{c.ConnectedUrl()}))
		}),
		// Asynchronous server errors (a refused publish, a slow consumer) go to the log, not to stderr.
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			fmt.Fprintf(log, "flowstat: NATS: %v\n", err)
		}))
	if err != nil {
		return nil, nil, nil, &tail.ConnectError{URL: urlText, Err: err}
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, nil, err
	}
	deadline := time.Now().Add(streamWait)
	for waited := false; ; waited = true {
		lctx, cancel := context.WithTimeout(ctx, timeout)
		s, err := js.Stream(lctx, stream)
		cancel()
		if err == nil {
			if waited {
				fmt.Fprintf(log, "flowstat: stream %q is there now\n", stream)
			}
			return nc, js, s, nil
		}
		if !errors.Is(err, jetstream.ErrStreamNotFound) || time.Now().After(deadline) || ctx.Err() != nil {
			nc.Close()
			if ctx.Err() != nil {
				return nil, nil, nil, ctx.Err()
			}
			return nil, nil, nil, &tail.StreamError{Stream: stream, URL: urlText, Err: err}
		}
		if !waited {
			mon.setState(fmt.Sprintf("waiting for stream %q to appear on %s", stream, urlText))
			fmt.Fprintf(log, "flowstat: stream %q does not exist on %s yet; waiting up to %v for flowagent to create it (or set --stream / FLOWBUS_STREAM)\n", stream, urlText, streamWait.Round(time.Second))
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

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
	o.Monitor.setState("connecting to NATS at " + tail.RedactURLs(o.URLs))
	defer o.Monitor.setState("stopped")
	nc, js, stream, err := connect(ctx, o.URLs, o.Stream, o.ConnectTimeout, o.StreamWait, "flowstat-"+o.Durable, o.Log, o.Monitor)
	if err != nil {
		return Stats{}, err
	}
	defer nc.Close()

	o.Monitor.setState(fmt.Sprintf("binding durable consumer %q on stream %q", o.Durable, o.Stream))
	cons, cp, err := ensureCheckpointAndConsumer(ctx, st, stream, &o, dbID)
	if err != nil {
		return Stats{}, err
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
		if r.o.CrashAfter > 0 && r.folded >= r.o.CrashAfter {
			r.stats.Reason = "crash"
			return r.stats, ErrCrashed
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
				seq, msg.Subject(), b.Seq, b.Host, b.RunID, b.Direction)
		}
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
					seq, msg.Subject(), reason, derr, r.o.DeadLetterSubject, err)
			} else {
				dead.Copied = true
				fmt.Fprintf(r.o.Log, "flowstat: stream sequence %d on %s is not a valid batch (%s: %v): copied to %s\n",
					seq, msg.Subject(), reason, derr, r.o.DeadLetterSubject)
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

// ErrFilterOutsideStream means a subject filter selects nothing the stream stores.
var ErrFilterOutsideStream = errors.New("subject filter outside the stream")

// overlap reports whether some subject matches both subject patterns a and b.
func overlap(a, b string) bool {
	at, bt := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; ; i++ {
		switch {
		case i < len(at) && at[i] == ">", i < len(bt) && bt[i] == ">":
			return true
		case i == len(at) || i == len(bt):
			return len(at) == len(bt)
		case at[i] != bt[i] && at[i] != "*" && bt[i] != "*":
			return false
		}
	}
}

func sorted(s []string) []string {
	c := slices.Clone(s)
	slices.Sort(c)
	return c
}

// ensureCheckpointAndConsumer makes the durable consumer stand at the database's checkpoint and returns
// that checkpoint. An existing consumer is kept only if it is exactly there (same filters, ack floor and
// delivered sequence at the checkpoint, nothing in flight); otherwise it is recreated from
// checkpoint+1, so messages delivered to a process that died are read again at once instead of after
// the ack wait. Without a checkpoint the consumer is created by the start policy and its starting point
// is recorded as the checkpoint before anything is read.
func ensureCheckpointAndConsumer(ctx context.Context, st *store.Store, stream jetstream.Stream, o *Options, dbID string) (jetstream.Consumer, uint64, error) {
	cp, cpFilters, found, err := st.CheckpointOf(ctx, o.Durable, o.Stream)
	if err != nil {
		return nil, 0, err
	}
	if found && !slices.Equal(sorted(cpFilters), sorted(o.Filters)) {
		fmt.Fprintf(o.Log, "flowstat: filters changed from %v to %v: continuing after stream sequence %d with the new ones\n", cpFilters, o.Filters, cp)
	}
	// The server would refuse the consumer with a terse error; say which setting to fix instead. A
	// stream without subjects (a mirror) cannot be checked.
	if subs := stream.CachedInfo().Config.Subjects; len(subs) > 0 {
		for _, f := range o.Filters {
			if !slices.ContainsFunc(subs, func(s string) bool { return overlap(f, s) }) {
				return nil, 0, fmt.Errorf("%w: filter %q matches none of stream %s's subjects %q: set --filter (FLOWBUS_FLOWSTAT_FILTER) or --prefix (FLOWBUS_SUBJECT_PREFIX) to what the agents publish",
					ErrFilterOutsideStream, f, o.Stream, subs)
			}
		}
	}
	cctx, cancel := context.WithTimeout(ctx, o.ConnectTimeout)
	defer cancel()
	// What the stream deleted (age, size or count limits, a purge) after the checkpoint before it was
	// read. Checked whether the consumer is kept or recreated: a surviving consumer simply skips what
	// is gone, so only this check tells.
	var lossFrom, lossTo uint64
	if found {
		sinfo, err := stream.Info(cctx)
		if err != nil {
			return nil, 0, fmt.Errorf("look up stream %q: %w", o.Stream, err)
		}
		// An emptied stream has FirstSeq = LastSeq+1, so the range is exact then too.
		if sinfo.State.FirstSeq > cp+1 {
			lossFrom, lossTo = cp+1, sinfo.State.FirstSeq-1
		}
	}
	cons, err := stream.Consumer(cctx, o.Durable)
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
				if updated, err := stream.UpdateConsumer(cctx, c); err == nil {
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
		if err := stream.DeleteConsumer(cctx, o.Durable); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
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
	switch {
	case found:
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, cp+1
	case o.Start == StartNew:
		cfg.DeliverPolicy = jetstream.DeliverNewPolicy
	case o.Start == StartTime:
		t := o.Since
		cfg.DeliverPolicy, cfg.OptStartTime = jetstream.DeliverByStartTimePolicy, &t
	case o.Start == StartSeq:
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, o.FromSeq
	default:
		cfg.DeliverPolicy = jetstream.DeliverAllPolicy
	}
	cons, err = stream.CreateConsumer(cctx, cfg)
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

// deadLetterer copies bad messages to the dead-letter subject. When a stream captures that subject it
// publishes through JetStream (stored and acknowledged); otherwise it is a core publish, flushed, which
// only subscribers connected at that moment see (the database keeps the record either way).
type deadLetterer struct {
	nc      *nats.Conn
	js      jetstream.JetStream
	subject string
	stream  string
	timeout time.Duration
	useJS   bool
}

func newDeadLetterer(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, subject, stream string, timeout time.Duration) *deadLetterer {
	d := &deadLetterer{nc: nc, js: js, subject: subject, stream: stream, timeout: timeout}
	lctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if name, err := js.StreamNameBySubject(lctx, subject); err == nil && name != "" {
		d.useJS = true
	}
	return d
}

// send publishes the copy, retrying briefly: a dead letter is rare, and a short stall is better than a
// missing copy.
func (d *deadLetterer) send(ctx context.Context, msg jetstream.Msg, seq uint64, reason string, cause error) error {
	out := nats.NewMsg(d.subject)
	out.Data = msg.Data()
	for k, v := range msg.Headers() {
		// Nats-* headers steer JetStream (expected stream, sequence, TTL...): copied, they could make
		// the server refuse the copy or treat it as something else.
		if !strings.HasPrefix(strings.ToLower(k), "nats-") {
			out.Header[k] = v
		}
	}
	out.Header.Set(HeaderDLReason, reason)
	out.Header.Set(HeaderDLError, headerSafe(cause.Error()))
	out.Header.Set(HeaderDLSubject, msg.Subject())
	out.Header.Set(HeaderDLStream, d.stream)
	out.Header.Set(HeaderDLSeq, strconv.FormatUint(seq, 10))
	out.Header.Set(nats.MsgIdHdr, d.stream+"."+strconv.FormatUint(seq, 10))
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Duration(attempt) * 200 * time.Millisecond):
			}
		}
		if d.useJS {
			pctx, cancel := context.WithTimeout(ctx, d.timeout)
			_, err = d.js.PublishMsg(pctx, out)
			cancel()
		} else {
			err = d.corePublish(out)
		}
		if err == nil || errors.Is(err, nats.ErrPermissionViolation) { // a refusal is not transient
			return err
		}
	}
	return err
}

// corePublish publishes and flushes. The server refuses a publish it does not permit with an
// asynchronous error that arrives before the flush's answer; the client keeps it as its last error, so a
// new one naming our subject means the copy was dropped.
func (d *deadLetterer) corePublish(m *nats.Msg) error {
	before := d.nc.LastError()
	if err := d.nc.PublishMsg(m); err != nil {
		return err
	}
	if err := d.nc.FlushTimeout(d.timeout); err != nil {
		return err
	}
	if after := d.nc.LastError(); after != nil && after != before && errors.Is(after, nats.ErrPermissionViolation) && strings.Contains(after.Error(), d.subject) {
		return fmt.Errorf("%w (allow this user to publish to %s)", after, d.subject)
	}
	return nil
}

// headerSafe keeps a header value on one line and short.
func headerSafe(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > 1024 {
		s = s[:1024]
	}
	return s
}
