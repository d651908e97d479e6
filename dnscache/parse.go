package dnscache

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// Bounds on the work one message can cause, whatever it claims. Every answer
// record is read: a message holds at most 65,535 of them (ANCOUNT), and each
// takes at least minRecord bytes, so the work is bounded by its length.
const (
	maxChain  = 16 // CNAME hops followed from an address back to the asked name
	minRecord = 11 // the smallest record: root name, type, class, TTL, RDLENGTH 0
	headerLen = 12
)

// Protocol numbers of the payloads the kernel hands over.
const (
	ProtoTCP = 6
	ProtoUDP = 17
)

// ErrMalformed wraps every reason a payload could not be parsed.
var ErrMalformed = errors.New("malformed DNS message")

// AddPayload learns from what the kernel captured: a UDP datagram's payload,
// or a TCP segment from port 53 (2-byte length-prefixed messages). origLen >
// len(payload) means the kernel cut it; a TCP message running past the
// segment's end is cut too. The records before a cut are still learned. It
// never fails: bad input is counted and dropped.
func (c *Cache) AddPayload(proto uint8, payload []byte, origLen int, now int64) {
	if proto == ProtoUDP {
		_ = c.addMessage(payload, max(origLen, len(payload)), now)
		return
	}
	// Every message of the segment: each takes at least 2+headerLen bytes.
	for len(payload) > 0 {
		if len(payload) < 2 {
			c.truncated.Add(1) // a length prefix split over segments
			return
		}
		n := int(binary.BigEndian.Uint16(payload))
		if n == 0 {
			c.malformed.Add(1)
			return
		}
		if 2+n > len(payload) {
			// A message spread over segments: we do not reassemble, but
			// learn what this segment holds of it.
			_ = c.addMessage(payload[2:], n, now)
			return
		}
		_ = c.addMessage(payload[2:2+n], n, now)
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
// addresses teach nothing and are counted as ignored. The message lands in
// exactly one of the outcomes Stats lists.
func (c *Cache) AddMessage(msg []byte, now int64) error {
	return c.addMessage(msg, len(msg), now)
}

// addMessage is AddMessage for msg, the first bytes of a message origLen
// long: cut when origLen > len(msg).
func (c *Cache) addMessage(msg []byte, origLen int, now int64) error {
	cut := origLen > len(msg)
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil {
		c.fail(cut, 0, 0, origLen)
		return fmt.Errorf("%w: header: %v", ErrMalformed, err)
	}
	if !h.Response || h.RCode != dnsmessage.RCodeSuccess {
		c.ign.Add(1)
		return nil
	}
	announced := int(binary.BigEndian.Uint16(msg[6:]))
	if err := p.SkipAllQuestions(); err != nil {
		c.fail(cut, announced, 0, origLen)
		return fmt.Errorf("%w: question: %v", ErrMalformed, err)
	}
	var (
		cnames  []cname
		addrs   []addrRec
		perr    error
		read    int
		scratch [128]addrRec // a 2047-byte copy holds at most 127 A records
		last    dnsmessage.Name
		lastStr string
	)
	addrs = scratch[:0]
	for {
		rh, err := p.AnswerHeader()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			break
		}
		if err != nil {
			perr = err
			break
		}
		// Only the names of records we learn from must be clean. Answers
		// repeat their owner: normalize it once.
		owner := lastStr
		switch rh.Type {
		case dnsmessage.TypeA, dnsmessage.TypeAAAA, dnsmessage.TypeCNAME:
			if rh.Name.Length != last.Length || rh.Name.Data != last.Data {
				if owner, err = normalize(rh.Name); err != nil {
					perr = err
				}
				last, lastStr = rh.Name, owner
			}
		}
		if perr != nil {
			break
		}
		a, cn, err := readAnswer(&p, rh, owner)
		if err != nil {
			perr = err
			break
		}
		read++
		switch rh.Type {
		case dnsmessage.TypeA, dnsmessage.TypeAAAA:
			addrs = append(addrs, a)
		case dnsmessage.TypeCNAME:
			cnames = append(cnames, cn)
		}
	}
	// What was parsed before a cut or a bad record is still good to learn.
	c.learnAll(addrs, cnames, now)
	c.records.Add(uint64(len(addrs)))
	if perr != nil {
		if len(addrs) > 0 {
			c.partial.Add(1)
			c.dropped(cut, announced, read, origLen)
		} else {
			c.fail(cut, announced, read, origLen)
		}
		return fmt.Errorf("%w: answer: %v", ErrMalformed, perr)
	}
	if len(addrs) == 0 {
		c.ign.Add(1)
		return nil
	}
	c.answers.Add(1)
	return nil
}

// fail counts a message of which nothing was learned.
func (c *Cache) fail(cut bool, announced, read, origLen int) {
	if cut {
		c.truncated.Add(1)
	} else {
		c.malformed.Add(1)
	}
	c.dropped(cut, announced, read, origLen)
}

// dropped counts the answer records not read: those the header announced,
// but no more than the message's length could hold, so that a forged count
// cannot inflate the counter.
func (c *Cache) dropped(cut bool, announced, read, origLen int) {
	n := min(announced, (origLen-headerLen)/minRecord) - read
	if n <= 0 {
		return
	}
	if cut {
		c.droppedCut.Add(uint64(n))
	} else {
		c.droppedMalformed.Add(uint64(n))
	}
}

// learnAll adds every address with its owner and every alias leading to it.
// Owners repeat (many addresses for one name): each chain is walked once.
func (c *Cache) learnAll(addrs []addrRec, cnames []cname, now int64) {
	if len(addrs) == 0 {
		return
	}
	// By target, to find a name's alias by binary search; among aliases of
	// one target the first in the message wins.
	slices.SortStableFunc(cnames, func(a, b cname) int { return cmp.Compare(a.target, b.target) })
	var (
		lastName string
		chainN   [maxChain + 1]string
		chainT   [maxChain + 1]uint32 // the least TTL from the owner down to this hop
		ttlsN    [maxChain + 1]uint32
	)
	chain, chainTTL := chainN[:0], chainT[:0]
	for i, a := range addrs {
		if i == 0 || a.owner != lastName {
			lastName = a.owner
			chain, chainTTL = chainN[:0], chainT[:0]
			chain, chainTTL = append(chain, a.owner), append(chainTTL, ^uint32(0))
			cur := a.owner
			for hop := 0; hop < maxChain; hop++ {
				j, ok := slices.BinarySearchFunc(cnames, cur, func(cn cname, t string) int { return cmp.Compare(cn.target, t) })
				for ok && j < len(cnames) && cnames[j].target == cur && cnames[j].alias == cur {
					j++ // a name aliased to itself leads nowhere
				}
				if !ok || j >= len(cnames) || cnames[j].target != cur || cnames[j].alias == "" || slices.Contains(chain, cnames[j].alias) {
					break
				}
				cur = cnames[j].alias
				chain = append(chain, cur)
				chainTTL = append(chainTTL, min(chainTTL[len(chainTTL)-1], cnames[j].ttl))
			}
		}
		ttls := ttlsN[:len(chain)]
		for k := range chain {
			ttls[k] = min(a.ttl, chainTTL[k])
		}
		c.addNames(a.addr, chain, ttls, now)
	}
}

func ttlDur(s uint32) time.Duration { return time.Duration(s) * time.Second }

// readAnswer reads the body of the answer rh heads, owned by owner (rh.Name
// normalized): an address record (A, AAAA), an alias (CNAME), or neither
// for the types that name nothing.
func readAnswer(p *dnsmessage.Parser, rh dnsmessage.ResourceHeader, owner string) (addrRec, cname, error) {
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
		target, err := normalize(r.CNAME)
		return addrRec{}, cname{owner, target, rh.TTL}, err
	default:
		return addrRec{}, cname{}, p.SkipAnswer()
	}
	if owner == "" {
		// The root names nothing; such a record is broken or hostile.
		return addrRec{}, cname{}, errors.New("address record owned by the root")
	}
	return addrRec{owner, ip, rh.TTL}, cname{}, nil
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
