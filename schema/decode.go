package schema

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"slices"
)

// Minimum encoded sizes, used to cap preallocation by the bytes actually left: a hostile length prefix
// can never cause an allocation larger than the message justifies.
const (
	minRowSize      = 1 + rowLen // fixarray header and six one-byte elements
	minEndpointSize = 3          // fixarray header, empty string, empty array
)

// Top-level key indexes, for the position table.
const (
	tkMajor = iota
	tkMinor
	tkHost
	tkDir
	tkRunID
	tkSeq
	tkT0
	tkDrops
	tkEndpoints
	tkCtx
	tkEvents
	tkPrevSeq
	tkPrevRun
	tkEvent // end batches only
)

var topKeys = [numTopKeys + 1]string{keySchemaMajor, keySchemaMinor, keyHost, keyConnDirection, keyRunID,
	keySeq, keyT0, keyDrops, keyEndpoints, keyCtx, keyEvents, keyPrevSeq, keyPrevRun, keyEvent}

// Bounds on the strings of a batch, in bytes. A longer string makes the batch malformed: nothing read
// from the stream may grow a consumer's memory, database or terminal line without limit (schema/FORMAT.md).
const (
	MaxHostLen        = 64  // the host token, as in the subject
	MaxRunIDLen       = 64  // the agent writes 16 hex digits
	MaxDirectionLen   = 16  // "outgoing" or "incoming"
	MaxAddrLen        = 64  // IPv6 text (at most 45) with a %zone
	MaxDNSNameLen     = 253 // the longest DNS name in text form
	MaxCommLen        = 16  // the kernel's TASK_COMM_LEN
	MaxContainerIDLen = 64  // 64 hex digits
	MaxKeyLen         = 64  // any map key, known or not
)

func malformed(where string, err error) error {
	return fmt.Errorf("%w: %s: %v", ErrMalformed, where, err)
}

type endpoint struct {
	addr  netip.Addr
	names []string
}

// DecodeBatch decodes one batch message into into, reusing the capacity of into.Events (whose previous
// contents are overwritten). Keys may come in any order; unknown top-level keys, unknown ctx and drops
// keys, and extra trailing row elements are ignored (that is how minor versions add fields). A major
// other than Major fails with ErrUnsupportedMajor (an end batch, major EndMajor, says so: it is read
// with DecodeEndBatch); every structural problem fails with ErrMalformed.
// DNS name slices are shared by the events of one batch that have the same endpoint. On error, into
// holds partial results.
func DecodeBatch(data []byte, into *Batch) error {
	var h head
	if err := decodeHead(data, KindBegin, &h); err != nil {
		return err
	}
	into.Major, into.Minor, into.Host, into.Direction, into.RunID = Major, h.minor, h.host, h.dir, h.runID
	into.Seq, into.PrevSeq, into.PrevRun, into.Drops = h.seq, h.prevSeq, h.prevRun, h.drops
	return decodeEvents(&h.events, into, h.t0, h.eps, h.ctxs)
}

// head is what batches of both kinds share: the decoded top level, and a reader at the events.
type head struct {
	minor        int
	host, runID  string
	dir          Direction
	seq, prevSeq uint64
	t0           int64
	prevRun      *RunLink
	drops        Drops
	eps          []endpoint
	ctxs         []ctxKey
	events       reader
}

// decodeHead decodes the top level of a batch of kind, all but the event rows.
func decodeHead(data []byte, kind Kind, h *head) error {
	keys := topKeys[:numTopKeys] // a begin batch's event key is an unknown key, as it was in 1.0
	want := Major
	if kind == KindEnd {
		keys, want = topKeys[:], EndMajor
	}
	r := reader{b: data}
	n, err := r.readLen(true)
	if err != nil {
		return malformed("batch", err)
	}
	// Pass 1: find every known key's value, so keys may come in any order, and check the major first.
	var pos [numTopKeys + 1]int
	for i := range pos {
		pos[i] = -1
	}
	for i := 0; i < n; i++ {
		kb, err := readBounded(&r, MaxKeyLen)
		if err != nil {
			return malformed(fmt.Sprintf("top-level key #%d", i), err)
		}
		k := -1
		for j, name := range keys {
			if string(kb) == name {
				k = j
				break
			}
		}
		if k >= 0 {
			if pos[k] >= 0 {
				return malformed(topKeys[k], errors.New("duplicate key"))
			}
			pos[k] = r.p
		}
		if k == tkMajor {
			major, err := r.readInt()
			if err != nil {
				return malformed(keySchemaMajor, err)
			}
			if major != int64(want) {
				return majorError(kind, major)
			}
			continue
		}
		if err := r.skipValue(1, k < 0); err != nil { // known values: pass 2 checks them closer
			where := "value of unknown key " + fmt.Sprintf("%q", kb)
			if k >= 0 {
				where = topKeys[k]
			}
			return malformed(where, err)
		}
	}
	if r.rem() != 0 {
		return malformed("batch", fmt.Errorf("%d trailing bytes after the top-level map", r.rem()))
	}
	required := []int{tkMajor, tkMinor, tkHost, tkDir, tkRunID, tkSeq, tkPrevSeq, tkT0, tkEndpoints, tkEvents}
	if kind == KindEnd {
		required = append(required, tkEvent)
	}
	for _, k := range required {
		if pos[k] < 0 {
			return malformed(topKeys[k], errors.New("missing key"))
		}
	}

	// Pass 2: decode the known values in dependency order.
	at := func(k int) *reader { return &reader{b: data, p: pos[k]} }
	if kind == KindEnd {
		ev, err := readBounded(at(tkEvent), MaxEventLen)
		if err == nil && string(ev) != EndEventName {
			err = fmt.Errorf("event %q in a schema major %d batch, want %q", ev, EndMajor, EndEventName)
		}
		if err != nil {
			return malformed(keyEvent, err)
		}
	}
	minor, err := at(tkMinor).readInt()
	if err != nil {
		return malformed(keySchemaMinor, err)
	}
	if minor < 0 || minor > math.MaxInt32 {
		return malformed(keySchemaMinor, fmt.Errorf("invalid minor %d", minor))
	}
	h.minor = int(minor)
	if h.host, err = readString(at(tkHost), MaxHostLen); err != nil {
		return malformed(keyHost, err)
	}
	dir, err := readBounded(at(tkDir), MaxDirectionLen)
	if err != nil {
		return malformed(keyConnDirection, err)
	}
	if h.dir, err = ParseDirection(string(dir)); err != nil {
		return malformed(keyConnDirection, err)
	}
	if h.runID, err = readString(at(tkRunID), MaxRunIDLen); err != nil {
		return malformed(keyRunID, err)
	}
	if h.seq, err = at(tkSeq).readUint(math.MaxUint64); err != nil {
		return malformed(keySeq, err)
	}
	if h.prevSeq, err = at(tkPrevSeq).readUint(math.MaxUint64); err != nil {
		return malformed(keyPrevSeq, err)
	}
	h.prevRun = nil
	if pos[tkPrevRun] >= 0 && !at(tkPrevRun).isNil() { // nil: absent
		if h.prevSeq != 0 {
			return malformed(keyPrevRun, fmt.Errorf("on a batch with prev_seq %d: only the first batch of a direction (prev_seq 0) carries it", h.prevSeq))
		}
		if h.prevRun, err = decodeRunLink(at(tkPrevRun)); err != nil {
			return err
		}
	}
	t0, err := at(tkT0).readInt()
	if err != nil {
		return malformed(keyT0, err)
	}
	h.t0 = t0
	h.drops = Drops{}
	if pos[tkDrops] >= 0 {
		if err := decodeDrops(at(tkDrops), &h.drops); err != nil {
			return err
		}
	}
	if h.eps, err = decodeEndpoints(at(tkEndpoints)); err != nil {
		return err
	}
	if pos[tkCtx] >= 0 {
		if h.ctxs, err = decodeCtxs(at(tkCtx)); err != nil {
			return err
		}
	}
	h.events = *at(tkEvents)
	return nil
}

// majorError is the refusal of a batch whose major the decoder of kind does not read. Both name the
// major seen and the one supported, and where the batch belongs: an end batch (major 2) read as a
// begin batch says a newer flowbus reads it (DecodeEndBatch); anything else says to upgrade.
func majorError(kind Kind, major int64) error {
	if kind == KindBegin && major == EndMajor {
		return fmt.Errorf("%w: flowbus batch schema major %d is not supported by this consumer (supports %d): it is a %s batch, read by a newer flowbus consumer (schema.DecodeEndBatch, subjects <prefix>.<host>.<direction>.end): upgrade the consumer, or subscribe to begin subjects only",
			ErrUnsupportedMajor, major, Major, EndEventName)
	}
	if kind == KindEnd {
		if major == Major {
			return fmt.Errorf("%w: flowbus batch schema major %d is a net_flow_tcp_begin batch, not an end batch (this decoder reads major %d): decode it with schema.DecodeBatch",
				ErrUnsupportedMajor, major, EndMajor)
		}
		return fmt.Errorf("%w: flowbus end batch schema major %d is not supported by this consumer (supports %d): upgrade the consumer",
			ErrUnsupportedMajor, major, EndMajor)
	}
	return fmt.Errorf("%w: flowbus batch schema major %d is not supported by this consumer (supports %d): upgrade the consumer",
		ErrUnsupportedMajor, major, Major)
}

func readString(r *reader, bound int) (string, error) {
	b, err := readBounded(r, bound)
	return string(b), err
}

// readBounded reads a string of at most bound bytes.
func readBounded(r *reader, bound int) ([]byte, error) {
	b, err := r.readStr()
	if err == nil && len(b) > bound {
		return nil, fmt.Errorf("string of %d bytes is longer than the bound of %d", len(b), bound)
	}
	return b, err
}

func decodeDrops(r *reader, d *Drops) error {
	n, err := r.readLen(true)
	if err != nil {
		return malformed(keyDrops, err)
	}
	var seen [len(dropKeys)]bool
	for i := 0; i < n; i++ {
		kb, err := readBounded(r, MaxKeyLen)
		if err != nil {
			return malformed(fmt.Sprintf("drops key #%d", i), err)
		}
		k := -1
		for j, name := range dropKeys {
			if string(kb) == name {
				k = j
				break
			}
		}
		if k < 0 {
			if err := r.skip(2); err != nil {
				return malformed(fmt.Sprintf("drops[%q]", kb), err)
			}
			continue
		}
		if seen[k] {
			return malformed(fmt.Sprintf("drops[%q]", kb), errors.New("duplicate key"))
		}
		seen[k] = true
		v, err := r.readUint(math.MaxUint64)
		if err != nil {
			return malformed(fmt.Sprintf("drops[%q]", kb), err)
		}
		*[...]*uint64{&d.Kernel, &d.Reader, &d.Queue, &d.Spool, &d.Publish}[k] = v
	}
	return nil
}

func decodeEndpoints(r *reader) ([]endpoint, error) {
	n, err := r.readLen(false)
	if err != nil {
		return nil, malformed(keyEndpoints, err)
	}
	eps := make([]endpoint, 0, min(n, r.rem()/minEndpointSize))
	for i := 0; i < n; i++ {
		m, err := r.readLen(false)
		if err != nil {
			return nil, malformed(fmt.Sprintf("endpoints[%d]", i), err)
		}
		if m < 2 {
			return nil, malformed(fmt.Sprintf("endpoints[%d]", i), fmt.Errorf("entry has %d elements, need 2 (address, names)", m))
		}
		ab, err := readBounded(r, MaxAddrLen)
		if err != nil {
			return nil, malformed(fmt.Sprintf("endpoints[%d][0] (address)", i), err)
		}
		var ep endpoint
		if len(ab) > 0 { // "" is the zero (unknown) address
			if ep.addr, err = netip.ParseAddr(string(ab)); err != nil {
				return nil, malformed(fmt.Sprintf("endpoints[%d][0] (address)", i), err)
			}
		}
		k, err := r.readLen(false)
		if err != nil {
			return nil, malformed(fmt.Sprintf("endpoints[%d][1] (names)", i), err)
		}
		if k > 0 {
			ep.names = make([]string, k)
			for j := range ep.names {
				if ep.names[j], err = readString(r, MaxDNSNameLen); err != nil {
					return nil, malformed(fmt.Sprintf("endpoints[%d][1][%d] (name)", i, j), err)
				}
			}
		}
		for j := 2; j < m; j++ {
			if err := r.skip(2); err != nil {
				return nil, malformed(fmt.Sprintf("endpoints[%d][%d]", i, j), err)
			}
		}
		eps = append(eps, ep)
	}
	return eps, nil
}

func decodeCtxs(r *reader) ([]ctxKey, error) {
	n, err := r.readLen(false)
	if err != nil {
		return nil, malformed(keyCtx, err)
	}
	ctxs := make([]ctxKey, 0, n) // n <= bytes left, and a ctxKey is small
	for i := 0; i < n; i++ {
		m, err := r.readLen(true)
		if err != nil {
			return nil, malformed(fmt.Sprintf("ctx[%d]", i), err)
		}
		var c ctxKey
		var seen [5]bool
		for j := 0; j < m; j++ {
			kb, err := readBounded(r, MaxKeyLen)
			if err != nil {
				return nil, malformed(fmt.Sprintf("ctx[%d] key #%d", i, j), err)
			}
			f := -1
			switch string(kb) {
			case "cgroup_id":
				f = 0
			case "pid":
				f = 1
			case "comm":
				f = 2
			case "container_id":
				f = 3
			case "uid":
				f = 4
			}
			where := func() string { return fmt.Sprintf("ctx[%d][%q]", i, kb) }
			if f < 0 {
				if err := r.skip(2); err != nil {
					return nil, malformed(where(), err)
				}
				continue
			}
			if seen[f] {
				return nil, malformed(where(), errors.New("duplicate key"))
			}
			seen[f] = true
			if r.isNil() { // unknown, as if absent
				r.p++
				continue
			}
			var v uint64
			switch f {
			case 0:
				c.cgroupID, err = r.readUint(math.MaxUint64)
			case 1:
				v, err = r.readUint(math.MaxUint32)
				c.pid = uint32(v)
			case 2:
				c.comm, err = readString(r, MaxCommLen)
			case 3:
				c.containerID, err = readString(r, MaxContainerIDLen)
			case 4:
				v, err = r.readUint(math.MaxUint32)
				c.uid, c.hasUID = uint32(v), err == nil
			}
			if err != nil {
				return nil, malformed(where(), err)
			}
		}
		ctxs = append(ctxs, c)
	}
	return ctxs, nil
}

func decodeEvents(r *reader, into *Batch, t0 int64, eps []endpoint, ctxs []ctxKey) error {
	n, err := r.readLen(false)
	if err != nil {
		return malformed(keyEvents, err)
	}
	into.Events = slices.Grow(into.Events[:0], min(n, r.rem()/minRowSize))
	for i := 0; i < n; i++ {
		var rs rowStart
		if err := readRowStart(r, i, rowLen, eps, ctxs, &rs); err != nil {
			return err
		}
		ev := Event{
			Timestamp: t0 + rs.dt,
			Direction: into.Direction,
			Src:       rs.src.addr,
			Dst:       rs.dst.addr,
			SrcPort:   rs.sport,
			DstPort:   rs.dport,
			SrcDNS:    rs.src.names,
			DstDNS:    rs.dst.names,
		}
		if k := rs.ctx; k != nil {
			ev.CgroupID, ev.PID, ev.Comm, ev.ContainerID = k.cgroupID, k.pid, k.comm, k.containerID
			ev.UID, ev.UIDKnown = k.uid, k.hasUID
		}
		if err := skipRowRest(r, i, rowLen, rs.n); err != nil {
			return err
		}
		into.Events = append(into.Events, ev)
	}
	return nil
}

// rowStart is the six elements every row starts with, begin or end.
type rowStart struct {
	src, dst     *endpoint
	sport, dport uint16
	dt           int64
	ctx          *ctxKey // nil: unknown
	n            int     // elements in the row
}

// readRowStart reads the header of row i, which must have at least need elements, and its first six.
func readRowStart(r *reader, i, need int, eps []endpoint, ctxs []ctxKey, rs *rowStart) error {
	m, err := r.readLen(false)
	if err != nil {
		return malformed(fmt.Sprintf("events[%d]", i), err)
	}
	if m < need {
		return malformed(fmt.Sprintf("events[%d]", i), fmt.Errorf("row has %d elements, need %d", m, need))
	}
	rs.n = m
	var v [4]uint64
	for j, lim := range [4]uint64{uint64(len(eps)), uint64(len(eps)), math.MaxUint16 + 1, math.MaxUint16 + 1} {
		if v[j], err = r.readUint(math.MaxUint64); err == nil && v[j] >= lim {
			if j < 2 {
				err = fmt.Errorf("reference %d out of range (%d endpoints)", v[j], len(eps))
			} else {
				err = fmt.Errorf("port %d out of range", v[j])
			}
		}
		if err != nil {
			return malformed(fmt.Sprintf("events[%d][%d] (%s)", i, j, rowFields[j]), err)
		}
	}
	rs.src, rs.dst, rs.sport, rs.dport = &eps[v[0]], &eps[v[1]], uint16(v[2]), uint16(v[3])
	if rs.dt, err = r.readInt(); err != nil {
		return malformed(fmt.Sprintf("events[%d][4] (dt_ns)", i), err)
	}
	rs.ctx = nil
	if r.isNil() {
		r.p++
		return nil
	}
	c, err := r.readUint(math.MaxUint64)
	if err == nil && c >= uint64(len(ctxs)) {
		err = fmt.Errorf("reference %d out of range (%d ctx entries)", c, len(ctxs))
	}
	if err != nil {
		return malformed(fmt.Sprintf("events[%d][5] (ctx_ref)", i), err)
	}
	rs.ctx = &ctxs[c]
	return nil
}

// skipRowRest skips the elements of row i past the known ones (a later minor's).
func skipRowRest(r *reader, i, from, m int) error {
	for j := from; j < m; j++ {
		if err := r.skip(2); err != nil {
			return malformed(fmt.Sprintf("events[%d][%d]", i, j), err)
		}
	}
	return nil
}

var rowFields = [...]string{"src_ref", "dst_ref", "src_port", "dst_port", "dt_ns", "ctx_ref"}

// Batch is a decoded message.
type Batch struct {
	Major, Minor int
	Host         string
	Direction    Direction
	RunID        string
	Seq          uint64
	PrevSeq      uint64   // seq of the previous batch of this direction from this run, 0 for the first
	PrevRun      *RunLink // the previous run of this host (schema 1.1, first batches only); nil when absent
	Drops        Drops
	Events       []Event // each has Direction set from the batch
}
