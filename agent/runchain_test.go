package agent

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/internal/syncbuf"
	"github.com/flowbus/flowbus/schema"
)

func chainLog() (*slog.Logger, *syncbuf.Buffer) {
	var b syncbuf.Buffer
	return slog.New(slog.NewTextHandler(&b, nil)), &b
}

// One run's record, as the next run reads it: seals per direction, the
// last-alive time, and "stopped" only after a clean stop.
func TestRunChainRecordsAndLinks(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "run-web-01.state")
	log, logs := chainLog()

	c1 := openRunChain(path, "web-01", "run1", log)
	if c1 == nil || c1.prev != nil {
		t.Fatalf("first run: chain %v, prev %+v", c1, c1.prev)
	}
	// Said at attach, not at open: a start that fails prints only its cause.
	if l := logs.Take(); strings.Contains(l, "no previous run") {
		t.Errorf("first run: said before attach: %s", l)
	}
	if l := c1.prevRun(schema.Outgoing); l != nil {
		t.Fatalf("first run links to %+v", l)
	}
	start1 := time.Now()
	c1.attached(start1)
	if !strings.Contains(logs.Take(), "no previous run of this host recorded") {
		t.Error("first run: no line saying there is no previous run")
	}
	c1.sealed(schema.Outgoing, 1, 10)
	c1.sealed(schema.Incoming, 2, 20)
	c1.sealed(schema.Outgoing, 3, 30)
	time.Sleep(2*heartbeatEvery + 50*time.Millisecond) // heartbeats move last_ns on
	beforeKill := time.Now()
	// A kill: no detached, no stopped; the file is just let go.
	c1.close()

	c2 := openRunChain(path, "web-01", "run2", log)
	if c2 == nil || c2.prev == nil {
		t.Fatalf("second run: no previous run read:\n%s", logs.String())
	}
	start2 := time.Now()
	c2.attached(start2)
	out, in := c2.prevRun(schema.Outgoing), c2.prevRun(schema.Incoming)
	if out == nil || in == nil {
		t.Fatal("no link")
	}
	wantOut := schema.RunLink{RunID: "run1", LastSeq: 3, Batches: 2, Events: 40, LastNs: out.LastNs, StartNs: start2.UnixNano(), End: schema.RunEndUnknown}
	wantIn := schema.RunLink{RunID: "run1", LastSeq: 2, Batches: 1, Events: 20, LastNs: out.LastNs, StartNs: start2.UnixNano(), End: schema.RunEndUnknown}
	if *out != wantOut || *in != wantIn {
		t.Fatalf("links\n out %+v\n in  %+v\nwant\n out %+v\n in  %+v", out, in, wantOut, wantIn)
	}
	if out.LastNs < start1.Add(heartbeatEvery).UnixNano() || out.LastNs > beforeKill.UnixNano() {
		t.Errorf("last_ns %v: want a heartbeat between %v and the kill at %v", time.Unix(0, out.LastNs), start1.Add(heartbeatEvery), beforeKill)
	}
	line := logs.Take()
	for _, w := range []string{"previous run run1 of host web-01 ended (unknown) after seq 3", "outgoing: last seq 3, 2 batches, 40 events",
		"incoming: last seq 2, 1 batches, 20 events", "capture was down from "} {
		if !strings.Contains(line, w) {
			t.Errorf("start line lacks %q:\n%s", w, line)
		}
	}
	// A clean stop: end "stopped", last_ns at the detach, and nothing sealed.
	c2.sealed(schema.Incoming, 1, 5)
	c2.detached()
	detachedAt := time.Now()
	c2.sealed(schema.Incoming, 2, 5) // a seal at Close, after the capture ended
	c2.stopped()

	c3 := openRunChain(path, "web-01", "run3", log)
	defer c3.close()
	c3.attached(time.Now())
	l := c3.prevRun(schema.Incoming)
	if l == nil || l.RunID != "run2" || l.End != schema.RunEndStopped || l.Batches != 2 || l.LastSeq != 2 || l.Events != 10 {
		t.Fatalf("after a clean stop: %+v", l)
	}
	if l.LastNs > detachedAt.UnixNano() {
		t.Errorf("last_ns %v after the detach at %v: a seal after the capture ended moved it", time.Unix(0, l.LastNs), detachedAt)
	}
	if o := c3.prevRun(schema.Outgoing); o == nil || o.Batches != 0 || o.LastSeq != 0 {
		t.Errorf("outgoing link of a run that sealed none: %+v", o)
	}
	if !strings.Contains(logs.Take(), "ended (stopped) after seq 2") {
		t.Error("no line for the stopped run")
	}
}

// A torn write of one slot leaves the other: the record read is the one
// before, never garbage.
func TestRunChainTornSlot(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run-h.state")
	log, _ := chainLog()
	c := openRunChain(path, "h", "r1", log)
	c.attached(time.Now())
	c.sealed(schema.Outgoing, 1, 1)
	c.sealed(schema.Outgoing, 2, 1)
	gen := c.rec.gen
	c.close()
	data, err := os.ReadFile(path)
	must(t, err)
	// The newest slot is gen%2: tear it in the middle.
	s := int(gen%2) * slotSize
	copy(data[s+offDirs:], []byte{0xde, 0xad})
	rec, ok := parseRunState(data)
	if !ok || rec.gen != gen-1 || rec.dirs[0].lastSeq != 1 {
		t.Fatalf("torn newest slot: got %+v ok %v, want the previous record (gen %d, last seq 1)", rec, ok, gen-1)
	}
}

func TestRunChainBadFiles(t *testing.T) {
	dir := t.TempDir()
	log, logs := chainLog()
	for _, tc := range []struct {
		name, content, host, want string
	}{
		{"corrupt", strings.Repeat("x", 700), "h", "run state file corrupt: this run's first batches name no previous run"},
		{"short", "FBRUNST1", "h", "run state file corrupt"},
	} {
		path := filepath.Join(dir, tc.name)
		must(t, os.WriteFile(path, []byte(tc.content), 0o644))
		c := openRunChain(path, tc.host, "r", log)
		if c == nil || c.prev != nil {
			t.Fatalf("%s: chain %v", tc.name, c)
		}
		c.attached(time.Now())
		if l := c.prevRun(schema.Outgoing); l != nil {
			t.Errorf("%s: link %+v", tc.name, l)
		}
		c.stopped()
		if got := logs.Take(); strings.Count(got, "level=WARN") != 1 || !strings.Contains(got, tc.want) {
			t.Errorf("%s: want one warning %q, got:\n%s", tc.name, tc.want, got)
		}
		// Rewritten: the next run links to this one.
		c = openRunChain(path, tc.host, "r2", log)
		if c == nil || c.prev == nil || c.prev.runID != "r" {
			t.Errorf("%s: not rewritten for the next run", tc.name)
		}
		c.close()
		logs.Take()
	}

	// Another host's file: one warning, no link.
	path := filepath.Join(dir, "foreign")
	c := openRunChain(path, "web-01", "r", log)
	c.attached(time.Now())
	c.stopped()
	logs.Take()
	c = openRunChain(path, "web-02", "r2", log)
	c.attached(time.Now())
	if l := c.prevRun(schema.Incoming); l != nil {
		t.Errorf("foreign file: link %+v", l)
	}
	if got := logs.Take(); !strings.Contains(got, "run state file belongs to another host") || !strings.Contains(got, "file_host=web-01") {
		t.Errorf("foreign file: %s", got)
	}

	// Held by another agent: one warning, no chain for this run, the holder's record untouched.
	other := openRunChain(path, "web-02", "r3", log)
	if other != nil {
		t.Fatal("a second holder of the same state file")
	}
	if got := logs.Take(); !strings.Contains(got, "run state file in use by another agent with the same FLOWBUS_HOST") {
		t.Errorf("busy file: %s", got)
	}
	c.close()

	if openRunChain("off", "h", "r", log) != nil {
		t.Error("off: a chain")
	}
	var nilChain *runChain // every method of a nil chain is a no-op
	nilChain.attached(time.Now())
	nilChain.sealed(schema.Outgoing, 1, 1)
	if nilChain.prevRun(schema.Outgoing) != nil {
		t.Error("nil chain links")
	}
	nilChain.stopped()
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// The cost of the write-ahead record, paid under the publisher's lock at
// every seal: go test ./agent -run '^$' -bench RunChainSealed
func BenchmarkRunChainSealed(b *testing.B) {
	log, _ := chainLog()
	c := openRunChain(filepath.Join(b.TempDir(), "run.state"), "h", "r", log)
	defer c.close()
	c.attached(time.Now())
	defer c.detached()
	for i := 0; i < b.N; i++ {
		c.sealed(schema.Outgoing, uint64(i+1), 100)
	}
}
