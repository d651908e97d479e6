package enrich

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"sync/atomic"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// Bounds of the query matcher.
const (
	// DefaultMaxQueries is how many outstanding DNS queries are tracked.
	DefaultMaxQueries = 16384
	// DefaultQueryTimeout is how long a query waits for its answer.
	DefaultQueryTimeout = 30 * time.Second
	// maxTCPMessages bounds the messages taken from one TCP segment (each
	// takes at least 14 bytes: a 2047-byte copy holds fewer).
	maxTCPMessages = 160
)

// Protocol numbers of what the kernel hands over.
const (
	protoTCP = 6
	protoUDP = 17
)

// queryKey names one outstanding query: the socket that asked (its
// cookie), transport, both ends and the transaction id.
type queryKey struct {
	cookie         uint64
	proto          uint8
	id             uint16
	client, server netip.AddrPort
}

// connKey names a TCP connection to port 53.
type connKey struct {
	cookie         uint64
	client, server netip.AddrPort
}

// question is what a query asked; name is lowercase (ASCII), as on the wire.
type question struct {
	name         string
	qtype, class uint16
}

type pending struct {
	q     question
	asked int64
}

type restOf struct {
	n    int   // bytes still to come
	seen int64 // when the last part came
}

type queued struct {
	k     queryKey
	asked int64
}

// MatchStats are the matcher's counters.
type MatchStats struct {
	Outstanding int    // queries waiting for their answer now
	Tracked     uint64 // queries seen leaving a watched socket (a retry with the same id is the same query)
	Malformed   uint64 // queries without a readable header and single question: not tracked
	Answered    uint64 // answers that matched their query and were handed to the cache
	Unsolicited uint64 // answers the kernel let through that match no outstanding query (id, question)
	Expired     uint64 // queries that got no answer in time
	Evicted     uint64 // queries pushed out by the bound before their answer came
}

// matcher pairs DNS answers with the queries watched sockets sent: an
// answer counts only if it comes to the socket that asked, from the server
// it asked, over the same transport, with the query's id and question. The
// kernel already drops answers that match no (socket, ends, id); this is the
// second half of the check, which needs the question. It runs on the
// capture's reader goroutine only; the counters may be read from any.
type matcher struct {
	max     int
	timeout int64 // ns
	m       map[queryKey]pending
	queue   []queued // in the order asked: the front expires first
	head    int
	// rest holds, per TCP connection, the bytes still to come of an answer
	// whose start was matched and handed on: the segments carrying them
	// start mid-message and are part of that answer, not unsolicited.
	rest map[connKey]restOf

	outstanding                                                 atomic.Int64
	tracked, malformed, answered, unsolicited, expired, evicted atomic.Uint64
}

func newMatcher(max int, timeout time.Duration) *matcher {
	if max <= 0 {
		max = DefaultMaxQueries
	}
	if timeout <= 0 {
		timeout = DefaultQueryTimeout
	}
	return &matcher{max: max, timeout: int64(timeout), m: make(map[queryKey]pending), rest: make(map[connKey]restOf)}
}

// errNoQuestion: a message without exactly one question can be matched to
// nothing.
var errNoQuestion = errors.New("not exactly one question")

// parseQuestion reads a message's header and its single question.
func parseQuestion(msg []byte) (dnsmessage.Header, question, error) {
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil {
		return h, question{}, err
	}
	q, err := p.Question()
	if err != nil {
		return h, question{}, err
	}
	if _, err := p.Question(); !errors.Is(err, dnsmessage.ErrSectionDone) {
		return h, question{}, errNoQuestion
	}
	return h, question{lowerASCII(q.Name.Data[:q.Name.Length]), uint16(q.Type), uint16(q.Class)}, nil
}

// lowerASCII folds case as DNS does: ASCII letters only.
func lowerASCII(b []byte) string {
	out := make([]byte, len(b))
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		out[i] = c
	}
	return string(out)
}

// query tracks what a watched socket asked. A TCP segment may carry
// several length-prefixed queries.
func (m *matcher) query(now int64, proto uint8, cookie uint64, client, server netip.AddrPort, payload []byte) {
	m.expire(now)
	if proto == protoUDP {
		m.track(now, queryKey{cookie, proto, 0, client, server}, payload)
		return
	}
	for i := 0; i < maxTCPMessages && len(payload) >= 2; i++ {
		n := int(binary.BigEndian.Uint16(payload))
		end := min(2+n, len(payload))
		m.track(now, queryKey{cookie, proto, 0, client, server}, payload[2:end])
		payload = payload[end:]
	}
}

func (m *matcher) track(now int64, k queryKey, msg []byte) {
	h, q, err := parseQuestion(msg)
	if err != nil || h.Response {
		m.malformed.Add(1)
		return
	}
	k.id = h.ID
	if old, ok := m.m[k]; ok {
		// Asked again (a retry): the same query, the same wait, the
		// latest question.
		m.m[k] = pending{q, old.asked}
		return
	}
	m.tracked.Add(1)
	for len(m.m) >= m.max {
		m.pop(&m.evicted)
	}
	m.m[k] = pending{q, now}
	if len(m.queue)-m.head >= 2*m.max {
		m.compact()
	}
	m.queue = append(m.queue, queued{k, now})
	m.outstanding.Store(int64(len(m.m)))
}

// compact drops from the queue the queries already answered, so that it
// holds at most twice the bound however fast queries are answered.
func (m *matcher) compact() {
	live := m.queue[:0]
	for _, f := range m.queue[m.head:] {
		if p, ok := m.m[f.k]; ok && p.asked == f.asked {
			live = append(live, f)
		}
	}
	clear(m.queue[len(live):])
	m.queue, m.head = live, 0
}

// pop drops the query at the front of the queue, counting it in c if it was
// still outstanding.
func (m *matcher) pop(c *atomic.Uint64) {
	f := m.queue[m.head]
	m.queue[m.head] = queued{}
	m.head++
	if p, ok := m.m[f.k]; ok && p.asked == f.asked {
		delete(m.m, f.k)
		c.Add(1)
	}
	// Reuse the queue's memory once its dead front is half of it.
	if m.head > 1024 && m.head*2 > len(m.queue) {
		m.queue = append(m.queue[:0], m.queue[m.head:]...)
		m.head = 0
	}
	m.outstanding.Store(int64(len(m.m)))
}

// expire drops the queries whose wait is over.
func (m *matcher) expire(now int64) {
	for m.head < len(m.queue) && now-m.queue[m.head].asked > m.timeout {
		m.pop(&m.expired)
	}
}

// learner takes the answers that matched: the DNS cache.
type learner interface {
	AddPayload(proto uint8, payload []byte, origLen int, now int64)
}

// answer hands to l each message of payload that answers an outstanding
// query, as the kernel saw it: a UDP payload and its length on the wire, or
// one length-prefixed TCP message, complete or cut at the segment's end.
// The rest is counted as unsolicited.
func (m *matcher) answer(now int64, proto uint8, cookie uint64, client, server netip.AddrPort, payload []byte, origLen int, l learner) {
	m.expire(now)
	if proto == protoUDP {
		if m.match(now, queryKey{cookie, proto, 0, client, server}, payload) {
			l.AddPayload(proto, payload, origLen, now)
		}
		return
	}
	ck := connKey{cookie, client, server}
	if r, ok := m.rest[ck]; ok && now-r.seen <= m.timeout {
		// The rest of an answer already handed on (and counted) in part.
		delete(m.rest, ck)
		if r.n >= len(payload) {
			if r.n > len(payload) {
				m.rest[ck] = restOf{r.n - len(payload), now}
			}
			return
		}
		payload = payload[r.n:]
	}
	for i := 0; i < maxTCPMessages && len(payload) > 0; i++ {
		if len(payload) < 2 {
			m.unsolicited.Add(1)
			return
		}
		n := int(binary.BigEndian.Uint16(payload))
		end := min(2+n, len(payload))
		if !m.match(now, queryKey{cookie, proto, 0, client, server}, payload[2:end]) {
			// Nothing after an unmatched message can be framed with trust.
			return
		}
		l.AddPayload(proto, payload[:end], end, now)
		if 2+n > end {
			m.expectRest(ck, restOf{2 + n - end, now})
		}
		payload = payload[end:]
	}
	if len(payload) > 0 {
		m.unsolicited.Add(1) // more messages than one segment can honestly hold
	}
}

// expectRest notes that the next bytes on ck continue an answer. Bounded:
// when full, the notes older than the timeout go; if none is, the rest of
// this answer will count as unsolicited.
func (m *matcher) expectRest(ck connKey, r restOf) {
	if len(m.rest) >= m.max {
		for k, old := range m.rest {
			if r.seen-old.seen > m.timeout {
				delete(m.rest, k)
			}
		}
		if len(m.rest) >= m.max {
			return
		}
	}
	m.rest[ck] = r
}

// match tells whether msg answers the outstanding query k (with msg's id):
// same question, exactly one. A match ends the query; anything else counts
// as unsolicited.
func (m *matcher) match(now int64, k queryKey, msg []byte) bool {
	h, q, err := parseQuestion(msg)
	if err == nil && h.Response {
		k.id = h.ID
		if p, ok := m.m[k]; ok && p.q == q && now-p.asked <= m.timeout {
			delete(m.m, k) // the queue entry dies when it reaches the front
			m.outstanding.Store(int64(len(m.m)))
			m.answered.Add(1)
			return true
		}
	}
	m.unsolicited.Add(1)
	return false
}

func (m *matcher) stats() MatchStats {
	return MatchStats{
		Outstanding: int(m.outstanding.Load()),
		Tracked:     m.tracked.Load(),
		Malformed:   m.malformed.Load(),
		Answered:    m.answered.Load(),
		Unsolicited: m.unsolicited.Load(),
		Expired:     m.expired.Load(),
		Evicted:     m.evicted.Load(),
	}
}
