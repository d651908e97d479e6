// Package schema defines the flowbus events (net_flow_tcp_begin, and net_flow_tcp_end in end.go), their
// msgpack batch wire formats, their JSON shapes, and the NATS subjects and message ids. It is the contract between the agent and every consumer,
// so it depends on nothing but the standard library. FORMAT.md documents the wire format field by field.
package schema

import (
	"errors"
	"fmt"
	"net/netip"
)

// Schema version of the batches this package writes. Consumers reject another Major (an incompatible
// change); a higher Minor only adds fields that older consumers ignore.
const (
	Major = 1
	Minor = 2
)

// Direction says who initiated a connection, seen from the reporting host.
type Direction uint8

// Directions. The zero value is deliberately invalid so a forgotten field is caught.
const (
	// Outgoing: this host initiated (the SYN-ACK arrived on ingress).
	Outgoing Direction = 1
	// Incoming: a peer initiated (the SYN-ACK left on egress).
	Incoming Direction = 2
)

// String returns the wire and subject spelling: "outgoing", "incoming", or "unknown" for anything else.
func (d Direction) String() string {
	switch d {
	case Outgoing:
		return "outgoing"
	case Incoming:
		return "incoming"
	}
	return "unknown"
}

// ParseDirection parses "incoming" or "outgoing" (exact, lowercase, as on the wire and in subjects).
func ParseDirection(s string) (Direction, error) {
	switch s {
	case "outgoing":
		return Outgoing, nil
	case "incoming":
		return Incoming, nil
	}
	return 0, fmt.Errorf("invalid direction %q (want \"incoming\" or \"outgoing\")", s)
}

// Event is one net_flow_tcp_begin. Src is always the initiator.
type Event struct {
	Timestamp   int64      // wall clock, unix ns
	Direction   Direction  // set from the batch when decoded
	Src, Dst    netip.Addr // IPv4 as 4-byte (Unmap'ed) addresses
	SrcPort     uint16
	DstPort     uint16
	SrcDNS      []string // read-only, may be shared with a cache or other events; nil = none
	DstDNS      []string
	CgroupID    uint64 // 0 = unknown
	PID         uint32 // 0 = unknown
	Comm        string // "" = unknown
	ContainerID string // "" = unknown
	// UID is the process's user id, meaningful only with UIDKnown (0 is root, a real value).
	UID      uint32
	UIDKnown bool
}

// hasContext reports whether any process context field is known; an event without it gets a nil ctx_ref.
func (e *Event) hasContext() bool {
	return e.CgroupID != 0 || e.PID != 0 || e.Comm != "" || e.ContainerID != "" || e.UIDKnown
}

// ctx is the event's process context as the ctx dictionary keys it.
func (e *Event) ctx() ctxKey {
	return ctxKey{e.CgroupID, e.PID, e.Comm, e.ContainerID, e.UID, e.UIDKnown}
}

// Drops counts events lost since the previous batch, by stage, so a consumer can see gaps.
// msgpack keys: "kernel","reader","queue","spool","publish"; only non-zero keys are written.
type Drops struct{ Kernel, Reader, Queue, Spool, Publish uint64 }

// Total is the sum over all stages.
func (d Drops) Total() uint64 { return d.Kernel + d.Reader + d.Queue + d.Spool + d.Publish }

// Add adds o's counts to d, stage by stage.
func (d *Drops) Add(o Drops) {
	d.Kernel += o.Kernel
	d.Reader += o.Reader
	d.Queue += o.Queue
	d.Spool += o.Spool
	d.Publish += o.Publish
}

// ErrUnsupportedMajor is wrapped by DecodeBatch when the batch has a schema major this consumer does not
// know; the message names the major seen and the supported one, so the operator knows to upgrade.
var ErrUnsupportedMajor = errors.New("unsupported flowbus batch schema major")

// ErrMalformed is wrapped by DecodeBatch for every structural problem (truncation, wrong type, reference
// out of range, ...); the message says what was wrong and where.
var ErrMalformed = errors.New("malformed flowbus batch")
