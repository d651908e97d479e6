// Package tail reads flowbus batches from the JetStream stream with an ordered (ephemeral, unacked)
// consumer and hands every event to a callback. It is the engine of cmd/flowtail and is meant for any
// consumer that wants a live or replayed view without durable state.
//
// Messages that are not valid batches are skipped with a warning, never fatal: the stream is shared and a
// foreign publisher or a newer agent must not stop a reader. Drop counters carried by batches and holes in
// the batch sequence of a (host, run, direction) are reported as warnings, so a reader sees what it misses.
package tail

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/flowbus/flowbus/schema"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// DefaultStream is the stream name the agent creates by default.
const DefaultStream = "FLOWS"

// DefaultURL is where a local flowagent's embedded server listens by default.
const DefaultURL = "nats://127.0.0.1:4222"

// Start says where in the stream reading begins.
type Start int

const (
	// StartNew delivers only batches published after the consumer is created (live tail). The default.
	StartNew Start = iota
	// StartAll replays the whole stream, then follows it.
	StartAll
	// StartSince delivers batches stored at or after Options.Since.
	StartSince
	// StartSeq delivers batches from stream sequence Options.FromSeq on.
	StartSeq
)

// Options configures Run. The zero value (plus a handler) tails new batches from a local server.
type Options struct {
	// URLs are the NATS servers to try; empty means DefaultURL.
	URLs []string
	// Stream is the JetStream stream; empty means DefaultStream.
	Stream string
	// Prefix is the subject prefix; empty means schema.DefaultPrefix.
	Prefix string
	// Host restricts to one host token; empty means all hosts.
	Host string
	// Direction restricts to one direction; 0 means both.
	Direction schema.Direction

	// Start, Since and FromSeq choose the first batch delivered.
	Start   Start
	Since   time.Time
	FromSeq uint64

	// Count stops Run after this many events; 0 means no limit.
	Count int
	// IdleExit stops Run when no message arrives for this long; 0 means never.
	IdleExit time.Duration

	// ConnectTimeout bounds connecting (shared by the URLs, at least 1s each) and the stream lookup; 0
	// means 5s. A tail must not hang silently when the server is down or black-holed.
	ConnectTimeout time.Duration
	// IdleInterval is how long Run waits for a message before calling OnIdle; 0 means 200ms.
	IdleInterval time.Duration
	// OnIdle, if set, is called whenever Run has caught up with the stream or has waited IdleInterval
	// without a message, so a caller that buffers output can flush it without holding back live events.
	OnIdle func() error
	// OnReady, if set, is called once the consumer exists, before anything is read, so a caller can
	// print a header at once and say when its start lies past the end of the stream. An error stops Run.
	OnReady func(Ready) error

	// Warnings receives skipped-message, drop and gap warnings and connection notices; nil discards them.
	Warnings io.Writer
	// ClientName is the NATS connection name, shown in server monitoring; empty means "flowbus-tail".
	ClientName string
}

// Ready describes what Run reads, as it starts reading.
type Ready struct {
	Stream string
	Filter string // the subject filter of the consumer (FilterSubject)
	// State of the stream when it was opened: FirstSeq and LastSeq are its first and last sequences,
	// LastTime when the last message was stored (zero when it is empty).
	Msgs, FirstSeq, LastSeq uint64
	LastTime                time.Time
}

// Meta describes the batch an event came from. The handler must not keep it past its return.
type Meta struct {
	Subject   string
	Host      string
	Direction schema.Direction
	RunID     string
	// Seq is the batch sequence number within (Host, RunID), shared by both directions.
	Seq uint64
	// PrevSeq is the Seq of the previous batch of the same direction, 0 for the first.
	PrevSeq uint64
	// StreamSeq is the JetStream stream sequence of the message.
	StreamSeq uint64
	// Stored is when the server stored the message.
	Stored time.Time
	// Drops are the events the agent lost since its previous batch.
	Drops schema.Drops
}

// Handler is called once per event. ev and m are reused for the next event: copy what must outlive the
// call. A non-nil error stops Run and is returned by it.
type Handler func(m *Meta, ev *schema.Event) error

// Stats summarises what Run saw.
type Stats struct {
	Events  uint64 // events handed to the handler
	Batches uint64 // valid batches decoded
	Skipped uint64 // messages that were not valid batches, or not on their batch's subject
	// Mismatched counts the skipped batches whose host or direction disagreed with their subject.
	Mismatched uint64
	Gaps       uint64 // breaks detected in batch chains (each may be several batches)
	Dropped    uint64 // events the agents reported as dropped
	Reason     string // why Run stopped: "count", "idle", "canceled", or "" on error
	Filter     string // the subject filter read (FilterSubject of the options)
	LastSeq    uint64 // stream sequence of the last message seen
}

// ConnectError means no NATS server could be reached; URL is the redacted server list.
type ConnectError struct {
	URL string
	Err error
}

// Error names the servers and the cause.
func (e *ConnectError) Error() string {
	return fmt.Sprintf("cannot connect to NATS at %s: %v", e.URL, e.Err)
}

// Unwrap returns the client's error.
func (e *ConnectError) Unwrap() error { return e.Err }

// StreamError means the stream could not be opened: it does not exist (errors.Is jetstream.ErrStreamNotFound),
// JetStream is not enabled, or the lookup failed.
type StreamError struct {
	Stream string
	URL    string
	Err    error
}

// Error names the stream and the servers, and the cause unless the stream simply does not exist.
func (e *StreamError) Error() string {
	if errors.Is(e.Err, jetstream.ErrStreamNotFound) {
		return fmt.Sprintf("stream %q does not exist on %s", e.Stream, e.URL)
	}
	return fmt.Sprintf("cannot open stream %q on %s: %v", e.Stream, e.URL, e.Err)
}

// Unwrap returns the underlying error.
func (e *StreamError) Unwrap() error { return e.Err }

// ErrFilterOutsideStream is wrapped in a StreamError when the prefix, host and direction select no
// subject the stream stores.
var ErrFilterOutsideStream = errors.New("wrong subject prefix")

// subjectsOverlap reports whether some subject matches both filter and one of patterns. Overlap, not
// containment: tailing flows.> from a stream that stores only flows.web-01.> is fine.
func subjectsOverlap(filter string, patterns []string) bool {
	ft := strings.Split(filter, ".")
	for _, p := range patterns {
		pt := strings.Split(p, ".")
		for i := 0; ; i++ {
			if i < len(ft) && ft[i] == ">" || i < len(pt) && pt[i] == ">" {
				return true
			}
			if i == len(ft) || i == len(pt) {
				if i == len(ft) && i == len(pt) {
					return true
				}
				break
			}
			if ft[i] != pt[i] && ft[i] != "*" && pt[i] != "*" {
				break
			}
		}
	}
	return false
}

// FilterSubject is the consumer filter for prefix, host and direction: prefix.host.direction,
// prefix.*.direction, prefix.host.> or prefix.>.
func FilterSubject(prefix, host string, d schema.Direction) string {
	if prefix == "" {
		prefix = schema.DefaultPrefix
	}
	switch {
	case host != "" && d != 0:
		return schema.Subject(prefix, host, d)
	case d != 0:
		return prefix + ".*." + d.String()
	case host != "":
		return prefix + "." + host + ".>"
	}
	return prefix + ".>"
}

// ErrSubjectMismatch means a batch was published on a subject other than the one its own host and
// direction name. Consumers trust the subject, which the server's per-host publish permissions control,
// not the payload: otherwise a host allowed to publish only on <prefix>.web-01.> could report flows as
// web-02.
var ErrSubjectMismatch = errors.New("subject does not match the batch")

// CheckSubject returns an error wrapping ErrSubjectMismatch unless subject is exactly
// <prefix>.<host>.<direction> for the batch's host and direction (an empty prefix is
// schema.DefaultPrefix). The whole subject is compared, not its last two tokens: a host allowed to publish
// on flows.web-01.> could otherwise publish a batch of web-02 on flows.web-01.web-02.outgoing.
func CheckSubject(subject, prefix, host string, d schema.Direction) error {
	if prefix == "" {
		prefix = schema.DefaultPrefix
	}
	want := schema.Subject(prefix, host, d)
	if subject == want {
		return nil
	}
	return fmt.Errorf("%w: the batch says host %q direction %s, which belongs on %s (a publisher claiming another host or direction: check its publish permissions; or agents using another subject prefix than %q: set the prefix)",
		ErrSubjectMismatch, host, d, want, prefix)
}

// RedactURLs joins urls for messages, hiding passwords and tokens so they do not end up in logs.
func RedactURLs(urls []string) string {
	out := make([]string, len(urls))
	for i, u := range urls {
		out[i] = u
		p, err := url.Parse(u)
		if err != nil {
			// Unparseable, but it may still hold user:password@ before the host.
			if s, rest, ok := strings.Cut(u, "://"); ok {
				hostEnd := strings.IndexAny(rest, "/?#")
				if hostEnd < 0 {
					hostEnd = len(rest)
				}
				if at := strings.LastIndexByte(rest[:hostEnd], '@'); at >= 0 {
					out[i] = s + "://xxxxx" + rest[at:]
				}
			}
			continue
		}
		if p.User != nil {
			if _, has := p.User.Password(); has {
				out[i] = p.Redacted()
			} else {
				p.User = url.User("xxxxx")
				out[i] = p.String()
			}
		}
	}
	return strings.Join(out, ",")
}

// Run connects, opens the stream, and delivers events to h until ctx is done (returns nil, Reason
// "canceled"), Count events were delivered, IdleExit passed without messages, or an error happens.
func Run(ctx context.Context, o Options, h Handler) (Stats, error) {
	o.defaults()
	var st Stats
	err := o.validate()
	if h == nil {
		err = errors.Join(err, errors.New("nil handler"))
	}
	if err != nil {
		return st, err
	}
	w := newWarner(o.Warnings)

	urlText := RedactURLs(o.URLs)
	nc, err := connect(ctx, &o, w)
	if ctx.Err() != nil {
		st.Reason = "canceled"
		return st, nil
	}
	if err != nil {
		return st, &ConnectError{URL: urlText, Err: err}
	}
	defer nc.Close()

	js, err := jetstream.New(nc)
	if err != nil {
		return st, err
	}
	lookupCtx, cancel := context.WithTimeout(ctx, o.ConnectTimeout)
	defer cancel()
	stream, err := js.Stream(lookupCtx, o.Stream)
	if err != nil {
		if ctx.Err() != nil {
			st.Reason = "canceled"
			return st, nil
		}
		return st, &StreamError{Stream: o.Stream, URL: urlText, Err: err}
	}

	filter := FilterSubject(o.Prefix, o.Host, o.Direction)
	st.Filter = filter
	// The server accepts a filter outside the stream's subjects and then delivers nothing, which would
	// look like a quiet stream; a wrong --prefix must fail loudly instead. A stream without subjects
	// (a mirror or sourced stream) cannot be checked.
	if subs := stream.CachedInfo().Config.Subjects; len(subs) > 0 && !subjectsOverlap(filter, subs) {
		return st, &StreamError{Stream: o.Stream, URL: urlText,
			Err: fmt.Errorf("%w: filter %q matches none of its subjects %q", ErrFilterOutsideStream, filter, subs)}
	}
	cfg := jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{filter},
		DeliverPolicy:  jetstream.DeliverNewPolicy,
		// Short so an abandoned ephemeral consumer does not linger on the server after a crash.
		InactiveThreshold: 30 * time.Second,
	}
	switch o.Start {
	case StartAll:
		cfg.DeliverPolicy = jetstream.DeliverAllPolicy
	case StartSince:
		cfg.DeliverPolicy = jetstream.DeliverByStartTimePolicy
		t := o.Since
		cfg.OptStartTime = &t
	case StartSeq:
		cfg.DeliverPolicy = jetstream.DeliverByStartSequencePolicy
		cfg.OptStartSeq = o.FromSeq
	}
	cons, err := stream.OrderedConsumer(lookupCtx, cfg)
	if err != nil {
		if ctx.Err() != nil {
			st.Reason = "canceled"
			return st, nil
		}
		return st, &StreamError{Stream: o.Stream, URL: urlText,
			Err: fmt.Errorf("cannot create a consumer with filter %q: %w", filter, err)}
	}
	cancel()
	if o.OnReady != nil {
		ss := stream.CachedInfo().State
		if err := o.OnReady(Ready{Stream: o.Stream, Filter: filter, Msgs: ss.Msgs, FirstSeq: ss.FirstSeq, LastSeq: ss.LastSeq, LastTime: ss.LastTime}); err != nil {
			return st, err
		}
	}

	it, err := cons.Messages()
	if err != nil {
		return st, fmt.Errorf("consume stream %q: %w", o.Stream, err)
	}
	defer it.Stop()

	r := reader{o: &o, h: h, w: w, st: &st, seqs: make(map[seqKey]uint64)}
	err = r.loop(ctx, it)
	w.summary()
	return st, err
}

// connect dials the servers within about ConnectTimeout in total and gives up early when ctx ends, so
// an interrupt during a hanging dial exits at once.
func connect(ctx context.Context, o *Options, w *warner) (*nats.Conn, error) {
	// The client dials the servers one after another, each with its own timeout: share the budget.
	perServer := max(o.ConnectTimeout/time.Duration(len(o.URLs)), time.Second)
	type result struct {
		nc  *nats.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		nc, err := nats.Connect(strings.Join(o.URLs, ","),
			nats.Name(o.ClientName),
			nats.Timeout(perServer),
			// Once connected, a tail should survive server restarts rather than exit.
			nats.MaxReconnects(-1),
			nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
				if err != nil {
					w.printf("warning: disconnected from NATS: %v; reconnecting\n", err)
				}
			}),
			nats.ReconnectHandler(func(c *nats.Conn) {
				w.printf("warning: reconnected to NATS at %s\n", RedactURLs([]string{c.ConnectedUrl()}))
			}),
		)
		done <- result{nc, err}
	}()
	select {
	case r := <-done:
		return r.nc, r.err
	case <-ctx.Done():
		// Close the connection if the dial still succeeds, so nothing leaks.
		go func() {
			if r := <-done; r.nc != nil {
				r.nc.Close()
			}
		}()
		return nil, ctx.Err()
	}
}

func (o *Options) defaults() {
	if len(o.URLs) == 0 {
		o.URLs = []string{DefaultURL}
	}
	if o.Stream == "" {
		o.Stream = DefaultStream
	}
	if o.Prefix == "" {
		o.Prefix = schema.DefaultPrefix
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = 5 * time.Second
	}
	if o.IdleInterval <= 0 {
		o.IdleInterval = 200 * time.Millisecond
	}
	if o.ClientName == "" {
		o.ClientName = "flowbus-tail"
	}
}

func (o *Options) validate() error {
	var errs []error
	if err := schema.ValidatePrefix(o.Prefix); err != nil {
		errs = append(errs, fmt.Errorf("prefix %w", err))
	}
	if o.Host != "" {
		if err := schema.ValidateHostToken(o.Host); err != nil {
			errs = append(errs, fmt.Errorf("host %w", err))
		}
	}
	if o.Direction != 0 && o.Direction != schema.Incoming && o.Direction != schema.Outgoing {
		errs = append(errs, fmt.Errorf("invalid direction %d", o.Direction))
	}
	switch o.Start {
	case StartNew, StartAll:
	case StartSince:
		if o.Since.IsZero() {
			errs = append(errs, errors.New("StartSince needs Since"))
		}
	case StartSeq:
		if o.FromSeq == 0 {
			errs = append(errs, errors.New("StartSeq needs FromSeq >= 1"))
		}
	default:
		errs = append(errs, fmt.Errorf("invalid start %d", o.Start))
	}
	if o.Count < 0 {
		errs = append(errs, errors.New("negative Count"))
	}
	if o.IdleExit < 0 {
		errs = append(errs, errors.New("negative IdleExit"))
	}
	return errors.Join(errs...)
}

// seqKey identifies one batch chain: a run's batches of one direction, linked by PrevSeq.
type seqKey struct {
	host, run string
	dir       schema.Direction
}

// maxSeqKeys bounds the gap tracker; agent restarts create new run ids forever.
const maxSeqKeys = 4096

type reader struct {
	o     *Options
	h     Handler
	w     *warner
	st    *Stats
	seqs  map[seqKey]uint64
	batch schema.Batch
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
	if err := schema.DecodeBatch(msg.Data(), &r.batch); err != nil {
		r.st.Skipped++
		r.w.skip(subject, m.StreamSeq, err)
		return nil
	}
	b := &r.batch
	if err := CheckSubject(subject, r.o.Prefix, b.Host, b.Direction); err != nil {
		r.st.Skipped++
		r.st.Mismatched++
		r.w.skip(subject, m.StreamSeq, err)
		return nil
	}
	r.st.Batches++
	m.Host, m.Direction, m.RunID, m.Seq, m.PrevSeq, m.Drops = b.Host, b.Direction, b.RunID, b.Seq, b.PrevSeq, b.Drops
	r.checkSeq(m, b.PrevSeq)
	if n := b.Drops.Total(); n > 0 {
		r.st.Dropped += n
		d := b.Drops
		r.w.printf("warning: drops: host %s direction %s lost %d events before batch %d (kernel=%d reader=%d queue=%d spool=%d publish=%d)\n",
			b.Host, b.Direction, n, b.Seq, d.Kernel, d.Reader, d.Queue, d.Spool, d.Publish)
	}
	for i := range b.Events {
		if err := r.h(m, &b.Events[i]); err != nil {
			return err
		}
		r.st.Events++
		if r.o.Count > 0 && r.st.Events >= uint64(r.o.Count) {
			return errDone
		}
	}
	return nil
}

// checkSeq reports holes in the batch chain of a (host, run, direction). Batch seqs are shared by both
// directions of a run, so the chain is followed through PrevSeq, the seq of the previous batch of the same
// direction: a batch whose PrevSeq is not the last seen Seq means batches are missing. The range printed
// is where they lie (it may include seqs of the other direction). The first batch seen of a run is not a
// gap: the reader may have started mid-stream, or old batches may have aged out.
func (r *reader) checkSeq(m *Meta, prev uint64) {
	k := seqKey{m.Host, m.RunID, m.Direction}
	last, seen := r.seqs[k]
	switch {
	case !seen:
		if len(r.seqs) >= maxSeqKeys {
			clear(r.seqs)
		}
	case m.Seq <= last:
		// Not a loss, but worth knowing: a duplicate the stream's dedupe window did not catch.
		r.w.printf("warning: host %s direction %s run %s batch %d arrived after batch %d (duplicate or reordered)\n",
			m.Host, m.Direction, m.RunID, m.Seq, last)
		return
	case prev == last:
	case prev > last:
		r.st.Gaps++
		if prev == last+1 {
			r.w.printf("warning: gap: host %s direction %s run %s missing batch %d\n", m.Host, m.Direction, m.RunID, prev)
		} else {
			r.w.printf("warning: gap: host %s direction %s run %s missing batches %d..%d\n", m.Host, m.Direction, m.RunID, last+1, prev)
		}
	default:
		r.st.Gaps++
		r.w.printf("warning: gap: host %s direction %s run %s batch %d says its predecessor is %d, but %d was seen last\n",
			m.Host, m.Direction, m.RunID, m.Seq, prev, last)
	}
	r.seqs[k] = m.Seq
}

// warner writes warnings, reporting each kind of bad message once per subject and counting the rest, so
// a flood of foreign messages cannot drown the output.
type warner struct {
	mu    sync.Mutex // printf is also called from NATS connection callbacks
	out   io.Writer
	skips map[skipKey]*skipCount
	order []skipKey
}

type skipKey struct{ subject, reason string }

type skipCount struct{ n uint64 }

// maxSkipKeys bounds the skip table: a foreign publisher could use endless subjects.
const maxSkipKeys = 1024

func newWarner(out io.Writer) *warner {
	if out == nil {
		out = io.Discard
	}
	return &warner{out: out, skips: make(map[skipKey]*skipCount)}
}

func (w *warner) printf(format string, args ...any) {
	w.mu.Lock()
	defer w.mu.Unlock()
	fmt.Fprintf(w.out, format, args...)
}

// skipReason classifies a decode error into a short, stable reason; the full error text can contain
// offsets that differ per message, so it is shown once but not used as the key.
func skipReason(err error) string {
	switch {
	case errors.Is(err, schema.ErrUnsupportedMajor):
		return "unsupported schema version"
	case errors.Is(err, ErrSubjectMismatch):
		return "batch for another host or direction than its subject"
	case errors.Is(err, schema.ErrMalformed):
		return "not a valid flowbus batch"
	}
	return "undecodable"
}

func (w *warner) skip(subject string, streamSeq uint64, err error) {
	k := skipKey{subject, skipReason(err)}
	if c, ok := w.skips[k]; ok {
		c.n++
		// A live tail may never reach its exit summary: repeat the count at 10, 100, 1000, ...
		if isPow10(c.n) {
			w.printf("warning: skipped %d messages on %s so far: %s\n", c.n, subject, k.reason)
		}
		return
	}
	if len(w.skips) < maxSkipKeys {
		w.skips[k] = &skipCount{n: 1}
		w.order = append(w.order, k)
	}
	hint := ""
	if k.reason == "unsupported schema version" {
		hint = " (upgrade this consumer)"
	}
	w.printf("warning: skipping message %d on %s: %s: %v%s; further such messages on this subject are counted\n",
		streamSeq, subject, k.reason, err, hint)
}

func isPow10(n uint64) bool {
	if n < 10 {
		return false
	}
	for n%10 == 0 {
		n /= 10
	}
	return n == 1
}

// summary reports the counts of skipped messages that were not shown individually.
func (w *warner) summary() {
	for _, k := range w.order {
		if c := w.skips[k]; c.n > 1 {
			w.printf("warning: skipped %d messages on %s: %s\n", c.n, k.subject, k.reason)
		}
	}
}
