package schema

import (
	"errors"
	"fmt"
	"math"
)

// RunLink names the previous run of the same host, carried (as prev_run) by the first batch of each
// direction of a run, so a consumer can tell how the previous run ended, how many of its batches never
// arrived and how long capture was down (FORMAT.md, "prev_run").
type RunLink struct {
	RunID   string // the previous run's id (at most MaxRunIDLen bytes, never empty)
	LastSeq uint64 // seq of the last batch of THIS direction the previous run sealed (0: none)
	Batches uint64 // batches of this direction the previous run sealed
	Events  uint64 // events in those batches
	LastNs  int64  // unix ns up to which the previous run is known to have been capturing (T1)
	StartNs int64  // unix ns at which this run's capture started (T2)
	End     string // how the previous run ended: RunEndStopped or RunEndUnknown (at most MaxRunEndLen bytes)
}

// How a previous run ended (RunLink.End). A consumer treats any other value (a later minor may add
// some) as RunEndUnknown.
const (
	RunEndStopped = "stopped" // clean shutdown: every batch it sealed was acknowledged or spooled
	RunEndUnknown = "unknown" // killed or crashed: its last batches may never have been published
)

// MaxRunEndLen bounds RunLink.End on the wire, in bytes.
const MaxRunEndLen = 16

// Keys of the prev_run map, in the order the encoder writes them.
const (
	keyPrevRun   = "prev_run"
	rlRunID      = "run_id"
	rlLastSeq    = "last_seq"
	rlBatches    = "batches"
	rlEvents     = "events"
	rlLastNs     = "last_ns"
	rlStartNs    = "start_ns"
	rlEnd        = "end"
	numRunLinkKs = 7
)

var runLinkKeys = [numRunLinkKs]string{rlRunID, rlLastSeq, rlBatches, rlEvents, rlLastNs, rlStartNs, rlEnd}

// runLinkMax bounds the encoded size of a prev_run key and value.
var runLinkMax = 1 + len(keyPrevRun) + 1 + // key, fixmap header
	len(rlRunID) + len(rlLastSeq) + len(rlBatches) + len(rlEvents) + len(rlLastNs) + len(rlStartNs) + len(rlEnd) + numRunLinkKs + // keys (fixstr)
	maxHeaderLen + MaxRunIDLen + maxHeaderLen + MaxRunEndLen + 5*maxUintLen

// Validate reports a link the encoder cannot write: an empty or too long run id, a too long End.
func (l *RunLink) Validate() error {
	switch {
	case l.RunID == "":
		return errors.New("previous run link without a run id")
	case len(l.RunID) > MaxRunIDLen:
		return fmt.Errorf("previous run id of %d bytes is longer than the bound of %d", len(l.RunID), MaxRunIDLen)
	case len(l.End) > MaxRunEndLen:
		return fmt.Errorf("previous run end %q is longer than the bound of %d bytes", l.End, MaxRunEndLen)
	}
	return nil
}

func appendRunLink(dst []byte, l *RunLink) []byte {
	dst = appendMapHeader(dst, numRunLinkKs)
	dst = appendStr(dst, rlRunID)
	dst = appendStr(dst, l.RunID)
	dst = appendStr(dst, rlLastSeq)
	dst = appendUint(dst, l.LastSeq)
	dst = appendStr(dst, rlBatches)
	dst = appendUint(dst, l.Batches)
	dst = appendStr(dst, rlEvents)
	dst = appendUint(dst, l.Events)
	dst = appendStr(dst, rlLastNs)
	dst = appendInt(dst, l.LastNs)
	dst = appendStr(dst, rlStartNs)
	dst = appendInt(dst, l.StartNs)
	dst = appendStr(dst, rlEnd)
	return appendStr(dst, l.End)
}

// decodeRunLink reads a prev_run map. Every key of schema 1.1 is required; unknown keys are ignored,
// duplicated ones are an error.
func decodeRunLink(r *reader) (*RunLink, error) {
	n, err := r.readLen(true)
	if err != nil {
		return nil, malformed(keyPrevRun, err)
	}
	var l RunLink
	var seen [numRunLinkKs]bool
	for i := 0; i < n; i++ {
		kb, err := readBounded(r, MaxKeyLen)
		if err != nil {
			return nil, malformed(fmt.Sprintf("prev_run key #%d", i), err)
		}
		k := -1
		for j, name := range runLinkKeys {
			if string(kb) == name {
				k = j
				break
			}
		}
		where := func() string { return fmt.Sprintf("prev_run[%q]", kb) }
		if k < 0 {
			if err := r.skip(2); err != nil {
				return nil, malformed(where(), err)
			}
			continue
		}
		if seen[k] {
			return nil, malformed(where(), errors.New("duplicate key"))
		}
		seen[k] = true
		switch k {
		case 0:
			l.RunID, err = readString(r, MaxRunIDLen)
			if err == nil && l.RunID == "" {
				err = errors.New("empty run id")
			}
		case 1:
			l.LastSeq, err = r.readUint(math.MaxUint64)
		case 2:
			l.Batches, err = r.readUint(math.MaxUint64)
		case 3:
			l.Events, err = r.readUint(math.MaxUint64)
		case 4:
			l.LastNs, err = r.readInt()
		case 5:
			l.StartNs, err = r.readInt()
		case 6:
			l.End, err = readString(r, MaxRunEndLen)
		}
		if err != nil {
			return nil, malformed(where(), err)
		}
	}
	for k, ok := range seen {
		if !ok {
			return nil, malformed(fmt.Sprintf("prev_run[%q]", runLinkKeys[k]), errors.New("missing key"))
		}
	}
	return &l, nil
}
