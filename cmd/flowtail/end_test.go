package main

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/flowbus/flowbus/schema"
)

// jsonEnd mirrors an end object (FORMAT.md "End batches"); unknown fields fail decoding.
type jsonEnd struct {
	Event         string   `json:"event"`
	ConnDirection string   `json:"conn_direction"`
	Src           string   `json:"src"`
	Dst           string   `json:"dst"`
	SrcPort       uint16   `json:"src_port"`
	DstPort       uint16   `json:"dst_port"`
	SrcDNS        []string `json:"src_dns"`
	DstDNS        []string `json:"dst_dns"`
	BeginNs       int64    `json:"begin_ns"`
	EndNs         int64    `json:"end_ns"`
	DurationNs    int64    `json:"duration_ns"`
	SrcBytes      uint64   `json:"src_bytes"`
	DstBytes      uint64   `json:"dst_bytes"`
	SrcSegs       uint64   `json:"src_segs"`
	DstSegs       uint64   `json:"dst_segs"`
	Retrans       uint64   `json:"retrans"`
	SRTTus        uint32   `json:"srtt_us"`
	Reason        string   `json:"reason"`
	Host          string   `json:"host"`
	CgroupID      uint64   `json:"cgroup_id"`
	PID           uint32   `json:"pid"`
	Comm          string   `json:"comm"`
	ContainerID   string   `json:"container_id"`
}

func endOf(id uint16, src, dst string, dstPort uint16, reason schema.EndReason, dstDNS ...string) schema.EndEvent {
	end := baseTS + int64(id)*int64(time.Millisecond)
	return schema.EndEvent{Src: netip.MustParseAddr(src), Dst: netip.MustParseAddr(dst), SrcPort: 40000 + id, DstPort: dstPort,
		DstDNS: dstDNS, BeginNs: end - 2_500_000_000, EndNs: end, SrcBytes: 517, DstBytes: 1_234_567, SrcSegs: 3, DstSegs: 860,
		Retrans: 1, SRTTus: 11250, Reason: reason, PID: 1234, Comm: "curl"}
}

// endFixture: begins and ends of one agent run, interleaved in the stream (ids in the source port):
//
//	1 web-01 outgoing begin 1    2 web-01 outgoing end 1 (fin)   3 web-01 incoming begin 2
//	4 web-01 incoming end 2 (never_established)                 5 web-01 outgoing begin 3
func endFixture(t *testing.T) *tailtest.Server {
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	a := tailtest.NewAgent("web-01", "run1")
	a.Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, ev(1, "10.0.0.1", "93.184.216.34", 443, "example.com"))
	a.PublishEnd(t, srv, "flows", schema.Outgoing, schema.Drops{}, endOf(1, "10.0.0.1", "93.184.216.34", 443, schema.EndFIN, "example.com"))
	a.Publish(t, srv, "flows", schema.Incoming, schema.Drops{}, ev(2, "192.0.2.7", "10.0.0.1", 22))
	a.PublishEnd(t, srv, "flows", schema.Incoming, schema.Drops{}, endOf(2, "192.0.2.7", "10.0.0.1", 22, schema.EndNeverEstablished))
	a.Publish(t, srv, "flows", schema.Outgoing, schema.Drops{}, ev(3, "10.0.0.1", "1.1.1.1", 853))
	return srv
}

// kinds reads JSON lines as begin ("b<id>") or end ("e<id>") objects, each decoded strictly as its kind.
func kinds(t *testing.T, out string) ([]string, []jsonEnd) {
	t.Helper()
	var got []string
	var ends []jsonEnd
	for _, line := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
		if line == "" {
			continue
		}
		dec := json.NewDecoder(strings.NewReader(line))
		dec.DisallowUnknownFields()
		if strings.HasPrefix(line, `{"event":"net_flow_tcp_end",`) {
			var e jsonEnd
			if err := dec.Decode(&e); err != nil {
				t.Fatalf("bad end line %q: %v", line, err)
			}
			ends = append(ends, e)
			got = append(got, "e"+string(rune('0'+e.SrcPort-40000)))
			continue
		}
		var b jsonEvent // a begin decoder: an end line here would fail on its unknown fields
		if err := dec.Decode(&b); err != nil {
			t.Fatalf("bad begin line %q: %v", line, err)
		}
		got = append(got, "b"+string(rune('0'+b.SrcPort-40000)))
	}
	return got, ends
}

// --event chooses what flowtail prints: by default begins only (the end batches are not shown, not
// warned about), end only ends, both all in stream order; JSON end objects carry every field.
func TestEventChoice(t *testing.T) {
	t.Parallel()
	srv := endFixture(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "b1 b2 b3"},
		{[]string{"--event", "begin"}, "b1 b2 b3"},
		{[]string{"--event", "end"}, "e1 e2"},
		{[]string{"--event", "both"}, "b1 e1 b2 e2 b3"},
		{[]string{"--event", "end", "--direction", "incoming"}, "e2"},
	} {
		args := append([]string{"--nats", srv.URL, "--all", "--json", "--idle-exit", "700ms"}, tc.args...)
		r := runArgs(t, args...)
		if r.code != 0 || r.stderr != "" {
			t.Fatalf("%v: exit %d, stderr %q", tc.args, r.code, r.stderr)
		}
		got, ends := kinds(t, r.stdout)
		if strings.Join(got, " ") != tc.want {
			t.Errorf("%v: %v, want %s", tc.args, got, tc.want)
		}
		for _, e := range ends {
			if e.Host != "web-01" || e.DurationNs != 2_500_000_000 || e.EndNs-e.BeginNs != e.DurationNs || e.SrcBytes != 517 ||
				e.DstBytes != 1_234_567 || e.SrcSegs != 3 || e.DstSegs != 860 || e.Retrans != 1 || e.SRTTus != 11250 || e.PID != 1234 || e.Comm != "curl" {
				t.Errorf("end object %+v", e)
			}
		}
		if len(ends) == 2 && (ends[0].Reason != "fin" || ends[0].ConnDirection != "outgoing" || ends[0].DstDNS[0] != "example.com" ||
			ends[1].Reason != "never_established" || ends[1].ConnDirection != "incoming") {
			t.Errorf("end objects %+v", ends)
		}
	}
}

// The end table: DURATION, BYTES (src/dst), REASON and PROCESS (comm[pid], "-" when unknown); both adds EVENT; the begin table is as before.
func TestEndTable(t *testing.T) {
	t.Parallel()
	srv := endFixture(t)
	r := runArgs(t, "--nats", srv.URL, "--all", "--event", "both", "--idle-exit", "700ms")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	t.Logf("table:\n%s", r.stdout)
	lines := strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n")
	if len(lines) != 6 || strings.Join(strings.Fields(lines[0]), " ") != "TIME HOST EVENT DIRECTION SRC DST DURATION BYTES REASON PROCESS SRC_DNS DST_DNS" {
		t.Fatalf("header %q, %d lines", lines[0], len(lines))
	}
	endTS := time.Unix(0, baseTS+int64(time.Millisecond)).UTC().Format("2006-01-02T15:04:05.000Z")
	if got := strings.Join(strings.Fields(lines[2]), " "); got != endTS+" web-01 end outgoing 10.0.0.1:40001 93.184.216.34:443 2.5s 517/1234567 fin curl[1234] - example.com" {
		t.Errorf("end row %q", got)
	}
	if f := strings.Fields(lines[1]); f[2] != "begin" || f[6] != "-" || f[7] != "-" || f[8] != "-" {
		t.Errorf("begin row %q", lines[1])
	}
	col := strings.Index(lines[0], "REASON")
	if !strings.HasPrefix(lines[4][col:], "never_established") {
		t.Errorf("misaligned %q (REASON at %d)", lines[4], col)
	}
	r = runArgs(t, "--nats", srv.URL, "--all", "--event", "end", "--idle-exit", "700ms")
	if h := strings.Join(strings.Fields(strings.SplitN(r.stdout, "\n", 2)[0]), " "); r.code != 0 || h != "TIME HOST DIRECTION SRC DST DURATION BYTES REASON PROCESS SRC_DNS DST_DNS" {
		t.Errorf("end table header %q (exit %d)", h, r.code)
	}
	r = runArgs(t, "--nats", srv.URL, "--all", "--idle-exit", "700ms")
	if h := strings.Join(strings.Fields(strings.SplitN(r.stdout, "\n", 2)[0]), " "); r.code != 0 || h != "TIME HOST DIRECTION SRC DST PROCESS SRC_DNS DST_DNS" || strings.Count(r.stdout, "\n") != 4 {
		t.Errorf("default table changed: %q", r.stdout)
	}
}

func TestEventFlagAndHelp(t *testing.T) {
	t.Parallel()
	r := runArgs(t, "--event", "ends")
	if r.code != 2 || !strings.Contains(r.stderr, `--event: "ends" is not an event choice: want begin, end or both`) {
		t.Errorf("exit %d, stderr %q", r.code, r.stderr)
	}
	r = runArgs(t, "--help")
	if !strings.Contains(r.stdout, "--event KIND          begin, end or both (default begin") {
		t.Errorf("help lacks --event:\n%s", r.stdout)
	}
	for i, l := range strings.Split(r.stdout, "\n") {
		if n := len([]rune(l)); n > 80 {
			t.Errorf("help line %d has %d columns: %q", i+1, n, l)
		}
	}
}

// An end batch published on a begin subject (a misrouting publisher) reaches only the begin decoder,
// which refuses it as schema major 2 with one warning: flowtail never prints it as a begin.
func TestEndOnBeginSubjectNeverABegin(t *testing.T) {
	t.Parallel()
	srv := tailtest.Start(t)
	srv.CreateStream(t, "FLOWS", "flows.>")
	_, data := tailtest.NewAgent("web-01", "run1").EndBatch(schema.Outgoing, schema.Drops{},
		endOf(1, "10.0.0.1", "93.184.216.34", 443, schema.EndFIN))
	srv.Publish(t, "flows.web-01.outgoing", data)
	for _, event := range []string{"begin", "both"} {
		r := runArgs(t, "--nats", srv.URL, "--all", "--json", "--event", event, "--idle-exit", "500ms")
		if r.code != 0 || r.stdout != "" || !strings.Contains(r.stderr, "schema major 2 is not supported by this consumer (supports 1): it is a net_flow_tcp_end batch") {
			t.Errorf("--event %s: exit %d, stdout %q, stderr %q", event, r.code, r.stdout, r.stderr)
		}
	}
}
