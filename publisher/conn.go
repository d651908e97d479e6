package publisher

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"golang.org/x/sys/unix"

	"github.com/flowbus/flowbus/schema"
)

// SelfFilter knows the agent's own TCP connections, so that their
// net_flow_tcp_begin events are not published (no feedback loop). A
// connection is registered before its SYN leaves, so its SYN-ACK can never
// overtake the registration.
type SelfFilter struct {
	mu    sync.RWMutex
	conns map[selfKey]struct{}
}

type selfKey struct {
	localPort uint16
	remote    netip.AddrPort
}

// NewSelfFilter returns an empty filter.
func NewSelfFilter() *SelfFilter { return &SelfFilter{conns: map[selfKey]struct{}{}} }

// Match tells whether ev is one of the agent's own connections.
func (f *SelfFilter) Match(ev *schema.Event) bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if len(f.conns) == 0 {
		return false
	}
	_, ok := f.conns[selfKey{ev.SrcPort, netip.AddrPortFrom(ev.Dst, ev.DstPort)}]
	return ok
}

func (f *SelfFilter) add(k selfKey) {
	f.mu.Lock()
	f.conns[k] = struct{}{}
	f.mu.Unlock()
}

// Len is the number of connections registered.
func (f *SelfFilter) Len() int {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return len(f.conns)
}

// Dialer returns a nats.CustomDialer that binds each socket to an ephemeral
// port before connecting and registers it with the filter.
func (f *SelfFilter) Dialer(timeout time.Duration) nats.CustomDialer {
	return &selfDialer{f: f, d: net.Dialer{Timeout: timeout}}
}

type selfDialer struct {
	f *SelfFilter
	d net.Dialer
}

func (s *selfDialer) Dial(network, address string) (net.Conn, error) {
	d := s.d
	d.Control = func(network, address string, c syscall.RawConn) error {
		remote, err := netip.ParseAddrPort(address)
		if err != nil {
			return nil // not an IP destination: nothing to filter
		}
		var ctrlErr error
		err = c.Control(func(fd uintptr) {
			var sa unix.Sockaddr = &unix.SockaddrInet4{}
			if network == "tcp6" {
				sa = &unix.SockaddrInet6{}
			}
			if ctrlErr = unix.Bind(int(fd), sa); ctrlErr != nil {
				return
			}
			var got unix.Sockaddr
			got, ctrlErr = unix.Getsockname(int(fd))
			if ctrlErr != nil {
				return
			}
			var port int
			switch a := got.(type) {
			case *unix.SockaddrInet4:
				port = a.Port
			case *unix.SockaddrInet6:
				port = a.Port
			}
			s.f.add(selfKey{uint16(port), netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())})
		})
		if err != nil {
			return err
		}
		if ctrlErr != nil {
			return fmt.Errorf("binding the NATS client socket: %w", ctrlErr)
		}
		return nil
	}
	return d.Dial(network, address)
}
