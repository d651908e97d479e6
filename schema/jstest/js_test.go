// Package jstest proves that flowbus batches decode exactly with the official NATS JavaScript client and
// @msgpack/msgpack, following the recipe of schema/FORMAT.md. The Node program (decode.mjs, flowbus.mjs)
// lives beside this test; `npm ci` in this directory installs its locked dependencies.
package jstest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/vmihailenco/msgpack/v5"

	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/flowbus/flowbus/publisher"
	"github.com/flowbus/flowbus/schema"
)

// envRequire turns the skip for a missing Node.js or npm install into a failure (CI sets it).
const envRequire = "FLOWBUS_REQUIRE_PRIVILEGED"

// requireNode returns the node binary, or skips (fails under envRequire=1) with one line saying how to
// get what is missing.
func requireNode(t *testing.T) string {
	t.Helper()
	node, err := exec.LookPath("node")
	missing := ""
	switch {
	case err != nil:
		missing = "node is not on PATH"
	default:
		for _, dep := range []string{"@msgpack/msgpack", "@nats-io/jetstream", "@nats-io/transport-node"} {
			if _, err := os.Stat(filepath.Join("node_modules", dep, "package.json")); err != nil {
				missing = "schema/jstest/node_modules lacks " + dep
				break
			}
		}
	}
	if missing == "" {
		return node
	}
	msg := "JavaScript client test: " + missing + "; run deploy/install-deps.sh (or `npm ci` in schema/jstest)"
	if os.Getenv(envRequire) == "1" {
		t.Fatal(msg + " (" + envRequire + "=1 makes this a failure)")
	}
	t.Skip(msg)
	return ""
}

// Output of decode.mjs. Unknown fields are an error, so the two sides cannot drift apart unnoticed.
type jsOutput struct {
	Batches []jsBatch `json:"batches"`
}

type jsBatch struct {
	Subject       string            `json:"subject"`
	StreamSeq     uint64            `json:"stream_seq"`
	Headers       map[string]string `json:"headers"`
	Batch         *jsDecoded        `json:"batch"`
	EndBatch      *jsEndDecoded     `json:"end_batch"`
	DefaultDecode jsDefault         `json:"default_decode"`
}

type jsDecoded struct {
	SchemaMajor   int               `json:"schema_major"`
	SchemaMinor   int               `json:"schema_minor"`
	Host          string            `json:"host"`
	ConnDirection string            `json:"conn_direction"`
	RunID         string            `json:"run_id"`
	Seq           string            `json:"seq"`
	PrevSeq       string            `json:"prev_seq"`
	PrevRun       *jsRunLink        `json:"prev_run"`
	T0            string            `json:"t0"`
	Drops         map[string]string `json:"drops"`
	Events        []jsEvent         `json:"events"`
}

type jsEndDecoded struct {
	SchemaMajor   int               `json:"schema_major"`
	SchemaMinor   int               `json:"schema_minor"`
	Event         string            `json:"event"`
	Host          string            `json:"host"`
	ConnDirection string            `json:"conn_direction"`
	RunID         string            `json:"run_id"`
	Seq           string            `json:"seq"`
	PrevSeq       string            `json:"prev_seq"`
	PrevRun       *jsRunLink        `json:"prev_run"`
	T0            string            `json:"t0"`
	Drops         map[string]string `json:"drops"`
	Events        []jsEndEvent      `json:"events"`
}

type jsEndEvent struct {
	Event         string   `json:"event"`
	ConnDirection string   `json:"conn_direction"`
	Src           string   `json:"src"`
	Dst           string   `json:"dst"`
	SrcPort       uint16   `json:"src_port"`
	DstPort       uint16   `json:"dst_port"`
	SrcDNS        []string `json:"src_dns"`
	DstDNS        []string `json:"dst_dns"`
	BeginNs       string   `json:"begin_ns"`
	EndNs         string   `json:"end_ns"`
	DurationNs    string   `json:"duration_ns"`
	SrcBytes      string   `json:"src_bytes"`
	DstBytes      string   `json:"dst_bytes"`
	SrcSegs       string   `json:"src_segs"`
	DstSegs       string   `json:"dst_segs"`
	Retrans       string   `json:"retrans"`
	SRTTus        uint32   `json:"srtt_us"`
	Reason        string   `json:"reason"`
	Host          string   `json:"host"`
	CgroupID      *string  `json:"cgroup_id"`
	PID           *uint32  `json:"pid"`
	Comm          *string  `json:"comm"`
	UID           *uint32  `json:"uid"`
	ContainerID   *string  `json:"container_id"`
}

type jsRunLink struct {
	RunID   string `json:"run_id"`
	LastSeq string `json:"last_seq"`
	Batches string `json:"batches"`
	Events  string `json:"events"`
	LastNs  string `json:"last_ns"`
	StartNs string `json:"start_ns"`
	End     string `json:"end"`
}

type jsEvent struct {
	ConnDirection string   `json:"conn_direction"`
	Src           string   `json:"src"`
	Dst           string   `json:"dst"`
	SrcPort       uint16   `json:"src_port"`
	DstPort       uint16   `json:"dst_port"`
	SrcDNS        []string `json:"src_dns"`
	DstDNS        []string `json:"dst_dns"`
	Timestamp     string   `json:"timestamp"`
	Host          string   `json:"host"`
	CgroupID      *string  `json:"cgroup_id"`
	PID           *uint32  `json:"pid"`
	Comm          *string  `json:"comm"`
	UID           *uint32  `json:"uid"`
	ContainerID   *string  `json:"container_id"`
}

type jsDefault struct {
	T0         string   `json:"t0"`
	Timestamps []string `json:"timestamps"`
	BigintMix  *struct {
		T0Type string `json:"t0_type"`
		DtType string `json:"dt_type"`
		Sum    string `json:"sum"`
		Error  string `json:"error"`
	} `json:"bigint_mix"`
}

// published is one batch as the Go side knows it.
type published struct {
	name      string
	data      []byte
	subject   string
	msgID     string
	streamSeq uint64
	batch     schema.Batch
	end       *schema.EndBatch // set for an end batch (testdata/end_*), batch then unused
	t0        int64            // from a generic Go msgpack decode, independent of schema.DecodeBatch
	dts       []int64
}

// Beyond 2^53 a float64 (a JavaScript number) cannot hold every integer: 2^53+1 is the first it rounds.
const above53 = 1<<53 + 1

func edgeBatches() map[string][]byte {
	ev := func(ts int64) schema.Event {
		return schema.Event{Timestamp: ts, Src: netip.MustParseAddr("192.0.2.1"), Dst: netip.MustParseAddr("198.51.100.2"),
			SrcPort: 40000, DstPort: 443}
	}
	batch := func(host, runID string, seq uint64, drops schema.Drops, evs ...schema.Event) []byte {
		enc := schema.NewBatchEncoder(host, runID, schema.Outgoing)
		for i := range evs {
			enc.Add(&evs[i])
		}
		return enc.Finish(nil, seq, drops)
	}
	// dt_ns in every msgpack integer encoding: positive and negative fixint, uint8/16/32 and int8/16/32
	// (numbers in JavaScript), uint64 and int64 (bigints).
	var near53 []schema.Event
	for _, dt := range []int64{0, 1, -1, 3, 201, -33, 1001, -201, 70_001, -70_001, 3_000_000_001, -2_000_000_001,
		5_000_000_001, -5_000_000_001} {
		near53 = append(near53, ev(above53+dt))
	}
	near53[1].CgroupID = above53
	near53[1].PID = math.MaxUint32
	wrap := []schema.Event{ev(math.MaxInt64 - 2), ev(math.MinInt64 + 1), ev(math.MaxInt64)} // t0+dt wraps
	before1970 := []schema.Event{ev(-above53 - 2), ev(-above53 + 5), ev(-above53 - 9)}
	return map[string][]byte{
		"near_2^53":   batch("js-edge", "near53", above53, schema.Drops{Kernel: above53, Spool: 1}, near53...),
		"wraps_int64": batch("js-edge", "wrap", 1, schema.Drops{}, wrap...),
		"before_1970": batch("js-edge", "neg", 2, schema.Drops{}, before1970...),
	}
}

func goldenBatches(t *testing.T) map[string][]byte {
	paths, err := filepath.Glob(filepath.Join("..", "testdata", "*.msgpack"))
	if err != nil || len(paths) == 0 {
		t.Fatalf("no golden vectors in schema/testdata (%v)", err)
	}
	out := make(map[string][]byte)
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		out[strings.TrimSuffix(filepath.Base(p), ".msgpack")] = data
	}
	return out
}

// rawTimes reads t0 and every dt_ns with a generic msgpack decoder.
func rawTimes(t *testing.T, data []byte) (int64, []int64) {
	t.Helper()
	var raw struct {
		T0     int64   `msgpack:"t0"`
		Events [][]any `msgpack:"events"`
	}
	if err := msgpack.Unmarshal(data, &raw); err != nil {
		t.Fatal(err)
	}
	dts := make([]int64, len(raw.Events))
	for i, row := range raw.Events {
		d, err := strconv.ParseInt(fmt.Sprint(row[4]), 10, 64)
		if err != nil {
			t.Fatalf("events[%d][4]: %v", i, err)
		}
		dts[i] = d
	}
	return raw.T0, dts
}

// float is how a JavaScript number prints an integer-valued double: shortest round-trip digits.
func float(f float64) string { return strconv.FormatFloat(f, 'f', -1, 64) }

func addrText(a netip.Addr) string { return string(a.AppendTo(nil)) }

func TestJavaScriptClientDecodesExactly(t *testing.T) {
	node := requireNode(t)
	srv := tailtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := publisher.EnsureStream(ctx, srv.JS, publisher.StreamSettings{Name: "FLOWS", Prefix: schema.DefaultPrefix,
		Duplicates: time.Minute, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}

	all := goldenBatches(t)
	for name, data := range edgeBatches() {
		all[name] = data
	}
	names := slices.Sorted(maps.Keys(all))
	var pubs []*published
	for _, name := range names {
		p := &published{name: name, data: all[name]}
		version := schema.SchemaHeaderValue()
		if strings.HasPrefix(name, "end_") {
			p.end = new(schema.EndBatch)
			if err := schema.DecodeEndBatch(p.data, p.end); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			p.subject = schema.EndSubject(schema.DefaultPrefix, p.end.Host, p.end.Direction)
			p.msgID = schema.MsgID(p.end.Host, p.end.RunID, p.end.Seq)
			version = schema.EndSchemaHeaderValue()
		} else {
			if err := schema.DecodeBatch(p.data, &p.batch); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			p.subject = schema.Subject(schema.DefaultPrefix, p.batch.Host, p.batch.Direction)
			p.msgID = schema.MsgID(p.batch.Host, p.batch.RunID, p.batch.Seq)
		}
		p.t0, p.dts = rawTimes(t, p.data)
		// The headers flowagent's publisher sets on every batch.
		ack, err := srv.JS.PublishMsg(ctx, &nats.Msg{Subject: p.subject, Data: p.data, Header: nats.Header{
			schema.HeaderMsgID:       {p.msgID},
			schema.HeaderContentType: {schema.ContentType},
			schema.HeaderSchema:      {version},
		}})
		if err != nil {
			t.Fatalf("publish %s: %v", name, err)
		}
		if ack.Duplicate {
			t.Fatalf("%s: message id %s taken twice: the test batches need distinct ids", name, p.msgID)
		}
		p.streamSeq = ack.Sequence
		pubs = append(pubs, p)
	}

	cmd := exec.CommandContext(ctx, node, "decode.mjs", srv.URL, "FLOWS")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("node decode.mjs: %v\n%s", err, stderr.String())
	}
	var out jsOutput
	dec := json.NewDecoder(&stdout)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&out); err != nil {
		t.Fatalf("decode.mjs output: %v", err)
	}
	if len(out.Batches) != len(pubs) {
		t.Fatalf("decode.mjs read %d batches, %d were published", len(out.Batches), len(pubs))
	}

	rounded, mixErrors := 0, 0
	for i, p := range pubs {
		js := out.Batches[i]
		t.Run(p.name, func(t *testing.T) {
			if p.end != nil {
				checkEndBatch(t, p, &js)
				return
			}
			if js.Batch == nil {
				t.Fatalf("decode.mjs gave no begin batch for %s", p.subject)
			}
			checkBatch(t, p, &js)
		})
		for j, ev := range p.batch.Events {
			if j < len(js.DefaultDecode.Timestamps) && js.DefaultDecode.Timestamps[j] != strconv.FormatInt(ev.Timestamp, 10) {
				rounded++
			}
		}
		if m := js.DefaultDecode.BigintMix; m != nil && m.Error != "" {
			mixErrors++
		}
	}
	// The vectors must be where the pitfall bites, or this test would prove nothing about the recipe.
	if rounded == 0 {
		t.Error("no timestamp was rounded by a default decode: the vectors do not exercise values above 2^53")
	}
	if mixErrors == 0 {
		t.Error("no batch had a bigint t0 with a number dt_ns under useBigInt64: the mixing pitfall is not exercised")
	}
	links, ends := 0, 0
	var uids, rootUIDs, endUIDs int // events with a known uid, of them uid 0, and those in end batches
	for _, p := range pubs {
		if p.batch.PrevRun != nil || p.end != nil && p.end.PrevRun != nil {
			links++
		}
		if p.end != nil {
			ends++
			for _, ev := range p.end.Events {
				if ev.UIDKnown {
					uids++
					endUIDs++
					rootUIDs += b2i(ev.UID == 0)
				}
			}
			continue
		}
		for _, ev := range p.batch.Events {
			if ev.UIDKnown {
				uids++
				rootUIDs += b2i(ev.UID == 0)
			}
		}
	}
	// The process vector holds uid 0 (root, a value) beside others and events without one.
	if uids == 0 || rootUIDs == 0 || endUIDs == 0 {
		t.Errorf("%d events with a uid (%d of them root, %d in end batches): the uid of schema 1.2 / 2.1 is not exercised (testdata/process, end_future_minor)", uids, rootUIDs, endUIDs)
	}
	if ends < 4 {
		t.Errorf("only %d end batches: the end vectors (testdata/end_*) are not exercised", ends)
	}
	if links == 0 {
		t.Error("no batch carries prev_run: the schema 1.1 link is not exercised")
	}
	if t.Failed() {
		return
	}
	t.Logf("%d batches (%d end batches, %d with prev_run, %d events with a uid, %d of them root): every field exact in JavaScript; a default decode rounded %d timestamps; t0 + dt_ns threw in %d batches",
		len(pubs), ends, links, uids, rootUIDs, rounded, mixErrors)
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

func checkBatch(t *testing.T, p *published, js *jsBatch) {
	eq := func(what, got, want string) {
		t.Helper()
		if got != want {
			t.Errorf("%s: JavaScript %q, Go %q", what, got, want)
		}
	}
	eq("subject", js.Subject, p.subject)
	eq("stream seq", strconv.FormatUint(js.StreamSeq, 10), strconv.FormatUint(p.streamSeq, 10))
	eq("header "+schema.HeaderMsgID, js.Headers[schema.HeaderMsgID], p.msgID)
	eq("header "+schema.HeaderContentType, js.Headers[schema.HeaderContentType], schema.ContentType)
	eq("header "+schema.HeaderSchema, js.Headers[schema.HeaderSchema], schema.SchemaHeaderValue())

	b, g := js.Batch, &p.batch
	eq("schema_major", strconv.Itoa(b.SchemaMajor), strconv.Itoa(g.Major))
	eq("schema_minor", strconv.Itoa(b.SchemaMinor), strconv.Itoa(g.Minor))
	eq("host", b.Host, g.Host)
	eq("conn_direction", b.ConnDirection, g.Direction.String())
	eq("run_id", b.RunID, g.RunID)
	eq("seq", b.Seq, strconv.FormatUint(g.Seq, 10))
	eq("prev_seq", b.PrevSeq, strconv.FormatUint(g.PrevSeq, 10))
	eq("t0", b.T0, strconv.FormatInt(p.t0, 10))
	switch jl, gl := b.PrevRun, g.PrevRun; {
	case (jl == nil) != (gl == nil):
		t.Errorf("prev_run: JavaScript %+v, Go %+v", jl, gl)
	case gl != nil:
		eq("prev_run.run_id", jl.RunID, gl.RunID)
		eq("prev_run.last_seq", jl.LastSeq, strconv.FormatUint(gl.LastSeq, 10))
		eq("prev_run.batches", jl.Batches, strconv.FormatUint(gl.Batches, 10))
		eq("prev_run.events", jl.Events, strconv.FormatUint(gl.Events, 10))
		eq("prev_run.last_ns", jl.LastNs, strconv.FormatInt(gl.LastNs, 10))
		eq("prev_run.start_ns", jl.StartNs, strconv.FormatInt(gl.StartNs, 10))
		eq("prev_run.end", jl.End, gl.End)
	}
	for k, v := range map[string]uint64{"kernel": g.Drops.Kernel, "reader": g.Drops.Reader, "queue": g.Drops.Queue,
		"spool": g.Drops.Spool, "publish": g.Drops.Publish} {
		eq("drops."+k, b.Drops[k], strconv.FormatUint(v, 10))
	}
	if len(b.Drops) != 5 {
		t.Errorf("drops: JavaScript has %d stages %v, want the 5 of schema 1.0", len(b.Drops), b.Drops)
	}
	if len(b.Events) != len(g.Events) {
		t.Fatalf("JavaScript decoded %d events, Go %d", len(b.Events), len(g.Events))
	}
	opt := func(s *string) string {
		if s == nil {
			return "(absent)"
		}
		return *s
	}
	for i := range g.Events {
		je, ge := &b.Events[i], &g.Events[i]
		f := func(name string) string { return fmt.Sprintf("events[%d].%s", i, name) }
		eq(f("conn_direction"), je.ConnDirection, ge.Direction.String())
		eq(f("src"), je.Src, addrText(ge.Src))
		eq(f("dst"), je.Dst, addrText(ge.Dst))
		eq(f("src_port"), strconv.Itoa(int(je.SrcPort)), strconv.Itoa(int(ge.SrcPort)))
		eq(f("dst_port"), strconv.Itoa(int(je.DstPort)), strconv.Itoa(int(ge.DstPort)))
		eq(f("src_dns"), strings.Join(je.SrcDNS, ","), strings.Join(ge.SrcDNS, ","))
		eq(f("dst_dns"), strings.Join(je.DstDNS, ","), strings.Join(ge.DstDNS, ","))
		if je.SrcDNS == nil || je.DstDNS == nil {
			t.Errorf("%s: src_dns/dst_dns must be arrays, got %v %v", f("dns"), je.SrcDNS, je.DstDNS)
		}
		eq(f("timestamp"), je.Timestamp, strconv.FormatInt(ge.Timestamp, 10))
		eq(f("host"), je.Host, g.Host)
		wantCg, wantComm, wantCid := "(absent)", "(absent)", "(absent)"
		if ge.CgroupID != 0 {
			wantCg = strconv.FormatUint(ge.CgroupID, 10)
		}
		if ge.Comm != "" {
			wantComm = ge.Comm
		}
		if ge.ContainerID != "" {
			wantCid = ge.ContainerID
		}
		eq(f("cgroup_id"), opt(je.CgroupID), wantCg)
		eq(f("comm"), opt(je.Comm), wantComm)
		eq(f("container_id"), opt(je.ContainerID), wantCid)
		gotPID, wantPID := "(absent)", "(absent)"
		if je.PID != nil {
			gotPID = strconv.FormatUint(uint64(*je.PID), 10)
		}
		if ge.PID != 0 {
			wantPID = strconv.FormatUint(uint64(ge.PID), 10)
		}
		eq(f("pid"), gotPID, wantPID)
		eq(f("uid"), jsUID(je.UID), goUID(ge.UID, ge.UIDKnown))
	}

	checkDefaultDecode(t, p, js)
}

// jsUID and goUID print a uid or "(absent)": unknown in Go (UIDKnown false) must be no key in
// JavaScript, and uid 0 (root) must be the key with 0.
func jsUID(u *uint32) string {
	if u == nil {
		return "(absent)"
	}
	return strconv.FormatUint(uint64(*u), 10)
}

func goUID(uid uint32, known bool) string {
	if !known {
		return "(absent)"
	}
	return strconv.FormatUint(uint64(uid), 10)
}

// checkDefaultDecode checks the pitfall, as FORMAT.md states it: a default decode yields every 64-bit
// integer as the nearest double, and t0 + dt_ns is then a double addition.
func checkDefaultDecode(t *testing.T, p *published, js *jsBatch) {
	eq := func(what, got, want string) {
		t.Helper()
		if got != want {
			t.Errorf("%s: JavaScript %q, Go %q", what, got, want)
		}
	}
	d := &js.DefaultDecode
	eq("default decode t0", d.T0, float(float64(p.t0)))
	if len(d.Timestamps) != len(p.dts) {
		t.Fatalf("default decode: %d timestamps, want %d", len(d.Timestamps), len(p.dts))
	}
	for i, dt := range p.dts {
		eq(fmt.Sprintf("default decode events[%d] t0 + dt_ns", i), d.Timestamps[i], float(float64(p.t0)+float64(dt)))
	}
	// With useBigInt64 a value takes bigint only in the 64-bit encodings, so t0 + dt_ns mixes types
	// exactly when one of them needs 64 bits and the other does not.
	if len(p.dts) > 0 {
		m := d.BigintMix
		if m == nil {
			t.Fatal("default decode: no bigint_mix for a batch with events")
		}
		wantType := func(v int64) string {
			if v > math.MaxUint32 || v < math.MinInt32 {
				return "bigint"
			}
			return "number"
		}
		eq("typeof t0 under useBigInt64", m.T0Type, wantType(p.t0))
		eq("typeof dt_ns under useBigInt64", m.DtType, wantType(p.dts[0]))
		if m.T0Type != m.DtType {
			if !strings.HasPrefix(m.Error, "TypeError: ") {
				t.Errorf("t0 (%s) + dt_ns (%s) under useBigInt64: want a TypeError, got sum %q error %q", m.T0Type, m.DtType, m.Sum, m.Error)
			}
		} else if m.Error != "" {
			t.Errorf("t0 + dt_ns, both %s: unexpected error %q", m.T0Type, m.Error)
		}
	}
}

// A batch of a future major must be refused with the error of FORMAT.md's decoding rule 1, never read.
func TestJavaScriptClientRejectsUnknownMajor(t *testing.T) {
	node := requireNode(t)
	srv := tailtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	srv.CreateStream(t, "FUTURE", "future.>")
	data, err := msgpack.Marshal(map[string]any{"schema_major": 2, "schema_minor": 0, "host": "web-01",
		"conn_direction": "outgoing", "run_id": "r", "seq": 1, "prev_seq": 0, "t0": int64(above53),
		"endpoints": []any{}, "events": []any{}})
	if err != nil {
		t.Fatal(err)
	}
	srv.Publish(t, "future.web-01.outgoing", data)
	out, err := exec.CommandContext(ctx, node, "decode.mjs", srv.URL, "FUTURE").CombinedOutput()
	if err == nil {
		t.Fatalf("decode.mjs accepted a schema major 2 batch:\n%s", out)
	}
	const want = "flowbus batch schema major 2 is not supported by this consumer (supports 1): upgrade the consumer"
	if !strings.Contains(string(out), want) {
		t.Fatalf("decode.mjs on a schema major 2 batch: %v\n%s\nwant the message %q", err, out, want)
	}
}

// flowbus.mjs enforces the string bounds of FORMAT.md decoding rule 4 in bytes, as the Go decoder does,
// and decodes prev_run: bounds.test.mjs checks each bound at its value and one past it.
func TestJavaScriptDecoderBounds(t *testing.T) {
	node := requireNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, node, "--test", "bounds.test.mjs").CombinedOutput()
	if err != nil {
		t.Fatalf("node --test bounds.test.mjs: %v\n%s", err, out)
	}
	// The bounds the JavaScript test checks are the Go decoder's.
	want := map[string]int{"host": schema.MaxHostLen, "run_id": schema.MaxRunIDLen, "direction": schema.MaxDirectionLen,
		"addr": schema.MaxAddrLen, "dns_name": schema.MaxDNSNameLen, "comm": schema.MaxCommLen,
		"container_id": schema.MaxContainerIDLen, "run_end": schema.MaxRunEndLen, "key": schema.MaxKeyLen,
		"event": schema.MaxEventLen}
	script := `import { BOUNDS } from "./flowbus.mjs"; process.stdout.write(JSON.stringify(BOUNDS));`
	b, err := exec.CommandContext(ctx, node, "--input-type=module", "-e", script).Output()
	if err != nil {
		t.Fatalf("reading BOUNDS from flowbus.mjs: %v", err)
	}
	var got map[string]int
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(got, want) {
		t.Fatalf("flowbus.mjs BOUNDS %v, Go decoder %v", got, want)
	}
	if n := strings.Count(string(out), "\nok "); n < 32 {
		t.Fatalf("only %d JavaScript tests passed:\n%s", n, out)
	}
}

// checkEndBatch is checkBatch for an end batch: decodeEndBatch in JavaScript against DecodeEndBatch.
func checkEndBatch(t *testing.T, p *published, js *jsBatch) {
	eq := func(what, got, want string) {
		t.Helper()
		if got != want {
			t.Errorf("%s: JavaScript %q, Go %q", what, got, want)
		}
	}
	if js.EndBatch == nil || js.Batch != nil {
		t.Fatalf("decode.mjs did not read %s as an end batch", p.subject)
	}
	eq("subject", js.Subject, p.subject)
	eq("header "+schema.HeaderMsgID, js.Headers[schema.HeaderMsgID], p.msgID)
	eq("header "+schema.HeaderSchema, js.Headers[schema.HeaderSchema], schema.EndSchemaHeaderValue())
	b, g := js.EndBatch, p.end
	u := func(v uint64) string { return strconv.FormatUint(v, 10) }
	i64 := func(v int64) string { return strconv.FormatInt(v, 10) }
	eq("schema_major", strconv.Itoa(b.SchemaMajor), strconv.Itoa(g.Major))
	eq("schema_minor", strconv.Itoa(b.SchemaMinor), strconv.Itoa(g.Minor))
	eq("event", b.Event, schema.EndEventName)
	eq("host", b.Host, g.Host)
	eq("conn_direction", b.ConnDirection, g.Direction.String())
	eq("run_id", b.RunID, g.RunID)
	eq("seq", b.Seq, u(g.Seq))
	eq("prev_seq", b.PrevSeq, u(g.PrevSeq))
	eq("t0", b.T0, i64(p.t0))
	switch jl, gl := b.PrevRun, g.PrevRun; {
	case (jl == nil) != (gl == nil):
		t.Errorf("prev_run: JavaScript %+v, Go %+v", jl, gl)
	case gl != nil:
		eq("prev_run", fmt.Sprint(*jl), fmt.Sprint(jsRunLink{gl.RunID, u(gl.LastSeq), u(gl.Batches), u(gl.Events), i64(gl.LastNs), i64(gl.StartNs), gl.End}))
	}
	for k, v := range map[string]uint64{"kernel": g.Drops.Kernel, "reader": g.Drops.Reader, "queue": g.Drops.Queue,
		"spool": g.Drops.Spool, "publish": g.Drops.Publish} {
		eq("drops."+k, b.Drops[k], u(v))
	}
	if len(b.Events) != len(g.Events) {
		t.Fatalf("JavaScript decoded %d events, Go %d", len(b.Events), len(g.Events))
	}
	opt := func(s *string) string {
		if s == nil {
			return "(absent)"
		}
		return *s
	}
	for i := range g.Events {
		je, ge := &b.Events[i], &g.Events[i]
		f := func(name string) string { return fmt.Sprintf("events[%d].%s", i, name) }
		eq(f("event"), je.Event, schema.EndEventName)
		eq(f("conn_direction"), je.ConnDirection, ge.Direction.String())
		eq(f("src"), je.Src, addrText(ge.Src))
		eq(f("dst"), je.Dst, addrText(ge.Dst))
		eq(f("src_port"), strconv.Itoa(int(je.SrcPort)), strconv.Itoa(int(ge.SrcPort)))
		eq(f("dst_port"), strconv.Itoa(int(je.DstPort)), strconv.Itoa(int(ge.DstPort)))
		eq(f("src_dns"), strings.Join(je.SrcDNS, ","), strings.Join(ge.SrcDNS, ","))
		eq(f("dst_dns"), strings.Join(je.DstDNS, ","), strings.Join(ge.DstDNS, ","))
		if je.SrcDNS == nil || je.DstDNS == nil {
			t.Errorf("%s: src_dns/dst_dns must be arrays, got %v %v", f("dns"), je.SrcDNS, je.DstDNS)
		}
		eq(f("begin_ns"), je.BeginNs, i64(ge.BeginNs))
		eq(f("end_ns"), je.EndNs, i64(ge.EndNs))
		eq(f("duration_ns"), je.DurationNs, i64(ge.Duration()))
		eq(f("src_bytes"), je.SrcBytes, u(ge.SrcBytes))
		eq(f("dst_bytes"), je.DstBytes, u(ge.DstBytes))
		eq(f("src_segs"), je.SrcSegs, u(ge.SrcSegs))
		eq(f("dst_segs"), je.DstSegs, u(ge.DstSegs))
		eq(f("retrans"), je.Retrans, u(ge.Retrans))
		eq(f("srtt_us"), u(uint64(je.SRTTus)), u(uint64(ge.SRTTus)))
		eq(f("reason"), je.Reason, ge.Reason.String())
		eq(f("host"), je.Host, g.Host)
		wantCg, wantComm, wantCid, wantPID, gotPID := "(absent)", "(absent)", "(absent)", "(absent)", "(absent)"
		if ge.CgroupID != 0 {
			wantCg = u(ge.CgroupID)
		}
		if ge.Comm != "" {
			wantComm = ge.Comm
		}
		if ge.ContainerID != "" {
			wantCid = ge.ContainerID
		}
		if ge.PID != 0 {
			wantPID = u(uint64(ge.PID))
		}
		if je.PID != nil {
			gotPID = u(uint64(*je.PID))
		}
		eq(f("cgroup_id"), opt(je.CgroupID), wantCg)
		eq(f("comm"), opt(je.Comm), wantComm)
		eq(f("container_id"), opt(je.ContainerID), wantCid)
		eq(f("pid"), gotPID, wantPID)
		eq(f("uid"), jsUID(je.UID), goUID(ge.UID, ge.UIDKnown))
	}
	checkDefaultDecode(t, p, js)
}
