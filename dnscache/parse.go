package dnscache

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// Bounds on the work one message can cause, whatever it claims.
const (
	maxRecords = 64 // answer records looked at per message
	maxChain   = 16 // CNAME hops followed from an address back to the asked name
	maxTCPMsgs = 16 // messages taken from one TCP segment
)

// Protocol numbers of the payloads the kernel hands over.
const (
	ProtoTCP = 6
	ProtoUDP = 17
)

// ErrMalformed wraps every reason a payload could not be parsed.
var ErrMalformed = errors.New("malformed DNS message")

// AddPayload learns from what the kernel captured: a UDP datagram's payload,
// or a TCP segment from port 53 (2-byte length-prefixed messages; only those
// complete in the segment are used). origLen > len(payload) means the kernel
// cut it: the records before the cut are still learned. It never fails: bad
// input is counted and dropped.
func (c *Cache) AddPayload(proto uint8, payload []byte, origLen int, now int64) {
	cut := origLen > len(payload)
	if proto == ProtoUDP {
		if err := c.AddMessage(payload, now); err != nil && cut {
			c.truncated.Add(1)
		}
		return
	}
	for i := 0; i < maxTCPMsgs && len(payload) > 0; i++ {
		if len(payload) < 2 {
			c.truncated.Add(1)
			return
		}
		n := int(binary.BigEndian.Uint16(payload))
		if n == 0 {
			c.malformed.Add(1)
			return
		}
		if 2+n > len(payload) {
			// A message spread over segments: we do not reassemble.
			c.truncated.Add(1)
			return
		}
		_ = c.AddMessage(payload[2:2+n], now)
		payload = payload[2+n:]
	}
}

type cname struct {
	alias, target string
	ttl           uint32
}

type addrRec struct {
	owner string
	addr  netip.Addr
	ttl   uint32
}

// AddMessage parses one DNS message and learns its A and AAAA answers: each
// address maps to its owner name and every name on the CNAME chain leading to
// it (the asked name among them). Queries, error answers and messages without
// addresses teach nothing and are counted as ignored.
func (c *Cache) AddMessage(msg []byte, now int64) error {
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil {
		c.malformed.Add(1)
		return fmt.Errorf("%w: header: %v", ErrMalformed, err)
	}
	if !h.Response || h.RCode != dnsmessage.RCodeSuccess {
		c.ign.Add(1)
		return nil
	}
	if err := p.SkipAllQuestions(); err != nil {
		c.malformed.Add(1)
		return fmt.Errorf("%w: question: %v", ErrMalformed, err)
	}
	var (
		cnames  []cname
		addrs   []addrRec
		perr    error
		scratch [maxRecords]addrRec
	)
	addrs = scratch[:0]
	for i := 0; i < maxRecords; i++ {
		rh, err := p.AnswerHeader()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			break
		}
		if err != nil {
			perr = err
			break
		}
		a, cn, err := readAnswer(&p, rh)
		if err != nil {
			perr = err
			break
		}
		switch rh.Type {
		case dnsmessage.TypeA, dnsmessage.TypeAAAA:
			addrs = append(addrs, a)
		case dnsmessage.TypeCNAME:
			cnames = append(cnames, cn)
		}
	}
	// What was parsed before a cut or a bad record is still good to learn.
	for _, a := range addrs {
		if a.owner == "" {
			continue
		}
		c.learn(a, cnames, now)
	}
	c.records.Add(uint64(len(addrs)))
	if perr != nil {
		c.malformed.Add(1)
		return fmt.Errorf("%w: answer: %v", ErrMalformed, perr)
	}
	if len(addrs) == 0 {
		c.ign.Add(1)
		return nil
	}
	c.answers.Add(1)
	return nil
}

// learn adds a's owner and every alias that leads to it.
func (c *Cache) learn(a addrRec, cnames []cname, now int64) {
	ttl := a.ttl
	c.Add(a.addr, a.owner, ttlDur(ttl), now)
	cur := a.owner
	for hop := 0; hop < maxChain; hop++ {
		next := ""
		for _, cn := range cnames {
			if cn.target == cur && cn.alias != cur {
				next = cn.alias
				ttl = min(ttl, cn.ttl)
				break
			}
		}
		if next == "" || next == a.owner {
			return
		}
		c.Add(a.addr, next, ttlDur(ttl), now)
		cur = next
	}
}

func ttlDur(s uint32) time.Duration { return time.Duration(s) * time.Second }

// readAnswer reads the body of the answer rh heads: an address record (A,
// AAAA), an alias (CNAME), or neither for the types that name nothing.
func readAnswer(p *dnsmessage.Parser, rh dnsmessage.ResourceHeader) (addrRec, cname, error) {
	var ip netip.Addr
	// The parser reads 4 or 16 bytes whatever RDLENGTH says: a wrong length
	// would learn the bytes of the next record.
	switch rh.Type {
	case dnsmessage.TypeA:
		if rh.Length != 4 {
			return addrRec{}, cname{}, fmt.Errorf("data length %d of an A record", rh.Length)
		}
		r, err := p.AResource()
		if err != nil {
			return addrRec{}, cname{}, err
		}
		ip = netip.AddrFrom4(r.A)
	case dnsmessage.TypeAAAA:
		if rh.Length != 16 {
			return addrRec{}, cname{}, fmt.Errorf("data length %d of an AAAA record", rh.Length)
		}
		r, err := p.AAAAResource()
		if err != nil {
			return addrRec{}, cname{}, err
		}
		ip = netip.AddrFrom16(r.AAAA).Unmap()
	case dnsmessage.TypeCNAME:
		r, err := p.CNAMEResource()
		if err != nil {
			return addrRec{}, cname{}, err
		}
		alias, err := normalize(rh.Name)
		if err != nil {
			return addrRec{}, cname{}, err
		}
		target, err := normalize(r.CNAME)
		return addrRec{}, cname{alias, target, rh.TTL}, err
	default:
		return addrRec{}, cname{}, p.SkipAnswer()
	}
	owner, err := normalize(rh.Name)
	return addrRec{owner, ip, rh.TTL}, cname{}, err
}

// normalize returns a name lowercase and without the trailing dot. A name
// with a byte outside printable ASCII (control characters, spaces, bytes
// that are not UTF-8) is refused: labels may hold any byte on the wire, but
// such a name is hostile or broken, and passed on it would reach terminals
// (escape sequences) and msgpack strings (invalid UTF-8) downstream.
func normalize(n dnsmessage.Name) (string, error) {
	b := n.Data[:n.Length]
	if len(b) > 0 && b[len(b)-1] == '.' {
		b = b[:len(b)-1]
	}
	for _, c := range b {
		if c < 0x21 || c > 0x7e {
			return "", fmt.Errorf("name %q has byte 0x%02x, not printable ASCII", b, c)
		}
	}
	return strings.ToLower(string(b)), nil
}
