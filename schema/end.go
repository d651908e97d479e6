package schema

import (
	"fmt"
	"net/netip"
	"strings"
)

// Schema version of end batches (net_flow_tcp_end). Their major differs from Major on purpose: a
// consumer of begins that reads them anyway (a flows.> subscription) rejects them as an unknown major
// instead of reading an end as a begin (FORMAT.md, "End batches").
const (
	EndMajor = 2
	EndMinor = 1
)

// EndEventName is the value of an end batch's top-level event key.
const EndEventName = "net_flow_tcp_end"

// keyEvent is the top-level key naming the event kind of an end batch.
const keyEvent = "event"

// MaxEventLen bounds the top-level event string on the wire, in bytes.
const MaxEventLen = 32

// Kind says which event a batch carries: its subject, schema major and decoder.
type Kind uint8

// Kinds. KindBegin is the zero value, so code written before end events keeps meaning begins.
const (
	KindBegin Kind = iota // net_flow_tcp_begin, schema 1.x, subject <prefix>.<host>.<direction>
	KindEnd               // net_flow_tcp_end, schema 2.x, subject <prefix>.<host>.<direction>.end
)

// String returns "begin", "end" or "unknown".
func (k Kind) String() string {
	switch k {
	case KindBegin:
		return "begin"
	case KindEnd:
		return "end"
	}
	return "unknown"
}

// EndReason says how a connection ended.
type EndReason uint8

// End reasons, with their wire code (the value) and JSON name (String).
const (
	EndUnknown          EndReason = iota // not known ("unknown"); also any code a later minor adds
	EndFIN                               // orderly: FINs both ways ("fin")
	EndRSTSent                           // this host reset it ("rst_sent")
	EndRSTReceived                       // the peer reset it ("rst_received")
	EndTimeout                           // retransmissions or keepalives gave up ("timeout")
	EndNeverEstablished                  // an incoming begin whose handshake never completed ("never_established")
	numEndReasons
)

var endReasonNames = [numEndReasons]string{"unknown", "fin", "rst_sent", "rst_received", "timeout", "never_established"}

// String returns the JSON name of r; a code this package does not know is "unknown".
func (r EndReason) String() string {
	if r < numEndReasons {
		return endReasonNames[r]
	}
	return "unknown"
}

// ParseEndReason parses a name String returns (exact, lowercase).
func ParseEndReason(s string) (EndReason, bool) {
	for i, n := range endReasonNames {
		if n == s {
			return EndReason(i), true
		}
	}
	return EndUnknown, false
}

// EndEvent is one net_flow_tcp_end: a connection that had its begin (same direction, src/dst
// convention and DNS names as the begin) ended. Counters are the kernel's own TCP state at the close.
type EndEvent struct {
	Direction        Direction  // the begin's conn_direction; set from the batch when decoded
	Src, Dst         netip.Addr // initiator, responder, as in the begin
	SrcPort, DstPort uint16
	SrcDNS, DstDNS   []string // read-only, may be shared; nil = none

	// BeginNs is the begin's timestamp (unix ns); EndNs when the connection closed on this host.
	BeginNs, EndNs int64
	// SrcBytes and DstBytes are the payload bytes the initiator and the responder sent; SrcSegs and
	// DstSegs their data segments. The kernel counts what this host sent (bytes_acked, data_segs_out)
	// and got (bytes_received, data_segs_in); the agent maps them onto src/dst by direction.
	SrcBytes, DstBytes uint64
	SrcSegs, DstSegs   uint64
	Retrans            uint64 // segments this host retransmitted (total_retrans)
	SRTTus             uint32 // smoothed round-trip time, µs; 0 = unknown
	Reason             EndReason

	// Process context, as in Event; zero = unknown.
	CgroupID    uint64
	PID         uint32
	Comm        string
	ContainerID string
	UID         uint32
	UIDKnown    bool
}

// Duration is EndNs - BeginNs.
func (e *EndEvent) Duration() int64 { return e.EndNs - e.BeginNs }

func (e *EndEvent) hasContext() bool {
	return e.CgroupID != 0 || e.PID != 0 || e.Comm != "" || e.ContainerID != "" || e.UIDKnown
}

func (e *EndEvent) ctx() ctxKey {
	return ctxKey{e.CgroupID, e.PID, e.Comm, e.ContainerID, e.UID, e.UIDKnown}
}

// Elements of an end row: the begin row's six (dt_ns is the end time's), then these.
const endRowLen = 14

// EndBatchEncoder builds one end batch for one host and direction: the same dictionaries, header rules
// and zero allocations per AddEnd in steady state as BatchEncoder. Not safe for concurrent use.
type EndBatchEncoder struct{ b *BatchEncoder }

// NewEndBatchEncoder returns an encoder for end batches of host, run runID and direction dir (the
// begins' direction). It panics on an invalid direction. Its Finish takes seqs from the same counter
// as the run's begin batches; its prev_seq chain is its own (one per direction and kind).
func NewEndBatchEncoder(host, runID string, dir Direction) *EndBatchEncoder {
	return &EndBatchEncoder{b: newEncoder(host, runID, dir, KindEnd)}
}

// AddEnd appends one end event. The batch keeps references to ev's DNS slices until Reset.
// ev.Direction is ignored: the batch has one direction.
func (e *EndBatchEncoder) AddEnd(ev *EndEvent) {
	b := e.b
	if b.n == 0 {
		b.t0 = ev.EndNs
	}
	b.n++
	src := b.endpoint(ev.Src, ev.SrcDNS)
	dst := b.endpoint(ev.Dst, ev.DstDNS)
	r := append(b.rows, 0x90|endRowLen)
	r = appendUint(r, uint64(src))
	r = appendUint(r, uint64(dst))
	r = appendUint(r, uint64(ev.SrcPort))
	r = appendUint(r, uint64(ev.DstPort))
	r = appendInt(r, ev.EndNs-b.t0)
	if ev.hasContext() {
		r = appendUint(r, uint64(b.context(ev.ctx())))
	} else {
		r = append(r, mpNil)
	}
	r = appendInt(r, ev.EndNs-ev.BeginNs)
	r = appendUint(r, ev.SrcBytes)
	r = appendUint(r, ev.DstBytes)
	r = appendUint(r, ev.SrcSegs)
	r = appendUint(r, ev.DstSegs)
	r = appendUint(r, ev.Retrans)
	r = appendUint(r, uint64(ev.SRTTus))
	r = appendUint(r, uint64(ev.Reason))
	b.rows = r
}

// Len is the number of events added since the last Reset.
func (e *EndBatchEncoder) Len() int { return e.b.Len() }

// Size is an upper bound of the encoded size of the batch so far.
func (e *EndBatchEncoder) Size() int { return e.b.Size() }

// SetPrevRun makes the first end batch this encoder finishes carry l (the previous run's end chain of
// this direction: its last seq, batches and events) as prev_run; nil carries none.
func (e *EndBatchEncoder) SetPrevRun(l *RunLink) error { return e.b.SetPrevRun(l) }

// Finish appends the whole end batch with seq and drops to dst and returns it, then Resets.
func (e *EndBatchEncoder) Finish(dst []byte, seq uint64, drops Drops) []byte {
	return e.b.Finish(dst, seq, drops)
}

// Reset discards the events added so far, keeping capacity.
func (e *EndBatchEncoder) Reset() { e.b.Reset() }

// EndBatch is a decoded end batch: the header of a begin batch (same meaning) and end events.
type EndBatch struct {
	Major, Minor int
	Host         string
	Direction    Direction
	RunID        string
	Seq          uint64
	PrevSeq      uint64   // seq of the previous end batch of this direction from this run, 0 for the first
	PrevRun      *RunLink // on the first end batch of a direction; nil when absent
	Drops        Drops
	Events       []EndEvent // each has Direction set from the batch
}

// EndSubject is the subject of an end batch: <prefix>.<host>.<direction>.end, one token more than a
// begin's, so begin subscriptions (flows.*.incoming, flows.web-01.outgoing) never match it.
func EndSubject(prefix, host string, d Direction) string {
	return Subject(prefix, host, d) + ".end"
}

// EndSchemaHeaderValue is the HeaderSchema value of an end batch: "2.0".
func EndSchemaHeaderValue() string { return fmt.Sprintf("%d.%d", EndMajor, EndMinor) }

// CheckEndSubject is CheckSubject for an end batch: subject must be exactly
// EndSubject(prefix, host, d) for the batch's host and direction.
func CheckEndSubject(subject, prefix, host string, d Direction) error {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	want := EndSubject(prefix, host, d)
	if subject == want {
		return nil
	}
	return fmt.Errorf("%w: the end batch says host %q direction %s, which belongs on %s (a publisher claiming another host or direction: check its publish permissions; or agents using another subject prefix than %q: set the prefix)",
		ErrSubjectMismatch, host, d, want, prefix)
}

// FilterSubjects are the subscription subjects for the batches of prefix, host and direction of the
// kinds asked for: <prefix>.<host>.<direction> for begins, the same with .end for ends, with * for an
// empty host (all hosts) or a zero direction (both). An empty prefix is DefaultPrefix. No kind: nil.
// Unlike FilterSubject's <prefix>.>, the begin filter never selects an end batch.
func FilterSubjects(prefix, host string, d Direction, begins, ends bool) []string {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	h, dir := host, "*"
	if h == "" {
		h = "*"
	}
	if d != 0 {
		dir = d.String()
	}
	base := prefix + "." + h + "." + dir
	var out []string
	if begins {
		out = append(out, base)
	}
	if ends {
		out = append(out, base+".end")
	}
	return out
}

// SubjectKind tells the kind of batch a subject under prefix carries by its shape: four tokens after
// the prefix ending in "end" is an end subject, anything else a begin subject (whose batch decides).
func SubjectKind(subject, prefix string) Kind {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	rest, ok := strings.CutPrefix(subject, prefix+".")
	if ok && strings.Count(rest, ".") == 2 && strings.HasSuffix(rest, ".end") {
		return KindEnd
	}
	return KindBegin
}
