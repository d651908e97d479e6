// Package publisher batches flow events per direction, encodes them and
// publishes each batch to JetStream with a message id, retrying with the same
// id until the stream acknowledges it.
//
// Add never blocks: it is called on the ring buffer reader's goroutine. Memory
// is bounded by Config.QueueBytes; past it whole batches are dropped and
// counted, and the count travels in the next batch.
package publisher

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/flowbus/flowbus/publisher/spool"
	"github.com/flowbus/flowbus/schema"
)

// Config controls batching and publishing. Zero values take the defaults.
type Config struct {
	Prefix string // subject prefix, e.g. "flows"
	Host   string // host token
	RunID  string // agent run id

	MaxEvents int           // seal a batch at this many events
	MaxBytes  int           // seal a batch once its encoding reaches this size
	Linger    time.Duration // seal a batch this long after its first event

	MaxInflight  int           // batches published and not yet acknowledged
	QueueBytes   int           // bound on sealed batches not yet acknowledged
	AckTimeout   time.Duration // after this a publish counts as failed and is retried
	RetryBackoff time.Duration // first retry delay, doubled up to MaxBackoff
	MaxBackoff   time.Duration

	// OnAck, if set, is called after each acknowledged batch (for metrics).
	OnAck func(events, bytes int, sealedAt time.Time)

	// Spool, if set, takes the batches that do not fit in QueueBytes, and
	// those still unacknowledged at Close; nil drops them (counted).
	Spool *spool.Spool

	// ServerURL names the NATS server in log messages (credentials already
	// redacted); empty uses the connection's own redacted URL.
	ServerURL string

	// PrevRun, if set, is asked (under the publisher's lock, once per
	// direction) at the first seal of each direction for the link to the
	// previous run of this host that this batch carries (schema prev_run);
	// nil: no link.
	PrevRun func(dir schema.Direction) *schema.RunLink

	// OnSeal, if set, is called under the publisher's lock for every batch
	// sealed with a seq, before it is queued, spooled or published: a
	// write-ahead record of what this run sealed. It must be quick.
	OnSeal func(dir schema.Direction, seq uint64, events int)
}

// Defaults chosen near the bus's sweet spot: batches of tens of KiB.
const (
	DefaultMaxEvents    = 4096
	DefaultMaxBytes     = 64 << 10
	DefaultLinger       = 100 * time.Millisecond
	DefaultMaxInflight  = 256
	DefaultQueueBytes   = 32 << 20
	DefaultAckTimeout   = 5 * time.Second
	DefaultRetryBackoff = 100 * time.Millisecond
	DefaultMaxBackoff   = 5 * time.Second
)

func (c *Config) fill() {
	set := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	setD := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	if c.Prefix == "" {
		c.Prefix = schema.DefaultPrefix
	}
	set(&c.MaxEvents, DefaultMaxEvents)
	set(&c.MaxBytes, DefaultMaxBytes)
	setD(&c.Linger, DefaultLinger)
	set(&c.MaxInflight, DefaultMaxInflight)
	set(&c.QueueBytes, DefaultQueueBytes)
	setD(&c.AckTimeout, DefaultAckTimeout)
	setD(&c.RetryBackoff, DefaultRetryBackoff)
	setD(&c.MaxBackoff, DefaultMaxBackoff)
}

// Stats is a snapshot of the publisher's counters since start.
type Stats struct {
	EventsIn        uint64 // begins handed to Add
	EventsAcked     uint64 // begins in batches the stream acknowledged
	BatchesAcked    uint64
	BytesAcked      uint64
	DuplicateAcks   uint64 // batches the stream already held (a retry after a lost ack)
	IDCollisions    uint64 // duplicate acks for a message someone else stored under our id; the batch was republished
	PublishErrors   uint64 // failed attempts, each retried or given up
	Drops           schema.Drops
	PendingBatches  int // in memory, sealed, not yet acknowledged
	PendingBytes    int
	InflightBatches int
	SpoolBatches    int // on disk
	SpoolCorrupt    int // files found unreadable at Open and set aside
	SpoolBytes      int64
	SpoolEvents     int
	Spooled         uint64 // batches written to the spool since start
	// EndsIn, EndsAcked and EndsDropped are the ends among EventsIn,
	// EventsAcked and the events Drops counts.
	EndsIn, EndsAcked, EndsDropped uint64
}

type batch struct {
	seq       uint64
	dir       schema.Direction
	kind      schema.Kind // set when sealed here; from the subject for a spooled one
	subject   string
	msgID     string
	data      []byte
	events    int
	drops     schema.Drops // carried in this batch; restored if it is lost
	attempts  int
	notBefore time.Time
	sealedAt  time.Time
	spoolName string // set when the batch lives in the spool until acked
	baseID    string // msgID before a collision gave it a fresh one
}

// encoder is what begin and end batch encoders have in common.
type encoder interface {
	Len() int
	Size() int
	SetPrevRun(*schema.RunLink) error
	Finish(dst []byte, seq uint64, drops schema.Drops) []byte
	Reset()
}

type dirState struct {
	dir     schema.Direction
	kind    schema.Kind
	enc     encoder
	begins  *schema.BatchEncoder    // enc, for begins
	ends    *schema.EndBatchEncoder // enc, for ends
	subject string
	timer   *time.Timer
	started time.Time
	linked  bool // PrevRun was asked for this direction
}

// Publisher batches and publishes events. Create it with New.
type Publisher struct {
	cfg Config
	js  jetstream.JetStream
	log *slog.Logger

	mu         sync.Mutex
	dirs       [3]*dirState // begins, indexed by schema.Direction
	endDirs    [3]*dirState // ends, the same
	seq        uint64
	drops      schema.Drops // lost since the last sealed batch, reported in the next
	totalDrops schema.Drops
	endDrops   uint64   // ends among totalDrops' events
	queue      []*batch // sealed and waiting to be sent, oldest first
	pendBytes  int      // queue plus in flight
	inflight   int
	flying     map[*batch]struct{} // in flight, to spool them if Close times out
	closing    bool

	loadedMu sync.Mutex
	loaded   map[string]bool // spool entries in memory (queued or in flight)
	spooled  atomic.Uint64

	wake chan struct{}
	stop chan struct{}
	done chan struct{}
	bufs sync.Pool
	// lastWarn rate limits each warning on its own (message -> *atomic.Int64),
	// so steady retry warnings never hide a drop.
	lastWarn sync.Map

	// eventsIn and endsIn are counted under mu, which Add takes anyway:
	// one atomic operation less per event on the reader's goroutine.
	eventsIn, endsIn uint64

	eventsAcked, batchesAcked, bytesAcked, dupAcks, pubErrors, collisions atomic.Uint64
	endsAcked                                                             atomic.Uint64

	nc *nats.Conn
	// stallSince is when the stream last answered (an ack), or the first
	// send after nothing was pending: how long publishes have waited for
	// an answer. Zero while nothing is pending. Guarded by mu.
	stallSince time.Time
	// onFailure, if set, sees each retryable failure first; true means it
	// reports the cause itself (once per state) and the warning is not
	// logged.
	onFailure atomic.Pointer[func(error) bool]
	// maxBytes is cfg.MaxBytes, lowered to fit the server's max_payload
	// (refreshed as the connection moves between servers), so that no
	// batch is sealed too large to publish. Guarded by mu.
	maxBytes int
}

// payloadHeadroom is left below the server's max_payload for the headers
// and subject that travel with a batch.
const payloadHeadroom = 1024

// refreshMaxBytesLocked lowers the batch bound to what the server accepts.
func (p *Publisher) refreshMaxBytesLocked() { p.setMaxBytesLocked(p.nc.MaxPayload()) }

// setMaxBytesLocked lowers the batch bound to fit a server's max_payload.
func (p *Publisher) setMaxBytesLocked(maxPayload int64) {
	mb := p.cfg.MaxBytes
	if mp := int(maxPayload); mp > 0 && mp-payloadHeadroom < mb {
		mb = max(mp-payloadHeadroom, 512)
	}
	if mb != p.maxBytes && p.maxBytes != 0 {
		p.log.Warn("batch size bound changed to fit the server's max_payload", "max_bytes", mb, "configured", p.cfg.MaxBytes, "max_payload", maxPayload)
	}
	p.maxBytes = mb
}

// New starts a publisher on nc. It does not create the stream: see EnsureStream.
func New(nc *nats.Conn, cfg Config, log *slog.Logger) (*Publisher, error) {
	cfg.fill()
	if err := schema.ValidateHostToken(cfg.Host); err != nil {
		return nil, fmt.Errorf("publisher host: %w", err)
	}
	if err := schema.ValidatePrefix(cfg.Prefix); err != nil {
		return nil, fmt.Errorf("publisher subject prefix: %w", err)
	}
	if log == nil {
		log = slog.Default()
	}
	js, err := jetstream.New(nc,
		jetstream.WithPublishAsyncMaxPending(cfg.MaxInflight+1),
		jetstream.WithPublishAsyncTimeout(cfg.AckTimeout))
	if err != nil {
		return nil, fmt.Errorf("jetstream context: %w", err)
	}
	p := &Publisher{
		nc:     nc,
		cfg:    cfg,
		js:     js,
		log:    log,
		wake:   make(chan struct{}, 1),
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
		flying: map[*batch]struct{}{},
		loaded: map[string]bool{},
	}
	for _, d := range []schema.Direction{schema.Outgoing, schema.Incoming} {
		ds := &dirState{
			dir:     d,
			begins:  schema.NewBatchEncoder(cfg.Host, cfg.RunID, d),
			subject: schema.Subject(cfg.Prefix, cfg.Host, d),
		}
		ds.enc = ds.begins
		ds.timer = time.AfterFunc(time.Hour, func() { p.lingerExpired(ds) })
		ds.timer.Stop()
		p.dirs[d] = ds
		// End batches chain on their own (prev_seq per direction and
		// kind) and carry no link to the previous run: the run record
		// follows the begins.
		es := &dirState{
			dir:     d,
			kind:    schema.KindEnd,
			ends:    schema.NewEndBatchEncoder(cfg.Host, cfg.RunID, d),
			subject: schema.EndSubject(cfg.Prefix, cfg.Host, d),
			linked:  true,
		}
		es.enc = es.ends
		es.timer = time.AfterFunc(time.Hour, func() { p.lingerExpired(es) })
		es.timer.Stop()
		p.endDirs[d] = es
	}
	p.mu.Lock()
	p.refreshMaxBytesLocked()
	p.mu.Unlock()
	go p.sendLoop()
	p.signal() // a spool left by an earlier run goes first
	return p, nil
}

// Add appends an event to its direction's batch. It never blocks on the
// network. ev is not retained.
func (p *Publisher) Add(ev *schema.Event) {
	p.mu.Lock()
	p.eventsIn++
	if int(ev.Direction) >= len(p.dirs) || p.dirs[ev.Direction] == nil || p.closing {
		p.drops.Reader++
		p.totalDrops.Reader++
		p.mu.Unlock()
		return
	}
	d := p.dirs[ev.Direction]
	d.begins.Add(ev)
	p.addedLocked(d, ev.Timestamp)
	p.mu.Unlock()
}

// AddEnd appends an end to its direction's end batch, as Add does a begin.
// Ends count in EndsIn and EndsAcked (EventsIn and EventsAcked are the
// begins), their losses in Drops like those of begins, and in EndsDropped.
func (p *Publisher) AddEnd(ev *schema.EndEvent) {
	p.mu.Lock()
	p.endsIn++
	if int(ev.Direction) >= len(p.endDirs) || p.endDirs[ev.Direction] == nil || p.closing {
		p.drops.Reader++
		p.totalDrops.Reader++
		p.endDrops++
		p.mu.Unlock()
		return
	}
	d := p.endDirs[ev.Direction]
	d.ends.AddEnd(ev)
	p.addedLocked(d, ev.EndNs)
	p.mu.Unlock()
}

// addedLocked starts the linger of a batch that just got its first event
// (at evNanos), and seals it once full.
func (p *Publisher) addedLocked(d *dirState, evNanos int64) {
	if d.enc.Len() == 1 {
		d.started = lingerStart(evNanos, time.Now(), p.cfg.Linger)
		d.timer.Reset(p.cfg.Linger - time.Since(d.started))
	}
	if d.enc.Len() >= p.cfg.MaxEvents || d.enc.Size() >= p.maxBytes {
		p.sealLocked(d)
	}
}

// AddDrops records events lost before the publisher (kernel, reader); they
// are reported in the next batch.
func (p *Publisher) AddDrops(d schema.Drops) {
	p.mu.Lock()
	p.drops.Add(d)
	p.totalDrops.Add(d)
	p.mu.Unlock()
}

// lingerStart is when a batch whose first event happened at evNanos (wall
// clock) starts to linger: at the event itself, so that the time the reader
// took to see it (its poll interval) counts against the linger and the
// event's latency stays near the linger. It is clamped to [now-linger/2,
// now]: a clock step or a backlogged reader must not seal every batch at
// once, which would shred batches just when the agent is busiest.
func lingerStart(evNanos int64, now time.Time, linger time.Duration) time.Time {
	t := time.Unix(0, evNanos)
	if t.After(now) {
		return now
	}
	if floor := now.Add(-linger / 2); t.Before(floor) {
		return floor
	}
	return t
}

func (p *Publisher) lingerExpired(d *dirState) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if d.enc.Len() == 0 {
		return
	}
	// The timer may belong to a batch already sealed by size; re-arm for the
	// one that is open now.
	if left := p.cfg.Linger - time.Since(d.started); left > time.Millisecond {
		d.timer.Reset(left)
		return
	}
	p.sealLocked(d)
}

// sealLocked finishes d's open batch and queues it in memory or, once
// memory is full or the spool already holds older batches (order matters),
// in the spool. Past both bounds the batch is dropped whole and counted.
func (p *Publisher) sealLocked(d *dirState) {
	n := d.enc.Len()
	if n == 0 {
		return
	}
	d.timer.Stop()
	sp := p.cfg.Spool
	memFull := p.pendBytes+d.enc.Size() > p.cfg.QueueBytes
	toSpool := sp != nil && (memFull || sp.Len() > 0)
	if memFull && !toSpool {
		d.enc.Reset()
		p.drops.Queue += uint64(n)
		p.totalDrops.Queue += uint64(n)
		p.countEndDropsLocked(d.kind, n)
		p.warn("publish queue full and no spool: batch dropped; NATS is slow or unreachable", "events", n, "pending_bytes", p.pendBytes, "bound", p.cfg.QueueBytes)
		return
	}
	if !d.linked && p.cfg.PrevRun != nil {
		d.linked = true
		if err := d.enc.SetPrevRun(p.cfg.PrevRun(d.dir)); err != nil {
			p.log.Warn("link to the previous run left out of the first batch", "direction", d.dir.String(), "err", err)
		}
	}
	p.seq++
	buf, _ := p.bufs.Get().([]byte)
	b := &batch{
		seq:      p.seq,
		dir:      d.dir,
		kind:     d.kind,
		subject:  d.subject,
		msgID:    schema.MsgID(p.cfg.Host, p.cfg.RunID, p.seq),
		events:   n,
		drops:    p.drops,
		sealedAt: time.Now(),
	}
	b.data = d.enc.Finish(buf[:0], p.seq, p.drops)
	p.drops = schema.Drops{}
	if p.cfg.OnSeal != nil && d.kind == schema.KindBegin {
		p.cfg.OnSeal(d.dir, p.seq, n)
	}
	if toSpool {
		err := sp.Put(b.sealedAt.UnixNano(), b.msgID, b.subject, n, b.data)
		//lint:ignore SA6002 a slice header per batch costs less than boxing a pointer to it
		p.bufs.Put(b.data[:0])
		if err != nil {
			// The batch and the losses it carried are lost; say so in the next one.
			p.drops.Add(b.drops)
			p.drops.Spool += uint64(n)
			p.totalDrops.Spool += uint64(n)
			p.countEndDropsLocked(d.kind, n)
			p.warn("spool cannot take the batch: dropped", "events", n, "spool_bytes", sp.Bytes(), "err", err)
			return
		}
		p.spooled.Add(1)
		p.signal()
		return
	}
	p.pendBytes += len(b.data)
	p.queue = append(p.queue, b)
	p.signal()
}

// warn logs at most once per second so that an outage does not flood the log.
func (p *Publisher) warn(msg string, args ...any) {
	now := time.Now().UnixNano()
	v, _ := p.lastWarn.LoadOrStore(msg, new(atomic.Int64))
	lw := v.(*atomic.Int64)
	last := lw.Load()
	if now-last < int64(time.Second) || !lw.CompareAndSwap(last, now) {
		return
	}
	p.log.Warn(msg, args...)
}

func (p *Publisher) sendLoop() {
	defer close(p.done)
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-p.wake:
		case <-retry.C:
		}
		for {
			b, wait := p.next()
			if b == nil {
				if wait > 0 {
					retry.Reset(wait)
				}
				break
			}
			p.send(b)
		}
	}
}

// next takes the oldest sendable batch, or says how long until one is due.
// Memory holds the oldest batches; when it is empty the spool's turn comes.
func (p *Publisher) next() (*batch, time.Duration) {
	p.mu.Lock()
	if p.inflight >= p.cfg.MaxInflight {
		p.mu.Unlock()
		return nil, 0
	}
	if len(p.queue) > 0 {
		b := p.queue[0]
		if wait := time.Until(b.notBefore); wait > 0 {
			p.mu.Unlock()
			return nil, wait
		}
		p.queue[0] = nil
		p.queue = p.queue[1:]
		p.inflight++
		p.flying[b] = struct{}{}
		p.mu.Unlock()
		return b, 0
	}
	sp := p.cfg.Spool
	room := p.pendBytes < p.cfg.QueueBytes
	p.mu.Unlock()
	if sp == nil || !room || sp.Len() == 0 {
		return nil, 0
	}
	es, err := sp.Peek(1, func(name string) bool {
		p.loadedMu.Lock()
		defer p.loadedMu.Unlock()
		return p.loaded[name]
	})
	if err != nil {
		lost := uint64(1) // unknown size: at least one
		if le := (*spool.LoadError)(nil); errors.As(err, &le) && le.Events > 0 {
			lost = uint64(le.Events)
		}
		p.log.Error("unreadable spool file skipped; its events are counted as dropped (stage spool)", "err", err, "events", lost)
		p.mu.Lock()
		p.drops.Spool += lost // carried by the next batch, like every drop
		p.totalDrops.Spool += lost
		p.mu.Unlock()
		p.signal() // the batches behind it must not wait for the next event
	}
	if len(es) == 0 {
		return nil, 0
	}
	e := es[0]
	p.loadedMu.Lock()
	p.loaded[e.Name] = true
	p.loadedMu.Unlock()
	b := &batch{subject: e.Subject, msgID: e.MsgID, data: e.Data, events: e.Events,
		sealedAt: time.Unix(0, e.SealedAt), spoolName: e.Name, kind: schema.SubjectKind(e.Subject, p.cfg.Prefix)}
	p.mu.Lock()
	p.inflight++
	p.pendBytes += len(b.data)
	p.flying[b] = struct{}{}
	p.mu.Unlock()
	return b, 0
}

func (p *Publisher) send(b *batch) {
	// Asked before taking mu: the client's lock can be held for as long as
	// a write to a hung server blocks, and Add must never wait for that.
	mp := p.nc.MaxPayload()
	p.mu.Lock()
	p.setMaxBytesLocked(mp) // the connection may have moved to another server
	if p.stallSince.IsZero() {
		p.stallSince = time.Now()
	}
	p.mu.Unlock()
	msg := &nats.Msg{
		Subject: b.subject,
		Data:    b.data,
		Header: nats.Header{
			schema.HeaderMsgID:       []string{b.msgID},
			schema.HeaderContentType: []string{schema.ContentType},
			schema.HeaderSchema:      []string{schemaHeader(b.kind)},
		},
	}
	b.attempts++
	fut, err := p.js.PublishMsgAsync(msg, jetstream.WithStallWait(p.cfg.AckTimeout))
	if err != nil {
		p.failed(b, err)
		return
	}
	go func() {
		select {
		case ack := <-fut.Ok():
			p.acked(b, ack)
		case err := <-fut.Err():
			p.failed(b, err)
		}
	}()
}

func (p *Publisher) acked(b *batch, ack *jetstream.PubAck) {
	if ack != nil && ack.Duplicate {
		// JetStream dedupes ids across the whole stream: anyone who can
		// publish to it can claim our next ids first. Only a stored copy of
		// this very batch makes the duplicate ours.
		mine, stored, err := p.storedIsOurs(b, ack)
		if err != nil {
			p.failed(b, fmt.Errorf("duplicate ack for stored sequence %d could not be verified: %w", ack.Sequence, err))
			return
		}
		if !mine {
			p.collided(b, ack, stored)
			return
		}
		p.dupAcks.Add(1)
	}
	if b.kind == schema.KindEnd {
		p.endsAcked.Add(uint64(b.events))
	} else {
		p.eventsAcked.Add(uint64(b.events))
	}
	p.batchesAcked.Add(1)
	p.bytesAcked.Add(uint64(len(b.data)))
	if p.cfg.OnAck != nil {
		p.cfg.OnAck(b.events, len(b.data), b.sealedAt)
	}
	p.mu.Lock()
	p.inflight--
	delete(p.flying, b)
	p.pendBytes -= len(b.data)
	p.answeredLocked()
	p.mu.Unlock()
	if b.spoolName != "" {
		p.unspool(b.spoolName)
	} else {
		//lint:ignore SA6002 a slice header per batch costs less than boxing a pointer to it
		p.bufs.Put(b.data[:0])
	}
	p.signal()
}

// verifyTimeout bounds the read-back of a message the stream called a duplicate.
const verifyTimeout = 5 * time.Second

// storedIsOurs reads back the message a duplicate ack names and tells whether
// it is b (same subject, same bytes). It also returns the stored subject.
func (p *Publisher) storedIsOurs(b *batch, ack *jetstream.PubAck) (bool, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), min(p.cfg.AckTimeout, verifyTimeout))
	defer cancel()
	st, err := p.js.Stream(ctx, ack.Stream)
	if err != nil {
		return false, "", err
	}
	m, err := st.GetMsg(ctx, ack.Sequence)
	if err != nil {
		return false, "", err
	}
	return m.Subject == b.subject && bytes.Equal(m.Data, b.data), m.Subject, nil
}

// collided republishes b at once under a fresh id that nobody can predict,
// since the stream kept another publisher's message under b's id. The new id
// stays with b, so its own retries are still deduped.
func (p *Publisher) collided(b *batch, ack *jetstream.PubAck, stored string) {
	p.collisions.Add(1)
	if b.baseID == "" {
		b.baseID = b.msgID
	}
	old := b.msgID
	b.msgID = freshID(b.baseID)
	p.warn("message id already used in the stream by another publisher: batch republished under a fresh id",
		"msg_id", old, "stored_subject", stored, "stored_seq", ack.Sequence, "subject", b.subject, "new_msg_id", b.msgID)
	p.mu.Lock()
	p.inflight--
	if p.stopped() {
		p.mu.Unlock()
		return
	}
	delete(p.flying, b)
	b.notBefore = time.Time{}
	p.requeueLocked(b)
	p.answeredLocked() // the stream answered, if not with an ack of ours
	p.mu.Unlock()
	p.signal()
}

// freshID appends 64 random bits to base: an id no other publisher can claim
// in advance.
func freshID(base string) string {
	var r [8]byte
	if _, err := rand.Read(r[:]); err != nil {
		panic("publisher: no system randomness: " + err.Error())
	}
	return base + "." + strconv.FormatUint(binary.BigEndian.Uint64(r[:]), 16)
}

// requeueLocked puts b back in seq order, so that batches go out oldest
// first after an outage.
func (p *Publisher) requeueLocked(b *batch) {
	i := len(p.queue)
	for i > 0 && p.queue[i-1].sealedAt.After(b.sealedAt) {
		i--
	}
	p.queue = append(p.queue, nil)
	copy(p.queue[i+1:], p.queue[i:])
	p.queue[i] = b
}

func (p *Publisher) unspool(name string) {
	p.cfg.Spool.Remove(name)
	p.loadedMu.Lock()
	delete(p.loaded, name)
	p.loadedMu.Unlock()
}

// answeredLocked restarts the wait for an answer: the stream just gave one.
func (p *Publisher) answeredLocked() {
	p.stallSince = time.Now()
	if p.inflight == 0 && len(p.queue) == 0 {
		p.stallSince = time.Time{}
	}
}

// AckStall is how long batches have waited for the stream's answer: the
// time since the last ack, or since the first publish after the publisher
// was idle, while batches are in flight or queued; 0 when nothing waits.
// A server that hangs (stopped, overloaded, partitioned without a TCP
// reset) shows here long before the client notices the connection is dead.
func (p *Publisher) AckStall() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stallSince.IsZero() || (p.inflight == 0 && len(p.queue) == 0) {
		return 0
	}
	return time.Since(p.stallSince)
}

// SetFailureReporter makes f see each retryable publish failure first.
// When f returns true it has reported the cause (a health check that logs
// once per state change), and the publisher does not warn about it too.
func (p *Publisher) SetFailureReporter(f func(err error) bool) {
	p.onFailure.Store(&f)
}

// RetryNow sends the queued batches at once, without waiting out their
// backoff: called when what made them fail (a missing stream) is fixed.
func (p *Publisher) RetryNow() {
	p.mu.Lock()
	for _, b := range p.queue {
		b.notBefore = time.Time{}
	}
	p.mu.Unlock()
	p.signal()
}

// NoStream tells a publish error that means no stream took the subject:
// the stream is missing, or does not hold the subject.
func NoStream(err error) bool {
	return errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders)
}

// permanent tells errors that no retry can fix.
func permanent(err error) bool {
	return errors.Is(err, nats.ErrMaxPayload) || errors.Is(err, nats.ErrBadSubject)
}

func (p *Publisher) failed(b *batch, err error) {
	p.pubErrors.Add(1)
	p.mu.Lock()
	p.inflight--
	if p.stopped() {
		// Shut down: spoolLeftovers owns what is still in flight.
		p.mu.Unlock()
		return
	}
	delete(p.flying, b)
	if permanent(err) {
		p.pendBytes -= len(b.data)
		if b.spoolName != "" {
			defer p.unspool(b.spoolName)
		}
		lost := schema.Drops{Publish: uint64(b.events)}
		lost.Add(b.drops) // the losses it carried must still be reported
		p.drops.Add(lost)
		p.totalDrops.Publish += uint64(b.events)
		p.countEndDropsLocked(b.kind, b.events)
		if p.inflight == 0 && len(p.queue) == 0 {
			p.stallSince = time.Time{}
		}
		p.mu.Unlock()
		p.log.Error("batch given up", "seq", b.seq, "events", b.events, "err", err)
		p.signal()
		return
	}
	backoff := p.cfg.RetryBackoff << min(b.attempts-1, 16)
	if backoff > p.cfg.MaxBackoff || backoff <= 0 {
		backoff = p.cfg.MaxBackoff
	}
	b.notBefore = time.Now().Add(backoff)
	p.requeueLocked(b)
	seq, attempts := b.seq, b.attempts // b belongs to the send loop again once unlocked
	pending := len(p.queue) + p.inflight
	p.mu.Unlock()
	if f := p.onFailure.Load(); f != nil && (*f)(err) {
		p.signal()
		return
	}
	if !p.nc.IsConnected() {
		// The client's own error says little then ("headers not supported"
		// before the first connection, a timeout after): say what it is.
		p.warn("NATS is not reachable: batches are kept (memory, then spool) and retried with the same message id",
			"url", p.serverURL(), "status", p.nc.Status().String(), "pending_batches", pending, "spool_batches", p.spoolLen())
	} else {
		p.warn("publish failed, will retry with the same message id", "url", p.serverURL(), "seq", seq, "attempt", attempts, "retry_in", backoff, "err", err)
	}
	p.signal()
}

// serverURL names the server for log messages.
func (p *Publisher) serverURL() string {
	if p.cfg.ServerURL != "" {
		return p.cfg.ServerURL
	}
	if u := p.nc.ConnectedUrlRedacted(); u != "" {
		return u
	}
	var us []string
	for _, s := range p.nc.Servers() {
		if u, err := url.Parse(s); err == nil {
			s = u.Redacted()
		}
		us = append(us, s)
	}
	return strings.Join(us, ",")
}

func (p *Publisher) spoolLen() int {
	if p.cfg.Spool == nil {
		return 0
	}
	return p.cfg.Spool.Len()
}

func (p *Publisher) stopped() bool {
	select {
	case <-p.stop:
		return true
	default:
		return false
	}
}

func (p *Publisher) signal() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// Flush seals the open batches now.
func (p *Publisher) Flush() {
	p.mu.Lock()
	for _, d := range append(p.dirs[:], p.endDirs[:]...) {
		if d != nil {
			p.sealLocked(d)
		}
	}
	p.mu.Unlock()
}

// schemaHeader is the Flowbus-Schema header of a batch of kind k.
func schemaHeader(k schema.Kind) string {
	if k == schema.KindEnd {
		return schema.EndSchemaHeaderValue()
	}
	return schema.SchemaHeaderValue()
}

// countEndDropsLocked adds n lost events of a batch of kind k to the ends
// dropped.
func (p *Publisher) countEndDropsLocked(k schema.Kind, n int) {
	if k == schema.KindEnd {
		p.endDrops += uint64(n)
	}
}

// Close seals the open batches and waits, until ctx ends, for every batch to
// be acknowledged. What is still unacknowledged then goes to the spool if
// there is one (it is sent by the next run), else it is counted as lost and
// reported in the returned error.
func (p *Publisher) Close(ctx context.Context) error {
	p.Flush()
	p.mu.Lock()
	p.closing = true
	p.mu.Unlock()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		p.mu.Lock()
		left := len(p.queue) + p.inflight
		p.mu.Unlock()
		if left == 0 && (p.cfg.Spool == nil || p.cfg.Spool.Len() == 0) {
			break
		}
		select {
		case <-ctx.Done():
			close(p.stop)
			<-p.done
			return p.spoolLeftovers()
		case <-tick.C:
		}
	}
	close(p.stop)
	<-p.done
	p.stopTimers()
	return nil
}

func (p *Publisher) stopTimers() {
	for _, d := range append(p.dirs[:], p.endDirs[:]...) {
		if d != nil {
			d.timer.Stop()
		}
	}
}

// spoolLeftovers saves what is still unacknowledged at shutdown.
func (p *Publisher) spoolLeftovers() error {
	p.stopTimers()
	p.mu.Lock()
	left := append([]*batch(nil), p.queue...)
	for b := range p.flying {
		left = append(left, b)
	}
	p.queue = nil
	p.mu.Unlock()
	lostB, lostE, lostEnds, kept, onDisk := 0, 0, 0, 0, 0
	for _, b := range left {
		if b.spoolName != "" {
			onDisk++ // still in the spool: the next run sends it
			continue
		}
		if p.cfg.Spool != nil {
			if err := p.cfg.Spool.Put(b.sealedAt.UnixNano(), b.msgID, b.subject, b.events, b.data); err == nil {
				kept++
				p.spooled.Add(1)
				continue
			}
		}
		lostB++
		lostE += b.events
		if b.kind == schema.KindEnd {
			lostEnds += b.events
		}
	}
	p.mu.Lock()
	p.totalDrops.Publish += uint64(lostE)
	p.endDrops += uint64(lostEnds)
	p.mu.Unlock()
	if lostB > 0 {
		return fmt.Errorf("shutdown: %d batches (%d events) not acknowledged before the deadline and not spooled", lostB, lostE)
	}
	if kept+onDisk > 0 {
		p.log.Warn("shutdown before NATS acknowledged everything: batches kept in the spool for the next run", "spooled_now", kept, "already_spooled", onDisk)
	}
	return nil
}

// Stats returns the counters.
func (p *Publisher) Stats() Stats {
	p.mu.Lock()
	s := Stats{
		Drops:           p.totalDrops,
		PendingBatches:  len(p.queue) + p.inflight,
		PendingBytes:    p.pendBytes,
		InflightBatches: p.inflight,
		EndsDropped:     p.endDrops,
		EventsIn:        p.eventsIn,
		EndsIn:          p.endsIn,
	}
	p.mu.Unlock()
	s.EndsAcked = p.endsAcked.Load()
	s.EventsAcked = p.eventsAcked.Load()
	s.BatchesAcked = p.batchesAcked.Load()
	s.BytesAcked = p.bytesAcked.Load()
	s.DuplicateAcks = p.dupAcks.Load()
	s.IDCollisions = p.collisions.Load()
	s.PublishErrors = p.pubErrors.Load()
	s.Spooled = p.spooled.Load()
	if sp := p.cfg.Spool; sp != nil {
		s.SpoolBatches, s.SpoolBytes, s.SpoolEvents = sp.Len(), sp.Bytes(), sp.Events()
		s.SpoolCorrupt = sp.Corrupt()
	}
	return s
}
