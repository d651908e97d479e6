// Package tail reads flowbus batches from the JetStream stream with an ordered (ephemeral, unacked)
// consumer and hands every event to a callback. It is the engine of cmd/flowtail and is meant for any
// consumer that wants a live or replayed view without durable state.
//
// Messages that are not valid batches are skipped with a warning, never fatal: the stream is shared and a
// foreign publisher or a newer agent must not stop a reader. Drop counters carried by batches, holes in
// the batch sequence of a (host, run, direction) and agent restarts (run links: how many batches of the
// previous run never arrived, how long capture was down) are reported as warnings, so a reader sees what
// it misses.
//
// Connecting, opening the stream, start policies and filter checks are package stream's; tail.go holds
// the options and Run, engine.go the read loop, warner.go the warnings.
package tail

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/internal/redact"
	"github.com/flowbus/flowbus/schema"
	"github.com/nats-io/nats.go/jetstream"
)

// Options configures Run. The zero value (plus a handler) tails new batches from a local server.
type Options struct {
	// URLs are the NATS servers to try; empty means stream.DefaultURL.
	URLs []string
	// Stream is the JetStream stream; empty means stream.DefaultStream.
	Stream string
	// Prefix is the subject prefix; empty means schema.DefaultPrefix.
	Prefix string
	// Host restricts to one host token; empty means all hosts.
	Host string
	// Direction restricts to one direction; 0 means both.
	Direction schema.Direction
	// Events chooses which events are read: EventsBegin (the zero value, what Run read before end
	// events existed), EventsEnd or EventsBoth (interleaved in stream order).
	Events Events
	// OnEnd is called once per end event, as the handler of Run is per begin; required when Events
	// includes ends.
	OnEnd EndHandler

	// Start, Since and FromSeq choose the first batch delivered; stream.StartDefault is stream.StartNew
	// (live tail).
	Start   stream.Start
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

// Events is a choice of event kinds.
type Events int

const (
	// EventsBegin reads net_flow_tcp_begin batches only, from <prefix>.<host>.<direction>.
	EventsBegin Events = iota
	// EventsEnd reads net_flow_tcp_end batches only, from <prefix>.<host>.<direction>.end.
	EventsEnd
	// EventsBoth reads both, interleaved in stream order.
	EventsBoth
)

// String is the spelling ParseEvents accepts.
func (e Events) String() string {
	switch e {
	case EventsBegin:
		return "begin"
	case EventsEnd:
		return "end"
	case EventsBoth:
		return "both"
	}
	return "events(" + fmt.Sprint(int(e)) + ")"
}

// ParseEvents parses begin, end or both.
func ParseEvents(s string) (Events, error) {
	switch s {
	case "begin":
		return EventsBegin, nil
	case "end":
		return EventsEnd, nil
	case "both":
		return EventsBoth, nil
	}
	return 0, fmt.Errorf("%q is not an event choice: want begin, end or both", s)
}

func (e Events) begins() bool { return e == EventsBegin || e == EventsBoth }
func (e Events) ends() bool   { return e == EventsEnd || e == EventsBoth }

// EndHandler is called once per end event; ev and m are reused (copy what must outlive the call). A
// non-nil error stops Run.
type EndHandler func(m *Meta, ev *schema.EndEvent) error

// Ready describes what Run reads, as it starts reading.
type Ready struct {
	Stream string
	Filter string // the subject filters of the consumer (schema.FilterSubjects), space-separated
	// State of the stream when it was opened: FirstSeq and LastSeq are its first and last sequences,
	// LastTime when the last message was stored (zero when it is empty).
	Msgs, FirstSeq, LastSeq uint64
	LastTime                time.Time
}

// Meta describes the batch an event came from. The handler must not keep it past its return.
type Meta struct {
	Subject   string
	Kind      schema.Kind // begin or end batch
	Host      string
	Direction schema.Direction
	RunID     string
	// Seq is the batch sequence number within (Host, RunID), shared by both directions.
	Seq uint64
	// PrevSeq is the Seq of the previous batch of the same direction and kind, 0 for the first.
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
	Events uint64 // events handed to the handlers, begins and ends
	Ends   uint64 // of which end events
	// IgnoredEnds counts end batches skipped unread because only begins were chosen (a <prefix>.>
	// filter selects them too).
	IgnoredEnds uint64
	Batches     uint64 // valid batches decoded
	Skipped     uint64 // messages that were not valid batches, or not on their batch's subject
	// Mismatched counts the skipped batches whose host or direction disagreed with their subject.
	Mismatched uint64
	Gaps       uint64 // breaks detected in batch chains (each may be several batches)
	Dropped    uint64 // events the agents reported as dropped
	// Restarts counts run links seen: first batches of a direction naming the previous run of their
	// host. NeverArrived sums their K where it could be told (the previous run seen from its start), as
	// it was when the link arrived; Recovered counts late batches of such runs that arrived after it.
	Restarts, NeverArrived, Recovered uint64
	Reason                            string // why Run stopped: "count", "idle", "canceled", or "" on error
	Filter                            string // the subject filters read (schema.FilterSubjects of the options), space-separated
	LastSeq                           uint64 // stream sequence of the last message seen
}

// Run connects, opens the stream, and delivers events to h until ctx is done (returns nil, Reason
// "canceled"), Count events were delivered, IdleExit passed without messages, or an error happens.
// Connecting fails with a *stream.ConnectError, opening the stream with a *stream.StreamError.
func Run(ctx context.Context, o Options, h Handler) (Stats, error) {
	o.defaults()
	var st Stats
	err := o.validate()
	if h == nil && o.Events.begins() {
		err = errors.Join(err, errors.New("nil handler"))
	}
	if o.OnEnd == nil && o.Events.ends() {
		err = errors.Join(err, errors.New("nil OnEnd handler with end events chosen"))
	}
	if err != nil {
		return st, err
	}
	w := newWarner(o.Warnings)

	urlText := redact.URLs(o.URLs)
	nc, err := stream.Connect(ctx, stream.Dial{URLs: o.URLs, Name: o.ClientName, Timeout: o.ConnectTimeout,
		Notify: func(msg string) { w.printf("warning: %s\n", msg) }})
	if ctx.Err() != nil {
		st.Reason = "canceled"
		return st, nil
	}
	if err != nil {
		return st, err
	}
	defer nc.Close()

	js, err := jetstream.New(nc)
	if err != nil {
		return st, err
	}
	s, err := stream.Open(ctx, js, stream.Lookup{Stream: o.Stream, URL: urlText, Timeout: o.ConnectTimeout})
	if err != nil {
		if ctx.Err() != nil {
			st.Reason = "canceled"
			return st, nil
		}
		return st, err
	}

	filters := o.filters()
	filter := strings.Join(filters, " ")
	st.Filter = filter
	// A wrong --prefix must fail loudly rather than look like a quiet stream.
	for _, f := range filters {
		if err := stream.CheckFilter(o.Stream, f, s.CachedInfo().Config.Subjects); err != nil {
			return st, &stream.StreamError{Stream: o.Stream, URL: urlText, Err: err}
		}
	}
	cfg := jetstream.OrderedConsumerConfig{
		FilterSubjects: filters,
		// Short so an abandoned ephemeral consumer does not linger on the server after a crash.
		InactiveThreshold: 30 * time.Second,
	}
	cfg.DeliverPolicy, cfg.OptStartTime, cfg.OptStartSeq = o.Start.Deliver(o.Since, o.FromSeq)
	cctx, cancel := context.WithTimeout(ctx, o.ConnectTimeout)
	defer cancel()
	cons, err := s.OrderedConsumer(cctx, cfg)
	if err != nil {
		if ctx.Err() != nil {
			st.Reason = "canceled"
			return st, nil
		}
		return st, &stream.StreamError{Stream: o.Stream, URL: urlText,
			Err: fmt.Errorf("cannot create a consumer with filter %q: %w", filter, err)}
	}
	cancel()
	if o.OnReady != nil {
		ss := s.CachedInfo().State
		if err := o.OnReady(Ready{Stream: o.Stream, Filter: filter, Msgs: ss.Msgs, FirstSeq: ss.FirstSeq, LastSeq: ss.LastSeq, LastTime: ss.LastTime}); err != nil {
			return st, err
		}
	}

	it, err := cons.Messages()
	if err != nil {
		return st, fmt.Errorf("consume stream %q: %w", o.Stream, err)
	}
	defer it.Stop()

	r := reader{o: &o, h: h, w: w, st: &st, seqs: stream.NewChains()}
	err = r.loop(ctx, it)
	w.summary()
	return st, err
}

// filters are the consumer's subject filters. Begins keep the filter of before end events
// (schema.FilterSubject: <prefix>.> reads foreign subjects too, which are then reported), so a reader of
// begins sees what it saw; the end batches such a filter also selects are skipped unread and counted
// (Stats.IgnoredEnds). Ends add <prefix>.<host>.<direction>.end where that filter lacks them.
func (o *Options) filters() []string {
	begin := schema.FilterSubject(o.Prefix, o.Host, o.Direction)
	end := schema.FilterSubjects(o.Prefix, o.Host, o.Direction, false, true)[0]
	switch {
	case o.Events == EventsEnd:
		return []string{end}
	case o.Events == EventsBoth && !strings.HasSuffix(begin, ">"):
		return []string{begin, end}
	}
	return []string{begin}
}

func (o *Options) defaults() {
	if len(o.URLs) == 0 {
		o.URLs = []string{stream.DefaultURL}
	}
	if o.Stream == "" {
		o.Stream = stream.DefaultStream
	}
	if o.Prefix == "" {
		o.Prefix = schema.DefaultPrefix
	}
	o.Start = o.Start.Or(stream.StartNew)
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
	if o.Events < EventsBegin || o.Events > EventsBoth {
		errs = append(errs, fmt.Errorf("invalid event choice %d", o.Events))
	}
	if o.Direction != 0 && o.Direction != schema.Incoming && o.Direction != schema.Outgoing {
		errs = append(errs, fmt.Errorf("invalid direction %d", o.Direction))
	}
	if err := o.Start.Check(o.Since, o.FromSeq); err != nil {
		errs = append(errs, err)
	}
	if o.Count < 0 {
		errs = append(errs, errors.New("negative Count"))
	}
	if o.IdleExit < 0 {
		errs = append(errs, errors.New("negative IdleExit"))
	}
	return errors.Join(errs...)
}
