package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/schema"
)

// The test zone: svc has a CNAME chain to an A record, svc6 to an AAAA
// record, client names the address the client binds to.
var testZone = map[string]struct {
	chain []string // CNAME chain after the asked name
	addr  netip.Addr
}{
	"svc.flowbus.test.":    {[]string{"edge.cdn.flowbus.test.", "e1.cdn.flowbus.test."}, netip.MustParseAddr("127.1.2.3")},
	"svc6.flowbus.test.":   {[]string{"edge6.cdn.flowbus.test."}, netip.MustParseAddr("::1")},
	"client.flowbus.test.": {nil, netip.MustParseAddr("127.4.5.6")},
}

// dnsServer answers queries for testZone on UDP addr until the test ends.
func dnsServer(t *testing.T, addr string) {
	t.Helper()
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		t.Fatalf("test DNS server on %s: %v", addr, err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if resp, err := answer(buf[:n]); err == nil {
				_, _ = pc.WriteTo(resp, from)
			}
		}
	}()
}

func answer(query []byte) ([]byte, error) {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil {
		return nil, err
	}
	q, err := p.Question()
	if err != nil {
		return nil, err
	}
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired, RecursionAvailable: true})
	b.EnableCompression()
	_ = b.StartQuestions()
	_ = b.Question(q)
	_ = b.StartAnswers()
	z, ok := testZone[strings.ToLower(q.Name.String())]
	wantType := dnsmessage.TypeA
	if ok && z.addr.Is6() {
		wantType = dnsmessage.TypeAAAA
	}
	if ok && q.Type == wantType {
		owner := q.Name
		for _, next := range z.chain {
			n := dnsmessage.MustNewName(next)
			_ = b.CNAMEResource(dnsmessage.ResourceHeader{Name: owner, Class: dnsmessage.ClassINET, TTL: 300}, dnsmessage.CNAMEResource{CNAME: n})
			owner = n
		}
		hdr := dnsmessage.ResourceHeader{Name: owner, Class: dnsmessage.ClassINET, TTL: 30}
		if z.addr.Is4() {
			_ = b.AResource(hdr, dnsmessage.AResource{A: z.addr.As4()})
		} else {
			_ = b.AAAAResource(hdr, dnsmessage.AAAAResource{AAAA: z.addr.As16()})
		}
	}
	return b.Finish()
}

func init() {
	cgrouptest.Register("dns-traffic", dnsTrafficHelper)
}

// dnsTrafficHelper runs inside the watched cgroup: resolve, then connect at
// once, as real clients do. Args: dns server address.
func dnsTrafficHelper(args []string) error {
	server := args[0]
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "udp", server)
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var conns []cgrouptest.Conn
	for _, c := range []struct{ name, network, client string }{
		{"svc.flowbus.test.", "ip4", "client.flowbus.test."},
		{"svc6.flowbus.test.", "ip6", ""},
	} {
		var local net.Addr
		if c.client != "" {
			ips, err := r.LookupNetIP(ctx, "ip4", c.client)
			if err != nil {
				return fmt.Errorf("resolving %s: %w", c.client, err)
			}
			local = &net.TCPAddr{IP: ips[0].AsSlice()}
		}
		ips, err := r.LookupNetIP(ctx, c.network, c.name)
		if err != nil {
			return fmt.Errorf("resolving %s: %w", c.name, err)
		}
		ln, err := net.Listen("tcp", net.JoinHostPort(ips[0].String(), "0"))
		if err != nil {
			return err
		}
		go func() {
			if a, err := ln.Accept(); err == nil {
				a.Close()
			}
		}()
		d := net.Dialer{LocalAddr: local, Timeout: 5 * time.Second}
		conn, err := d.Dial("tcp", ln.Addr().String())
		if err != nil {
			return err
		}
		conns = append(conns, cgrouptest.Conn{Client: conn.LocalAddr().String(), Server: conn.RemoteAddr().String()})
		conn.Close()
		ln.Close()
	}
	return json.NewEncoder(os.Stdout).Encode(cgrouptest.TrafficResult{Conns: conns})
}

func TestDNSEnrichment(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	const server = "127.77.0.53:53"
	dnsServer(t, server)
	cg := cgrouptest.NewChild(t)
	a := startAgent(t, testConfig(t, cg.Path))

	out, err := cg.Command("dns-traffic", server).Output()
	if err != nil {
		t.Fatalf("dns-traffic helper: %v", err)
	}
	var res cgrouptest.TrafficResult
	if err := json.Unmarshal(out, &res); err != nil || len(res.Conns) != 2 {
		t.Fatalf("helper output %q: %v", out, err)
	}
	got := readStream(t, a.ClientURL(), "FLOWS", 4, 300*time.Millisecond)
	if len(got) != 4 {
		t.Fatalf("got %d events, want 4", len(got))
	}
	want := map[string][2][]string{ // server address -> src_dns, dst_dns
		"127.1.2.3": {{"client.flowbus.test"}, {"e1.cdn.flowbus.test", "edge.cdn.flowbus.test", "svc.flowbus.test"}},
		// Both ends are ::1, so the initiator has the names too.
		"::1": {{"edge6.cdn.flowbus.test", "svc6.flowbus.test"}, {"edge6.cdn.flowbus.test", "svc6.flowbus.test"}},
	}
	for _, r := range got {
		w, ok := want[r.Ev.Dst.String()]
		if !ok {
			t.Errorf("unexpected event %+v", r.Ev)
			continue
		}
		src, dst := slices.Sorted(slices.Values(r.Ev.SrcDNS)), slices.Sorted(slices.Values(r.Ev.DstDNS))
		if !slices.Equal(src, w[0]) || !slices.Equal(dst, w[1]) {
			t.Errorf("%s event %s -> %s: src_dns %q dst_dns %q, want %q %q", r.Ev.Direction, r.Ev.Src, r.Ev.Dst, src, dst, w[0], w[1])
		}
		if r.Ev.Direction == schema.Outgoing && r.Ev.Src.String() == "127.4.5.6" && len(src) == 0 {
			t.Errorf("outgoing event without src_dns")
		}
	}
	s := a.Snapshot()
	if s.DNS.Answers < 3 || s.DNS.Malformed != 0 {
		t.Errorf("DNS stats %+v: want at least 3 learned answers and none malformed", s.DNS)
	}
}
