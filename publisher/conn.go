package publisher

import (
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"golang.org/x/sys/unix"
)

// Dialer returns a nats.CustomDialer that binds each socket to an ephemeral
// port before connecting and calls register with that port and the address
// dialed, so that the agent can tell its own connections (enrich.SelfFilter)
// before their SYN leaves.
func Dialer(timeout time.Duration, register func(localPort uint16, remote netip.AddrPort)) nats.CustomDialer {
	return &selfDialer{register: register, d: net.Dialer{Timeout: timeout}}
}

type selfDialer struct {
	register func(localPort uint16, remote netip.AddrPort)
	d        net.Dialer
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
			s.register(uint16(port), netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port()))
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
