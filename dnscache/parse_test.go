package dnscache

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// --- building real DNS messages ---

type rr struct {
	name string
	ttl  uint32
	body dnsmessage.ResourceBody
}

func aRR(name string, ttl uint32, ip string) rr {
	return rr{name, ttl, &dnsmessage.AResource{A: netip.MustParseAddr(ip).As4()}}
}

func aaaaRR(name string, ttl uint32, ip string) rr {
	return rr{name, ttl, &dnsmessage.AAAAResource{AAAA: netip.MustParseAddr(ip).As16()}}
}

func cnameRR(name, target string, ttl uint32) rr {
	return rr{name, ttl, &dnsmessage.CNAMEResource{CNAME: dnsmessage.MustNewName(target)}}
}

func txtRR(name string, ttl uint32, txt ...string) rr {
	return rr{name, ttl, &dnsmessage.TXTResource{TXT: txt}}
}

func mxRR(name string, ttl uint32, pref uint16, mx string) rr {
	return rr{name, ttl, &dnsmessage.MXResource{Pref: pref, MX: dnsmessage.MustNewName(mx)}}
}

func respHeader() dnsmessage.Header {
	return dnsmessage.Header{ID: 0x1234, Response: true, RecursionDesired: true, RecursionAvailable: true}
}

// buildMsg builds a DNS message with compression: one question (if qname is
// not empty) and the given answers.
func buildMsg(tb testing.TB, h dnsmessage.Header, qname string, qtype dnsmessage.Type, answers ...rr) []byte {
	tb.Helper()
	b := dnsmessage.NewBuilder(make([]byte, 0, 512), h)
	b.EnableCompression()
	must := func(err error) {
		tb.Helper()
		if err != nil {
			tb.Fatalf("building DNS message: %v", err)
		}
	}
	must(b.StartQuestions())
	if qname != "" {
		must(b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(qname), Type: qtype, Class: dnsmessage.ClassINET}))
	}
	must(b.StartAnswers())
	for _, a := range answers {
		rh := dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(a.name), Class: dnsmessage.ClassINET, TTL: a.ttl}
		switch r := a.body.(type) {
		case *dnsmessage.AResource:
			must(b.AResource(rh, *r))
		case *dnsmessage.AAAAResource:
			must(b.AAAAResource(rh, *r))
		case *dnsmessage.CNAMEResource:
			must(b.CNAMEResource(rh, *r))
		case *dnsmessage.TXTResource:
			must(b.TXTResource(rh, *r))
		case *dnsmessage.MXResource:
			must(b.MXResource(rh, *r))
		default:
			tb.Fatalf("unsupported record %T", r)
		}
	}
	msg, err := b.Finish()
	must(err)
	return msg
}

// frame prefixes each message with its 2-byte length, as DNS over TCP does.
func frame(msgs ...[]byte) []byte {
	var out []byte
	for _, m := range msgs {
		out = binary.BigEndian.AppendUint16(out, uint16(len(m)))
		out = append(out, m...)
	}
	return out
}

// cnameChainMsg is www.example.com -> edge.cdn.example.net -> e1.cdn.example.net -> A,
// in mixed case.
func cnameChainMsg(tb testing.TB) []byte {
	return buildMsg(tb, respHeader(), "WWW.Example.COM.", dnsmessage.TypeA,
		cnameRR("WWW.Example.COM.", "Edge.CDN.example.NET.", 3600),
		cnameRR("Edge.CDN.example.NET.", "E1.cdn.Example.net.", 300),
		aRR("E1.cdn.Example.net.", 120, "93.184.215.14"))
}

// --- tests ---

var chainNames = []string{"www.example.com", "edge.cdn.example.net", "e1.cdn.example.net"}

func TestParseA(t *testing.T) {
	c := New(Config{MinTTL: time.Second, MaxTTL: time.Hour})
	msg := buildMsg(t, respHeader(), "example.org.", dnsmessage.TypeA, aRR("example.org.", 300, "192.0.2.80"))
	if err := c.AddMessage(msg, t0); err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr("192.0.2.80")
	wantNames(t, c, a, t0, "example.org")
	wantNames(t, c, a, t0+sec(300)-1, "example.org")
	wantNames(t, c, a, t0+sec(300))
	st := c.Stats()
	if st.Answers != 1 || st.Records != 1 || st.Malformed != 0 || st.Ignored != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestParseAAAA(t *testing.T) {
	c := New(Config{})
	msg := buildMsg(t, respHeader(), "v6.Example.org.", dnsmessage.TypeAAAA,
		aaaaRR("v6.Example.org.", 300, "2001:db8::80"),
		aaaaRR("v6.Example.org.", 300, "::ffff:198.51.100.9"))
	if err := c.AddMessage(msg, t0); err != nil {
		t.Fatal(err)
	}
	wantNames(t, c, netip.MustParseAddr("2001:db8::80"), t0, "v6.example.org")
	// A v4-mapped AAAA is stored as the IPv4 address, and found either way.
	wantNames(t, c, netip.MustParseAddr("198.51.100.9"), t0, "v6.example.org")
	wantNames(t, c, netip.MustParseAddr("::ffff:198.51.100.9"), t0, "v6.example.org")
	if c.Len() != 2 {
		t.Fatalf("Len %d, want 2", c.Len())
	}
	checkInvariants(t, c)
}

func TestParseCNAMEChain(t *testing.T) {
	c := New(Config{MinTTL: time.Second, MaxTTL: time.Hour})
	if err := c.AddMessage(cnameChainMsg(t), t0); err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr("93.184.215.14")
	wantNames(t, c, a, t0, chainNames...)
	for _, n := range c.Lookup(a, t0) {
		if n != "" && (n[len(n)-1] == '.' || bytes.ContainsAny([]byte(n), "ABCDEFGHIJKLMNOPQRSTUVWXYZ")) {
			t.Fatalf("name not normalized: %q", n)
		}
	}
	// The A TTL (120 s) bounds every name of the chain.
	wantNames(t, c, a, t0+sec(120), nil...)
	if st := c.Stats(); st.Records != 1 || st.Answers != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestParseCNAMEChainTTL(t *testing.T) {
	// The shortest TTL along the chain bounds the aliases.
	c := New(Config{MinTTL: time.Second, MaxTTL: time.Hour})
	msg := buildMsg(t, respHeader(), "a.example.", dnsmessage.TypeA,
		cnameRR("a.example.", "b.example.", 30),
		cnameRR("b.example.", "c.example.", 600),
		aRR("c.example.", 600, "192.0.2.9"))
	if err := c.AddMessage(msg, t0); err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr("192.0.2.9")
	wantNames(t, c, a, t0+sec(29), "a.example", "b.example", "c.example")
	wantNames(t, c, a, t0+sec(30), "b.example", "c.example")
}

func TestParseCNAMEOutOfOrder(t *testing.T) {
	// Records in reverse order still chain.
	c := New(Config{})
	msg := buildMsg(t, respHeader(), "www.example.com.", dnsmessage.TypeA,
		aRR("e1.cdn.example.net.", 120, "93.184.215.14"),
		cnameRR("edge.cdn.example.net.", "e1.cdn.example.net.", 300),
		cnameRR("www.example.com.", "edge.cdn.example.net.", 3600))
	if err := c.AddMessage(msg, t0); err != nil {
		t.Fatal(err)
	}
	wantNames(t, c, netip.MustParseAddr("93.184.215.14"), t0, chainNames...)
}

func TestParseCNAMELoop(t *testing.T) {
	c := New(Config{})
	msg := buildMsg(t, respHeader(), "a.example.", dnsmessage.TypeA,
		cnameRR("a.example.", "b.example.", 60),
		cnameRR("b.example.", "a.example.", 60),
		cnameRR("c.example.", "c.example.", 60),
		aRR("a.example.", 60, "192.0.2.5"),
		aRR("c.example.", 60, "192.0.2.6"))
	if err := c.AddMessage(msg, t0); err != nil {
		t.Fatal(err)
	}
	wantNames(t, c, netip.MustParseAddr("192.0.2.5"), t0, "a.example", "b.example")
	wantNames(t, c, netip.MustParseAddr("192.0.2.6"), t0, "c.example")
}

func TestParseSeveralA(t *testing.T) {
	c := New(Config{})
	ips := []string{"192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"}
	var ans []rr
	for _, ip := range ips {
		ans = append(ans, aRR("multi.example.", 60, ip))
	}
	if err := c.AddMessage(buildMsg(t, respHeader(), "multi.example.", dnsmessage.TypeA, ans...), t0); err != nil {
		t.Fatal(err)
	}
	for _, ip := range ips {
		wantNames(t, c, netip.MustParseAddr(ip), t0, "multi.example")
	}
	if st := c.Stats(); st.Records != 4 || st.Answers != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestParseTwoNamesOneAddr(t *testing.T) {
	c := New(Config{})
	m1 := buildMsg(t, respHeader(), "shop.example.", dnsmessage.TypeA, aRR("shop.example.", 60, "203.0.113.7"))
	m2 := buildMsg(t, respHeader(), "blog.example.", dnsmessage.TypeA, aRR("blog.example.", 60, "203.0.113.7"))
	for _, m := range [][]byte{m1, m2} {
		if err := c.AddMessage(m, t0); err != nil {
			t.Fatal(err)
		}
	}
	wantNames(t, c, netip.MustParseAddr("203.0.113.7"), t0, "shop.example", "blog.example")
}

func TestParseIgnored(t *testing.T) {
	query := respHeader()
	query.Response = false
	nx := respHeader()
	nx.RCode = dnsmessage.RCodeNameError
	sf := respHeader()
	sf.RCode = dnsmessage.RCodeServerFailure
	cases := []struct {
		name string
		msg  []byte
	}{
		// Even with an answer section, a query teaches nothing.
		{"query", buildMsg(t, query, "q.example.", dnsmessage.TypeA, aRR("q.example.", 60, "192.0.2.1"))},
		{"NXDOMAIN", buildMsg(t, nx, "nx.example.", dnsmessage.TypeA)},
		{"NXDOMAIN with answer", buildMsg(t, nx, "nx.example.", dnsmessage.TypeA, aRR("nx.example.", 60, "192.0.2.1"))},
		{"SERVFAIL", buildMsg(t, sf, "sf.example.", dnsmessage.TypeA, aRR("sf.example.", 60, "192.0.2.1"))},
		{"TXT only", buildMsg(t, respHeader(), "t.example.", dnsmessage.TypeTXT, txtRR("t.example.", 60, "192.0.2.1", "v=spf1"))},
		{"MX only", buildMsg(t, respHeader(), "m.example.", dnsmessage.TypeMX, mxRR("m.example.", 60, 10, "mail.m.example."))},
		{"CNAME only", buildMsg(t, respHeader(), "c.example.", dnsmessage.TypeA, cnameRR("c.example.", "d.example.", 60))},
		{"no answers", buildMsg(t, respHeader(), "e.example.", dnsmessage.TypeA)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := New(Config{})
			if err := c.AddMessage(tc.msg, t0); err != nil {
				t.Fatalf("AddMessage: %v", err)
			}
			st := c.Stats()
			if st.Ignored != 1 || st.Entries != 0 || st.Records != 0 || st.Answers != 0 || st.Malformed != 0 {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}

func TestParseMixedTypes(t *testing.T) {
	// TXT and MX records among A records are skipped, not fatal.
	c := New(Config{})
	msg := buildMsg(t, respHeader(), "x.example.", dnsmessage.TypeALL,
		txtRR("x.example.", 60, "hello"),
		aRR("x.example.", 60, "192.0.2.44"),
		mxRR("x.example.", 60, 5, "mx.x.example."))
	if err := c.AddMessage(msg, t0); err != nil {
		t.Fatal(err)
	}
	wantNames(t, c, netip.MustParseAddr("192.0.2.44"), t0, "x.example")
}

// learned returns every address the cache holds with its names.
func learned(c *Cache, now int64) map[netip.Addr][]string {
	c.mu.Lock()
	addrs := make([]netip.Addr, 0, len(c.m))
	for a := range c.m {
		addrs = append(addrs, a)
	}
	c.mu.Unlock()
	out := make(map[netip.Addr][]string)
	for _, a := range addrs {
		if v := c.Lookup(a, now); len(v) > 0 {
			out[a] = v
		}
	}
	return out
}

func TestParseTruncation(t *testing.T) {
	msgs := map[string][]byte{
		"chain": cnameChainMsg(t),
		"multi": buildMsg(t, respHeader(), "m.example.", dnsmessage.TypeA,
			aRR("m.example.", 60, "192.0.2.1"), aRR("m.example.", 60, "192.0.2.2"),
			aaaaRR("m.example.", 60, "2001:db8::2")),
	}
	for name, full := range msgs {
		t.Run(name, func(t *testing.T) {
			ref := New(Config{})
			if err := ref.AddMessage(full, t0); err != nil {
				t.Fatal(err)
			}
			want := learned(ref, t0)
			for n := 0; n < len(full); n++ {
				cut := full[:n:n] // capacity n: reading past the cut would panic
				c := New(Config{})
				err := c.AddMessage(cut, t0)
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("cut at %d/%d: err %v, want ErrMalformed", n, len(full), err)
				}
				if st := c.Stats(); st.Malformed+st.Partial != 1 || outcomes(st) != 1 {
					t.Fatalf("cut at %d: stats %+v, want one outcome: malformed or partial", n, st)
				}
				for a, names := range learned(c, t0) {
					for _, nm := range names {
						if !slices.Contains(want[a], nm) {
							t.Fatalf("cut at %d: learned %v -> %q, not in the full message (%v)", n, a, nm, want)
						}
					}
				}
				// The same cut as a UDP payload the kernel truncated.
				c = New(Config{})
				c.AddPayload(ProtoUDP, cut, len(full), t0)
				st := c.Stats()
				if st.Truncated+st.Partial != 1 || outcomes(st) != 1 {
					t.Fatalf("UDP cut at %d: stats %+v, want one outcome: truncated or partial", n, st)
				}
				if n >= headerLen && st.DroppedCut == 0 {
					t.Fatalf("UDP cut at %d: no record counted as dropped: %+v", n, st)
				}
			}
		})
	}
}

// outcomes is how many outcomes the messages fed to a cache landed in.
func outcomes(st Stats) uint64 {
	return st.Answers + st.Partial + st.Truncated + st.Malformed + st.Ignored
}

// An EDNS answer of 120 A records (1,962 bytes on the wire, as measured in
// the field) and one of 4,000 (a TCP-sized message) are learned whole.
func TestParseAllRecords(t *testing.T) {
	for _, n := range []int{120, 4000} {
		var ans []rr
		for i := range n {
			ans = append(ans, rr{"big.example.", 60, &dnsmessage.AResource{A: addrN(i).As4()}})
		}
		msg := buildMsg(t, respHeader(), "big.example.", dnsmessage.TypeA, ans...)
		if n == 120 && len(msg) > 2047 {
			t.Fatalf("%d-record answer is %d bytes, more than the kernel copies", n, len(msg))
		}
		c := New(Config{MaxEntries: 2 * n})
		if err := c.AddMessage(msg, t0); err != nil {
			t.Fatal(err)
		}
		st := c.Stats()
		if st.Records != uint64(n) || st.Entries != n || st.Answers != 1 || outcomes(st) != 1 || st.DroppedCut+st.DroppedMalformed != 0 {
			t.Fatalf("%d records: stats %+v", n, st)
		}
		for i := range n {
			wantNames(t, c, addrN(i), t0, "big.example")
		}
		checkInvariants(t, c)
	}
}

// longName is a name of exactly n characters (n >= 3), in labels of at most 63.
func longName(n int, tag string) string {
	s := tag
	for len(s) < n {
		if rem := n - len(s) - 1; rem > 0 {
			s += "." + strings.Repeat("a", min(63, rem))
		} else {
			s = "x" + s
		}
	}
	return s
}

// Names of 253 characters (255 bytes on the wire, the most DNS allows), as
// owner and along a CNAME chain, are learned in full.
func TestParseLongNames(t *testing.T) {
	owner := longName(253, "o1")
	alias := longName(253, "a1")
	if len(owner) != 253 {
		t.Fatalf("owner %d chars", len(owner))
	}
	msg := buildMsg(t, respHeader(), alias+".", dnsmessage.TypeA,
		cnameRR(alias+".", owner+".", 60), aRR(owner+".", 60, "192.0.2.7"), aRR(owner+".", 60, "192.0.2.8"))
	c := New(Config{})
	if err := c.AddMessage(msg, t0); err != nil {
		t.Fatal(err)
	}
	wantNames(t, c, netip.MustParseAddr("192.0.2.7"), t0, owner, alias)
	wantNames(t, c, netip.MustParseAddr("192.0.2.8"), t0, owner, alias)
	if st := c.Stats(); st.Answers != 1 || outcomes(st) != 1 || st.Names != 2 {
		t.Fatalf("stats %+v", st)
	}
	checkInvariants(t, c)
}

// An answer the kernel cut mid-record: the addresses before the cut are
// learned, the message is counted once (partial), and the records past the
// cut are counted as dropped.
func TestParseCutInKernel(t *testing.T) {
	var ans []rr
	for i := range 120 {
		ans = append(ans, rr{"cut.example.", 60, &dnsmessage.AResource{A: addrN(i).As4()}})
	}
	full := buildMsg(t, respHeader(), "cut.example.", dnsmessage.TypeA, ans...)
	// Question: 12 header + 11 name + 4; records of 16 bytes after it.
	const first = 12 + 13 + 4
	cut := full[:first+41*16+7] // 41 records whole, the 42nd cut
	c := New(Config{})
	c.AddPayload(ProtoUDP, cut, len(full), t0)
	st := c.Stats()
	if st.Partial != 1 || outcomes(st) != 1 || st.Records != 41 || st.DroppedCut != 120-41 || st.DroppedMalformed != 0 {
		t.Fatalf("stats %+v, want one partial answer, 41 records learned, 79 dropped as cut", st)
	}
	wantNames(t, c, addrN(40), t0, "cut.example")
	wantNames(t, c, addrN(41), t0)

	// Cut before the first record: truncated, all 120 dropped.
	c = New(Config{})
	c.AddPayload(ProtoUDP, full[:first+5], len(full), t0)
	if st := c.Stats(); st.Truncated != 1 || outcomes(st) != 1 || st.Records != 0 || st.DroppedCut != 120 {
		t.Fatalf("stats %+v, want one truncated answer, 120 records dropped as cut", st)
	}

	// The same bytes, not cut: a broken message, counted as such.
	c = New(Config{})
	c.AddPayload(ProtoUDP, cut, len(cut), t0)
	if st := c.Stats(); st.Partial != 1 || outcomes(st) != 1 || st.Records != 41 || st.DroppedCut != 0 || st.DroppedMalformed == 0 {
		t.Fatalf("stats %+v, want one partial answer, records dropped as malformed", st)
	}
}

// hdr makes a raw 12-byte header.
func hdr(flags, qd, an, ns, ar uint16) []byte {
	b := make([]byte, 12)
	binary.BigEndian.PutUint16(b[0:], 0xbeef)
	binary.BigEndian.PutUint16(b[2:], flags)
	binary.BigEndian.PutUint16(b[4:], qd)
	binary.BigEndian.PutUint16(b[6:], an)
	binary.BigEndian.PutUint16(b[8:], ns)
	binary.BigEndian.PutUint16(b[10:], ar)
	return b
}

const respFlags = 0x8180 // QR, RD, RA, NOERROR

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// rawA is an A record body after its name: type A, class IN, TTL 60, 4 bytes.
var rawA = []byte{0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 99}

func TestParseHostile(t *testing.T) {
	valid := buildMsg(t, respHeader(), "ok.example.", dnsmessage.TypeA, aRR("ok.example.", 60, "192.0.2.99"))
	many := slices.Clone(valid)
	binary.BigEndian.PutUint16(many[6:], 0xffff) // 65535 answers claimed, 1 present

	cases := []struct {
		name string
		msg  []byte
	}{
		{"empty", nil},
		{"short header", []byte{0xbe, 0xef, 0x81}},
		{"question pointer to itself", cat(hdr(respFlags, 1, 0, 0, 0), []byte{0xc0, 12, 0, 1, 0, 1})},
		{"answer pointer to itself", cat(hdr(respFlags, 0, 1, 0, 0), []byte{0xc0, 12}, rawA)},
		{"pointer ping-pong", cat(hdr(respFlags, 0, 1, 0, 0), []byte{0xc0, 14, 0xc0, 12}, rawA)},
		{"label then loop", cat(hdr(respFlags, 0, 1, 0, 0), []byte{1, 'a', 0xc0, 12}, rawA)},
		{"65535 answers, 1 present", many},
		{"pointer out of range", cat(hdr(respFlags, 0, 1, 0, 0), []byte{0xc0, 0xff}, rawA)},
		{"pointer far out of range", cat(hdr(respFlags, 0, 1, 0, 0), []byte{0xff, 0xff}, rawA)},
		// 0x1b is the message's last byte, 99: a label running past the end.
		{"pointer forward to a bad label", cat(hdr(respFlags, 0, 1, 0, 0), []byte{0xc0, 0x1b}, rawA)},
		// 16 is a zero byte: the owner is the root, which names nothing.
		{"pointer forward to the root", cat(hdr(respFlags, 0, 1, 0, 0), []byte{0xc0, 16}, rawA)},
		{"reserved label type", cat(hdr(respFlags, 0, 1, 0, 0), []byte{0x80, 0}, rawA)},
		{"label past the end", cat(hdr(respFlags, 1, 0, 0, 0), []byte{63, 'a', 'b', 'c'})},
		{"answer label past the end", cat(hdr(respFlags, 0, 1, 0, 0), []byte{40, 'x'})},
		{"rdlength past the end", cat(hdr(respFlags, 0, 1, 0, 0), []byte{1, 'a', 0}, []byte{0, 1, 0, 1, 0, 0, 0, 60, 0xff, 0xff, 1, 2, 3, 4})},
		{"A with rdlength 3", cat(hdr(respFlags, 0, 1, 0, 0), []byte{1, 'a', 0}, []byte{0, 1, 0, 1, 0, 0, 0, 60, 0, 3, 1, 2, 3})},
		// RDLENGTH 0: the parser would read the next record's bytes as the address.
		{"A with rdlength 0", cat(hdr(respFlags, 0, 2, 0, 0), []byte{1, 'a', 0}, []byte{0, 1, 0, 1, 0, 0, 0, 60, 0, 0}, []byte{1, 'b', 0}, rawA)},
		{"AAAA with rdlength 4", cat(hdr(respFlags, 0, 1, 0, 0), []byte{1, 'a', 0}, []byte{0, 28, 0, 1, 0, 0, 0, 60, 0, 4}, bytes.Repeat([]byte{7}, 16))},
		{"name longer than 255", cat(hdr(respFlags, 0, 1, 0, 0), bytes.Repeat(append([]byte{63}, bytes.Repeat([]byte{'a'}, 63)...), 5), []byte{0}, rawA)},
		{"65535 questions", cat(hdr(respFlags, 0xffff, 0, 0, 0), []byte{0, 0, 1, 0, 1})},
		// Labels may carry any byte on the wire; names that would put
		// terminal escapes, NULs or invalid UTF-8 into events are refused.
		{"escape in the owner name", cat(hdr(respFlags, 0, 1, 0, 0), []byte{4, 'a', 0x1b, '[', 'm', 0}, rawA)},
		{"NUL in the owner name", cat(hdr(respFlags, 0, 1, 0, 0), []byte{3, 'a', 0, 'b', 0}, rawA)},
		{"space in the owner name", cat(hdr(respFlags, 0, 1, 0, 0), []byte{3, 'a', ' ', 'b', 0}, rawA)},
		{"invalid UTF-8 in the owner name", cat(hdr(respFlags, 0, 1, 0, 0), []byte{2, 0xff, 0xfe, 0}, rawA)},
		{"newline in a CNAME target", cat(hdr(respFlags, 0, 2, 0, 0),
			[]byte{1, 'c', 0}, []byte{0, 5, 0, 1, 0, 0, 0, 60, 0, 5, 3, 'x', '\n', 'y', 0},
			[]byte{1, 'c', 0}, rawA)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := New(Config{})
			start := time.Now()
			var err error
			for range 200 {
				err = c.AddMessage(tc.msg, t0)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Fatalf("200 parses took %v", d)
			}
			st := c.Stats()
			switch {
			case outcomes(st) != 200:
				t.Fatalf("200 messages landed in %d outcomes: %+v", outcomes(st), st)
			case err != nil:
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("err %v does not wrap ErrMalformed", err)
				}
				if st.Malformed+st.Partial != 200 {
					t.Fatalf("Malformed %d, Partial %d, want 200 in all", st.Malformed, st.Partial)
				}
			case st.Ignored != 200 && st.Entries != 0:
				t.Fatalf("accepted: stats %+v", st)
			}
			// Whatever was learned is the one real record, never garbage.
			for a, names := range learned(c, t0) {
				if a != netip.MustParseAddr("192.0.2.99") || !slices.Equal(names, []string{"ok.example"}) {
					t.Fatalf("learned %v -> %q", a, names)
				}
			}
		})
	}
}

func TestPayloadTCP(t *testing.T) {
	m1 := buildMsg(t, respHeader(), "one.example.", dnsmessage.TypeA, aRR("one.example.", 60, "192.0.2.1"))
	m2 := cnameChainMsg(t)
	chainAddr := netip.MustParseAddr("93.184.215.14")

	t.Run("two complete", func(t *testing.T) {
		c := New(Config{})
		seg := frame(m1, m2)
		c.AddPayload(ProtoTCP, seg, len(seg), t0)
		wantNames(t, c, addrA, t0, "one.example")
		wantNames(t, c, chainAddr, t0, chainNames...)
		if st := c.Stats(); st.Answers != 2 || st.Truncated != 0 || st.Malformed != 0 {
			t.Fatalf("stats %+v", st)
		}
	})
	t.Run("partial second", func(t *testing.T) {
		c := New(Config{})
		seg := frame(m1, m2)
		seg = seg[:len(seg)-5]
		c.AddPayload(ProtoTCP, seg, len(seg), t0)
		wantNames(t, c, addrA, t0, "one.example")
		wantNames(t, c, chainAddr, t0)
		if st := c.Stats(); st.Answers != 1 || st.Truncated != 1 || st.Malformed != 0 {
			t.Fatalf("stats %+v", st)
		}
	})
	t.Run("message past the segment", func(t *testing.T) {
		// The addresses in this segment are learned; the records in the
		// next one are counted as cut.
		var ans []rr
		for i := range 10 {
			ans = append(ans, rr{"span.example.", 60, &dnsmessage.AResource{A: addrN(i).As4()}})
		}
		seg := frame(buildMsg(t, respHeader(), "span.example.", dnsmessage.TypeA, ans...))
		seg = seg[:len(seg)-16*4-3] // 5 records whole, the 6th cut
		c := New(Config{})
		c.AddPayload(ProtoTCP, seg, len(seg), t0)
		wantNames(t, c, addrN(4), t0, "span.example")
		wantNames(t, c, addrN(5), t0)
		if st := c.Stats(); st.Partial != 1 || outcomes(st) != 1 || st.Records != 5 || st.DroppedCut != 5 {
			t.Fatalf("stats %+v, want one partial answer, 5 records learned, 5 dropped as cut", st)
		}
	})
	t.Run("lone length byte", func(t *testing.T) {
		c := New(Config{})
		seg := append(frame(m1), 0)
		c.AddPayload(ProtoTCP, seg, len(seg), t0)
		wantNames(t, c, addrA, t0, "one.example")
		if st := c.Stats(); st.Truncated != 1 {
			t.Fatalf("stats %+v", st)
		}
	})
	t.Run("zero length", func(t *testing.T) {
		c := New(Config{})
		c.AddPayload(ProtoTCP, []byte{0, 0, 1, 2, 3}, 5, t0)
		if st := c.Stats(); st.Malformed != 1 || st.Entries != 0 {
			t.Fatalf("stats %+v", st)
		}
	})
	t.Run("empty segment", func(t *testing.T) {
		c := New(Config{})
		c.AddPayload(ProtoTCP, nil, 0, t0)
		if st := c.Stats(); st != (Stats{}) {
			t.Fatalf("stats %+v", st)
		}
	})
	t.Run("every message of a segment", func(t *testing.T) {
		c := New(Config{})
		var msgs [][]byte
		for i := range 100 {
			msgs = append(msgs, buildMsg(t, respHeader(), "n.example.", dnsmessage.TypeA,
				rr{"n.example.", 60, &dnsmessage.AResource{A: addrN(i).As4()}}))
		}
		seg := frame(msgs...)
		c.AddPayload(ProtoTCP, seg, len(seg), t0)
		if st := c.Stats(); st.Answers != 100 || outcomes(st) != 100 || st.Entries != 100 {
			t.Fatalf("stats %+v, want 100 answers learned", st)
		}
	})
}

func TestPayloadUDP(t *testing.T) {
	full := cnameChainMsg(t)
	chainAddr := netip.MustParseAddr("93.184.215.14")

	c := New(Config{})
	c.AddPayload(ProtoUDP, full, len(full), t0)
	wantNames(t, c, chainAddr, t0, chainNames...)

	// The kernel captured everything although the datagram was longer (an
	// EDNS padding tail, say): parse succeeded, so nothing is truncated.
	c = New(Config{})
	c.AddPayload(ProtoUDP, full, len(full)+100, t0)
	wantNames(t, c, chainAddr, t0, chainNames...)
	if st := c.Stats(); st.Truncated != 0 {
		t.Fatalf("stats %+v", st)
	}

	// Cut by the kernel in its only address record: Truncated, only.
	c = New(Config{})
	c.AddPayload(ProtoUDP, full[:len(full)-3], len(full), t0)
	if st := c.Stats(); st.Truncated != 1 || outcomes(st) != 1 || st.DroppedCut != 1 {
		t.Fatalf("stats %+v", st)
	}

	// Not cut, just bad: Malformed only.
	c = New(Config{})
	bad := full[:len(full)-3]
	c.AddPayload(ProtoUDP, bad, len(bad), t0)
	if st := c.Stats(); st.Truncated != 0 || st.Malformed != 1 {
		t.Fatalf("stats %+v", st)
	}
}
