package dnscache

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// fuzzSeed is one input of FuzzAddPayload.
type fuzzSeed struct {
	name    string
	proto   uint8
	payload []byte
	origLen int
}

// fuzzSeeds are real answers built by the Builder, framed for TCP, and cut.
func fuzzSeeds(tb testing.TB) []fuzzSeed {
	a := buildMsg(tb, respHeader(), "example.org.", dnsmessage.TypeA,
		aRR("example.org.", 300, "192.0.2.80"), aRR("example.org.", 300, "192.0.2.81"))
	aaaa := buildMsg(tb, respHeader(), "v6.Example.org.", dnsmessage.TypeAAAA,
		aaaaRR("v6.Example.org.", 300, "2001:db8::80"), aaaaRR("v6.Example.org.", 300, "::ffff:198.51.100.9"))
	chain := cnameChainMsg(tb)
	mixed := buildMsg(tb, respHeader(), "x.example.", dnsmessage.TypeALL,
		txtRR("x.example.", 60, "hello"), cnameRR("x.example.", "y.example.", 60),
		aRR("y.example.", 60, "192.0.2.44"), mxRR("x.example.", 60, 5, "mx.x.example."))
	nx := respHeader()
	nx.RCode = dnsmessage.RCodeNameError
	nxd := buildMsg(tb, nx, "nx.example.", dnsmessage.TypeA)

	seeds := []fuzzSeed{
		{"udp-a", ProtoUDP, a, len(a)},
		{"udp-aaaa", ProtoUDP, aaaa, len(aaaa)},
		{"udp-cname-chain", ProtoUDP, chain, len(chain)},
		{"udp-mixed", ProtoUDP, mixed, len(mixed)},
		{"udp-nxdomain", ProtoUDP, nxd, len(nxd)},
		{"tcp-two", ProtoTCP, frame(a, chain), len(frame(a, chain))},
		{"tcp-three", ProtoTCP, frame(aaaa, mixed, nxd), len(frame(aaaa, mixed, nxd))},
		{"tcp-partial", ProtoTCP, frame(a, chain)[:len(a)+2+20], len(frame(a, chain))},
	}
	var many []rr
	for i := range 120 {
		many = append(many, rr{"many.example.", 60, &dnsmessage.AResource{A: addrN(i).As4()}})
	}
	big := buildMsg(tb, respHeader(), "many.example.", dnsmessage.TypeA, many...)
	long := longName(253, "l")
	longMsg := buildMsg(tb, respHeader(), long+".", dnsmessage.TypeA, aRR(long+".", 60, "192.0.2.253"))
	flood := floodMsg(3)
	seeds = append(seeds,
		fuzzSeed{"udp-120-records", ProtoUDP, big, len(big)},
		fuzzSeed{"udp-120-records-cut", ProtoUDP, big[:len(big)/2], len(big)},
		fuzzSeed{"udp-long-name", ProtoUDP, longMsg, len(longMsg)},
		fuzzSeed{"udp-flood", ProtoUDP, flood, len(flood)},
	)
	for _, n := range []int{0, 5, 12, 20, len(chain) / 2, len(chain) - 1} {
		seeds = append(seeds, fuzzSeed{fmt.Sprintf("udp-cname-chain-cut%d", n), ProtoUDP, chain[:n], len(chain)})
	}
	for _, n := range []int{13, len(aaaa) - 4} {
		seeds = append(seeds, fuzzSeed{fmt.Sprintf("udp-aaaa-cut%d", n), ProtoUDP, aaaa[:n], len(aaaa)})
	}
	return seeds
}

func FuzzAddPayload(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s.proto, s.payload, s.origLen)
	}
	const maxNames = 3
	f.Fuzz(func(t *testing.T, proto uint8, payload []byte, origLen int) {
		// A budget of a few entries: eviction by bytes runs in most inputs,
		// and checkInvariants holds the account to the budget.
		c := New(Config{MaxEntries: 32, MaxBytes: 2048, MaxNamesPerAddr: maxNames, MinTTL: time.Second, MaxTTL: time.Hour})
		c.AddPayload(proto, payload, origLen, t0)
		st := c.Stats()
		if proto == ProtoUDP && outcomes(st) != 1 {
			t.Fatalf("a UDP payload landed in %d outcomes: %+v", outcomes(st), st)
		}
		checkInvariants(t, c)
		if err := c.AddMessage(payload, t0); err != nil && !errors.Is(err, ErrMalformed) {
			t.Fatalf("AddMessage error %v does not wrap ErrMalformed", err)
		}
		if got := c.Stats(); outcomes(got) != outcomes(st)+1 {
			t.Fatalf("one message landed in %d outcomes: %+v", outcomes(got)-outcomes(st), got)
		}
		checkInvariants(t, c)
		if b := c.Stats().Bytes; b > 2048 || b < 0 {
			t.Fatalf("%d bytes accounted, budget 2048", b)
		}
		for a, names := range learned(c, t0) {
			if len(names) > maxNames {
				t.Fatalf("%v has %d names > %d", a, len(names), maxNames)
			}
			// An address is learned from an A/AAAA record's data: its bytes
			// are in the payload.
			if !bytes.Contains(payload, a.AsSlice()) {
				t.Fatalf("learned address %v is not in the payload", a)
			}
			if a.Is4In6() {
				t.Fatalf("mapped address %v stored", a)
			}
			for _, n := range names {
				if n == "" || strings.HasSuffix(n, ".") || strings.ContainsAny(n, "ABCDEFGHIJKLMNOPQRSTUVWXYZ") {
					t.Fatalf("%v: bad name %q", a, n)
				}
				for i := 0; i < len(n); i++ {
					if n[i] < 0x21 || n[i] > 0x7e {
						t.Fatalf("%v: name %q has byte 0x%02x, not printable ASCII", a, n, n[i])
					}
				}
			}
		}
	})
}

// TestWriteFuzzCorpus regenerates testdata/fuzz/FuzzAddPayload from
// fuzzSeeds: DNSCACHE_WRITE_CORPUS=1 go test -run TestWriteFuzzCorpus.
// Without the variable it checks that the files there still parse as seeds.
func TestWriteFuzzCorpus(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzAddPayload")
	if os.Getenv("DNSCACHE_WRITE_CORPUS") == "" {
		ents, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		if len(ents) == 0 {
			t.Fatalf("no seeds in %s", dir)
		}
		for _, e := range ents {
			b, err := os.ReadFile(filepath.Join(dir, e.Name()))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.HasPrefix(b, []byte("go test fuzz v1\n")) || bytes.Count(b, []byte("\n")) != 4 {
				t.Errorf("%s: not a 3-value go fuzz corpus file", e.Name())
			}
		}
		return
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, s := range fuzzSeeds(t) {
		body := fmt.Sprintf("go test fuzz v1\nuint8(%d)\n[]byte(%s)\nint(%d)\n", s.proto, strconv.Quote(string(s.payload)), s.origLen)
		if err := os.WriteFile(filepath.Join(dir, s.name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
