package publisher

import (
	"testing"
	"time"

	"github.com/flowbus/flowbus/schema"
)

// The first batch of each direction carries the link PrevRun gives for that direction, no later batch
// does, and OnSeal sees every sealed batch (direction, seq, events) exactly as the stream holds it.
func TestPrevRunAndOnSeal(t *testing.T) {
	_, nc, js := natsServer(t)
	links := map[schema.Direction]*schema.RunLink{
		schema.Outgoing: {RunID: "old", LastSeq: 7, Batches: 4, Events: 40, LastNs: 100, StartNs: 200, End: schema.RunEndUnknown},
		schema.Incoming: {RunID: "old", LastSeq: 6, Batches: 3, Events: 30, LastNs: 100, StartNs: 200, End: schema.RunEndUnknown},
	}
	asked := map[schema.Direction]int{}
	type seal struct {
		dir    schema.Direction
		seq    uint64
		events int
	}
	var seals []seal
	p := newPub(t, nc, Config{MaxEvents: 3, Linger: time.Hour,
		PrevRun: func(d schema.Direction) *schema.RunLink { asked[d]++; return links[d] },
		OnSeal:  func(d schema.Direction, seq uint64, events int) { seals = append(seals, seal{d, seq, events}) }})
	for i := 0; i < 10; i++ {
		p.Add(event(i, schema.Outgoing))
		if i%2 == 0 {
			p.Add(event(i, schema.Incoming))
		}
	}
	closePub(t, p)
	if asked[schema.Outgoing] != 1 || asked[schema.Incoming] != 1 {
		t.Fatalf("PrevRun asked %v, want once per direction", asked)
	}
	got := fetchAll(t, js)
	if len(got) != len(seals) {
		t.Fatalf("%d batches stored, OnSeal saw %d", len(got), len(seals))
	}
	byseq := map[uint64]seal{}
	for _, s := range seals {
		byseq[s.seq] = s
	}
	linked := map[schema.Direction]int{}
	for _, m := range got {
		b := &m.batch
		if s := byseq[b.Seq]; s.dir != b.Direction || s.events != len(b.Events) {
			t.Errorf("batch seq %d (%s, %d events): OnSeal said %+v", b.Seq, b.Direction, len(b.Events), s)
		}
		if b.PrevRun != nil {
			linked[b.Direction]++
			if b.PrevSeq != 0 || *b.PrevRun != *links[b.Direction] {
				t.Errorf("batch seq %d (prev_seq %d) carries %+v, want %+v on the first batch only", b.Seq, b.PrevSeq, b.PrevRun, links[b.Direction])
			}
		} else if b.PrevSeq == 0 {
			t.Errorf("first %s batch (seq %d) has no prev_run", b.Direction, b.Seq)
		}
	}
	if linked[schema.Outgoing] != 1 || linked[schema.Incoming] != 1 {
		t.Fatalf("batches with prev_run by direction: %v, want one each", linked)
	}
}
