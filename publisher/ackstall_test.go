package publisher

import (
	"context"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/flowbus/flowbus/internal/syncbuf"
	"github.com/flowbus/flowbus/schema"
)

// With the stream deleted under it, the publisher keeps its batches, hands
// each failure to the reporter (which names the cause once, so the
// publisher does not warn per failure), and AckStall grows; once the stream
// is back every batch is stored once and AckStall is 0 again.
func TestAckStallAndNoStreamReporter(t *testing.T) {
	_, nc, js := natsServer(t)
	var log syncbuf.Buffer
	p, err := New(nc, fastRetry(Config{Host: "web-01", RunID: "run1", MaxEvents: 5, Linger: 10 * time.Millisecond}),
		slog.New(slog.NewTextHandler(&log, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer closePub(t, p)
	var noStream, other atomic.Int64
	p.SetFailureReporter(func(err error) bool {
		if NoStream(err) {
			noStream.Add(1)
			return true
		}
		other.Add(1)
		return false
	})
	for i := range 10 {
		p.Add(event(i, schema.Outgoing))
	}
	waitAcked(t, p, 10)
	if s := p.AckStall(); s != 0 {
		t.Errorf("AckStall %v with nothing pending, want 0", s)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := js.DeleteStream(ctx, "FLOWS"); err != nil {
		t.Fatal(err)
	}
	for i := 10; i < 30; i++ {
		p.Add(event(i, schema.Outgoing))
	}
	deadline := time.Now().Add(10 * time.Second)
	for p.AckStall() < 500*time.Millisecond || noStream.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("after 10s without the stream: AckStall %v, %d no-stream failures reported", p.AckStall(), noStream.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	stall := p.AckStall()
	if l := log.Take(); strings.Contains(l, "publish failed") {
		t.Errorf("the publisher warned about failures its reporter took:\n%s", l)
	}
	if _, err := EnsureStream(ctx, js, StreamSettings{Name: "FLOWS", Prefix: "flows", Duplicates: time.Minute, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	p.RetryNow()
	waitAcked(t, p, 30)
	if s := p.AckStall(); s != 0 {
		t.Errorf("AckStall %v once everything is acknowledged, want 0", s)
	}
	got := fetchAll(t, js)
	n := 0
	for _, m := range got {
		n += len(m.batch.Events)
	}
	t.Logf("stream missing: AckStall reached %v, %d no-stream failures reported, %d other; new stream holds %d events in %d batches",
		stall.Round(time.Millisecond), noStream.Load(), other.Load(), n, len(got))
	if n != 20 {
		t.Errorf("the recreated stream holds %d events, want the 20 published while it was missing", n)
	}
}
