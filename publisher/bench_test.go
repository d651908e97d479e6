package publisher

import (
	"testing"
	"time"

	"github.com/flowbus/flowbus/schema"
)

// BenchmarkAdd is the reader's per-event cost of handing an event to the
// publisher: batch append and incremental encoding, with batches sealed and
// published to a real in-process JetStream as they fill.
func BenchmarkAdd(b *testing.B) {
	_, nc, _ := natsServer(b)
	p := newPub(b, nc, Config{Linger: time.Hour})
	defer closePub(b, p)
	evs := make([]*schema.Event, 1024)
	for i := range evs {
		evs[i] = event(i, schema.Direction(1+i%2))
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		ev := evs[i&1023]
		ev.SrcPort = uint16(i)
		p.Add(ev)
		i++
		if i%65536 == 0 { // keep within the queue bound: the figure is Add, not drops
			for p.Stats().PendingBytes > DefaultQueueBytes/4 {
				time.Sleep(time.Millisecond)
			}
		}
	}
	b.StopTimer()
	if d := p.Stats().Drops.Total(); d != 0 {
		b.Fatalf("%d events dropped", d)
	}
}
