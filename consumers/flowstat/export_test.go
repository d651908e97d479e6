package flowstat

// ErrCrashed is returned by Run when SetCrashAfter triggers.
var ErrCrashed = errCrashed

// SetCrashAfter makes Run return ErrCrashed right after folding n messages in, without committing the
// pending chunk, as if the process died; 0 disables.
func SetCrashAfter(o *Options, n int) { o.crashAfter = n }

// ObserveChains makes Run call f with the number of chains in memory at start and after every message.
func ObserveChains(o *Options, f func(inMemory int)) { o.chainsObserved = f }
