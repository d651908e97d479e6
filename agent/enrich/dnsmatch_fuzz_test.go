package enrich

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// learned records what the matcher hands on.
type learned struct{ payloads [][]byte }

func (l *learned) AddPayload(_ uint8, payload []byte, _ int, _ int64) {
	l.payloads = append(l.payloads, append([]byte(nil), payload...))
}

// FuzzMatcher: whatever the query and the two answer segments, a message is
// handed on only when it has the id and the single question (names without
// ASCII case) of a query sent, each query is answered at most once, and
// every query tracked is accounted for.
func FuzzMatcher(f *testing.F) {
	pack := func(m dnsmessage.Message) []byte {
		b, err := m.Pack()
		if err != nil {
			f.Fatal(err)
		}
		return b
	}
	q := func(name string) dnsmessage.Question {
		return dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}
	}
	query := pack(dnsmessage.Message{Header: dnsmessage.Header{ID: 0x1234}, Questions: []dnsmessage.Question{q("shop.example.")}})
	ans := pack(dnsmessage.Message{Header: dnsmessage.Header{ID: 0x1234, Response: true}, Questions: []dnsmessage.Question{q("SHOP.example.")},
		Answers: []dnsmessage.Resource{{Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName("shop.example."), Class: dnsmessage.ClassINET, TTL: 60},
			Body: &dnsmessage.AResource{A: [4]byte{203, 0, 113, 1}}}}})
	forged := pack(dnsmessage.Message{Header: dnsmessage.Header{ID: 0x9999, Response: true}, Questions: []dnsmessage.Question{q("bank.example.")}})
	fr := func(m []byte) []byte { return append(binary.BigEndian.AppendUint16(nil, uint16(len(m))), m...) }
	f.Add(query, ans, ans, false)
	f.Add(query, forged, ans, false)
	f.Add(fr(query), fr(ans)[:20], fr(ans)[20:], true)
	f.Add(append(fr(query), fr(query)...), append(fr(ans), fr(forged)...), fr(ans), true)
	f.Add(fr(query), fr(ans)[:30], append(fr(ans)[30:], fr(ans)...), true)
	client, server := netip.MustParseAddrPort("192.0.2.7:33333"), netip.MustParseAddrPort("192.0.2.53:53")
	f.Fuzz(func(t *testing.T, query, seg1, seg2 []byte, tcp bool) {
		m := newMatcher(4, time.Second)
		proto := uint8(protoUDP)
		if tcp {
			proto = protoTCP
		}
		var l learned
		m.query(0, proto, 1, client, server, query)
		m.answer(1, proto, 1, client, server, seg1, len(seg1), &l)
		m.answer(2, proto, 1, client, server, seg2, len(seg2), &l)
		st := m.stats()
		if int(st.Tracked) != st.Outstanding+int(st.Answered)+int(st.Evicted) || st.Expired != 0 {
			t.Fatalf("stats %+v: tracked queries unaccounted for", st)
		}
		if int(st.Answered) != len(l.payloads) {
			t.Fatalf("%d answered, %d handed on", st.Answered, len(l.payloads))
		}
		queries := [][]byte{query}
		if tcp {
			queries = frames(query)
		}
		used := map[string]bool{}
		for _, p := range l.payloads {
			msg := p
			if tcp {
				if len(p) < 2 {
					t.Fatalf("handed on %x: no length prefix", p)
				}
				msg = p[2:]
			} else if !bytes.Equal(p, seg1) && !bytes.Equal(p, seg2) {
				t.Fatalf("handed on %x, not a datagram received", p)
			}
			k, ok := answers(queries, msg)
			if !ok {
				t.Fatalf("handed on %x, which answers none of the queries %x", p, query)
			}
			if used[k] {
				t.Fatalf("query %q answered twice", k)
			}
			used[k] = true
		}
	})
}

// frames splits a TCP payload into its length-prefixed messages, the last
// one possibly cut.
func frames(b []byte) [][]byte {
	var out [][]byte
	for len(b) >= 2 {
		end := min(2+int(binary.BigEndian.Uint16(b)), len(b))
		out = append(out, b[2:end])
		b = b[end:]
	}
	return out
}

// answers tells, by dnsmessage's own reading, which of the queries a
// answers (same id, one question each, equal up to ASCII case), keyed by
// id and question.
func answers(queries [][]byte, a []byte) (string, bool) {
	ha, qa, ok := oneQuestion(a)
	if !ok || !ha.Response {
		return "", false
	}
	for _, q := range queries {
		hq, qq, ok := oneQuestion(q)
		if ok && !hq.Response && hq.ID == ha.ID && qq.Type == qa.Type && qq.Class == qa.Class &&
			bytes.EqualFold(qq.Name.Data[:qq.Name.Length], qa.Name.Data[:qa.Name.Length]) {
			return string(binary.BigEndian.AppendUint16(nil, hq.ID)) + lowerASCII(qq.Name.Data[:qq.Name.Length]), true
		}
	}
	return "", false
}

func oneQuestion(m []byte) (dnsmessage.Header, dnsmessage.Question, bool) {
	var p dnsmessage.Parser
	h, err := p.Start(m)
	if err != nil {
		return h, dnsmessage.Question{}, false
	}
	q, err := p.Question()
	if err != nil {
		return h, q, false
	}
	_, err = p.Question()
	return h, q, errors.Is(err, dnsmessage.ErrSectionDone)
}
