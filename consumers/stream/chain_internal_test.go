package stream

import (
	"strconv"
	"testing"

	"github.com/flowbus/flowbus/schema"
)

// Whatever the stream holds (a publisher making up run ids, chains with endless gaps), the tracker
// keeps at most MaxChains chains and run links and MaxHoles holes a chain.
func TestChainsBounded(t *testing.T) {
	c := NewChains()
	for i := range 3 * MaxChains {
		id := strconv.Itoa(i)
		c.Observe(&schema.Batch{Host: "h", RunID: id, Direction: schema.Outgoing, Seq: 1, PrevRun: &schema.RunLink{RunID: "prev-" + id, Batches: 3}})
		if len(c.chains) > MaxChains || len(c.links) > MaxChains {
			t.Fatalf("after %d runs: %d chains, %d links", i+1, len(c.chains), len(c.links))
		}
	}
	b := schema.Batch{Host: "h", RunID: "gappy", Direction: schema.Outgoing, Seq: 1}
	c.Observe(&b)
	for i := range 10 * MaxHoles {
		b.PrevSeq, b.Seq = b.Seq+1, b.Seq+3 // each batch skips one: a new hole
		c.Observe(&b)
		if n := len(c.chains[ChainKey{"h", "gappy", schema.Outgoing, schema.KindBegin}].holes); n > MaxHoles {
			t.Fatalf("after %d gaps: %d holes", i+1, n)
		}
	}
}
