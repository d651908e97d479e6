package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat"
	"github.com/flowbus/flowbus/consumers/flowstat/flowstattest"
	"github.com/flowbus/flowbus/consumers/flowstat/pgtest"
	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/flowbus/flowbus/internal/syncbuf"
	"github.com/flowbus/flowbus/schema"
)

// The test binary doubles as flowstat: with asMainEnv=1 it runs main's code on its arguments, so the
// kill test runs real flowstat processes without building a separate binary. Two more variables inject
// faults into the transactions of `flowstat run`: txDelayEnv sleeps inside every commit (so a SIGKILL
// lands mid-transaction), stallEnv=N prints stallMarker and blocks forever inside the Nth commit, after
// its rows are written.
const (
	asMainEnv   = "FLOWSTAT_TEST_AS_MAIN"
	txDelayEnv  = "FLOWSTAT_TEST_TX_DELAY"
	stallEnv    = "FLOWSTAT_TEST_STALL_COMMIT"
	stallMarker = "test: stalled inside a transaction"
)

func TestMain(m *testing.M) {
	if os.Getenv(asMainEnv) == "1" {
		delay, _ := time.ParseDuration(os.Getenv(txDelayEnv))
		var stallAt int
		fmt.Sscan(os.Getenv(stallEnv), &stallAt)
		commits := 0
		testHookStore = func(st *store.Store) {
			st.InTxHook = func() error {
				commits++
				if commits == stallAt {
					fmt.Fprintln(os.Stderr, stallMarker)
					select {}
				}
				time.Sleep(delay)
				return nil
			}
		}
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr, os.Getenv, time.Now()))
	}
	os.Exit(pgtest.Main(m))
}

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

var now = time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)

func TestParseArgsDefaultsAndPrecedence(t *testing.T) {
	cfg, err := parseArgs("run", nil, env(map[string]string{"XDG_STATE_HOME": "/st", "FLOWBUS_SUBJECT_PREFIX": "acme.flows"}), now)
	if err != nil {
		t.Fatal(err)
	}
	o := cfg.run
	if cfg.dsn != "/st/flowbus/flowstat.db" || o.URLs[0] != "nats://127.0.0.1:4222" || o.Stream != "FLOWS" || o.Durable != "flowstat" ||
		len(o.Filters) != 1 || o.Filters[0] != "acme.flows.>" || o.Start != stream.StartAll || o.Bucket != time.Minute ||
		o.DeadLetterSubject != "flowbus.deadletter" || o.StreamWait != time.Minute {
		t.Errorf("defaults: dsn %q, %+v", cfg.dsn, o)
	}

	e := env(map[string]string{"FLOWBUS_DB": "postgres://u:pw@db:5432/stats", "FLOWBUS_NATS_URL": "nats://a:4222,nats://b:4222",
		"FLOWBUS_STREAM": "F2", envConsumer: "agg", envFilter: "flows.*.incoming, flows.web-01.>", envStart: "seq:42", envBucket: "10s"})
	cfg, err = parseArgs("run", nil, e, now)
	if err != nil {
		t.Fatal(err)
	}
	o = cfg.run
	if cfg.dsn != "postgres://u:pw@db:5432/stats" || len(o.URLs) != 2 || o.Stream != "F2" || o.Durable != "agg" ||
		strings.Join(o.Filters, " ") != "flows.*.incoming flows.web-01.>" || o.Start != stream.StartSeq || o.FromSeq != 42 || o.Bucket != 10*time.Second {
		t.Errorf("from the environment: dsn %q, %+v", cfg.dsn, o)
	}

	// Flags win over the environment.
	cfg, err = parseArgs("run", []string{"--db", "/tmp/x.db", "--consumer", "c2", "--since", "2h", "--once", "--bucket", "5m"}, e, now)
	if err != nil {
		t.Fatal(err)
	}
	o = cfg.run
	if cfg.dsn != "/tmp/x.db" || o.Durable != "c2" || o.Start != stream.StartTime || !o.Since.Equal(now.Add(-2*time.Hour)) || !o.ExitWhenCaughtUp || o.Bucket != 5*time.Minute {
		t.Errorf("flags over the environment: dsn %q, %+v", cfg.dsn, o)
	}

	cfg, err = parseArgs("new", []string{"--since", "2026-11-24T10:00:00Z", "--direction", "all", "--json"}, e, now)
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.filter.Since.Equal(now.Add(-2*time.Hour)) || cfg.filter.Direction != "" || !cfg.json || cfg.limit != 100 {
		t.Errorf("new: %+v", cfg)
	}
	cfg, err = parseArgs("new", nil, e, now)
	if err != nil || cfg.filter.Direction != "outgoing" || !cfg.filter.Since.Equal(now.Add(-24*time.Hour)) {
		t.Errorf("new defaults: %+v, %v", cfg, err)
	}
	cfg, err = parseArgs("run", []string{"--max-chains", "1000", "--chain-retention", "48h"}, e, now)
	if err != nil || cfg.run.MaxChains != 1000 || cfg.run.ChainRetention != 48*time.Hour {
		t.Errorf("run --max-chains 1000 --chain-retention 48h: %+v, %v", cfg.run, err)
	}
	cfg, err = parseArgs("run", []string{"--chain-retention", "off"}, e, now)
	if err != nil || cfg.run.ChainRetention >= 0 || cfg.run.MaxChains != 0 {
		t.Errorf("run --chain-retention off: %+v, %v", cfg.run, err)
	}
	cfg, err = parseArgs("replay", []string{"--from", "3h", "--to", "1h"}, e, now)
	if err != nil || !cfg.replay.From.Equal(now.Add(-3*time.Hour)) || !cfg.replay.To.Equal(now.Add(-time.Hour)) || cfg.replay.Durable != "agg" {
		t.Errorf("replay: %+v, %v", cfg, err)
	}
}

// Every problem is reported at once, each under the name of the flag or variable to fix.
func TestParseArgsReportsEverything(t *testing.T) {
	e := env(map[string]string{"FLOWBUS_NATS_URL": "http://nats:4222", envBucket: "90s500ms", envStart: "tomorrow", "FLOWBUS_DB": "mysql://x"})
	_, err := parseArgs("run", []string{"--filter", "flows..x,flows.>.a", "--stream", "a.b", "--commit-events", "0", "--max-chains", "-3", "--chain-retention", "5m", "--bogus", "stray"}, e, now)
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{"FLOWBUS_NATS_URL", "FLOWBUS_FLOWSTAT_BUCKET", "FLOWBUS_FLOWSTAT_START", "FLOWBUS_DB", "unsupported database URL scheme",
		`"flows..x"`, `'>' must be the last token`, "--stream", "--commit-events", "--max-chains", "--chain-retention", "unknown flag --bogus", `unexpected argument "stray"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %q:\n%v", want, err)
		}
	}
	_, err = parseArgs("replay", []string{"--to", "1h"}, env(nil), now)
	if err == nil || !strings.Contains(err.Error(), "--from is required") {
		t.Errorf("replay without --from: %v", err)
	}
	_, err = parseArgs("top", []string{"--by", "color", "--since", "1h", "--until", "2h"}, env(nil), now)
	if err == nil || !strings.Contains(err.Error(), "--by") || !strings.Contains(err.Error(), "is not after") {
		t.Errorf("top with a bad --by and range: %v", err)
	}
	_, err = parseArgs("top", []string{"--filter", "x"}, env(nil), now)
	if err == nil || !strings.Contains(err.Error(), "unknown flag --filter for `flowstat top`") {
		t.Errorf("a flag of another command: %v", err)
	}
	var stderr bytes.Buffer
	if code := run([]string{"frobnicate"}, io.Discard, &stderr, env(nil), now); code != exitUsage || !strings.Contains(stderr.String(), `unknown command "frobnicate"`) {
		t.Errorf("unknown command: exit %d, %q", code, stderr.String())
	}
}

// runCLI runs a flowstat command in this process and returns its exit status and output.
// Unless e sets FLOWBUS_STAT_METRICS_ADDR, `run` serves no metrics: the default port is fixed.
func runCLI(t *testing.T, e map[string]string, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	getenv := func(k string) string {
		if v, ok := e[k]; ok || k != envMetrics {
			return v
		}
		return "off"
	}
	code := run(args, &out, &errOut, getenv, time.Now())
	return code, out.String(), errOut.String()
}

type fixture struct {
	srv   *tailtest.Server
	rec   *flowstattest.Recorder
	fleet *flowstattest.Fleet
}

func newFixture(t *testing.T) *fixture {
	srv := tailtest.Start(t)
	flowstattest.CreateStream(t, srv, "FLOWS", "flows.>")
	t0 := time.Now().Add(-30 * time.Minute).Truncate(time.Minute)
	return &fixture{srv: srv, rec: flowstattest.NewRecorder(srv, "FLOWS", "flows"), fleet: flowstattest.NewFleet(7, t0, 4*time.Minute, 30)}
}

// `flowstat run --once` consumes the stream, and the query commands answer from what it stored, as
// tables and as JSON, consistently with the published events.
func TestRunAndQueries(t *testing.T) {
	f := newFixture(t)
	f.fleet.Publish(t, f.rec, 30)
	db := filepath.Join(t.TempDir(), "flowstat.db")
	e := map[string]string{"FLOWBUS_NATS_URL": f.srv.URL, "FLOWBUS_DB": db}
	code, _, stderr := runCLI(t, e, "run", "--once")
	if code != exitOK || !strings.Contains(stderr, "stopped (caught-up)") {
		t.Fatalf("run --once: exit %d\n%s", code, stderr)
	}
	want := flowstattest.Reference(f.rec.Batches, time.Minute)
	st, err := store.OpenWith(context.Background(), db, store.OpenOptions{MustExist: true})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	flowstattest.Check(t, st, want)

	// The busiest peer and the per-host totals, straight from the events.
	peers, hostsTotal := map[string]int64{}, map[string]int64{}
	var newOut int
	since := f.fleet.T0.Add(2 * time.Minute)
	for _, b := range f.rec.Batches {
		for _, ev := range b.Events {
			p := ev.Dst.String()
			if b.Dir.String() == "incoming" {
				p = ev.Src.String()
			}
			peers[p]++
			hostsTotal[b.Host]++
		}
	}
	for k, v := range want.Seen {
		var first int64
		fmt.Sscanf(v, "first=%d", &first)
		if strings.Contains(k, "|outgoing|") && first >= since.UnixNano() {
			newOut++
		}
	}
	var topPeer string
	for p, n := range peers {
		if topPeer == "" || n > peers[topPeer] || n == peers[topPeer] && p < topPeer {
			topPeer = p
		}
	}

	code, out, stderr := runCLI(t, e, "top", "--since", "2h", "--json")
	if code != exitOK {
		t.Fatalf("top: exit %d: %s", code, stderr)
	}
	var top struct {
		Peers []store.TopRow `json:"peers"`
		Ports []struct {
			Key   int   `json:"key"` // a number, as in every other output
			Conns int64 `json:"connections"`
		} `json:"ports"`
	}
	if err := json.Unmarshal([]byte(out), &top); err != nil {
		t.Fatalf("top --json: %v\n%s", err, out)
	}
	if len(top.Peers) == 0 || top.Peers[0].Key != topPeer || top.Peers[0].Conns != peers[topPeer] || len(top.Ports) == 0 {
		t.Errorf("top peers %+v, want %s with %d connections first", top.Peers, topPeer, peers[topPeer])
	}
	// SPEC: the same --nats and --stream flags as flowtail, on every command.
	code, out2, stderr := runCLI(t, nil, "top", "--nats", "nats://nobody.invalid:4222", "--stream", "FLOWS", "--db", db, "--since", "2h", "--json")
	var top2 struct {
		Peers []store.TopRow `json:"peers"`
	}
	if err := json.Unmarshal([]byte(out2), &top2); code != exitOK || err != nil || len(top2.Peers) == 0 || top2.Peers[0] != top.Peers[0] {
		t.Errorf("top --nats --stream: exit %d (%v), %s\n%s", code, err, stderr, out2)
	}
	for _, cmd := range []string{"new", "hosts", "summary"} {
		if code, _, stderr := runCLI(t, nil, cmd, "--nats", f.srv.URL, "--stream", "FLOWS", "--db", db); code != exitOK {
			t.Errorf("%s --nats --stream: exit %d: %s", cmd, code, stderr)
		}
	}
	code, out, stderr = runCLI(t, e, "summary", "--stream", "OTHER", "--json")
	if code != exitError || out != "" || stderr != "flowstat summary: stream OTHER has no checkpoints in database "+db+" (known: FLOWS)\n" {
		t.Errorf("summary --stream OTHER: exit %d, stdout %q, stderr %q", code, out, stderr)
	}
	code, out, _ = runCLI(t, e, "summary", "--stream", "FLOWS", "--json")
	var mine store.Summary
	if err := json.Unmarshal([]byte(out), &mine); code != exitOK || err != nil || len(mine.Checkpoints) != 1 || len(mine.Hosts) == 0 {
		t.Errorf("summary --stream FLOWS: exit %d (%v), checkpoints %+v, %d hosts", code, err, mine.Checkpoints, len(mine.Hosts))
	}
	code, out, _ = runCLI(t, e, "top", "--since", "2h")
	if code != exitOK || !strings.Contains(out, "Top peers") || !strings.Contains(out, "Top ports") || !strings.Contains(out, topPeer) {
		t.Errorf("top table: exit %d\n%s", code, out)
	}

	code, out, stderr = runCLI(t, e, "new", "--since", since.Format(time.RFC3339Nano), "--json", "--limit", "100000")
	var dests []store.NewDest
	if code != exitOK || json.Unmarshal([]byte(out), &dests) != nil {
		t.Fatalf("new: exit %d: %s\n%s", code, stderr, out)
	}
	if len(dests) != newOut || newOut == 0 {
		t.Errorf("new --since %v: %d destinations, want %d", since, len(dests), newOut)
	}
	for _, d := range dests {
		if d.Direction != "outgoing" || d.First.Before(since) {
			t.Errorf("new listed %+v", d)
		}
	}

	code, out, stderr = runCLI(t, e, "hosts", "--since", "2h", "--step", "2m", "--json")
	var points []store.HostPoint
	if code != exitOK || json.Unmarshal([]byte(out), &points) != nil {
		t.Fatalf("hosts: exit %d: %s\n%s", code, stderr, out)
	}
	got := map[string]int64{}
	for _, p := range points {
		got[p.Host] += p.Conns
		if p.Start.Unix()%120 != 0 {
			t.Errorf("hosts --step 2m: interval starting at %v", p.Start)
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(hostsTotal) || len(points) < 4 {
		t.Errorf("hosts: %v in %d points, want %v", got, len(points), hostsTotal)
	}
	code, out, _ = runCLI(t, e, "hosts", "--since", "2h")
	if code != exitOK || !strings.Contains(out, "web-01") || !strings.Contains(out, "db-02") {
		t.Errorf("hosts table: exit %d\n%s", code, out)
	}

	code, out, _ = runCLI(t, e, "summary")
	if code != exitOK || !strings.Contains(out, "Missing batches") || !strings.Contains(out, "web-01") || !strings.Contains(out, "COMMITTED UP TO") {
		t.Errorf("summary: exit %d\n%s", code, out)
	}
	code, out, _ = runCLI(t, e, "summary", "--json")
	var sum store.Summary
	if code != exitOK || json.Unmarshal([]byte(out), &sum) != nil || sum.GapCount != int64(len(want.Gaps)) || len(sum.Hosts) != 4 {
		t.Errorf("summary --json: exit %d, %d gaps (want %d), %d host rows\n%s", code, sum.GapCount, len(want.Gaps), len(sum.Hosts), out)
	}

	code, _, stderr = runCLI(t, e, "replay", "--from", "2h")
	if code != exitOK || !strings.Contains(stderr, "rebuilt") {
		t.Fatalf("replay: exit %d\n%s", code, stderr)
	}
	flowstattest.Check(t, st, want)
}

func TestRunErrorsNameTheFix(t *testing.T) {
	db := filepath.Join(t.TempDir(), "flowstat.db")
	code, _, stderr := runCLI(t, map[string]string{"FLOWBUS_DB": db}, "run", "--nats", "nats://127.0.0.1:1", "--once")
	if code != exitError || !strings.Contains(stderr, "cannot connect to NATS") || !strings.Contains(stderr, "FLOWBUS_NATS_URL") {
		t.Errorf("no server: exit %d\n%s", code, stderr)
	}
	srv := tailtest.Start(t)
	code, _, stderr = runCLI(t, map[string]string{"FLOWBUS_DB": db}, "run", "--nats", srv.URL, "--stream", "NOPE", "--stream-wait", "1s")
	if code != exitError || !strings.Contains(stderr, `stream "NOPE" does not exist`) || !strings.Contains(stderr, "FLOWBUS_STREAM") {
		t.Errorf("no stream: exit %d\n%s", code, stderr)
	}
	code, _, stderr = runCLI(t, map[string]string{"FLOWBUS_DB": filepath.Join(t.TempDir(), "missing.db")}, "top")
	if code != exitError || !strings.Contains(stderr, "run `flowstat run` first") {
		t.Errorf("query without a database: exit %d\n%s", code, stderr)
	}
}

// proc is a flowstat process started from this test binary.
type proc struct {
	cmd    *exec.Cmd
	stderr *syncbuf.Buffer
	marker chan struct{}
	done   chan error
}

func startProc(t *testing.T, extraEnv []string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	// No metrics unless asked for: the default port is fixed.
	cmd.Env = append(append(os.Environ(), asMainEnv+"=1", envMetrics+"=off"), extraEnv...)
	pipe, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, stderr: &syncbuf.Buffer{}, marker: make(chan struct{}), done: make(chan error, 1)}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(pipe)
		for sc.Scan() {
			p.stderr.Write([]byte(sc.Text() + "\n"))
			if sc.Text() == stallMarker {
				close(p.marker)
			}
		}
		p.done <- cmd.Wait()
	}()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

func (p *proc) kill(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	err := <-p.done
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("process did not die of SIGKILL: %v\n%s", err, p.stderr.String())
	}
}

// checkpoint reads the committed checkpoint (0 while the database or its checkpoint does not exist).
func checkpoint(dsn string) uint64 {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := store.OpenWith(ctx, dsn, store.OpenOptions{MustExist: true})
	if err != nil {
		return 0
	}
	defer st.Close()
	cp, _, _, _ := st.CheckpointOf(ctx, flowstat.DefaultDurable, "FLOWS")
	return cp
}

func waitFor(t *testing.T, what string, p *proc, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s\n%s", what, p.stderr.String())
		}
		select {
		case err := <-p.done:
			t.Fatalf("flowstat exited (%v) while waiting for %s\n%s", err, what, p.stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Real flowstat processes are killed with SIGKILL while they consume (inside transactions, which sleep
// so the kill lands there) and while one is stalled inside a transaction whose rows are written; each
// restart resumes from the database, and the aggregates end up exactly the reference. The last process
// stops on SIGTERM with its work committed.
func TestKilledProcessesCountEverythingOnce(t *testing.T) {
	for _, backend := range []string{"sqlite", "postgres"} {
		t.Run(backend, func(t *testing.T) {
			dsn := filepath.Join(t.TempDir(), "flowstat.db")
			if backend == "postgres" {
				dsn = pgtest.Shared(t).NewDB(t)
			}
			f := newFixture(t)
			f.fleet.Publish(t, f.rec, 40)
			last := func() uint64 { return f.rec.Batches[len(f.rec.Batches)-1].StreamSeq }
			args := []string{"run", "--nats", f.srv.URL, "--db", dsn, "--commit-events", "40"}

			// 1: killed in the middle of the backlog. A busy machine may let a process read it all
			// before the kill: then more is published and the next process's commits are slower, so
			// that the scenario surely happens; the test fails if it never does.
			var p *proc
			for attempt, delay := 1, 15*time.Millisecond; ; attempt, delay = attempt+1, delay*4 {
				before := checkpoint(dsn)
				p = startProc(t, []string{txDelayEnv + "=" + delay.String()}, args...)
				waitFor(t, "a commit", p, func() bool { return checkpoint(dsn) > before })
				p.kill(t)
				if cp := checkpoint(dsn); cp < last() {
					break
				} else if attempt == 3 {
					t.Fatalf("every process read the whole backlog before it was killed (checkpoint %d of %d): no kill landed mid-backlog", cp, last())
				}
				f.fleet.Publish(t, f.rec, 40)
			}

			// 2: stalled inside its second commit, then killed: that transaction must leave no trace.
			f.fleet.Publish(t, f.rec, 20)
			p = startProc(t, []string{stallEnv + "=2"}, args...)
			select {
			case <-p.marker:
			case err := <-p.done:
				t.Fatalf("flowstat exited (%v) before stalling\n%s", err, p.stderr.String())
			case <-time.After(60 * time.Second):
				t.Fatalf("flowstat did not stall\n%s", p.stderr.String())
			}
			cpStalled := checkpoint(dsn)
			p.kill(t)
			if cp := checkpoint(dsn); cp != cpStalled || cp >= last() {
				t.Fatalf("checkpoint %d after killing the stalled transaction, %d before; want unchanged and short of %d", cp, cpStalled, last())
			}

			// 3: runs to the end, then SIGTERM.
			f.fleet.Publish(t, f.rec, 20)
			p = startProc(t, nil, args...)
			waitFor(t, "the end of the stream", p, func() bool { return checkpoint(dsn) == last() })
			if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			if err := <-p.done; err != nil {
				t.Fatalf("after SIGTERM: %v\n%s", err, p.stderr.String())
			}
			if !strings.Contains(p.stderr.String(), "stopped (canceled)") {
				t.Errorf("no orderly stop in the log:\n%s", p.stderr.String())
			}
			st, err := store.Open(context.Background(), dsn)
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			flowstattest.Check(t, st, flowstattest.Reference(f.rec.Batches, time.Minute))
		})
	}
}

// A forged batch on a publisher's own subject with escape sequences in a DNS name and in the run id
// (whose lost batch makes a gap): `top --by name` and `summary` show them escaped, the JSON gives them
// back exactly, and no ESC byte reaches the terminal or the log.
func TestHostileStringsEscaped(t *testing.T) {
	f := newFixture(t)
	name := "\x1b[2J\x1b[31mbank.example"
	forger := tailtest.NewAgent("web-01", "run\x1b[31mRED")
	now := time.Now()
	evt := schema.Event{Timestamp: now.UnixNano(), Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.2"),
		SrcPort: 40000, DstPort: 443, DstDNS: []string{name}}
	forger.Publish(t, f.srv, "flows", schema.Outgoing, schema.Drops{}, evt)
	forger.Batch(schema.Outgoing, schema.Drops{}) // lost: a gap of this run
	forger.Publish(t, f.srv, "flows", schema.Outgoing, schema.Drops{}, evt)
	db := filepath.Join(t.TempDir(), "flowstat.db")
	e := map[string]string{"FLOWBUS_NATS_URL": f.srv.URL, "FLOWBUS_DB": db}
	code, _, stderr := runCLI(t, e, "run", "--once")
	if code != exitOK {
		t.Fatalf("run --once: exit %d\n%s", code, stderr)
	}
	for _, c := range []struct{ args, want []string }{
		{[]string{"top", "--by", "name", "--since", "2h"}, []string{`\x1b[2J\x1b[31mbank.example`}},
		{[]string{"summary"}, []string{`run\x1b[31mRED`, "web-01"}},
	} {
		code, out, stderr := runCLI(t, e, c.args...)
		if code != exitOK {
			t.Fatalf("%v: exit %d: %s", c.args, code, stderr)
		}
		if strings.ContainsRune(out+stderr, 0x1b) {
			t.Errorf("%v: an ESC byte reached the terminal: %q", c.args, out)
		}
		for _, w := range c.want {
			if !strings.Contains(out, w) {
				t.Errorf("%v lacks %q:\n%s", c.args, w, out)
			}
		}
	}
	code, out, stderr := runCLI(t, e, "top", "--by", "name", "--since", "2h", "--json")
	if code != exitOK {
		t.Fatalf("top --json: exit %d: %s", code, stderr)
	}
	var top struct {
		Names []struct {
			Key string `json:"key"`
		} `json:"names"`
	}
	if err := json.Unmarshal([]byte(out), &top); err != nil || strings.ContainsRune(out, 0x1b) {
		t.Fatalf("top --json: %v\n%q", err, out)
	}
	if len(top.Names) != 1 || top.Names[0].Key != name {
		t.Fatalf("top --json names %+v, want exactly %q", top.Names, name)
	}
}

// Agent restarts in `flowstat run`'s log and in `summary`, as a table and as JSON: a killed run with 3
// of its 10 batches missing (K = 3 and the 2.072 s downtime), and a link to a run this database never
// saw (K untold), whose id holds an escape sequence: escaped in the log and the table.
func TestSummaryShowsRestarts(t *testing.T) {
	f := newFixture(t)
	old := tailtest.NewAgent("web-01", "run-old")
	for i := 1; i <= 10; i++ {
		if i == 5 || i >= 9 {
			old.Batch(schema.Outgoing, schema.Drops{}) // never arrives
			continue
		}
		old.Publish(t, f.srv, "flows", schema.Outgoing, schema.Drops{})
	}
	t1 := time.Date(2026, 12, 2, 12, 0, 1, 234_000_000, time.UTC).UnixNano()
	neu := tailtest.NewAgent("web-01", "run-new")
	neu.SetPrevRun(schema.Outgoing, &schema.RunLink{RunID: "run-old", LastSeq: 10, Batches: 10, LastNs: t1, StartNs: t1 + 2_072_000_000, End: "unknown"})
	neu.Publish(t, f.srv, "flows", schema.Outgoing, schema.Drops{})
	db2 := tailtest.NewAgent("db-02", "run-c")
	db2.SetPrevRun(schema.Incoming, &schema.RunLink{RunID: "gone\x1b[31m", LastSeq: 4, Batches: 2, LastNs: t1, StartNs: t1 + 1e9, End: "stopped"})
	db2.Publish(t, f.srv, "flows", schema.Incoming, schema.Drops{})

	db := filepath.Join(t.TempDir(), "flowstat.db")
	e := map[string]string{"FLOWBUS_NATS_URL": f.srv.URL, "FLOWBUS_DB": db}
	code, _, stderr := runCLI(t, e, "run", "--once")
	if code != exitOK || !strings.Contains(stderr, ", 2 agent restarts\n") ||
		!strings.Contains(stderr, "flowstat: host web-01 direction outgoing restarted as run run-new: run run-old ended (unknown) after seq 10; 3 batches (of 10) never arrived; capture stopped 2026-12-02T12:00:01.234Z → 2026-12-02T12:00:03.306Z (2.072 s)\n") ||
		!strings.Contains(stderr, `run gone\x1b[31m ended (stopped)`) || strings.ContainsRune(stderr, 0x1b) {
		t.Fatalf("run --once: exit %d\n%s", code, stderr)
	}
	code, out, stderr := runCLI(t, e, "summary")
	if code != exitOK || strings.ContainsRune(out, 0x1b) {
		t.Fatalf("summary: exit %d %s\n%q", code, stderr, out)
	}
	lines := strings.Split(out, "\n")
	find := func(parts ...string) string {
		for _, l := range lines {
			if f := strings.Fields(l); len(f) >= len(parts) && slices.Equal(f[:len(parts)], parts) {
				return l
			}
		}
		t.Errorf("summary has no line starting %q:\n%s", parts, out)
		return ""
	}
	find("HOST", "DIRECTION", "CONNECTIONS", "BATCHES", "DROPPED", "GAPS", "RESTARTS")
	if f := strings.Fields(find("web-01", "outgoing")); len(f) < 7 || f[5] != "1" || f[6] != "1" {
		t.Errorf("web-01 outgoing: gaps and restarts %v, want 1 and 1", f)
	}
	if !strings.Contains(out, "\nAgent restarts (2 runs, 2 links): capture down 3.072 s in total, 3 batches of previous runs never arrived, 1 link untold; newest first:\n") {
		t.Errorf("summary lacks the restart totals:\n%s", out)
	}
	for _, w := range [][]string{
		{"web-01", "outgoing", "run-new", "run-old", "unknown", "10", "3", "of", "10", "2026-12-02T12:00:01.234Z", "2026-12-02T12:00:03.306Z", "2.072", "s"},
		{"db-02", "incoming", "run-c", `gone\x1b[31m`, "stopped", "4", "unknown", "of", "2:", "previous", "run", "not", "seen", "by", "this", "database"},
	} {
		find(w...)
	}
	code, out, _ = runCLI(t, e, "summary", "--json")
	var sum store.Summary
	if code != exitOK || json.Unmarshal([]byte(out), &sum) != nil {
		t.Fatalf("summary --json: exit %d\n%s", code, out)
	}
	if len(sum.Restarts) != 2 || sum.Restarts[1].Missing != 3 || sum.Restarts[1].DownNs != 2_072_000_000 || sum.Restarts[0].PrevRunID != "gone\x1b[31m" ||
		sum.Restarts[0].Missing != -1 || sum.RestartTotals.Missing != 3 {
		t.Errorf("summary --json restarts %+v, totals %+v", sum.Restarts, sum.RestartTotals)
	}
}
