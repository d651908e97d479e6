package enrich_test

import (
	"encoding/binary"
	"net/netip"
	"slices"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/flowbus/flowbus/agent/enrich"
	"github.com/flowbus/flowbus/dnscache"
	"github.com/flowbus/flowbus/schema"
)

// newMatchStage is an Enricher with the given query bounds.
func newMatchStage(t *testing.T, maxQueries int, timeout time.Duration) *stage {
	t.Helper()
	s := &stage{self: enrich.NewSelfFilter(), sink: &sliceSink{}}
	s.e = enrich.New(enrich.Config{
		CgroupRoot:        t.TempDir(),
		ContainersRefresh: time.Hour,
		DNS:               dnscache.Config{MinTTL: time.Second, MaxTTL: time.Hour},
		MaxQueries:        maxQueries,
		QueryTimeout:      timeout,
	}, s.self, s.sink)
	t.Cleanup(s.e.Close)
	return s
}

// msg builds a DNS message: a query when addr is invalid, else an answer
// with one A or AAAA record for the first question.
func msg(t testing.TB, id uint16, addr netip.Addr, qs ...dnsmessage.Question) []byte {
	t.Helper()
	m := dnsmessage.Message{Header: dnsmessage.Header{ID: id, Response: addr.IsValid(), RecursionDesired: true}, Questions: qs}
	if addr.IsValid() {
		h := dnsmessage.ResourceHeader{Name: qs[0].Name, Class: dnsmessage.ClassINET, TTL: 300}
		if addr.Is4() {
			m.Answers = append(m.Answers, dnsmessage.Resource{Header: h, Body: &dnsmessage.AResource{A: addr.As4()}})
		} else {
			m.Answers = append(m.Answers, dnsmessage.Resource{Header: h, Body: &dnsmessage.AAAAResource{AAAA: addr.As16()}})
		}
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func qA(name string) dnsmessage.Question {
	return dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}
}

// dstNames is what a connection to addr made at ts is labelled with.
func (s *stage) dstNames(ts int64, addr netip.Addr) []string {
	s.sink.evs = nil
	s.e.Flow(flow(schema.Outgoing, ts, asker.Addr(), asker.Port(), addr, 443, 0))
	return s.sink.evs[0].DstDNS
}

// framed is a DNS message with its TCP length prefix.
func framed(m []byte) []byte {
	return append(binary.BigEndian.AppendUint16(nil, uint16(len(m))), m...)
}

// Issue 14's forgeries as they reach user space (the kernel lets through
// whatever finds a query of the same socket, ends and id): each answer
// that differs from the query in anything but the case of the name is
// unsolicited and labels nothing; the real answer labels at once.
func TestDNSAnswerMustAnswerTheQuery(t *testing.T) {
	target := netip.MustParseAddr("203.0.113.66")
	shop := qA("shop.example.")
	other := netip.AddrPortFrom(asker.Addr(), asker.Port()+1)
	cases := []struct {
		name           string
		proto          uint8
		cookie         uint64
		client, server netip.AddrPort
		answer         []byte
		learned        bool
	}{
		{"the answer", 17, cookie, asker, resolver, msg(t, 0x1234, target, shop), true},
		{"the answer, name in other case", 17, cookie, asker, resolver, msg(t, 0x1234, target, qA("SHOP.Example.")), true},
		{"another id and question", 17, cookie, asker, resolver, msg(t, 0x9999, target, qA("bank.example.")), false},
		{"another id", 17, cookie, asker, resolver, msg(t, 0x1235, target, shop), false},
		{"another name", 17, cookie, asker, resolver, msg(t, 0x1234, target, qA("bank.example.")), false},
		{"another type", 17, cookie, asker, resolver, msg(t, 0x1234, target, dnsmessage.Question{Name: shop.Name, Type: dnsmessage.TypeAAAA, Class: dnsmessage.ClassINET}), false},
		{"another class", 17, cookie, asker, resolver, msg(t, 0x1234, target, dnsmessage.Question{Name: shop.Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassCHAOS}), false},
		{"two questions", 17, cookie, asker, resolver, msg(t, 0x1234, target, shop, qA("bank.example.")), false},
		{"another socket (another namespace)", 17, cookie + 1, asker, resolver, msg(t, 0x1234, target, shop), false},
		{"another client port", 17, cookie, other, resolver, msg(t, 0x1234, target, shop), false},
		{"another server", 17, cookie, asker, netip.MustParseAddrPort("192.0.2.54:53"), msg(t, 0x1234, target, shop), false},
		{"over tcp", 6, cookie, asker, resolver, framed(msg(t, 0x1234, target, shop)), false},
		{"a query, not an answer", 17, cookie, asker, resolver, msg(t, 0x1234, netip.Addr{}, shop), false},
		{"not DNS", 17, cookie, asker, resolver, []byte("\x12\x34 not a DNS message"), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := newMatchStage(t, 0, 0)
			s.e.DNSQuery(t0, 17, cookie, asker, resolver, msg(t, 0x1234, netip.Addr{}, shop))
			s.e.DNSAnswer(t0+1000, tc.proto, tc.cookie, tc.client, tc.server, tc.answer, len(tc.answer))
			names := s.dstNames(t0+2000, target)
			st := s.e.Stats()
			if tc.learned {
				if !slices.Equal(names, []string{"shop.example"}) || st.Match.Answered != 1 || st.Match.Unsolicited != 0 || st.Match.Outstanding != 0 {
					t.Errorf("names %q, stats %+v: want shop.example, answered 1", names, st.Match)
				}
				return
			}
			if names != nil || st.Match.Answered != 0 || st.Match.Unsolicited != 1 || st.Match.Outstanding != 1 || st.DNS.Answers != 0 {
				t.Errorf("names %q, stats %+v: want none learned, 1 unsolicited, the query still outstanding", names, st)
			}
			// The real answer still gets through after the forgery.
			real := msg(t, 0x1234, netip.MustParseAddr("198.51.100.1"), shop)
			s.e.DNSAnswer(t0+3000, 17, cookie, asker, resolver, real, len(real))
			if names := s.dstNames(t0+4000, netip.MustParseAddr("198.51.100.1")); !slices.Equal(names, []string{"shop.example"}) {
				t.Errorf("the real answer after the forgery labels %q, want shop.example", names)
			}
		})
	}
}

// Kind 6 of issue 14: once its query is answered, further answers with the
// same id and question (a forger's) change nothing.
func TestDNSAnswerOnlyOnce(t *testing.T) {
	s := newMatchStage(t, 0, 0)
	shop := qA("shop.example.")
	real, forged := netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("203.0.113.66")
	s.e.DNSQuery(t0, 17, cookie, asker, resolver, msg(t, 7, netip.Addr{}, shop))
	a := msg(t, 7, real, shop)
	s.e.DNSAnswer(t0, 17, cookie, asker, resolver, a, len(a))
	for range 8 {
		f := msg(t, 7, forged, shop)
		s.e.DNSAnswer(t0, 17, cookie, asker, resolver, f, len(f))
	}
	if names := s.dstNames(t0+1, forged); names != nil {
		t.Errorf("forged address labelled %q", names)
	}
	if names := s.dstNames(t0+1, real); !slices.Equal(names, []string{"shop.example"}) {
		t.Errorf("real address labelled %q, want shop.example", names)
	}
	if st := s.e.Stats().Match; st.Answered != 1 || st.Unsolicited != 8 || st.Tracked != 1 {
		t.Errorf("stats %+v: want 1 answered, 8 unsolicited", st)
	}
}

// Queries wait a bounded time, and only so many at once; the oldest go
// first and are counted, and their late answers are unsolicited.
func TestDNSQueryBounds(t *testing.T) {
	s := newMatchStage(t, 2, time.Second)
	addr := netip.MustParseAddr("198.51.100.1")
	for i, name := range []string{"a.example.", "b.example.", "c.example."} {
		s.e.DNSQuery(t0+int64(i), 17, cookie, asker, resolver, msg(t, uint16(i), netip.Addr{}, qA(name)))
	}
	if st := s.e.Stats().Match; st.Evicted != 1 || st.Outstanding != 2 || st.Tracked != 3 {
		t.Fatalf("stats %+v: want 1 evicted, 2 outstanding", st)
	}
	late := msg(t, 0, addr, qA("a.example."))
	s.e.DNSAnswer(t0+10, 17, cookie, asker, resolver, late, len(late))
	inTime := msg(t, 1, addr, qA("b.example."))
	s.e.DNSAnswer(t0+int64(time.Second), 17, cookie, asker, resolver, inTime, len(inTime))
	tooLate := msg(t, 2, addr, qA("c.example."))
	s.e.DNSAnswer(t0+int64(time.Second)+3, 17, cookie, asker, resolver, tooLate, len(tooLate))
	st := s.e.Stats().Match
	if st.Answered != 1 || st.Unsolicited != 2 || st.Expired != 1 || st.Outstanding != 0 {
		t.Errorf("stats %+v: want 1 answered, 2 unsolicited, 1 expired, none outstanding", st)
	}
	if names := s.dstNames(t0+int64(2*time.Second), addr); !slices.Equal(names, []string{"b.example"}) {
		t.Errorf("labelled %q, want b.example only", names)
	}
	// Many queries answered at once keep the bookkeeping within the bound.
	for i := range 10000 {
		q := msg(t, uint16(i), netip.Addr{}, qA("d.example."))
		s.e.DNSQuery(t0+int64(2*time.Second)+int64(i), 17, cookie, asker, resolver, q)
		a := msg(t, uint16(i), addr, qA("d.example."))
		s.e.DNSAnswer(t0+int64(2*time.Second)+int64(i), 17, cookie, asker, resolver, a, len(a))
	}
	if st := s.e.Stats().Match; st.Answered != 10001 || st.Evicted != 1 || st.Outstanding != 0 {
		t.Errorf("stats %+v: want every query answered", st)
	}
}

// Over TCP a segment may carry several answers, and an answer may run on
// into the next segments: those continue an answer already counted. A
// forged message after a real one stops the segment there.
func TestDNSAnswerTCP(t *testing.T) {
	s := newMatchStage(t, 0, 0)
	a1, a2 := netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("198.51.100.2")
	forged := netip.MustParseAddr("203.0.113.66")
	q1, q2 := msg(t, 1, netip.Addr{}, qA("one.example.")), msg(t, 2, netip.Addr{}, qA("two.example."))
	s.e.DNSQuery(t0, 6, cookie, asker, resolver, append(framed(q1), framed(q2)...))
	seg := append(framed(msg(t, 1, a1, qA("one.example."))), framed(msg(t, 9, forged, qA("bank.example.")))...)
	s.e.DNSAnswer(t0, 6, cookie, asker, resolver, seg, len(seg))
	// The second answer split over three segments.
	whole := framed(msg(t, 2, a2, qA("two.example.")))
	for _, part := range [][]byte{whole[:35], whole[35:38], whole[38:]} {
		s.e.DNSAnswer(t0, 6, cookie, asker, resolver, part, len(part))
	}
	st := s.e.Stats()
	if st.Match.Tracked != 2 || st.Match.Answered != 2 || st.Match.Unsolicited != 1 {
		t.Errorf("stats %+v: want 2 tracked, 2 answered, 1 unsolicited", st.Match)
	}
	if names := s.dstNames(t0, a1); !slices.Equal(names, []string{"one.example"}) {
		t.Errorf("%s labelled %q, want one.example", a1, names)
	}
	if names := s.dstNames(t0, forged); names != nil {
		t.Errorf("forged address labelled %q", names)
	}
	// A segment starting mid-message with no answer before it is unsolicited.
	s.e.DNSAnswer(t0, 6, cookie, asker, resolver, whole[38:], len(whole)-38)
	if got := s.e.Stats().Match.Unsolicited; got != 2 {
		t.Errorf("unsolicited %d after a stray continuation, want 2", got)
	}
}
