package webview

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/consumers/tail"
	"github.com/flowbus/flowbus/schema"
)

// Bounds of what one event may carry to a browser: names per end, characters per text.
const (
	maxNames   = 8
	maxTextLen = stream.MaxCell
)

// item is one decoded begin event, encoded once for every client that wants it, with the fields the
// filters look at.
type item struct {
	json             []byte // SPEC section 1 JSON, texts escaped and bounded
	host             string
	dir              schema.Direction
	src, dst         string // address texts, lowercase
	srcPort, dstPort uint16
	names            []string // lowercase DNS names of both ends
	comm             string   // lowercase
	pid              uint32
	cgroup           uint64
	container        string
}

// newItem copies what it needs of ev, which the reader reuses.
func newItem(host string, ev *schema.Event) *item {
	e := *ev
	e.SrcDNS, e.DstDNS = boundNames(ev.SrcDNS), boundNames(ev.DstDNS)
	e.Comm = stream.Escape(ev.Comm, maxTextLen)
	e.ContainerID = stream.Escape(ev.ContainerID, maxTextLen)
	it := &item{
		host: host, dir: ev.Direction, srcPort: ev.SrcPort, dstPort: ev.DstPort,
		src: strings.ToLower(ev.Src.String()), dst: strings.ToLower(ev.Dst.String()),
		comm: strings.ToLower(ev.Comm), pid: ev.PID, cgroup: ev.CgroupID, container: strings.ToLower(ev.ContainerID),
	}
	for _, n := range ev.SrcDNS {
		it.names = append(it.names, strings.ToLower(n))
	}
	for _, n := range ev.DstDNS {
		it.names = append(it.names, strings.ToLower(n))
	}
	it.json = e.AppendJSON(nil, stream.Escape(host, maxTextLen))
	return it
}

// boundNames escapes each name (no control or bidi character reaches the page) and keeps at most
// maxNames of them.
func boundNames(ns []string) []string {
	if len(ns) == 0 {
		return nil
	}
	out := make([]string, 0, min(len(ns), maxNames))
	for i, n := range ns {
		if i == maxNames {
			break
		}
		out = append(out, stream.Escape(n, maxTextLen))
	}
	return out
}

// FeedOptions says which stream the live feed reads.
type FeedOptions struct {
	URLs   []string
	Stream string
	Prefix string
	// Since is how far back the feed starts reading when it first connects, so a page opened just after
	// a connection still shows it; later reconnects resume after the last message read.
	Since time.Duration
	// History is how many recent events a newly opened page gets before the live ones (0: 500).
	History int
	// ClientBuffer bounds the events waiting for one client (0: 512); past it, events are dropped for
	// that client and counted.
	ClientBuffer int
	// ClientRate bounds the events per second sent to one client (0: 500), bursts up to ClientBuffer;
	// the excess is dropped and counted, so a busy host cannot flood a browser.
	ClientRate int
	// Log receives one line per feed problem (connection lost, skipped messages); nil discards.
	Log io.Writer
}

func (o *FeedOptions) defaults() {
	if o.History <= 0 {
		o.History = 500
	}
	if o.ClientBuffer <= 0 {
		o.ClientBuffer = 512
	}
	if o.ClientRate <= 0 {
		o.ClientRate = 500
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
}

// Feed reads the stream once, with an ordered ephemeral consumer (no state on the server), and fans the
// events out to the connected clients, each through its own bounded queue.
type Feed struct {
	o FeedOptions

	mu      sync.Mutex
	ring    []*item // the last o.History events, oldest at next when full
	next    int
	clients map[*client]struct{}
	status  string // "" while reading; else what is wrong, shown on the page
	events  uint64 // events read from the stream
	lastSeq uint64
}

// client is one open live view.
type client struct {
	f  Filter
	ch chan *item
	// dropped counts events this client did not get because its queue was full (a slow browser);
	// limited those over its rate.
	dropped, limited atomic.Uint64
	tokens           float64
	refill           time.Time
}

// NewFeed returns a feed that reads once Run is called.
func NewFeed(o FeedOptions) *Feed {
	o.defaults()
	return &Feed{o: o, clients: map[*client]struct{}{}, status: "connecting to NATS"}
}

// Run reads the stream until ctx ends. A lost connection or stream is reported (log and page) and
// retried every few seconds, resuming after the last message read.
func (f *Feed) Run(ctx context.Context) {
	first := true
	for ctx.Err() == nil {
		o := tail.Options{URLs: f.o.URLs, Stream: f.o.Stream, Prefix: f.o.Prefix, ClientName: "flowstat-serve",
			Warnings: &lineWriter{f: f}}
		f.mu.Lock()
		last := f.lastSeq
		f.mu.Unlock()
		switch {
		case last > 0:
			o.Start, o.FromSeq = stream.StartSeq, last+1
		case first && f.o.Since > 0:
			o.Start, o.Since = stream.StartTime, time.Now().Add(-f.o.Since)
		default:
			o.Start = stream.StartNew
		}
		o.OnReady = func(tail.Ready) error {
			f.setStatus("")
			return nil
		}
		_, err := tail.Run(ctx, o, f.handle)
		if ctx.Err() != nil {
			return
		}
		first = false
		msg := "the live feed stopped"
		if err != nil {
			msg = "live feed: " + err.Error()
		}
		var ce *stream.ConnectError
		if errors.As(err, &ce) {
			msg += " (start flowagent, or point --nats / FLOWBUS_NATS_URL at the server)"
		}
		f.setStatus(msg + "; retrying in 5s")
		fmt.Fprintf(f.o.Log, "flowstat serve: %s; retrying in 5s\n", msg)
		select {
		case <-ctx.Done():
		case <-time.After(5 * time.Second):
		}
	}
}

func (f *Feed) setStatus(s string) {
	f.mu.Lock()
	f.status = stream.Escape(s, stream.MaxLog)
	f.mu.Unlock()
}

// handle keeps ev in the history and hands it to every client whose filter it passes, never waiting
// for one.
func (f *Feed) handle(m *tail.Meta, ev *schema.Event) error {
	it := newItem(m.Host, ev)
	now := time.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.events++
	f.lastSeq = m.StreamSeq
	if len(f.ring) < f.o.History {
		f.ring = append(f.ring, it)
	} else {
		f.ring[f.next] = it
		f.next = (f.next + 1) % len(f.ring)
	}
	for c := range f.clients {
		if c.f.match(it) {
			f.offer(c, it, now)
		}
	}
	return nil
}

// offer queues it for c unless c is over its rate or its queue is full; either is counted. Called with
// f.mu held.
func (f *Feed) offer(c *client, it *item, now time.Time) {
	burst := float64(f.o.ClientBuffer)
	c.tokens = min(burst, c.tokens+now.Sub(c.refill).Seconds()*float64(f.o.ClientRate))
	c.refill = now
	if c.tokens < 1 {
		c.limited.Add(1)
		return
	}
	select {
	case c.ch <- it:
		c.tokens--
	default:
		c.dropped.Add(1)
	}
}

// subscribe registers a client with filter flt and returns it with the recent events it passes (at most
// o.History, oldest first).
func (f *Feed) subscribe(flt Filter) (*client, []*item) {
	c := &client{f: flt, ch: make(chan *item, f.o.ClientBuffer), tokens: float64(f.o.ClientBuffer), refill: time.Now()}
	f.mu.Lock()
	defer f.mu.Unlock()
	var hist []*item
	for i := range f.ring {
		it := f.ring[(f.next+i)%len(f.ring)]
		if flt.match(it) {
			hist = append(hist, it)
		}
	}
	f.clients[c] = struct{}{}
	return c, hist
}

func (f *Feed) unsubscribe(c *client) {
	f.mu.Lock()
	delete(f.clients, c)
	f.mu.Unlock()
}

// state is what the page shows of the feed.
func (f *Feed) state() (status string, events uint64, clients int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.status, f.events, len(f.clients)
}

// lineWriter turns the reader's warnings into log lines and the page's status.
type lineWriter struct {
	f *Feed
}

func (w *lineWriter) Write(p []byte) (int, error) {
	s := strings.TrimSpace(string(p))
	if s != "" {
		fmt.Fprintf(w.f.o.Log, "flowstat serve: live feed: %s\n", s)
		if strings.Contains(s, "disconnected") {
			w.f.setStatus(s)
		} else if strings.Contains(s, "reconnected") {
			w.f.setStatus("")
		}
	}
	return len(p), nil
}
