package main

import (
	"fmt"
	"math/rand/v2"
	"net/netip"

	"github.com/flowbus/flowbus/schema"
)

// syntheticEvents returns n events with realistic values: a host talking to
// ~50 peers (about 1/3 IPv6), outgoing to well-known service ports and
// incoming to the host's own services, ephemeral client ports, 0–3 DNS names
// per peer drawn from a pool, and a few processes and containers. Seeded, so
// every run pushes the same events.
func syntheticEvents(n int) []schema.Event {
	r := rand.New(rand.NewPCG(42, 7))
	local4 := netip.AddrFrom4([4]byte{10, 0, 3, 17})
	local6 := netip.MustParseAddr("2001:db8:10:3::17")
	names := []string{
		"api.github.com", "github.com", "objects.githubusercontent.com", "images-1.example.net",
		"auth.example.io", "production.edge.cdn.example.com", "wiki.org", "files.hosted.example.org",
		"proxy.example.org", "sum.example.org", "storage.googleapis.com", "www.google.com",
		"oauth2.googleapis.com", "s3.eu-west-1.amazonaws.com", "sts.amazonaws.com", "ec2.eu-west-1.amazonaws.com",
		"db-primary.internal.example.com", "db-replica-2.internal.example.com", "redis.cache.internal.example.com",
		"kafka-0.kafka.svc.cluster.local", "kafka-1.kafka.svc.cluster.local", "nats.messaging.svc.cluster.local",
		"login.microsoftonline.com", "graph.microsoft.com", "cdn.example.net", "fonts.gstatic.com",
		"sentry.io", "o12345.ingest.sentry.io", "hooks.slack.com", "api.stripe.com",
	}
	type peer struct {
		addr netip.Addr
		dns  []string
	}
	peers := make([]peer, 50)
	for i := range peers {
		var a netip.Addr
		if i%3 == 2 {
			var b [16]byte
			copy(b[:], []byte{0x26, 0x06, 0x47, 0x00, 0x00, byte(i)})
			b[15] = byte(r.IntN(250) + 1)
			b[13] = byte(r.IntN(256))
			a = netip.AddrFrom16(b)
		} else {
			prefixes := [][2]byte{{140, 82}, {151, 101}, {142, 250}, {52, 216}, {10, 0}, {172, 31}, {104, 16}}
			pf := prefixes[r.IntN(len(prefixes))]
			a = netip.AddrFrom4([4]byte{pf[0], pf[1], byte(r.IntN(256)), byte(r.IntN(254) + 1)})
		}
		k := r.IntN(4) // 0–3 names
		var dns []string
		for j := 0; j < k; j++ {
			dns = append(dns, names[r.IntN(len(names))])
		}
		peers[i] = peer{addr: a, dns: dns}
	}
	outPorts := []uint16{443, 443, 443, 443, 80, 53, 5432, 6379, 9092, 4222, 8080, 22}
	inPorts := []uint16{443, 8080, 22, 9464, 5432}
	containers := []string{"", "", "3f9c1d2e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d",
		"9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b"}
	evs := make([]schema.Event, n)
	for i := range evs {
		p := peers[r.IntN(len(peers))]
		ci := r.IntN(len(containers))
		ev := schema.Event{
			Timestamp: 1_750_000_000_000_000_000 + int64(i)*1000,
			SrcPort:   uint16(32768 + r.IntN(28232)),
			// What the agent knows of the socket's owner at a cgroup skb
			// hook: its cgroup and container, no process.
			CgroupID:    uint64(4000 + ci),
			ContainerID: containers[ci],
		}
		local := local4
		if p.addr.Is6() {
			local = local6
		}
		if r.IntN(2) == 0 {
			ev.Direction, ev.Src, ev.Dst = schema.Outgoing, local, p.addr
			ev.DstPort, ev.DstDNS = outPorts[r.IntN(len(outPorts))], p.dns
		} else {
			ev.Direction, ev.Src, ev.Dst = schema.Incoming, p.addr, local
			ev.DstPort, ev.SrcDNS = inPorts[r.IntN(len(inPorts))], p.dns
		}
		evs[i] = ev
	}
	return evs
}

// describeEvents summarises a pool for the report.
func describeEvents(evs []schema.Event) string {
	v6, dns := 0, 0
	for i := range evs {
		if evs[i].Src.Is6() {
			v6++
		}
		dns += len(evs[i].SrcDNS) + len(evs[i].DstDNS)
	}
	return fmt.Sprintf("%d distinct events, %.0f%% IPv6, %.2f DNS names/event, 50 peers", len(evs),
		100*float64(v6)/float64(len(evs)), float64(dns)/float64(len(evs)))
}
