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
