package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowbus/flowbus/cmd/internal/buildinfo"
	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/flowbus/flowbus/internal/syncbuf"
	"github.com/flowbus/flowbus/schema"
)

// TestMain lets a test run flowtail's main in a child process (the test binary itself), so real signals
// can be sent to it without hitting the test process.
func TestMain(m *testing.M) {
	if os.Getenv("FLOWTAIL_TEST_MAIN") == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// jsonEvent mirrors the JSON shape of SPEC section 1; unknown fields fail decoding so a renamed field
// is caught.
type jsonEvent struct {
	ConnDirection string   `json:"conn_direction"`
	Src           string   `json:"src"`
	Dst           string   `json:"dst"`
	SrcPort       uint16   `json:"src_port"`
	DstPort       uint16   `json:"dst_port"`
	SrcDNS        []string `json:"src_dns"`
	DstDNS        []string `json:"dst_dns"`
	Timestamp     int64    `json:"timestamp"`
	Host          string   `json:"host"`
	CgroupID      uint64   `json:"cgroup_id"`
	PID           uint32   `json:"pid"`
	Comm          string   `json:"comm"`
	ContainerID   string   `json:"container_id"`
}

const baseTS = int64(1_795_000_000_000_000_000)

// ev builds a distinct event; id goes into the source port so tests can tell events apart.
func ev(id uint16, src, dst string, dstPort uint16, dstDNS ...string) schema.Event {
	return schema.Event{
		Timestamp: baseTS + int64(id)*int64(time.Millisecond),
		Src:       netip.MustParseAddr(src),
		Dst:       netip.MustParseAddr(dst),
		SrcPort:   40000 + id,
		DstPort:   dstPort,
		DstDNS:    dstDNS,
	}
}

type fixture struct {
	srv     *tailtest.Server
	web, db *tailtest.Agent
	// seqs[i] is the stream sequence of the i-th published message.
	seqs []uint64
}

// newFixture publishes five batches for two hosts and both directions:
//
//	1 web-01 outgoing seq 1: ids 1, 2
//	2 web-01 incoming seq 2: id 3
//	3 db-02  outgoing seq 1: id 4 (IPv6, names)
//	4 db-02  incoming seq 2: ids 5, 6
//	5 web-01 outgoing seq 3: id 7
func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{srv: tailtest.Start(t), web: tailtest.NewAgent("web-01", "run1"), db: tailtest.NewAgent("db-02", "run1")}
	f.srv.CreateStream(t, "FLOWS", "flows.>")
	pub := func(a *tailtest.Agent, dir schema.Direction, evs ...schema.Event) {
		f.seqs = append(f.seqs, a.Publish(t, f.srv, "flows", dir, schema.Drops{}, evs...))
	}
	pub(f.web, schema.Outgoing,
		ev(1, "10.0.0.1", "93.184.216.34", 443, "example.com", "www.example.com"),
		ev(2, "10.0.0.1", "10.0.0.9", 5432))
	pub(f.web, schema.Incoming, ev(3, "192.0.2.7", "10.0.0.1", 80))
	pub(f.db, schema.Outgoing, ev(4, "2001:db8::2", "2001:db8::53", 8443, "api.internal"))
	pub(f.db, schema.Incoming, ev(5, "10.0.0.1", "10.0.0.9", 5432), ev(6, "10.0.0.3", "10.0.0.9", 5432))
	pub(f.web, schema.Outgoing, ev(7, "10.0.0.1", "1.1.1.1", 853, "one.one.one.one"))
	return f
}

type result struct {
	code           int
	stdout, stderr string
}

func runArgs(t *testing.T, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	done := make(chan int, 1)
	go func() { done <- run(args, &out, &errb) }()
	select {
	case code := <-done:
		return result{code, out.String(), errb.String()}
	case <-time.After(30 * time.Second):
		t.Fatalf("flowtail %v did not exit", args)
		return result{}
	}
}

func parseJSON(t *testing.T, out string) []jsonEvent {
	t.Helper()
	var evs []jsonEvent
	for _, line := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
		if line == "" {
			continue
		}
		dec := json.NewDecoder(strings.NewReader(line))
		dec.DisallowUnknownFields()
		var e jsonEvent
		if err := dec.Decode(&e); err != nil {
			t.Fatalf("bad JSON line %q: %v", line, err)
		}
		evs = append(evs, e)
	}
	return evs
}

// ids returns the event ids (source port - 40000) in output order.
func ids(evs []jsonEvent) []int {
	out := make([]int, len(evs))
	for i, e := range evs {
		out[i] = int(e.SrcPort) - 40000
	}
	return out
}

func eqInts(a, b []int) bool {
	return fmt.Sprint(a) == fmt.Sprint(b)
}

func TestReplayFilters(t *testing.T) {
	f := newFixture(t)
	url := f.srv.URL
	cases := []struct {
		name string
		args []string
		want []int
	}{
		{"all", []string{"--all"}, []int{1, 2, 3, 4, 5, 6, 7}},
		{"host", []string{"--all", "--host", "web-01"}, []int{1, 2, 3, 7}},
		{"direction", []string{"--all", "--direction", "incoming"}, []int{3, 5, 6}},
		{"host and direction", []string{"--all", "--host", "db-02", "--direction", "outgoing"}, []int{4}},
		{"from-seq", []string{"--from-seq", fmt.Sprint(f.seqs[2])}, []int{4, 5, 6, 7}},
		{"from-seq with host", []string{"--from-seq", fmt.Sprint(f.seqs[2]), "--host", "web-01"}, []int{7}},
		{"since duration", []string{"--since", "1h"}, []int{1, 2, 3, 4, 5, 6, 7}},
		{"count", []string{"--all", "--count", "3"}, []int{1, 2, 3}},
		{"count mid-batch", []string{"--all", "--count", "5", "--direction", "incoming"}, nil}, // idle-exits with 3
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			args := append([]string{"--nats", url, "--json", "--idle-exit", "700ms"}, c.args...)
			r := runArgs(t, args...)
			if r.code != 0 {
				t.Fatalf("exit %d, stderr:\n%s", r.code, r.stderr)
			}
			got := ids(parseJSON(t, r.stdout))
			want := c.want
			if want == nil {
				want = []int{3, 5, 6}
			}
			if !eqInts(got, want) {
				t.Errorf("events %v, want %v", got, want)
			}
			if r.stderr != "" {
				t.Errorf("unexpected stderr: %s", r.stderr)
			}
		})
	}
}

func TestJSONFields(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	r := runArgs(t, "--nats", f.srv.URL, "--json", "--all", "--host", "db-02", "--direction", "outgoing", "--count", "1")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	// Field names are the contract: check them on the raw object, not only through the struct.
	var raw map[string]any
	if err := json.Unmarshal([]byte(strings.TrimSpace(r.stdout)), &raw); err != nil {
		t.Fatalf("%v: %q", err, r.stdout)
	}
	for _, k := range []string{"conn_direction", "src", "dst", "src_port", "dst_port", "src_dns", "dst_dns", "timestamp", "host"} {
		if _, ok := raw[k]; !ok {
			t.Errorf("field %q missing in %s", k, r.stdout)
		}
	}
	e := parseJSON(t, r.stdout)[0]
	want := jsonEvent{
		ConnDirection: "outgoing", Src: "2001:db8::2", Dst: "2001:db8::53", SrcPort: 40004, DstPort: 8443,
		SrcDNS: []string{}, DstDNS: []string{"api.internal"}, Timestamp: baseTS + 4*int64(time.Millisecond), Host: "db-02",
	}
	if fmt.Sprintf("%#v", e) != fmt.Sprintf("%#v", want) {
		t.Errorf("got  %#v\nwant %#v", e, want)
	}
}

func TestSinceRFC3339(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	time.Sleep(20 * time.Millisecond)
	cut := time.Now()
	time.Sleep(20 * time.Millisecond)
	f.web.Publish(t, f.srv, "flows", schema.Outgoing, schema.Drops{}, ev(8, "10.0.0.1", "10.0.0.2", 22))
	r := runArgs(t, "--nats", f.srv.URL, "--json", "--idle-exit", "700ms", "--since", cut.UTC().Format(time.RFC3339Nano))
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	if got := ids(parseJSON(t, r.stdout)); !eqInts(got, []int{8}) {
		t.Errorf("events %v, want [8]", got)
	}
}

// TestLiveNewOnly checks the default start (new batches only) and that live output is flushed while
// flowtail keeps running, not held in the buffer until exit.
func TestLiveNewOnly(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	var out, errb syncbuf.Buffer
	done := make(chan int, 1)
	go func() { done <- run([]string{"--nats", f.srv.URL, "--json", "--idle-exit", "3s"}, &out, &errb) }()

	waitFor(t, "ordered consumer", func() bool {
		s, err := f.srv.JS.Stream(context.Background(), "FLOWS")
		return err == nil && s.CachedInfo().State.Consumers > 0
	})
	f.web.Publish(t, f.srv, "flows", schema.Incoming, schema.Drops{}, ev(9, "198.51.100.1", "10.0.0.1", 22))
	waitFor(t, "live event on stdout", func() bool { return strings.Contains(out.String(), "\n") })
	select {
	case code := <-done:
		t.Fatalf("exited early with %d", code)
	default:
	}
	if got := ids(parseJSON(t, out.String())); !eqInts(got, []int{9}) {
		t.Errorf("events %v, want only the new one [9]", got)
	}
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("exit %d: %s", code, errb.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("did not exit after --idle-exit")
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// patchMajor turns a real batch into one of another schema major, as a future agent would send.
func patchMajor(t *testing.T, b []byte, major byte) []byte {
	t.Helper()
	key := append([]byte{0xa0 | byte(len("schema_major"))}, "schema_major"...)
	i := bytes.Index(b, key)
	if i < 0 || b[i+len(key)] != schema.Major {
		t.Fatalf("schema_major %d not found in batch", schema.Major)
	}
	b = bytes.Clone(b)
	b[i+len(key)] = major
	return b
}

func TestForeignMessagesSkipped(t *testing.T) {
	t.Parallel()
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	agent := tailtest.NewAgent("web-01", "run1")
	good := func(id uint16) []byte {
		_, b := agent.Batch(schema.Outgoing, schema.Drops{}, ev(id, "10.0.0.1", "10.0.0.2", 443))
		return b
	}
	srv.Publish(t, "flows.web-01.outgoing", good(1))
	srv.Publish(t, "flows.web-01.outgoing", []byte{0xde, 0xad, 0xbe, 0xef, 0x00, 0x13, 0x37})
	srv.Publish(t, "flows.web-01.outgoing", []byte{0xde, 0xad, 0xbe, 0xef, 0x00, 0x13, 0x38})
	srv.Publish(t, "flows.other.json", []byte(`{"hello":"world","n":1}`))
	srv.Publish(t, "flows.web-01.outgoing", patchMajor(t, good(2), 2))
	b := good(3)
	srv.Publish(t, "flows.web-01.outgoing", b[:len(b)/2])
	srv.Publish(t, "flows.web-01.outgoing", []byte{})
	srv.Publish(t, "flows.web-01.outgoing", good(4))

	r := runArgs(t, "--nats", srv.URL, "--json", "--all", "--idle-exit", "700ms")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	if got := ids(parseJSON(t, r.stdout)); !eqInts(got, []int{1, 4}) {
		t.Errorf("events %v, want [1 4]", got)
	}
	for _, want := range []string{
		"skipping message 2 on flows.web-01.outgoing: not a valid flowbus batch",
		"skipping message 4 on flows.other.json: not a valid flowbus batch",
		"skipping message 5 on flows.web-01.outgoing: unsupported schema version",
		"schema major 2",
		"skipped 4 messages on flows.web-01.outgoing: not a valid flowbus batch",
	} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, r.stderr)
		}
	}
	// Once per (subject, reason): the second garbage message on the same subject is only counted.
	if n := strings.Count(r.stderr, "skipping message"); n != 3 {
		t.Errorf("%d individual skip warnings, want 3:\n%s", n, r.stderr)
	}
	// The gap warning must not fire for skipped messages' sequences: seqs 2 and 3 really are missing here,
	// so it must say so.
	if !strings.Contains(r.stderr, "gap: host web-01 direction outgoing run run1 missing batches 2..3") {
		t.Errorf("stderr lacks the gap warning:\n%s", r.stderr)
	}
}

func TestDropsAndGaps(t *testing.T) {
	t.Parallel()
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	e := ev(1, "10.0.0.1", "10.0.0.2", 443)
	a := tailtest.NewAgent("web-01", "r1")
	pub := func(dir schema.Direction, drops schema.Drops) { a.Publish(t, srv, "flows", dir, drops, e) }
	lose := func(dir schema.Direction) { a.Batch(dir, schema.Drops{}, e) }
	pub(schema.Outgoing, schema.Drops{})                    // 1
	pub(schema.Incoming, schema.Drops{})                    // 2
	pub(schema.Outgoing, schema.Drops{})                    // 3
	pub(schema.Incoming, schema.Drops{})                    // 4: seq 3 between is the other direction's, no gap
	lose(schema.Outgoing)                                   // 5
	lose(schema.Outgoing)                                   // 6
	pub(schema.Incoming, schema.Drops{})                    // 7
	pub(schema.Outgoing, schema.Drops{Kernel: 3, Spool: 4}) // 8: missing 4..6 (5 and 6 are)
	lose(schema.Incoming)                                   // 9
	pub(schema.Incoming, schema.Drops{})                    // 10: prev 9, last seen 7: reported as 8..9
	b := tailtest.NewAgent("web-01", "r2")
	b.Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, e) // new run: no gap

	r := runArgs(t, "--nats", srv.URL, "--json", "--all", "--idle-exit", "700ms")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	if n := len(parseJSON(t, r.stdout)); n != 8 {
		t.Errorf("%d events, want 8", n)
	}
	for _, want := range []string{
		"gap: host web-01 direction outgoing run r1 missing batches 4..6\n",
		"gap: host web-01 direction incoming run r1 missing batches 8..9\n",
		"drops: host web-01 direction outgoing lost 7 events before batch 8 (kernel=3 reader=0 queue=0 spool=4 publish=0)",
	} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, r.stderr)
		}
	}
	if n := strings.Count(r.stderr, "gap:"); n != 2 {
		t.Errorf("%d gap warnings, want 2:\n%s", n, r.stderr)
	}

	// Watching one direction only, the other direction's seqs are no gap.
	r = runArgs(t, "--nats", srv.URL, "--json", "--all", "--idle-exit", "700ms", "--direction", "incoming", "--host", "web-01")
	if r.code != 0 || strings.Count(r.stderr, "gap:") != 1 || !strings.Contains(r.stderr, "missing batches 8..9") {
		t.Errorf("exit %d, stderr:\n%s", r.code, r.stderr)
	}
}

func TestTable(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	r := runArgs(t, "--nats", f.srv.URL, "--all", "--idle-exit", "700ms")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	t.Logf("table:\n%s", r.stdout)
	all := strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n")
	// The header comes first, and again above a row that widened a column: every row lines up with
	// the header above it.
	var lines []string
	var head string
	for _, l := range all {
		if strings.HasPrefix(l, "TIME") {
			head = l
			continue
		}
		if head == "" {
			t.Fatalf("a row before the header:\n%s", r.stdout)
		}
		for _, name := range []string{"HOST", "DIRECTION", "SRC", "DST", "PROCESS", "SRC_DNS", "DST_DNS"} {
			at := strings.Index(head, " "+name+" ") + 1
			if name == "DST_DNS" {
				at = strings.LastIndex(head, " DST_DNS") + 1
			}
			if at <= 0 || len(l) <= at || l[at-1] != ' ' || l[at] == ' ' {
				t.Errorf("row %q does not line up with its header %q at %s", l, head, name)
			}
		}
		lines = append(lines, l)
	}
	lines = append([]string{head}, lines...)
	if len(lines) != 8 || !strings.HasPrefix(all[0], "TIME") {
		t.Fatalf("%d rows, want 7, after a header:\n%s", len(lines)-1, r.stdout)
	}
	// UTC by default, with the zone shown, in the form --since accepts.
	ts := time.Unix(0, baseTS+4*int64(time.Millisecond)).UTC().Format("2006-01-02T15:04:05.000Z")
	if _, err := parseSince(ts, time.Now()); err != nil {
		t.Errorf("table time %s is not accepted by --since: %v", ts, err)
	}
	row := lines[4]
	for _, want := range []string{ts, "db-02", "outgoing", "[2001:db8::2]:40004", "[2001:db8::53]:8443", "api.internal"} {
		if !strings.Contains(row, want) {
			t.Errorf("row %q lacks %q", row, want)
		}
	}
	if !strings.Contains(lines[1], "example.com,www.example.com") || !strings.Contains(lines[1], "10.0.0.1:40001") {
		t.Errorf("row %q lacks names or endpoint", lines[1])
	}
}

func TestEnvDefaults(t *testing.T) {
	f := newFixture(t)
	t.Setenv("FLOWBUS_NATS_URL", f.srv.URL)
	t.Setenv("FLOWBUS_STREAM", "FLOWS")
	t.Setenv("FLOWBUS_SUBJECT_PREFIX", "flows")
	r := runArgs(t, "--json", "--all", "--count", "2")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	if got := ids(parseJSON(t, r.stdout)); !eqInts(got, []int{1, 2}) {
		t.Errorf("events %v, want [1 2]", got)
	}

	t.Setenv("FLOWBUS_STREAM", "bad.name")
	r = runArgs(t, "--json")
	if r.code != 2 || !strings.Contains(r.stderr, "FLOWBUS_STREAM") {
		t.Errorf("exit %d, stderr %q: want 2 naming FLOWBUS_STREAM", r.code, r.stderr)
	}
}

func TestMissingStream(t *testing.T) {
	t.Parallel()
	srv := tailtest.Start(t)
	r := runArgs(t, "--nats", srv.URL, "--stream", "NOPE", "--all")
	if r.code != 1 {
		t.Fatalf("exit %d, want 1", r.code)
	}
	for _, want := range []string{`stream "NOPE" does not exist`, "--stream", "FLOWBUS_STREAM", "flowagent"} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, r.stderr)
		}
	}
}

func TestPrefixNotInStream(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	r := runArgs(t, "--nats", f.srv.URL, "--prefix", "other", "--all")
	if r.code != 1 || !strings.Contains(r.stderr, "other.>") || !strings.Contains(r.stderr, "prefix") {
		t.Errorf("exit %d, stderr:\n%s", r.code, r.stderr)
	}
}

func TestUnreachable(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	url := "nats://" + l.Addr().String()
	l.Close() // nothing listens there now
	start := time.Now()
	r := runArgs(t, "--nats", url)
	if r.code != 1 {
		t.Fatalf("exit %d, want 1", r.code)
	}
	for _, want := range []string{"cannot connect to NATS at " + url, "flowagent running", "--nats", "FLOWBUS_NATS_URL"} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, r.stderr)
		}
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("took %v to give up", d)
	}
}

func TestUnreachableHidesPassword(t *testing.T) {
	t.Parallel()
	r := runArgs(t, "--nats", "nats://alice:s3cret@127.0.0.1:1")
	if r.code != 1 || strings.Contains(r.stderr, "s3cret") || !strings.Contains(r.stderr, "alice") {
		t.Errorf("exit %d, stderr:\n%s", r.code, r.stderr)
	}
}

func TestInvalidFlags(t *testing.T) {
	t.Parallel()
	r := runArgs(t, "--direction", "sideways", "--all", "--since", "5m", "--from-seq", "0",
		"--count", "-1", "--idle-exit", "soon", "--host", "Web.01", "--bogus", "--prefix", "a..b", "extra")
	if r.code != 2 {
		t.Fatalf("exit %d, want 2", r.code)
	}
	for _, want := range []string{"--direction", "sideways", "mutually exclusive", "--from-seq", "--count",
		"--idle-exit", "--host", "web-01", "unknown flag --bogus", "a..b", `unexpected argument "extra"`, "--help"} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, r.stderr)
		}
	}
	if r.stdout != "" {
		t.Errorf("stdout: %q", r.stdout)
	}

	for _, args := range [][]string{
		{"--since", "yesterday"},
		{"--since", "-5m"},
		{"--since", "2999-01-01T00:00:00Z"},
		{"--nats", "http://x:4222"},
		{"--nats", "nats://a:1,,nats://b:2"},
		{"--json=maybe"},
		{"--count"},
	} {
		if r := runArgs(t, args...); r.code != 2 {
			t.Errorf("%v: exit %d, want 2; stderr %s", args, r.code, r.stderr)
		}
	}
}

func TestHelp(t *testing.T) {
	t.Parallel()
	r := runArgs(t, "--help")
	if r.code != 0 || !strings.Contains(r.stdout, "Exit status") || !strings.Contains(r.stdout, "--idle-exit") {
		t.Errorf("exit %d, stdout:\n%s", r.code, r.stdout)
	}
}

func TestSignalExitsCleanly(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			t.Parallel()
			f := newFixture(t)
			var out, errb syncbuf.Buffer
			cmd := exec.Command(os.Args[0], "--nats", f.srv.URL, "--json", "--all")
			cmd.Env = append(os.Environ(), "FLOWTAIL_TEST_MAIN=1")
			cmd.Stdout, cmd.Stderr = &out, &errb
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "replayed events", func() bool { return strings.Count(out.String(), "\n") == 7 })
			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("exit: %v, stderr: %s", err, errb.String())
				}
			case <-time.After(10 * time.Second):
				cmd.Process.Kill()
				t.Fatal("did not exit on signal")
			}
			if got := ids(parseJSON(t, out.String())); len(got) != 7 {
				t.Errorf("events %v", got)
			}
		})
	}
}

// A bad server list never shows the password it holds, whichever check refuses it.
func TestInvalidURLHidesPassword(t *testing.T) {
	t.Parallel()
	for _, v := range []string{"nats://alice:s3cret@127.0.0.1:4222,", "http://alice:s3cret@h:4222", "nats://alice:s3cret@", "nats://alice:s3cret@h:4222/%zz"} {
		r := runArgs(t, "--nats", v)
		if r.code != 2 || strings.Contains(r.stderr, "s3cret") || !strings.Contains(r.stderr, "--nats") {
			t.Errorf("--nats %s: exit %d, stderr:\n%s", v, r.code, r.stderr)
		}
		if _, err := parseArgs(nil, func(k string) string { return map[string]string{"FLOWBUS_NATS_URL": v}[k] }, time.Now()); err == nil ||
			strings.Contains(err.Error(), "s3cret") || !strings.Contains(err.Error(), "FLOWBUS_NATS_URL") {
			t.Errorf("FLOWBUS_NATS_URL=%s: %v", v, err)
		}
	}
}

// --local shows table times in the local zone, with its offset; the default stays UTC whatever TZ says.
func TestTableLocal(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	for _, c := range []struct {
		args []string
		want string
	}{
		{nil, "Z"},
		{[]string{"--local"}, "+05:30"},
	} {
		var out, errb bytes.Buffer
		cmd := exec.Command(os.Args[0], append([]string{"--nats", f.srv.URL, "--all", "--count", "1"}, c.args...)...)
		cmd.Env = append(os.Environ(), "FLOWTAIL_TEST_MAIN=1", "TZ=Asia/Kolkata")
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			t.Fatalf("%v: %v: %s", c.args, err, errb.String())
		}
		lines := strings.Split(strings.TrimSpace(out.String()), "\n")
		want := time.Unix(0, baseTS+int64(time.Millisecond)).In(time.FixedZone("IST", 5*3600+1800)).Format("2006-01-02T15:04:05.000Z07:00")
		if c.want == "Z" {
			want = time.Unix(0, baseTS+int64(time.Millisecond)).UTC().Format("2006-01-02T15:04:05.000Z")
		}
		if len(lines) != 2 || !strings.HasPrefix(lines[1], want+" ") {
			t.Errorf("%v with TZ=Asia/Kolkata: want the row to start with %s:\n%s", c.args, want, out.String())
		}
	}
}

// A filter that matches nothing still shows the header at once, and --idle-exit says on stderr that no
// event arrived and what was watched, instead of exiting silently.
func TestNoMatchHeaderAndIdleNotice(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	var out, errb syncbuf.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run([]string{"--nats", f.srv.URL, "--all", "--host", "web-09", "--idle-exit", "2s"}, &out, &errb)
	}()
	waitFor(t, "the table header", func() bool { return strings.HasPrefix(out.String(), "TIME") })
	select {
	case code := <-done:
		t.Fatalf("exited (%d) before --idle-exit; the header came only at exit", code)
	default:
	}
	var code int
	select {
	case code = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("did not exit after --idle-exit")
	}
	if code != 0 || strings.Count(out.String(), "\n") != 1 {
		t.Errorf("exit %d, stdout:\n%s", code, out.String())
	}
	want := "flowtail: no events arrived within --idle-exit 2s (stream FLOWS, subjects flows.web-09.>)\n"
	if errb.String() != want {
		t.Errorf("stderr %q, want %q", errb.String(), want)
	}

	// JSON output has no header, but the notice is the same.
	r := runArgs(t, "--nats", f.srv.URL, "--json", "--direction", "incoming", "--from-seq", fmt.Sprint(f.seqs[4]), "--idle-exit", "500ms")
	if r.code != 0 || r.stdout != "" || r.stderr != "flowtail: no events arrived within --idle-exit 500ms (stream FLOWS, subjects flows.*.incoming)\n" {
		t.Errorf("exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
}

// A start after the last stored message is said on stderr; flowtail then follows new events.
func TestStartPastTheEnd(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	last := f.seqs[len(f.seqs)-1]
	r := runArgs(t, "--nats", f.srv.URL, "--json", "--from-seq", fmt.Sprint(last+10), "--idle-exit", "500ms")
	want := fmt.Sprintf("flowtail: --from-seq %d is past the end of stream FLOWS (its last sequence is %d): only new events will show\n", last+10, last)
	if r.code != 0 || !strings.HasPrefix(r.stderr, want) || strings.Count(r.stderr, "\n") != 2 {
		t.Errorf("exit %d, stderr:\n%s\nwant first:\n%s", r.code, r.stderr, want)
	}

	time.Sleep(20 * time.Millisecond)
	cut := time.Now().UTC().Format(time.RFC3339Nano)
	r = runArgs(t, "--nats", f.srv.URL, "--json", "--since", cut, "--idle-exit", "500ms")
	if r.code != 0 || !strings.Contains(r.stderr, "is past the end of stream FLOWS (its last message was stored at ") || !strings.Contains(r.stderr, "only new events will show") {
		t.Errorf("--since after the last message: exit %d, stderr:\n%s", r.code, r.stderr)
	}

	srv := tailtest.Start(t)
	srv.CreateStream(t, "EMPTY", "flows.>")
	r = runArgs(t, "--nats", srv.URL, "--stream", "EMPTY", "--json", "--all", "--idle-exit", "300ms")
	if r.code != 0 || !strings.HasPrefix(r.stderr, "flowtail: --all: stream EMPTY is empty: only new events will show\n") {
		t.Errorf("--all on an empty stream: exit %d, stderr:\n%s", r.code, r.stderr)
	}

	// The start is followed by new events: a past-the-end --from-seq shows the next message.
	var out, errb syncbuf.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run([]string{"--nats", f.srv.URL, "--json", "--from-seq", fmt.Sprint(last + 1), "--count", "1"}, &out, &errb)
	}()
	waitFor(t, "the past-the-end notice", func() bool { return strings.Contains(errb.String(), "past the end") })
	f.web.Publish(t, f.srv, "flows", schema.Incoming, schema.Drops{}, ev(9, "198.51.100.1", "10.0.0.1", 22))
	select {
	case code := <-done:
		if got := ids(parseJSON(t, out.String())); code != 0 || !eqInts(got, []int{9}) {
			t.Errorf("exit %d, events %v, want [9]; stderr %s", code, got, errb.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the new event did not arrive")
	}
}

func TestVersion(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{{"--version"}, {"-version"}, {"--json", "--version"}} {
		r := runArgs(t, args...)
		if r.code != 0 || r.stdout != buildinfo.Line("flowtail")+"\n" || r.stderr != "" || !strings.HasPrefix(r.stdout, "flowtail ") {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", args, r.code, r.stdout, r.stderr)
		}
	}
}

// A forged batch on a publisher's own subject, with escape sequences in a DNS name and the run id, and
// a 1 MB host string: the table and the warnings show them escaped and bounded, the JSON escaped by
// JSON's own rules, and no ESC byte reaches the terminal.
func TestHostileStringsEscaped(t *testing.T) {
	t.Parallel()
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	forger := tailtest.NewAgent("web-01", "run\x1b[31mRED")
	name := "\x1b[2J\x1b[31mbank.example"
	forger.Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, ev(1, "10.0.0.1", "10.0.0.2", 443, name))
	forger.Batch(schema.Outgoing, schema.Drops{}) // lost: the gap warning names the run
	forger.Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, ev(2, "10.0.0.1", "10.0.0.2", 443))
	// 1 MB of host: the decoder refuses it; the warning quoting the subject and error stays short.
	huge := strings.Repeat("\x1b[31mh", 1_000_000/6)
	_, b := tailtest.NewAgent(huge, "run2").Batch(schema.Outgoing, schema.Drops{}, ev(3, "10.0.0.1", "10.0.0.2", 443))
	srv.Publish(t, "flows.web-01.outgoing", b)

	r := runArgs(t, "--nats", srv.URL, "--all", "--idle-exit", "700ms")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	if strings.ContainsRune(r.stdout+r.stderr, 0x1b) {
		t.Fatalf("an ESC byte reached the terminal:\nstdout %q\nstderr %.2000q", r.stdout, r.stderr)
	}
	if !strings.Contains(r.stdout, `\x1b[2J\x1b[31mbank.example`) {
		t.Errorf("table lacks the escaped name:\n%s", r.stdout)
	}
	for _, want := range []string{
		`gap: host web-01 direction outgoing run run\x1b[31mRED missing batch 2`,
		"skipping message 3 on flows.web-01.outgoing: not a valid flowbus batch",
		fmt.Sprintf("host: string of %d bytes is longer than the bound of 64", len(huge)),
	} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("stderr lacks %q:\n%.3000s", want, r.stderr)
		}
	}
	for _, l := range strings.Split(r.stderr, "\n") {
		if len(l) > 2*stream.MaxLog {
			t.Errorf("warning line of %d bytes: %.300q", len(l), l)
		}
	}

	r = runArgs(t, "--nats", srv.URL, "--all", "--json", "--idle-exit", "700ms")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	if strings.ContainsRune(r.stdout, 0x1b) || !strings.Contains(r.stdout, `\u001b[2J\u001b[31mbank.example`) {
		t.Fatalf("JSON not escaped: %q", r.stdout)
	}
	if evs := parseJSON(t, r.stdout); len(evs) != 2 || len(evs[0].DstDNS) != 1 || evs[0].DstDNS[0] != name {
		t.Fatalf("JSON does not give the name back exactly: %+v", evs)
	}
}

// A stream name or subject prefix NATS reserves ($JS..., _INBOX...) is refused before connecting, with
// exit status 2 and a message naming the flag or variable it came from.
func TestReservedNamesRefused(t *testing.T) {
	for _, c := range []struct {
		args []string
		env  map[string]string
		want []string
	}{
		{[]string{"--stream", "$JS.API", "--prefix", "_INBOX"}, nil,
			[]string{`--stream: stream name "$JS.API" starts with a name NATS reserves`, `--prefix: "_INBOX" starts with a name NATS reserves`}},
		{[]string{"--stream", "_INBOX_FLOWS", "--prefix", "$SYS.flows"}, nil,
			[]string{`--stream: stream name "_INBOX_FLOWS" starts with a name NATS reserves`, `--prefix: "$SYS.flows" starts with a name NATS reserves`}},
		{nil, map[string]string{"FLOWBUS_STREAM": "$KV_x", "FLOWBUS_SUBJECT_PREFIX": "_INBOX.x"},
			[]string{`FLOWBUS_STREAM: stream name "$KV_x" starts with a name NATS reserves`, `FLOWBUS_SUBJECT_PREFIX: "_INBOX.x" starts with a name NATS reserves`}},
	} {
		for k, v := range c.env {
			t.Setenv(k, v)
		}
		// Nothing listens there: a refusal after connecting would be exit 1 naming the server.
		r := runArgs(t, append([]string{"--nats", "nats://127.0.0.1:1"}, c.args...)...)
		if r.code != exitUsage || r.stdout != "" {
			t.Errorf("%v %v: exit %d, stdout %q; want 2", c.args, c.env, r.code, r.stdout)
		}
		for _, w := range append(c.want, "use another name", "Run 'flowtail --help'") {
			if !strings.Contains(r.stderr, w) {
				t.Errorf("%v %v: stderr lacks %q:\n%s", c.args, c.env, w, r.stderr)
			}
		}
		if strings.Contains(r.stderr, "cannot connect") {
			t.Errorf("%v: connected before refusing:\n%s", c.args, r.stderr)
		}
		for k := range c.env {
			os.Unsetenv(k)
		}
	}
}

// With --json, stdout stays one JSON event per line and an agent restart is warned about on stderr, as
// every other warning: K = 3 of 10 batches and the downtime, the previous run's id escaped.
func TestRestartWarnedWithJSON(t *testing.T) {
	t.Parallel()
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	prev := "old\x1b[31m"
	old := tailtest.NewAgent("web-01", prev)
	for i := 1; i <= 10; i++ {
		if i == 5 || i >= 9 {
			old.Batch(schema.Outgoing, schema.Drops{}) // never arrives
			continue
		}
		old.Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, ev(uint16(i), "10.0.0.1", "10.0.0.2", 443))
	}
	t1 := time.Date(2026, 12, 2, 12, 0, 1, 234_000_000, time.UTC).UnixNano()
	neu := tailtest.NewAgent("web-01", "run-new")
	neu.SetPrevRun(schema.Outgoing, &schema.RunLink{RunID: prev, LastSeq: 10, Batches: 10, LastNs: t1, StartNs: t1 + 2_072_000_000, End: "unknown"})
	neu.Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, ev(11, "10.0.0.1", "10.0.0.2", 443))

	r := runArgs(t, "--nats", srv.URL, "--all", "--json", "--idle-exit", "700ms")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	if evs := parseJSON(t, r.stdout); len(evs) != 8 {
		t.Errorf("%d JSON events, want 8", len(evs))
	}
	want := `warning: host web-01 direction outgoing restarted as run run-new: run old\x1b[31m ended (unknown) after seq 10; 3 batches (of 10) never arrived; capture stopped 2026-12-02T12:00:01.234Z → 2026-12-02T12:00:03.306Z (2.072 s)` + "\n"
	if !strings.Contains(r.stderr, want) || strings.ContainsRune(r.stderr, 0x1b) {
		t.Errorf("stderr lacks %q:\n%s", want, r.stderr)
	}
}
