package bpf

import (
	"time"

	"golang.org/x/sys/unix"
)

// wallClock converts the kernel's CLOCK_MONOTONIC (bpf_ktime_get_ns) to
// wall-clock time. The offset is measured again on every poll, so that
// clock steps are followed, from the tightest of a few readings of the
// monotonic clock on both sides of one wall-clock reading: a goroutine
// preempted between two plain readings would put every event until the
// next poll off by the time it waited (milliseconds on a busy host).
type wallClock struct{ offset int64 }

func newWallClock() *wallClock {
	w := &wallClock{}
	w.refresh()
	return w
}

// clockSamples is how many brackets refresh takes; clockGoodEnough ends it
// early, and a bracket wider than clockMaxBracket is not trusted over the
// offset already held.
const (
	clockSamples    = 5
	clockGoodEnough = 2 * time.Microsecond
	clockMaxBracket = 50 * time.Microsecond
)

func (w *wallClock) refresh() {
	best, offset := int64(-1), int64(0)
	for i := 0; i < clockSamples; i++ {
		var a, b unix.Timespec
		_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &a)
		now := time.Now().UnixNano()
		_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &b)
		width := b.Nano() - a.Nano()
		if best < 0 || width < best {
			best, offset = width, now-(a.Nano()+width/2)
		}
		if width <= int64(clockGoodEnough) {
			break
		}
	}
	if w.offset == 0 || best <= int64(clockMaxBracket) {
		w.offset = offset
	}
}

func (w *wallClock) wall(mono uint64) int64 { return int64(mono) + w.offset }
