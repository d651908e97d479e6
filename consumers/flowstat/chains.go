package flowstat

import "github.com/flowbus/flowbus/consumers/flowstat/store"

// chainEntry is what the consumer keeps of one batch chain: its state and its holes (sorted by From).
type chainEntry struct {
	cs    store.ChainState
	holes []store.Hole
}

type chainSlot struct {
	key store.RunKey
	e   chainEntry
	ref bool // used since the clock hand last passed
}

// chainCache holds at most max chains, evicting by the clock algorithm (second chance): a hit only
// sets the slot's reference bit, so the common path (the next batch of a chain in memory) costs one map
// read and no list surgery or allocation, as before the bound; the hand clears bits as it sweeps and
// evicts the first chain not used since its last pass. A chain enters unreferenced, so a flood of
// chains seen once (a publisher inventing run ids) replaces itself instead of the chains that keep
// sending. Evicting loses nothing: a chain's pending changes are in the delta and its committed state
// in the database, where the aggregator reads it again (aggregator.lookup).
type chainCache struct {
	max       int
	at        map[store.RunKey]int // index into ring
	ring      []chainSlot
	hand      int
	evictions uint64
	// complete: the cache holds every chain the database and the delta hold (it was loaded whole at
	// start and never evicted since), so a miss is a chain never seen, with no lookup.
	complete bool
}

func newChainCache(max int) *chainCache {
	return &chainCache{max: max, at: make(map[store.RunKey]int, min(max, 4096))}
}

func (c *chainCache) len() int { return len(c.ring) }

// get returns chain k and marks it used.
func (c *chainCache) get(k store.RunKey) (chainEntry, bool) {
	i, ok := c.at[k]
	if !ok {
		return chainEntry{}, false
	}
	s := &c.ring[i]
	s.ref = true
	return s.e, true
}

// put stores chain k, evicting another when the cache is full and k is new.
func (c *chainCache) put(k store.RunKey, e chainEntry) {
	if i, ok := c.at[k]; ok {
		c.ring[i].e = e
		return
	}
	if len(c.ring) < c.max {
		c.at[k] = len(c.ring)
		c.ring = append(c.ring, chainSlot{key: k, e: e})
		return
	}
	// Ends within two sweeps: the first clears every bit.
	for {
		s := &c.ring[c.hand]
		if s.ref {
			s.ref = false
			c.hand = (c.hand + 1) % len(c.ring)
			continue
		}
		delete(c.at, s.key)
		*s = chainSlot{key: k, e: e}
		c.at[k] = c.hand
		c.hand = (c.hand + 1) % len(c.ring)
		c.evictions++
		c.complete = false
		return
	}
}

// dropBefore removes the chains last active before ns (unix), as the database's retention pruned them
// (so a complete cache stays complete).
func (c *chainCache) dropBefore(ns int64) {
	kept := c.ring[:0]
	for _, s := range c.ring {
		if s.e.cs.Stored < ns {
			delete(c.at, s.key)
			continue
		}
		c.at[s.key] = len(kept)
		kept = append(kept, s)
	}
	clear(c.ring[len(kept):]) // release the dropped chains' strings and holes
	c.ring = kept
	c.hand = 0
}
