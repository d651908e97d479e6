package publisher

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/flowbus/flowbus/publisher/embedded"
	"github.com/flowbus/flowbus/schema"
)

// natsServer starts a real in-process JetStream server on a free loopback port.
func natsServer(t testing.TB) (*server.Server, *nats.Conn, jetstream.JetStream) {
	t.Helper()
	srv, err := embedded.Start(embedded.Options{Listen: "127.0.0.1:0", StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	_, err = EnsureStream(context.Background(), js, StreamSettings{Name: "FLOWS", Prefix: "flows", Duplicates: time.Minute, Storage: jetstream.FileStorage})
	if err != nil {
		t.Fatal(err)
	}
	return srv, nc, js
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func event(i int, dir schema.Direction) *schema.Event {
	return &schema.Event{
		Timestamp: time.Now().UnixNano(),
		Direction: dir,
		Src:       netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}),
		Dst:       netip.MustParseAddr("2001:db8::1"),
		SrcPort:   uint16(30000 + i%1000),
		DstPort:   443,
		DstDNS:    []string{"example.com"},
	}
}

type msg struct {
	subject, id string
	batch       schema.Batch
}

// storedMessages reads every message of stream FLOWS, in stream order.
func storedMessages(t *testing.T, js jetstream.JetStream) []*jetstream.RawStreamMsg {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := js.Stream(ctx, "FLOWS")
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []*jetstream.RawStreamMsg
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := st.GetMsg(ctx, seq)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, m)
	}
	return out
}

// fetchAll reads every message in the stream.
func fetchAll(t *testing.T, js jetstream.JetStream) []msg {
	t.Helper()
	var out []msg
	for _, m := range storedMessages(t, js) {
		var b schema.Batch
		if err := schema.DecodeBatch(m.Data, &b); err != nil {
			t.Fatal(err)
		}
		if ct := m.Header.Get(schema.HeaderContentType); ct != schema.ContentType {
			t.Errorf("content type %q", ct)
		}
		if sv := m.Header.Get(schema.HeaderSchema); sv != schema.SchemaHeaderValue() {
			t.Errorf("schema header %q", sv)
		}
		out = append(out, msg{m.Subject, m.Header.Get(schema.HeaderMsgID), b})
	}
	return out
}

func newPub(t testing.TB, nc *nats.Conn, cfg Config) *Publisher {
	t.Helper()
	if cfg.Host == "" {
		cfg.Host = "web-01"
	}
	if cfg.RunID == "" {
		cfg.RunID = "run1"
	}
	p, err := New(nc, cfg, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func closePub(t testing.TB, p *Publisher) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestBatchByCountSubjectsAndIDs(t *testing.T) {
	_, nc, js := natsServer(t)
	p := newPub(t, nc, Config{MaxEvents: 10, Linger: time.Hour})
	for i := 0; i < 25; i++ {
		p.Add(event(i, schema.Outgoing))
	}
	for i := 0; i < 10; i++ {
		p.Add(event(i, schema.Incoming))
	}
	// 25 outgoing = 2 full batches + 5 open; 10 incoming = 1 full batch.
	waitAcked(t, p, 30)
	closePub(t, p) // flushes the open 5
	msgs := fetchAll(t, js)
	if len(msgs) != 4 {
		t.Fatalf("got %d batches, want 4", len(msgs))
	}
	counts := map[string][]int{}
	seen := map[uint64]bool{}
	lastByDir := map[schema.Direction]uint64{}
	for _, m := range msgs {
		b := m.batch
		want := fmt.Sprintf("flows.web-01.%s", b.Direction)
		if m.subject != want {
			t.Errorf("batch of %s on subject %s, want %s", b.Direction, m.subject, want)
		}
		if m.id != fmt.Sprintf("web-01.run1.%d", b.Seq) {
			t.Errorf("msg id %q for seq %d", m.id, b.Seq)
		}
		if seen[b.Seq] {
			t.Errorf("seq %d twice", b.Seq)
		}
		seen[b.Seq] = true
		if b.PrevSeq != lastByDir[b.Direction] {
			t.Errorf("%s batch seq %d has prev_seq %d, want %d", b.Direction, b.Seq, b.PrevSeq, lastByDir[b.Direction])
		}
		lastByDir[b.Direction] = b.Seq
		counts[b.Direction.String()] = append(counts[b.Direction.String()], len(b.Events))
		for _, ev := range b.Events {
			if ev.Direction != b.Direction {
				t.Errorf("event direction %v in %v batch", ev.Direction, b.Direction)
			}
		}
	}
	if fmt.Sprint(counts["outgoing"]) != "[10 10 5]" || fmt.Sprint(counts["incoming"]) != "[10]" {
		t.Errorf("batch sizes %v", counts)
	}
}

func waitAcked(t *testing.T, p *Publisher, events uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for p.Stats().EventsAcked < events {
		if time.Now().After(deadline) {
			t.Fatalf("acked %d events, want %d", p.Stats().EventsAcked, events)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestBatchByBytes(t *testing.T) {
	_, nc, js := natsServer(t)
	p := newPub(t, nc, Config{MaxEvents: 100000, MaxBytes: 2048, Linger: time.Hour})
	for i := 0; i < 500; i++ {
		p.Add(event(i, schema.Outgoing))
	}
	closePub(t, p)
	msgs := fetchAll(t, js)
	if len(msgs) < 3 {
		t.Fatalf("got %d batches, want several of at most ~2 KiB", len(msgs))
	}
	total := 0
	for i, m := range msgs {
		total += len(m.batch.Events)
		size := len(m.batch.Events)
		// Sealed once it reaches MaxBytes: at most one event over.
		if i < len(msgs)-1 && size == 0 {
			t.Errorf("empty batch %d", i)
		}
	}
	if total != 500 {
		t.Errorf("got %d events, want 500", total)
	}
	st := p.Stats()
	if st.BytesAcked/uint64(len(msgs)) > 2048+256 {
		t.Errorf("average batch %d bytes, bound 2048", st.BytesAcked/uint64(len(msgs)))
	}
}

func TestBatchByLinger(t *testing.T) {
	_, nc, js := natsServer(t)
	p := newPub(t, nc, Config{MaxEvents: 1000, Linger: 50 * time.Millisecond})
	defer closePub(t, p)
	start := time.Now()
	p.Add(event(1, schema.Incoming))
	waitAcked(t, p, 1)
	if d := time.Since(start); d < 45*time.Millisecond {
		t.Errorf("batch sent after %v, before the linger of 50ms", d)
	}
	if msgs := fetchAll(t, js); len(msgs) != 1 || len(msgs[0].batch.Events) != 1 {
		t.Fatalf("want one batch of one event, got %d", len(msgs))
	}
}

// The linger counts from the event's own time, not from when the reader
// handed it over, so the reader's poll delay does not add to the latency;
// an old event (backlog, clock step) still lingers at least half the linger.
func TestLingerCountsFromTheEvent(t *testing.T) {
	_, nc, _ := natsServer(t)
	const linger = 400 * time.Millisecond
	p := newPub(t, nc, Config{MaxEvents: 1000, Linger: linger})
	defer closePub(t, p)
	for _, c := range []struct {
		age      time.Duration // how long before Add the event happened
		min, max time.Duration // from Add to the ack
	}{
		{0, linger - 5*time.Millisecond, 10 * linger},
		{100 * time.Millisecond, linger - 100*time.Millisecond - 5*time.Millisecond, linger - 20*time.Millisecond},
		{time.Hour, linger/2 - 5*time.Millisecond, linger - 20*time.Millisecond},
	} {
		ev := event(1, schema.Incoming)
		ev.Timestamp = time.Now().Add(-c.age).UnixNano()
		acked := p.Stats().BatchesAcked
		start := time.Now()
		p.Add(ev)
		for p.Stats().BatchesAcked == acked {
			if time.Since(start) > 5*time.Second {
				t.Fatal("batch not acked within 5 s")
			}
			time.Sleep(time.Millisecond)
		}
		if d := time.Since(start); d < c.min || d > c.max {
			t.Errorf("event %v old: acked %v after Add, want %v..%v", c.age, d, c.min, c.max)
		}
	}
}

func TestLingerStartClamps(t *testing.T) {
	now := time.Unix(1000, 0)
	l := 100 * time.Millisecond
	for _, c := range []struct {
		ev   time.Time
		want time.Time
	}{
		{now.Add(-30 * time.Millisecond), now.Add(-30 * time.Millisecond)},
		{now.Add(time.Second), now},
		{now.Add(-time.Second), now.Add(-50 * time.Millisecond)},
	} {
		if got := lingerStart(c.ev.UnixNano(), now, l); !got.Equal(c.want) {
			t.Errorf("lingerStart(%v) = %v, want %v", c.ev.Sub(now), got.Sub(now), c.want.Sub(now))
		}
	}
}

// A retried publish (same message id) is stored once: the stream's
// duplicate window rejects the copy.
func TestRetryIsDeduplicated(t *testing.T) {
	_, nc, js := natsServer(t)
	p := newPub(t, nc, Config{MaxEvents: 5, Linger: time.Hour})
	for i := 0; i < 5; i++ {
		p.Add(event(i, schema.Outgoing))
	}
	waitAcked(t, p, 5)
	closePub(t, p)
	msgs := fetchAll(t, js)
	if len(msgs) != 1 {
		t.Fatalf("want 1 batch, got %d", len(msgs))
	}
	// Replay the same batch exactly as a retry would.
	enc := schema.NewBatchEncoder("web-01", "run1", schema.Outgoing)
	for i := 0; i < 5; i++ {
		enc.Add(event(i, schema.Outgoing))
	}
	data := enc.Finish(nil, 1, schema.Drops{})
	m := &nats.Msg{Subject: "flows.web-01.outgoing", Data: data, Header: nats.Header{schema.HeaderMsgID: []string{msgs[0].id}}}
	ack, err := js.PublishMsg(context.Background(), m)
	if err != nil {
		t.Fatal(err)
	}
	if !ack.Duplicate {
		t.Errorf("retry with the same message id was stored again")
	}
	if got := fetchAll(t, js); len(got) != 1 {
		t.Errorf("stream holds %d batches after a retry, want 1", len(got))
	}
}

// While the server is down the publisher keeps batches (within its bound)
// and delivers them once it is back, without blocking Add.
func TestOutageRetriesSameIDs(t *testing.T) {
	dir := t.TempDir()
	opts := &server.Options{Host: "127.0.0.1", Port: server.RANDOM_PORT, JetStream: true, StoreDir: dir, NoSigs: true, NoLog: true}
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(5 * time.Second) {
		t.Fatal("server did not start")
	}
	url := srv.ClientURL()
	port := srv.Addr().(*net.TCPAddr).Port
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	if _, err := EnsureStream(context.Background(), js, StreamSettings{Name: "FLOWS", Prefix: "flows", Duplicates: time.Minute}); err != nil {
		t.Fatal(err)
	}
	p := newPub(t, nc, Config{MaxEvents: 10, Linger: 10 * time.Millisecond, AckTimeout: 300 * time.Millisecond, RetryBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond})
	for i := 0; i < 20; i++ {
		p.Add(event(i, schema.Outgoing))
	}
	waitAcked(t, p, 20)

	srv.Shutdown()
	srv.WaitForShutdown()
	addStart := time.Now()
	for i := 20; i < 120; i++ {
		p.Add(event(i, schema.Outgoing))
	}
	if d := time.Since(addStart); d > 100*time.Millisecond {
		t.Errorf("Add blocked for %v while NATS was down", d)
	}
	time.Sleep(700 * time.Millisecond) // several ack timeouts and retries

	opts.Port = port
	srv2, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	go srv2.Start()
	defer func() { srv2.Shutdown(); srv2.WaitForShutdown() }()
	if !srv2.ReadyForConnections(5 * time.Second) {
		t.Fatal("server did not restart")
	}
	waitAcked(t, p, 120)
	closePub(t, p)
	if p.Stats().PublishErrors == 0 {
		t.Errorf("expected failed attempts during the outage")
	}
	js2, _ := jetstream.New(nc)
	msgs := fetchAll(t, js2)
	n := 0
	seqs := map[uint64]bool{}
	for _, m := range msgs {
		if seqs[m.batch.Seq] {
			t.Errorf("batch %d stored twice", m.batch.Seq)
		}
		seqs[m.batch.Seq] = true
		n += len(m.batch.Events)
	}
	if n != 120 {
		t.Errorf("stream holds %d events, want 120", n)
	}
}

// A full queue drops whole batches, counts them, and reports the count in
// the next batch that gets through.
func TestQueueBoundDropsAreCountedAndReported(t *testing.T) {
	_, nc, js := natsServer(t)
	p := newPub(t, nc, Config{MaxEvents: 10, Linger: time.Hour, QueueBytes: 1})
	for i := 0; i < 30; i++ {
		p.Add(event(i, schema.Outgoing))
	}
	st := p.Stats()
	if st.Drops.Queue != 30 {
		t.Fatalf("queue drops %d, want 30", st.Drops.Queue)
	}
	p.mu.Lock()
	p.cfg.QueueBytes = 1 << 20
	p.mu.Unlock()
	for i := 0; i < 10; i++ {
		p.Add(event(i, schema.Outgoing))
	}
	closePub(t, p)
	msgs := fetchAll(t, js)
	if len(msgs) != 1 || msgs[0].batch.Drops.Queue != 30 || len(msgs[0].batch.Events) != 10 {
		t.Fatalf("want one batch of 10 carrying 30 queue drops, got %d batches %+v", len(msgs), msgs)
	}
}
