// Package enrich is the agent's stage between the capture and the
// publisher: it drops the agent's own connections, names each event's
// container from its cgroup and its addresses from the DNS cache, which it
// fills from the DNS answers the capture hands over, and passes each event
// on to a Sink.
//
// It implements the capture's handler (bpf.Handler) and imports neither the
// capture nor the publisher, so it is tested without the kernel or NATS.
package enrich

import (
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/flowbus/flowbus/dnscache"
	"github.com/flowbus/flowbus/schema"
)

// Sink takes the enriched events: the publisher's batching. Add is called
// on the capture's reader goroutine, so it must not block, and must not
// keep ev, which is reused after it returns.
type Sink interface {
	Add(ev *schema.Event)
	// AddEnd takes an end the same way.
	AddEnd(ev *schema.EndEvent)
}

// Config tunes the stage.
type Config struct {
	// CgroupRoot is the cgroup v2 directory whose descendants' container
	// ids are resolved: the watched cgroup.
	CgroupRoot string
	// ContainersRefresh is the least time between two walks of CgroupRoot
	// for a cgroup id not seen before.
	ContainersRefresh time.Duration
	// DNS bounds the DNS cache.
	DNS dnscache.Config
	// MaxQueries bounds the outstanding DNS queries tracked (0: the default).
	MaxQueries int
	// QueryTimeout is how long a query waits for its answer (0: the default).
	QueryTimeout time.Duration
}

// Enricher is the enrich stage. Flow and DNS run on the capture's reader
// goroutine, in the kernel's order, so a DNS answer is in the cache before
// any later SYN-ACK is enriched.
type Enricher struct {
	self       *SelfFilter
	containers *Containers
	dns        *dnscache.Cache
	match      *matcher
	sink       Sink

	selfExcluded atomic.Uint64
	selfEnds     atomic.Uint64
}

// Stats are the stage's counters.
type Stats struct {
	SelfExcluded uint64 // events of the agent's own connections, not passed on
	SelfEnds     uint64 // ends of the agent's own connections, not passed on
	DNS          dnscache.Stats
	Match        MatchStats
}

// New starts the stage: events that self does not match go, enriched, to
// sink. It walks cfg.CgroupRoot once before it returns.
func New(cfg Config, self *SelfFilter, sink Sink) *Enricher {
	return &Enricher{
		self:       self,
		containers: NewContainers(cfg.CgroupRoot, cfg.ContainersRefresh),
		dns:        dnscache.New(cfg.DNS),
		match:      newMatcher(cfg.MaxQueries, cfg.QueryTimeout),
		sink:       sink,
	}
}

// Flow enriches an event from the DNS cache, at the event's own time, and
// hands it to the sink.
func (e *Enricher) Flow(ev *schema.Event) {
	if e.self.Match(ev) {
		e.selfExcluded.Add(1)
		return
	}
	ev.ContainerID = e.containers.ContainerID(ev.CgroupID)
	ev.SrcDNS = e.dns.Lookup(ev.Src, ev.Timestamp)
	ev.DstDNS = e.dns.Lookup(ev.Dst, ev.Timestamp)
	e.sink.Add(ev)
}

// End enriches an end as Flow does a begin (DNS names at the begin's time,
// so that both carry the same names) and hands it to the sink; the agent's
// own connections have no end either.
func (e *Enricher) End(ev *schema.EndEvent) {
	if e.self.MatchAddrs(ev.SrcPort, ev.Dst, ev.DstPort) {
		e.selfEnds.Add(1)
		return
	}
	ev.ContainerID = e.containers.ContainerID(ev.CgroupID)
	ev.SrcDNS = e.dns.Lookup(ev.Src, ev.BeginNs)
	ev.DstDNS = e.dns.Lookup(ev.Dst, ev.BeginNs)
	e.sink.AddEnd(ev)
}

// DNSQuery notes a query a watched socket (cookie) sent from client to
// server (proto 17 for UDP, 6 for a TCP segment), so that its answer can be
// told from a forged one.
func (e *Enricher) DNSQuery(ts int64, proto uint8, cookie uint64, client, server netip.AddrPort, payload []byte) {
	e.match.query(ts, proto, cookie, client, server, payload)
}

// DNSAnswer learns from a DNS answer from server to the watched socket
// (origLen > len(payload) when the kernel cut it), but only from the
// messages that answer an outstanding query of that socket with its id and
// question; the others are counted as unsolicited and never learned.
func (e *Enricher) DNSAnswer(ts int64, proto uint8, cookie uint64, client, server netip.AddrPort, payload []byte, origLen int) {
	e.match.answer(ts, proto, cookie, client, server, payload, origLen, e.dns)
}

// Stats reads the counters.
func (e *Enricher) Stats() Stats {
	return Stats{SelfExcluded: e.selfExcluded.Load(), SelfEnds: e.selfEnds.Load(), DNS: e.dns.Stats(), Match: e.match.stats()}
}

// Close stops the background walks of the cgroup hierarchy. Flow must not
// be called after it.
func (e *Enricher) Close() { e.containers.Close() }
