package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowbus/flowbus/cmd/internal/buildinfo"
	"github.com/flowbus/flowbus/consumers/flowstat/flowstattest"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
)

func TestVersion(t *testing.T) {
	for _, args := range [][]string{{"--version"}, {"-version"}, {"version"}} {
		code, out, stderr := runCLI(t, nil, args...)
		if code != exitOK || out != buildinfo.Line("flowstat")+"\n" || stderr != "" || !strings.HasPrefix(out, "flowstat ") {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", args, code, out, stderr)
		}
	}
}

// helpFlags returns the flags a help text lists.
func helpFlags(help string) []string {
	var out []string
	for _, m := range regexp.MustCompile(`(?m)^  --([a-z-]+)`).FindAllStringSubmatch(help, -1) {
		if m[1] != "help" {
			out = append(out, m[1])
		}
	}
	return out
}

// `flowstat <command> --help` lists that command's flags, every one it accepts and no other;
// `flowstat --help` lists the commands.
func TestHelpPerCommand(t *testing.T) {
	code, general, _ := runCLI(t, nil, "--help")
	if code != exitOK || len(helpFlags(general)) != 0 {
		t.Errorf("flowstat --help: exit %d, lists flags:\n%s", code, general)
	}
	names := []string{"run", "top", "new", "hosts", "summary", "replay"}
	texts := map[string]string{}
	for _, cmd := range names {
		if !regexp.MustCompile(`(?m)^  ` + cmd + ` +\S`).MatchString(general) {
			t.Errorf("flowstat --help does not list %s:\n%s", cmd, general)
		}
		code, out, stderr := runCLI(t, nil, cmd, "--help")
		if code != exitOK || stderr != "" || !strings.HasPrefix(out, "Usage: flowstat "+cmd+" [flags]\n\n") {
			t.Fatalf("%s --help: exit %d, stderr %q:\n%s", cmd, code, stderr, out)
		}
		if _, viaHelp, _ := runCLI(t, nil, "help", cmd); viaHelp != out {
			t.Errorf("flowstat help %s differs from flowstat %s --help", cmd, cmd)
		}
		// The description is one line, between the usage line and the flags.
		if parts := strings.SplitN(out, "\n\n", 3); len(parts) < 3 || strings.Contains(parts[1], "\n") || !strings.HasPrefix(parts[2], "Flags:\n") {
			t.Errorf("%s --help: no one-line description:\n%s", cmd, out)
		}
		texts[cmd] = out
		listed := helpFlags(out)
		if len(listed) < 5 {
			t.Errorf("%s --help lists only %v", cmd, listed)
		}
		// Every flag listed is accepted: parsing it reports no unknown flag.
		for _, f := range listed {
			if _, err := parseArgs(cmd, []string{"--" + f + "=x"}, env(nil), now); err != nil && strings.Contains(err.Error(), "unknown flag") {
				t.Errorf("%s --help lists --%s, which it refuses: %v", cmd, f, err)
			}
		}
	}
	// Every flag another command has and this one does not is refused: the help is not one shared list.
	for _, cmd := range names {
		mine := map[string]bool{}
		for _, f := range helpFlags(texts[cmd]) {
			mine[f] = true
		}
		for _, other := range names {
			for _, f := range helpFlags(texts[other]) {
				if mine[f] {
					continue
				}
				_, err := parseArgs(cmd, []string{"--" + f + "=x"}, env(nil), now)
				if err == nil || !strings.Contains(err.Error(), "unknown flag --"+f) {
					t.Errorf("%s accepts --%s, which its help does not list: %v", cmd, f, err)
				}
			}
		}
	}
	if !strings.Contains(texts["run"], "--metrics-addr") || strings.Contains(texts["run"], "--by") || strings.Contains(texts["top"], "--filter") {
		t.Errorf("run/top help mixed up:\n%s\n%s", texts["run"], texts["top"])
	}
	if code, _, stderr := runCLI(t, nil, "help", "frob"); code != exitUsage || !strings.Contains(stderr, `"frob"`) {
		t.Errorf("help frob: exit %d, %q", code, stderr)
	}
}

// A --db that cannot be a database file is refused before anything starts, naming the fix; only the
// default state directory is created.
func TestDatabasePathRefused(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "nonexistent", "dir", "x.db")
	code, _, stderr := runCLI(t, nil, "run", "--db", missing, "--nats", "nats://127.0.0.1:1")
	if code != exitUsage || !strings.Contains(stderr, "--db: the directory "+filepath.Dir(missing)+" of "+missing+" does not exist: create it (mkdir -p ") {
		t.Errorf("missing directory: exit %d\n%s", code, stderr)
	}
	if _, err := os.Stat(filepath.Join(dir, "nonexistent")); !os.IsNotExist(err) {
		t.Errorf("the directory was created (%v)", err)
	}
	for _, cmd := range []string{"run", "summary", "top"} {
		code, _, stderr := runCLI(t, map[string]string{"FLOWBUS_DB": dir}, cmd)
		want := "  FLOWBUS_DB: " + dir + " is a directory, give a file path (e.g. " + filepath.Join(dir, "flowstat.db") + ")\n"
		if code != exitUsage || !strings.Contains(stderr, want) || strings.Contains(stderr, "(14)") {
			t.Errorf("%s with a directory: exit %d\n%s", cmd, code, stderr)
		}
	}

	// The default location is created.
	srv := tailtest.Start(t)
	flowstattest.CreateStream(t, srv, "FLOWS", "flows.>")
	state := filepath.Join(dir, "fresh", "state")
	code, _, stderr = runCLI(t, map[string]string{"XDG_STATE_HOME": state, "FLOWBUS_NATS_URL": srv.URL}, "run", "--once")
	if _, err := os.Stat(filepath.Join(state, "flowbus", "flowstat.db")); code != exitOK || err != nil {
		t.Errorf("default database: exit %d (%v)\n%s", code, err, stderr)
	}
}

// A filter outside the prefix is an invalid setting like the others: exit 2, listed with them.
func TestFilterOutsidePrefixIsInvalid(t *testing.T) {
	code, _, stderr := runCLI(t, nil, "run", "--db", filepath.Join(t.TempDir(), "x.db"), "--filter", "other.>", "--bucket", "1ms", "--metrics-addr", "nohost")
	for _, want := range []string{`--filter: subject filter "other.>" selects no subject flows.<host>.<direction>`, "--bucket", `--metrics-addr: "nohost" is not host:port`} {
		if code != exitUsage || !strings.Contains(stderr, want) {
			t.Errorf("exit %d, stderr lacks %q:\n%s", code, want, stderr)
		}
	}
	// From the environment it is named so; a filter above the prefix still selects its subjects.
	_, err := parseArgs("run", nil, env(map[string]string{envFilter: "other.*.incoming"}), now)
	if err == nil || !strings.Contains(err.Error(), envFilter+`: subject filter "other.*.incoming" selects no subject`) {
		t.Errorf("%s outside the prefix: %v", envFilter, err)
	}
	if _, err := parseArgs("run", []string{"--prefix", "acme.flows"}, env(map[string]string{envFilter: "acme.>"}), now); err != nil {
		t.Errorf("a filter above the prefix: %v", err)
	}
	cfg, err := parseArgs("run", []string{"--filter", "flows.web-01.>", "--metrics-addr", ""}, env(nil), now)
	if err != nil || cfg.metricsAddr != "" {
		t.Errorf("--metrics-addr '': %+v, %v", cfg, err)
	}
	if cfg, err = parseArgs("run", nil, env(map[string]string{envMetrics: "off"}), now); err != nil || cfg.metricsAddr != "" {
		t.Errorf("%s=off: %v", envMetrics, err)
	}
	if cfg, err = parseArgs("run", nil, env(nil), now); err != nil || cfg.metricsAddr != "127.0.0.1:9465" {
		t.Errorf("default metrics address %q, %v", cfg.metricsAddr, err)
	}
}

// Messages of the database side: one line for a refused PostgreSQL, no doubled prefix from replay.
func TestDatabaseMessages(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	code, _, stderr := runCLI(t, nil, "run", "--db", "postgres://u:pw@"+addr+"/x")
	if code != exitError || strings.Count(stderr, "\n") != 1 || strings.Count(stderr, "connection refused") != 1 || !strings.Contains(stderr, "check the URL in --db or FLOWBUS_DB") {
		t.Errorf("refused PostgreSQL: exit %d\n%s", code, stderr)
	}

	f := newFixture(t)
	f.fleet.Publish(t, f.rec, 5)
	db := filepath.Join(t.TempDir(), "flowstat.db")
	e := map[string]string{"FLOWBUS_NATS_URL": f.srv.URL, "FLOWBUS_DB": db}
	if code, _, stderr := runCLI(t, e, "run", "--once"); code != exitOK {
		t.Fatalf("run: %d %s", code, stderr)
	}
	code, _, stderr = runCLI(t, e, "replay", "--from", "1h", "--consumer", "nope")
	want := "flowstat replay: database " + db + ` has no checkpoint of consumer "nope" on stream "FLOWS"`
	if code != exitError || !strings.HasPrefix(stderr, want) || strings.Count(stderr, "replay:") != 1 {
		t.Errorf("replay of an unknown consumer: exit %d\n%s\nwant %s", code, stderr, want)
	}
}

// Two databases given the same durable consumer name: the second is refused with a message naming the
// fix, and the first keeps its consumer (no "restored from a backup?" recreation afterwards).
func TestConsumerSharedByTwoDatabases(t *testing.T) {
	f := newFixture(t)
	f.fleet.Publish(t, f.rec, 10)
	dbA, dbB := filepath.Join(t.TempDir(), "a.db"), filepath.Join(t.TempDir(), "b.db")
	e := map[string]string{"FLOWBUS_NATS_URL": f.srv.URL}
	if code, _, stderr := runCLI(t, e, "run", "--db", dbA, "--once"); code != exitOK {
		t.Fatalf("first database: exit %d\n%s", code, stderr)
	}
	code, _, stderr := runCLI(t, e, "run", "--db", dbB, "--once")
	want := "flowstat run: durable consumer flowstat (stream FLOWS) is also used by another database; give each database its own --consumer"
	if code != exitError || !strings.HasPrefix(stderr, want) || strings.Contains(stderr, "recreating") {
		t.Errorf("second database on the same consumer: exit %d\n%s", code, stderr)
	}
	f.fleet.Publish(t, f.rec, 10)
	code, _, stderr = runCLI(t, e, "run", "--db", dbA, "--once")
	if code != exitOK || strings.Contains(stderr, "recreating") || strings.Contains(stderr, "backup") {
		t.Errorf("first database again: exit %d\n%s", code, stderr)
	}
	if cp := checkpoint(dbA); cp != f.rec.Batches[len(f.rec.Batches)-1].StreamSeq {
		t.Errorf("first database at %d, want %d", cp, f.rec.Batches[len(f.rec.Batches)-1].StreamSeq)
	}
	// Its own consumer name makes the second database work.
	if code, _, stderr := runCLI(t, e, "run", "--db", dbB, "--consumer", "second", "--once"); code != exitOK {
		t.Errorf("second database with --consumer second: exit %d\n%s", code, stderr)
	}
}

// JSON gives ports and counts as numbers; tables give times in UTC with the zone shown (--local: the
// local zone with its offset).
func TestNumbersAndTimes(t *testing.T) {
	f := newFixture(t)
	f.fleet.Publish(t, f.rec, 10)
	db := filepath.Join(t.TempDir(), "flowstat.db")
	e := map[string]string{"FLOWBUS_NATS_URL": f.srv.URL, "FLOWBUS_DB": db}
	if code, _, stderr := runCLI(t, e, "run", "--once"); code != exitOK {
		t.Fatalf("run: %d %s", code, stderr)
	}
	code, out, _ := runCLI(t, e, "top", "--by", "port", "--since", "2h", "--json")
	var top map[string]any
	if code != exitOK || json.Unmarshal([]byte(out), &top) != nil {
		t.Fatalf("top --by port: exit %d\n%s", code, out)
	}
	ports, _ := top["ports"].([]any)
	if len(ports) == 0 {
		t.Fatalf("no ports:\n%s", out)
	}
	for _, p := range ports {
		row := p.(map[string]any)
		if _, ok := row["key"].(float64); !ok {
			t.Errorf("port %#v is not a number", row["key"])
		}
		if _, ok := row["connections"].(float64); !ok {
			t.Errorf("count %#v is not a number", row["connections"])
		}
	}
	code, out, _ = runCLI(t, e, "new", "--since", "2h", "--json", "--limit", "3")
	var dests []map[string]any
	if code != exitOK || json.Unmarshal([]byte(out), &dests) != nil || len(dests) == 0 {
		t.Fatalf("new: exit %d\n%s", code, out)
	}
	if _, ok := dests[0]["port"].(float64); !ok {
		t.Errorf("new: port %#v is not a number", dests[0]["port"])
	}
	first, _ := time.Parse(time.RFC3339Nano, dests[0]["first_seen"].(string))

	// The table: UTC with a trailing Z, in the form --since accepts, whatever TZ says.
	for _, c := range []struct {
		local bool
		want  string
	}{{false, first.UTC().Format("2006-01-02T15:04:05Z")}, {true, first.In(time.FixedZone("IST", 5*3600+1800)).Format("2006-01-02T15:04:05Z07:00")}} {
		args := []string{"new", "--db", db, "--since", "2h", "--limit", "3"}
		if c.local {
			args = append(args, "--local")
		}
		var stdout, stderr bytes.Buffer
		cmd := exec.Command(os.Args[0], args...)
		cmd.Env = append(os.Environ(), asMainEnv+"=1", "TZ=Asia/Kolkata")
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, stderr.String())
		}
		lines := strings.Split(stdout.String(), "\n")
		if len(lines) < 3 || !strings.HasPrefix(lines[2], c.want+"  ") {
			t.Errorf("%v under TZ=Asia/Kolkata: want the first row to start with %s:\n%s", args, c.want, stdout.String())
		}
		if _, err := parseWhen(c.want, time.Now()); err != nil {
			t.Errorf("table time %s is not accepted by --since: %v", c.want, err)
		}
	}
}

// metricValue returns the value of an unlabelled metric in a Prometheus text page, -1 when absent.
func metricValue(page, name string) float64 {
	m := regexp.MustCompile(`(?m)^` + name + ` (\S+)$`).FindStringSubmatch(page)
	if m == nil {
		return -1
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// A running `flowstat run` answers /healthz at once, /readyz only while it consumes (not while it waits
// for the stream, not while NATS is gone), and /metrics counts what it committed.
func TestHealthAndMetrics(t *testing.T) {
	srv := tailtest.Start(t)
	db := filepath.Join(t.TempDir(), "flowstat.db")
	p := startProc(t, []string{envMetrics + "=127.0.0.1:0"}, "run", "--nats", srv.URL, "--db", db, "--stream-wait", "2m")
	addrRE := regexp.MustCompile(`health and metrics on http://(\S+) `)
	var base string
	waitFor(t, "the metrics address", p, func() bool {
		if m := addrRE.FindStringSubmatch(p.stderr.String()); m != nil {
			base = "http://" + m[1]
			return true
		}
		return false
	})
	if code, body := get(t, base+"/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	waitFor(t, "the wait for the stream", p, func() bool { return strings.Contains(p.stderr.String(), "does not exist on") })
	if code, body := get(t, base+"/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, `waiting for stream "FLOWS"`) {
		t.Errorf("/readyz while the stream is missing: %d %q", code, body)
	}
	// `flowstat probe`, the compose healthcheck, says the same in its exit status.
	probeIt := func(wantCode int, want string) {
		t.Helper()
		var out, errb bytes.Buffer
		code := run([]string{"probe", strings.TrimPrefix(base, "http://")}, &out, &errb, func(string) string { return "" }, time.Now())
		if code != wantCode || !strings.Contains(out.String()+errb.String(), want) {
			t.Errorf("flowstat probe: exit %d, stdout %q, stderr %q; want %d and %q", code, out.String(), errb.String(), wantCode, want)
		}
	}
	probeIt(1, `waiting for stream "FLOWS"`)

	flowstattest.CreateStream(t, srv, "FLOWS", "flows.>")
	rec := flowstattest.NewRecorder(srv, "FLOWS", "flows")
	fleet := flowstattest.NewFleet(3, time.Now().Add(-10*time.Minute).Truncate(time.Minute), 4*time.Minute, 20)
	fleet.Publish(t, rec, 12)
	rec.PublishRaw(t, "flows.web-01.outgoing", []byte("not a batch"))
	waitFor(t, "readiness", p, func() bool { code, _ := get(t, base+"/readyz"); return code == http.StatusOK })
	probeIt(0, "ready")
	var page string
	waitFor(t, "the events in /metrics", p, func() bool {
		_, page = get(t, base+"/metrics")
		return metricValue(page, "flowbus_flowstat_events_total") == float64(rec.Events())
	})
	for name, want := range map[string]float64{
		"flowbus_flowstat_batches_total":                            float64(len(rec.Batches)),
		`flowbus_flowstat_dead_letters_total\{reason="malformed"\}`: 1,
		"flowbus_flowstat_committed_sequence":                       float64(rec.Batches[len(rec.Batches)-1].StreamSeq + 1),
		"flowbus_flowstat_pending_messages":                         0,
		"flowbus_flowstat_ready":                                    1,
	} {
		if got := metricValue(page, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	if metricValue(page, "flowbus_flowstat_commits_total") < 1 {
		t.Errorf("no commits counted:\n%s", page)
	}

	// NATS gone: alive, not ready.
	srv.Shutdown()
	waitFor(t, "unreadiness without NATS", p, func() bool {
		code, body := get(t, base+"/readyz")
		return code == http.StatusServiceUnavailable && strings.Contains(body, "not connected to NATS")
	})
	if code, _ := get(t, base+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz without NATS: %d", code)
	}
	probeIt(1, "not connected to NATS")
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := <-p.done; err != nil {
		t.Fatalf("after SIGTERM: %v\n%s", err, p.stderr.String())
	}
}

// The metrics address taken: exit 1, naming the setting.
func TestMetricsAddressTaken(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	code, _, stderr := runCLI(t, map[string]string{envMetrics: l.Addr().String()}, "run", "--db", filepath.Join(t.TempDir(), "x.db"))
	if code != exitError || !strings.Contains(stderr, "cannot serve health and metrics on "+l.Addr().String()) || !strings.Contains(stderr, "--metrics-addr or "+envMetrics) {
		t.Errorf("exit %d\n%s", code, stderr)
	}
}

// A stream name or subject prefix NATS reserves ($JS..., _INBOX...) is refused by every command that
// takes it, before anything opens, with exit status 2 and a message naming the flag or variable.
func TestReservedNamesRefused(t *testing.T) {
	db := filepath.Join(t.TempDir(), "x.db")
	for _, c := range []struct {
		args []string
		env  map[string]string
		want []string
	}{
		{[]string{"run", "--stream", "$JS.API", "--prefix", "_INBOX"}, nil,
			[]string{`--stream: stream name "$JS.API" starts with a name NATS reserves`, `--prefix: "_INBOX" starts with a name NATS reserves`}},
		{[]string{"replay", "--from", "1h", "--stream", "_INBOX_FLOWS", "--prefix", "$SYS.flows"}, nil,
			[]string{`--stream: stream name "_INBOX_FLOWS" starts with a name NATS reserves`, `--prefix: "$SYS.flows" starts with a name NATS reserves`}},
		{[]string{"run"}, map[string]string{"FLOWBUS_STREAM": "$KV_x", "FLOWBUS_SUBJECT_PREFIX": "_INBOX.x"},
			[]string{`FLOWBUS_STREAM: stream name "$KV_x" starts with a name NATS reserves`, `FLOWBUS_SUBJECT_PREFIX: "_INBOX.x" starts with a name NATS reserves`}},
		{[]string{"summary", "--stream", "$JS.API"}, nil, []string{`--stream: stream name "$JS.API" starts with a name NATS reserves`}},
	} {
		e := map[string]string{"FLOWBUS_DB": db, "FLOWBUS_NATS_URL": "nats://127.0.0.1:1"}
		for k, v := range c.env {
			e[k] = v
		}
		code, out, stderr := runCLI(t, e, c.args...)
		if code != exitUsage || out != "" {
			t.Errorf("%v %v: exit %d, stdout %q; want 2", c.args, c.env, code, out)
		}
		for _, w := range append(c.want, "use another name", "Run 'flowstat "+c.args[0]+" --help'") {
			if !strings.Contains(stderr, w) {
				t.Errorf("%v %v: stderr lacks %q:\n%s", c.args, c.env, w, stderr)
			}
		}
	}
	if _, err := os.Stat(db); !os.IsNotExist(err) {
		t.Errorf("a refused command created the database (%v)", err)
	}
}
