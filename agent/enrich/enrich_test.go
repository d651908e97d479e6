package enrich_test

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/flowbus/flowbus/agent/enrich"
	"github.com/flowbus/flowbus/bpf"
	"github.com/flowbus/flowbus/dnscache"
	"github.com/flowbus/flowbus/schema"
)

// The capture hands its records to the enrich stage.
var _ bpf.Handler = (*enrich.Enricher)(nil)

// sliceSink keeps a copy of every event it is given: the stage reuses ev.
type sliceSink struct {
	evs  []schema.Event
	ends []schema.EndEvent
}

func (s *sliceSink) Add(ev *schema.Event)       { s.evs = append(s.evs, *ev) }
func (s *sliceSink) AddEnd(ev *schema.EndEvent) { s.ends = append(s.ends, *ev) }

const containerID = "3f2a9c0d1e5b4a7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e"

var (
	t0      = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC).UnixNano()
	client  = netip.MustParseAddr("192.0.2.7")
	server  = netip.MustParseAddr("198.51.100.10")
	server6 = netip.MustParseAddr("2001:db8::10")
)

// stage is an Enricher over a directory tree laid out as a container
// runtime lays out cgroups; cgroup is the id of its container's directory.
type stage struct {
	e      *enrich.Enricher
	self   *enrich.SelfFilter
	sink   *sliceSink
	cgroup uint64
}

func newStage(t *testing.T) *stage {
	t.Helper()
	root := t.TempDir()
	dir := filepath.Join(root, "system.slice", "docker-"+containerID+".scope")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	s := &stage{self: enrich.NewSelfFilter(), sink: &sliceSink{}, cgroup: st.Ino}
	s.e = enrich.New(enrich.Config{
		CgroupRoot:        root,
		ContainersRefresh: time.Hour, // one walk, at New
		DNS:               dnscache.Config{MinTTL: time.Second, MaxTTL: time.Hour},
	}, s.self, s.sink)
	t.Cleanup(s.e.Close)
	return s
}

// answer is a DNS response for name, which a CNAME chain leads to addr.
func answer(t *testing.T, name string, ttl uint32, addr netip.Addr, chain ...string) []byte {
	t.Helper()
	qtype := dnsmessage.TypeA
	if addr.Is6() {
		qtype = dnsmessage.TypeAAAA
	}
	m := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: 42, Response: true, RecursionAvailable: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: qtype, Class: dnsmessage.ClassINET}},
	}
	owner := name
	for _, next := range chain {
		m.Answers = append(m.Answers, dnsmessage.Resource{
			Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(owner), Class: dnsmessage.ClassINET, TTL: ttl},
			Body:   &dnsmessage.CNAMEResource{CNAME: dnsmessage.MustNewName(next)},
		})
		owner = next
	}
	h := dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(owner), Class: dnsmessage.ClassINET, TTL: ttl}
	if addr.Is4() {
		m.Answers = append(m.Answers, dnsmessage.Resource{Header: h, Body: &dnsmessage.AResource{A: addr.As4()}})
	} else {
		m.Answers = append(m.Answers, dnsmessage.Resource{Header: h, Body: &dnsmessage.AAAAResource{AAAA: addr.As16()}})
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The socket that asks in these tests, and the server it asks.
var (
	asker    = netip.MustParseAddrPort("192.0.2.7:33333")
	resolver = netip.MustParseAddrPort("192.0.2.53:53")
)

const cookie = 77

// queryFor is the query that msg answers: its id and question.
func queryFor(t *testing.T, msg []byte) []byte {
	t.Helper()
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil {
		t.Fatal(err)
	}
	q, err := p.Question()
	if err != nil {
		t.Fatal(err)
	}
	b, err := (&dnsmessage.Message{Header: dnsmessage.Header{ID: h.ID, RecursionDesired: true}, Questions: []dnsmessage.Question{q}}).Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// resolve is a query over UDP for what answer answers, then answer.
func (s *stage) resolve(t *testing.T, ts int64, answer []byte) {
	t.Helper()
	s.e.DNSQuery(ts, dnscache.ProtoUDP, cookie, asker, resolver, queryFor(t, answer))
	s.e.DNSAnswer(ts, dnscache.ProtoUDP, cookie, asker, resolver, answer, len(answer))
}

func flow(dir schema.Direction, ts int64, src netip.Addr, sport uint16, dst netip.Addr, dport uint16, cgroup uint64) *schema.Event {
	return &schema.Event{Timestamp: ts, Direction: dir, Src: src, SrcPort: sport, Dst: dst, DstPort: dport, CgroupID: cgroup, PID: 1234, Comm: "curl"}
}

// An event leaves with the names of its addresses and its container id,
// and the kernel's fields as they came.
func TestFlowEnriched(t *testing.T) {
	s := newStage(t)
	s.resolve(t, t0, answer(t, "svc.example.", 300, server, "edge.cdn.example.", "E1.cdn.example."))
	s.resolve(t, t0, answer(t, "client.example.", 300, client))

	in := flow(schema.Outgoing, t0+int64(time.Millisecond), client, 40000, server, 443, s.cgroup)
	s.e.Flow(in)
	if len(s.sink.evs) != 1 {
		t.Fatalf("sink got %d events, want 1", len(s.sink.evs))
	}
	got := s.sink.evs[0]
	if want := []string{"e1.cdn.example", "edge.cdn.example", "svc.example"}; !slices.Equal(slices.Sorted(slices.Values(got.DstDNS)), want) {
		t.Errorf("dst_dns %q, want %q", got.DstDNS, want)
	}
	if want := []string{"client.example"}; !slices.Equal(got.SrcDNS, want) {
		t.Errorf("src_dns %q, want %q", got.SrcDNS, want)
	}
	if got.ContainerID != containerID {
		t.Errorf("container id %q, want %q", got.ContainerID, containerID)
	}
	if got.Timestamp != in.Timestamp || got.Direction != schema.Outgoing || got.Src != client || got.SrcPort != 40000 ||
		got.Dst != server || got.DstPort != 443 || got.CgroupID != s.cgroup || got.PID != 1234 || got.Comm != "curl" {
		t.Errorf("the kernel's fields changed: %+v", got)
	}
	st := s.e.Stats()
	if st.DNS.Answers != 2 || st.DNS.Hits != 2 || st.SelfExcluded != 0 {
		t.Errorf("stats %+v: want 2 answers learned, 2 hits, none excluded", st)
	}
}

// The capture reuses its event: what one event was given does not stay
// for the next, which has no names, no known cgroup and no container.
func TestFlowReusedEvent(t *testing.T) {
	s := newStage(t)
	s.resolve(t, t0, answer(t, "svc6.example.", 300, server6))
	ev := flow(schema.Incoming, t0, server6, 50000, server6, 22, s.cgroup)
	s.e.Flow(ev)
	*ev = *flow(schema.Incoming, t0, client, 50001, server, 22, 0)
	s.e.Flow(ev)
	if len(s.sink.evs) != 2 {
		t.Fatalf("sink got %d events, want 2", len(s.sink.evs))
	}
	if first := s.sink.evs[0]; !slices.Equal(first.SrcDNS, []string{"svc6.example"}) || !slices.Equal(first.DstDNS, []string{"svc6.example"}) || first.ContainerID != containerID {
		t.Errorf("first event: src_dns %q dst_dns %q container %q", first.SrcDNS, first.DstDNS, first.ContainerID)
	}
	if second := s.sink.evs[1]; second.SrcDNS != nil || second.DstDNS != nil || second.ContainerID != "" {
		t.Errorf("second event kept the first's enrichment: src_dns %q dst_dns %q container %q", second.SrcDNS, second.DstDNS, second.ContainerID)
	}
}

// Names are looked up at the event's own time, not the reader's: an event
// made before the answer's TTL ran out gets them, one after it none.
func TestFlowDNSAtEventTime(t *testing.T) {
	s := newStage(t)
	s.resolve(t, t0, answer(t, "svc.example.", 30, server))
	s.e.Flow(flow(schema.Outgoing, t0+int64(29*time.Second), client, 40000, server, 443, 0))
	s.e.Flow(flow(schema.Outgoing, t0+int64(31*time.Second), client, 40001, server, 443, 0))
	if len(s.sink.evs) != 2 {
		t.Fatalf("sink got %d events, want 2", len(s.sink.evs))
	}
	if inTime := s.sink.evs[0]; !slices.Equal(inTime.DstDNS, []string{"svc.example"}) {
		t.Errorf("an event within the TTL has dst_dns %q, want svc.example", inTime.DstDNS)
	}
	if late := s.sink.evs[1]; late.DstDNS != nil {
		t.Errorf("an event after the TTL has dst_dns %q", late.DstDNS)
	}
}

// The agent's own connections, both the outgoing and (to a local server)
// the incoming event of each, go no further and are counted.
func TestFlowSelfExcluded(t *testing.T) {
	s := newStage(t)
	nats := netip.AddrPortFrom(server, 4222)
	s.self.Add(41000, nats)
	s.e.Flow(flow(schema.Outgoing, t0, client, 41000, server, 4222, s.cgroup))
	s.e.Flow(flow(schema.Incoming, t0, client, 41000, server, 4222, s.cgroup))
	s.e.Flow(flow(schema.Outgoing, t0, client, 41001, server, 4222, s.cgroup)) // another socket
	s.e.Flow(flow(schema.Outgoing, t0, client, 41000, server, 4223, s.cgroup)) // another server port
	if got := s.e.Stats().SelfExcluded; got != 2 {
		t.Errorf("%d events counted as the agent's own, want 2", got)
	}
	if len(s.sink.evs) != 2 || s.sink.evs[0].SrcPort != 41001 || s.sink.evs[1].DstPort != 4223 {
		t.Errorf("sink got %+v, want the two foreign connections", s.sink.evs)
	}
}

// A cut answer to a real query is counted by the cache and names nothing;
// bytes that hold no question answer no query.
func TestDNSMalformed(t *testing.T) {
	s := newStage(t)
	good := answer(t, "svc.example.", 300, server)
	s.e.DNSQuery(t0, dnscache.ProtoUDP, cookie, asker, resolver, queryFor(t, good))
	s.e.DNSAnswer(t0, dnscache.ProtoUDP, cookie, asker, resolver, good[:len(good)-3], len(good))
	s.e.DNSAnswer(t0, dnscache.ProtoUDP, cookie, asker, resolver, []byte{0xde, 0xad}, 2)
	s.e.Flow(flow(schema.Outgoing, t0, client, 40000, server, 443, 0))
	if len(s.sink.evs) != 1 || s.sink.evs[0].DstDNS != nil {
		t.Fatalf("sink got %+v, want one event without names", s.sink.evs)
	}
	if st := s.e.Stats(); st.DNS.Answers != 0 || st.DNS.Truncated != 1 || st.Match.Answered != 1 || st.Match.Unsolicited != 1 {
		t.Errorf("stats %+v: want the cut answer matched and counted as truncated, the other unsolicited, none learned", st)
	}
}
