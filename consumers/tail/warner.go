package tail

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"

	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/schema"
)

// warner writes warnings, reporting each kind of bad message once per subject and counting the rest, so
// a flood of foreign messages cannot drown the output.
type warner struct {
	mu    sync.Mutex // printf is also called from NATS connection callbacks
	out   io.Writer
	skips map[skipKey]*skipCount
	order []skipKey
}

type skipKey struct{ subject, reason string }

type skipCount struct{ n uint64 }

// maxSkipKeys bounds the skip table: a foreign publisher could use endless subjects.
const maxSkipKeys = 1024

func newWarner(out io.Writer) *warner {
	if out == nil {
		out = io.Discard
	}
	return &warner{out: out, skips: make(map[skipKey]*skipCount)}
}

// printf escapes and bounds every string and error argument: they can hold what a publisher wrote
// (a subject, a host, a run id, a decode error quoting the batch). The format is ours.
func (w *warner) printf(format string, args ...any) {
	for i, a := range args {
		switch v := a.(type) {
		case string:
			args[i] = stream.Escape(v, stream.MaxLog)
		case error:
			args[i] = stream.Escape(v.Error(), stream.MaxLog)
		}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	fmt.Fprintf(w.out, format, args...)
}

// line writes one line that is escaped already (stream.Restart's texts), adding the newline.
func (w *warner) line(s string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	fmt.Fprintln(w.out, s)
}

// skipReason classifies a decode error into a short, stable reason; the full error text can contain
// offsets that differ per message, so it is shown once but not used as the key.
func skipReason(err error) string {
	switch {
	case errors.Is(err, schema.ErrUnsupportedMajor):
		return "unsupported schema version"
	case errors.Is(err, schema.ErrSubjectMismatch):
		return "batch for another host or direction than its subject"
	case errors.Is(err, schema.ErrMalformed):
		return "not a valid flowbus batch"
	}
	return "undecodable"
}

func (w *warner) skip(subject string, streamSeq uint64, err error) {
	k := skipKey{subject, skipReason(err)}
	if c, ok := w.skips[k]; ok {
		c.n++
		// A live tail may never reach its exit summary: repeat the count at 10, 100, 1000, ...
		if isPow10(c.n) {
			w.printf("warning: skipped %d messages on %s so far: %s\n", c.n, subject, k.reason)
		}
		return
	}
	if len(w.skips) < maxSkipKeys {
		w.skips[k] = &skipCount{n: 1}
		w.order = append(w.order, k)
	}
	hint := ""
	// The end and begin decoders' refusals say themselves what to do.
	if k.reason == "unsupported schema version" && !strings.Contains(err.Error(), "upgrade") && !strings.Contains(err.Error(), "decode it with") {
		hint = " (upgrade this consumer)"
	}
	w.printf("warning: skipping message %d on %s: %s: %v%s; further such messages on this subject are counted\n",
		streamSeq, subject, k.reason, err, hint)
}

func isPow10(n uint64) bool {
	if n < 10 {
		return false
	}
	for n%10 == 0 {
		n /= 10
	}
	return n == 1
}

// summary reports the counts of skipped messages that were not shown individually.
func (w *warner) summary() {
	for _, k := range w.order {
		if c := w.skips[k]; c.n > 1 {
			w.printf("warning: skipped %d messages on %s: %s\n", c.n, k.subject, k.reason)
		}
	}
}
