package enrich

import (
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/flowbus/flowbus/schema"
)

// SelfFilter knows the agent's own TCP connections, so that their
// net_flow_tcp_begin events are not published (no feedback loop). A
// connection is registered before its SYN leaves, so its SYN-ACK can never
// overtake the registration.
type SelfFilter struct {
	mu    sync.RWMutex
	conns map[selfKey]struct{}
	// ports has the bit of every local port in conns, read without the
	// lock: nearly every event is not ours and says so in one load, where
	// the lock and the map cost two atomic operations and a hash each.
	ports [1 << 16 / 64]atomic.Uint64
}

type selfKey struct {
	localPort uint16
	remote    netip.AddrPort
}

// NewSelfFilter returns an empty filter.
func NewSelfFilter() *SelfFilter { return &SelfFilter{conns: map[selfKey]struct{}{}} }

// Match tells whether ev is one of the agent's own connections.
func (f *SelfFilter) Match(ev *schema.Event) bool {
	return f.MatchAddrs(ev.SrcPort, ev.Dst, ev.DstPort)
}

// MatchAddrs tells whether the connection from local port srcPort to
// dst:dstPort is one of the agent's own (for begins and ends alike).
func (f *SelfFilter) MatchAddrs(srcPort uint16, dst netip.Addr, dstPort uint16) bool {
	if f.ports[srcPort/64].Load()&(1<<(srcPort%64)) == 0 {
		return false
	}
	f.mu.RLock()
	defer f.mu.RUnlock()
	if len(f.conns) == 0 {
		return false
	}
	_, ok := f.conns[selfKey{srcPort, netip.AddrPortFrom(dst, dstPort)}]
	return ok
}

// Add registers one of the agent's connections: its local port and the
// address it connects to. The dialer of the agent's NATS connections calls
// it before the SYN leaves.
func (f *SelfFilter) Add(localPort uint16, remote netip.AddrPort) {
	f.mu.Lock()
	f.conns[selfKey{localPort, remote}] = struct{}{}
	// Set before the SYN leaves, like the entry: the reader's Match comes
	// after the kernel saw the SYN-ACK.
	f.ports[localPort/64].Or(1 << (localPort % 64))
	f.mu.Unlock()
}

// Len is the number of connections registered.
func (f *SelfFilter) Len() int {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return len(f.conns)
}
