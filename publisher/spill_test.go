package publisher

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/flowbus/flowbus/publisher/spool"
	"github.com/flowbus/flowbus/schema"
)

// bus is a JetStream server that a test can stop and start again on the same
// port and store.
type bus struct {
	t    *testing.T
	opts *server.Options
	srv  *server.Server
	url  string
}

func newBus(t *testing.T) *bus {
	b := &bus{t: t, opts: &server.Options{Host: "127.0.0.1", Port: server.RANDOM_PORT, JetStream: true, StoreDir: t.TempDir(), NoSigs: true, NoLog: true}}
	b.start()
	b.opts.Port = b.srv.Addr().(*net.TCPAddr).Port
	b.url = b.srv.ClientURL()
	t.Cleanup(b.stop)
	nc := b.conn()
	js, _ := jetstream.New(nc)
	if _, err := EnsureStream(context.Background(), js, StreamSettings{Name: "FLOWS", Prefix: "flows", Duplicates: time.Minute}); err != nil {
		t.Fatal(err)
	}
	return b
}

func (b *bus) start() {
	srv, err := server.NewServer(b.opts)
	if err != nil {
		b.t.Fatal(err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(5 * time.Second) {
		b.t.Fatal("server did not start")
	}
	b.srv = srv
}

func (b *bus) stop() {
	if b.srv != nil {
		b.srv.Shutdown()
		b.srv.WaitForShutdown()
		b.srv = nil
	}
}

func (b *bus) conn() *nats.Conn {
	nc, err := nats.Connect(b.url, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond), nats.RetryOnFailedConnect(true))
	if err != nil {
		b.t.Fatal(err)
	}
	b.t.Cleanup(nc.Close)
	return nc
}

func fastRetry(cfg Config) Config {
	cfg.AckTimeout = 300 * time.Millisecond
	cfg.RetryBackoff = 20 * time.Millisecond
	cfg.MaxBackoff = 100 * time.Millisecond
	return cfg
}

// Past the memory bound batches go to the spool, and after the outage they
// all reach the stream once, in order.
func TestOutageSpillsToSpoolInOrder(t *testing.T) {
	b := newBus(t)
	sp, err := spool.Open(t.TempDir(), 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	p := newPub(t, b.conn(), fastRetry(Config{MaxEvents: 50, Linger: 5 * time.Millisecond, QueueBytes: 8 << 10, Spool: sp}))
	b.stop()
	const n = 5000
	for i := 0; i < n; i++ {
		p.Add(event(i, schema.Outgoing))
	}
	p.Flush()
	st := p.Stats()
	if st.SpoolBatches == 0 || st.PendingBytes > 8<<10+4096 {
		t.Fatalf("during the outage: %d batches spooled, %d bytes in memory (bound %d)", st.SpoolBatches, st.PendingBytes, 8<<10)
	}
	b.start()
	waitAcked(t, p, n)
	closePub(t, p)
	if sp.Len() != 0 {
		t.Errorf("spool still holds %d batches", sp.Len())
	}
	msgs := fetchAll(t, must(jetstream.New(b.conn())))
	var got int
	var last uint64
	seen := map[uint64]bool{}
	for _, m := range msgs {
		if seen[m.batch.Seq] {
			t.Fatalf("batch %d stored twice", m.batch.Seq)
		}
		seen[m.batch.Seq] = true
		if m.batch.PrevSeq != last {
			t.Fatalf("batch %d stored after %d, prev_seq %d: out of order", m.batch.Seq, last, m.batch.PrevSeq)
		}
		last = m.batch.Seq
		got += len(m.batch.Events)
	}
	if got != n || p.Stats().Drops.Total() != 0 {
		t.Errorf("stream holds %d events, want %d; drops %+v", got, n, p.Stats().Drops)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// A shutdown while NATS is down keeps the unacknowledged batches in the
// spool; the next run sends them with their original message ids.
func TestCloseSpoolsLeftoversForNextRun(t *testing.T) {
	b := newBus(t)
	dir := t.TempDir()
	sp, _ := spool.Open(dir, 64<<20)
	p := newPub(t, b.conn(), fastRetry(Config{MaxEvents: 10, Linger: 5 * time.Millisecond, Spool: sp}))
	b.stop()
	for i := 0; i < 95; i++ {
		p.Add(event(i, schema.Incoming))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := p.Close(ctx); err != nil {
		t.Fatalf("close: %v", err)
	}
	if sp.Events() != 95 {
		t.Fatalf("spool holds %d events after shutdown, want 95", sp.Events())
	}

	b.start()
	sp2, _ := spool.Open(dir, 64<<20)
	p2 := newPub(t, b.conn(), fastRetry(Config{RunID: "run2", Spool: sp2}))
	waitAcked(t, p2, 95)
	closePub(t, p2)
	msgs := fetchAll(t, must(jetstream.New(b.conn())))
	got := 0
	for _, m := range msgs {
		if m.batch.RunID != "run1" {
			t.Errorf("spooled batch arrived as run %s", m.batch.RunID)
		}
		got += len(m.batch.Events)
	}
	if got != 95 {
		t.Errorf("stream holds %d events, want 95", got)
	}
}

// A spool that is too small drops whole batches, exactly counted, and the
// count reaches the stream in the next batch that fits.
func TestSpoolFullDropIsCountedAndReported(t *testing.T) {
	b := newBus(t)
	sp, _ := spool.Open(t.TempDir(), 3000)
	p := newPub(t, b.conn(), fastRetry(Config{MaxEvents: 100, Linger: time.Hour, QueueBytes: 1, Spool: sp}))
	b.stop()
	for i := 0; i < 1000; i++ {
		p.Add(event(i, schema.Outgoing))
	}
	spooled := sp.Events()
	dropped := p.Stats().Drops.Spool
	if spooled == 0 || dropped == 0 || uint64(spooled)+dropped != 1000 {
		t.Fatalf("spooled %d + dropped %d events, want 1000 with both > 0", spooled, dropped)
	}
	b.start()
	waitAcked(t, p, uint64(spooled))
	// Room again: the next batch carries the count.
	for i := 0; i < 100; i++ {
		p.Add(event(i, schema.Outgoing))
	}
	waitAcked(t, p, uint64(spooled)+100)
	closePub(t, p)
	var reported uint64
	for _, m := range fetchAll(t, must(jetstream.New(b.conn()))) {
		reported += m.batch.Drops.Spool
	}
	if reported != dropped {
		t.Errorf("batches report %d spool drops, the publisher counted %d", reported, dropped)
	}
}

// A spool file that cannot be read back loses its batch: the loss is counted
// with the batch's own event count (from the spool's index), and carried by
// the next batch like every other drop.
func TestUnreadableSpoolFileIsCountedExactly(t *testing.T) {
	b := newBus(t)
	dir := t.TempDir()
	sp, err := spool.Open(dir, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	p := newPub(t, b.conn(), fastRetry(Config{MaxEvents: 100, Linger: time.Hour, QueueBytes: 1, Spool: sp}))
	b.stop()
	for i := 0; i < 300; i++ {
		p.Add(event(i, schema.Outgoing))
	}
	if sp.Len() != 3 {
		t.Fatalf("%d batches spooled, want 3", sp.Len())
	}
	var files []string
	des, _ := os.ReadDir(dir)
	for _, de := range des {
		if strings.HasSuffix(de.Name(), ".batch") {
			files = append(files, de.Name())
		}
	}
	sort.Strings(files)
	// The middle batch's bytes rot on disk.
	if err := os.WriteFile(filepath.Join(dir, files[1]), []byte("FBSP1\nrotten"), 0o600); err != nil {
		t.Fatal(err)
	}
	b.start()
	waitAcked(t, p, 200)
	if d := p.Stats().Drops.Spool; d != 100 {
		t.Fatalf("spool drops %d, want exactly the 100 events of the unreadable batch", d)
	}
	for i := 0; i < 100; i++ {
		p.Add(event(i, schema.Outgoing))
	}
	waitAcked(t, p, 300)
	closePub(t, p)
	var reported uint64
	for _, m := range fetchAll(t, must(jetstream.New(b.conn()))) {
		reported += m.batch.Drops.Spool
	}
	if reported != 100 {
		t.Errorf("batches report %d spool drops, want 100", reported)
	}
}

// A server with a max_payload below FLOWBUS_BATCH_MAX_BYTES would refuse
// every batch: the publisher seals them small enough instead, and loses
// nothing.
func TestBatchesFitTheServersMaxPayload(t *testing.T) {
	b := newBus(t)
	b.stop()
	b.opts.MaxPayload = 8192
	b.start()
	nc := b.conn()
	if !nc.IsConnected() {
		deadline := time.Now().Add(5 * time.Second)
		for !nc.IsConnected() && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
	}
	p := newPub(t, nc, Config{MaxEvents: 4096, Linger: 50 * time.Millisecond})
	for i := 0; i < 3000; i++ {
		p.Add(event(i, schema.Outgoing))
	}
	waitAcked(t, p, 3000)
	closePub(t, p)
	if st := p.Stats(); st.Drops.Total() != 0 || st.PublishErrors != 0 {
		t.Fatalf("drops %+v, publish errors %d: batches did not fit max_payload 8192", st.Drops, st.PublishErrors)
	}
	msgs := fetchAll(t, must(jetstream.New(nc)))
	n := 0
	for _, m := range msgs {
		n += len(m.batch.Events)
	}
	if n != 3000 || len(msgs) < 3 {
		t.Fatalf("%d events in %d batches, want 3000 in several batches", n, len(msgs))
	}
}
