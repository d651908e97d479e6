package stream

import (
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Start says where a new consumer begins reading the stream.
type Start int

const (
	// StartDefault leaves the choice to the consumer: flowtail follows new batches (StartNew),
	// flowstat reads the whole stream (StartAll), since aggregates want history.
	StartDefault Start = iota
	// StartAll reads the whole stream, then follows it.
	StartAll
	// StartNew reads only batches published after the consumer is created (a live tail).
	StartNew
	// StartTime reads batches stored at or after a start time.
	StartTime
	// StartSeq reads from a stream sequence on.
	StartSeq
)

// String is the spelling ParseStart accepts.
func (s Start) String() string {
	switch s {
	case StartDefault:
		return "default"
	case StartAll:
		return "all"
	case StartNew:
		return "new"
	case StartTime:
		return "time"
	case StartSeq:
		return "seq"
	}
	return "start(" + strconv.Itoa(int(s)) + ")"
}

// ParseStart parses all, new, time or seq; "" is all.
func ParseStart(s string) (Start, error) {
	switch s {
	case "all", "":
		return StartAll, nil
	case "new":
		return StartNew, nil
	case "time":
		return StartTime, nil
	case "seq":
		return StartSeq, nil
	}
	return 0, fmt.Errorf("start policy %q: want all, new, time (with a start time) or seq (with a stream sequence)", s)
}

// Or returns s, or def when s is StartDefault.
func (s Start) Or(def Start) Start {
	if s == StartDefault {
		return def
	}
	return s
}

// Check reports what s lacks: StartTime needs since, StartSeq a fromSeq of at least 1. StartDefault is
// valid. The messages name the Since and FromSeq fields the consumers' options give them in.
func (s Start) Check(since time.Time, fromSeq uint64) error {
	switch s {
	case StartDefault, StartAll, StartNew:
	case StartTime:
		if since.IsZero() {
			return errors.New("start policy time needs a start time (Since)")
		}
	case StartSeq:
		if fromSeq == 0 {
			return errors.New("start policy seq needs a stream sequence >= 1 (FromSeq)")
		}
	default:
		return fmt.Errorf("invalid start policy %d", s)
	}
	return nil
}

// Deliver is the JetStream deliver policy of s, with the start time or sequence it needs (nil and 0
// where it needs none). StartDefault, like StartAll, delivers everything: resolve it first with Or.
func (s Start) Deliver(since time.Time, fromSeq uint64) (jetstream.DeliverPolicy, *time.Time, uint64) {
	switch s {
	case StartNew:
		return jetstream.DeliverNewPolicy, nil, 0
	case StartTime:
		t := since
		return jetstream.DeliverByStartTimePolicy, &t, 0
	case StartSeq:
		return jetstream.DeliverByStartSequencePolicy, nil, fromSeq
	}
	return jetstream.DeliverAllPolicy, nil, 0
}
