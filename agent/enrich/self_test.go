package enrich_test

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/flowbus/flowbus/agent/enrich"
	"github.com/flowbus/flowbus/publisher"
	"github.com/flowbus/flowbus/schema"
)

// The dialer registers each connection before its SYN leaves, and Match
// recognises both events of it (outgoing and, on a local server, incoming).
func TestSelfFilterMatchesOwnConnections(t *testing.T) {
	for network, addr := range map[string]string{"tcp4": "127.0.0.1:0", "tcp6": "[::1]:0"} {
		ln, err := net.Listen(network, addr)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			if c, err := ln.Accept(); err == nil {
				c.Close()
			}
		}()
		f := enrich.NewSelfFilter()
		c, err := publisher.Dialer(time.Second, f.Add).Dial("tcp", ln.Addr().String()) // as nats.go dials
		if err != nil {
			t.Fatal(err)
		}
		local := netip.MustParseAddrPort(c.LocalAddr().String())
		remote := netip.MustParseAddrPort(c.RemoteAddr().String())
		c.Close()
		if f.Len() != 1 {
			t.Fatalf("%s: %d connections registered, want 1", network, f.Len())
		}
		for _, dir := range []schema.Direction{schema.Outgoing, schema.Incoming} {
			ev := &schema.Event{Direction: dir, Src: local.Addr(), SrcPort: local.Port(), Dst: remote.Addr(), DstPort: remote.Port()}
			if !f.Match(ev) {
				t.Errorf("%s %v: own connection %v -> %v not matched", network, dir, local, remote)
			}
		}
		other := &schema.Event{Src: local.Addr(), SrcPort: local.Port() + 1, Dst: remote.Addr(), DstPort: remote.Port()}
		if f.Match(other) {
			t.Errorf("%s: a foreign connection matched", network)
		}
	}
}

// A connection of another process on one of the agent's local ports (the
// port bit set, the remote another) is not the agent's; the first and last
// ports of a word of the port bits are told apart from their neighbours.
func TestSelfFilterSharedPort(t *testing.T) {
	f := enrich.NewSelfFilter()
	nats := netip.MustParseAddrPort("127.0.0.1:4222")
	for _, p := range []uint16{0, 63, 64, 40000, 65535} {
		f.Add(p, nats)
	}
	for _, tc := range []struct {
		port   uint16
		remote netip.AddrPort
		want   bool
	}{
		{0, nats, true}, {63, nats, true}, {64, nats, true}, {65535, nats, true}, {40000, nats, true},
		{1, nats, false}, {62, nats, false}, {65, nats, false}, {65534, nats, false}, {40001, nats, false},
		{40000, netip.MustParseAddrPort("127.0.0.1:4223"), false},
		{40000, netip.MustParseAddrPort("127.0.0.2:4222"), false},
	} {
		if got := f.MatchAddrs(tc.port, tc.remote.Addr(), tc.remote.Port()); got != tc.want {
			t.Errorf("port %d to %v: matched %v, want %v", tc.port, tc.remote, got, tc.want)
		}
	}
}
