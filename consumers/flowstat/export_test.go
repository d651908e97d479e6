package flowstat

import "time"

// ErrCrashed is returned by Run when SetCrashAfter triggers.
var ErrCrashed = errCrashed

// SetCrashAfter makes Run return ErrCrashed right after folding n messages in, without committing the
// pending chunk, as if the process died; 0 disables.
func SetCrashAfter(o *Options, n int) { o.crashAfter = n }

// ObserveChains makes Run call f with the number of chains in memory at start and after every message.
func ObserveChains(o *Options, f func(inMemory int)) { o.chainsObserved = f }

// SetChainPruneEvery makes a running consumer prune inactive chain state every d (after a commit) until
// restore is called.
func SetChainPruneEvery(d time.Duration) (restore func()) {
	old := chainPruneEvery
	chainPruneEvery = d
	return func() { chainPruneEvery = old }
}
