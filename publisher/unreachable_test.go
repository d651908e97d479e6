package publisher

import (
	"context"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/flowbus/flowbus/internal/syncbuf"
	"github.com/flowbus/flowbus/publisher/spool"
	"github.com/flowbus/flowbus/schema"
)

// With NATS never reached, the log says so and names the server, instead
// of the client's "headers not supported by this server"; the batches go
// to the spool, and the stats count them there, not as acknowledged.
func TestUnreachableNATSIsNamed(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	url := "nats://" + ln.Addr().String()
	ln.Close() // nothing listens there now
	nc, err := nats.Connect(url, nats.RetryOnFailedConnect(true), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	sp, err := spool.Open(t.TempDir(), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	var log syncbuf.Buffer
	p, err := New(nc, fastRetry(Config{Host: "web-01", RunID: "run1", MaxEvents: 2, QueueBytes: 1, Spool: sp,
		ServerURL: "nats://flow:xxxxx@" + ln.Addr().String()}), slog.New(slog.NewTextHandler(&log, nil)))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		p.Add(event(i, schema.Outgoing))
	}
	// The memory bound (1 byte) sends every batch to the spool; the spool
	// is retried and fails while nothing listens.
	deadline := time.Now().Add(10 * time.Second)
	var l string
	for l = log.Take(); !strings.Contains(l, "NATS is not reachable"); l += log.Take() {
		if time.Now().After(deadline) {
			t.Fatalf("no line saying NATS is not reachable; log:\n%s", l)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if strings.Contains(l, "headers not supported") {
		t.Errorf("log blames headers:\n%s", l)
	}
	if !strings.Contains(l, "url=nats://flow:xxxxx@"+ln.Addr().String()) {
		t.Errorf("log does not name the server:\n%s", l)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	st := p.Stats()
	if st.BatchesAcked != 0 || st.Spooled != 5 || st.SpoolBatches != 5 || st.SpoolEvents != 10 {
		t.Errorf("stats: acked %d batches, spooled %d, spool holds %d batches %d events; want 0, 5, 5, 10", st.BatchesAcked, st.Spooled, st.SpoolBatches, st.SpoolEvents)
	}
}
