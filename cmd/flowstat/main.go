// Command flowstat aggregates the flowbus stream into a database (SQLite by default, or PostgreSQL) and
// answers questions from it: top talkers, new destinations, connections per host over time.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/flowbus/flowbus/cmd/internal/buildinfo"
	"github.com/flowbus/flowbus/cmd/internal/cli"
	"github.com/flowbus/flowbus/consumers/flowstat"
	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/schema"
)

// Exit statuses, documented in the help text.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

// Environment variables beyond the shared FLOWBUS_NATS_URL, FLOWBUS_STREAM, FLOWBUS_SUBJECT_PREFIX and
// FLOWBUS_DB.
const (
	envConsumer   = "FLOWBUS_FLOWSTAT_CONSUMER"
	envFilter     = "FLOWBUS_FLOWSTAT_FILTER"
	envStart      = "FLOWBUS_FLOWSTAT_START"
	envBucket     = "FLOWBUS_FLOWSTAT_BUCKET"
	envDeadLetter = "FLOWBUS_FLOWSTAT_DEADLETTER"
	envMetrics    = "FLOWBUS_STAT_METRICS_ADDR"
)

// defaultMetricsAddr is where `flowstat run` serves its probes and metrics: beside the agent's 9464.
const defaultMetricsAddr = "127.0.0.1:9465"

func main() {
	getenv := func(k string) string {
		// An empty FLOWBUS_STAT_METRICS_ADDR disables the endpoint, which a plain lookup cannot tell
		// from an unset one.
		if v, ok := os.LookupEnv(k); ok && v == "" && k == envMetrics {
			return "off"
		}
		return os.Getenv(k)
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr, getenv, time.Now()))
}

// testHookStore, set by tests only, sees the store `flowstat run` opens (fault injection).
var testHookStore func(*store.Store)

// config is the validated command line of one command.
type config struct {
	cmd  string
	dsn  string
	json bool
	// dbDefault: dsn is the default path, whose directory `flowstat run` may create.
	dbDefault bool
	local     bool // table times in the local zone instead of UTC
	// metricsAddr is where run serves /healthz, /readyz and /metrics; "" disables.
	metricsAddr string

	run    flowstat.Options
	replay flowstat.ReplayOptions

	filter  store.Filter
	by      string
	limit   int
	step    time.Duration
	maxGaps int
	stream  string // query commands: only this stream's checkpoints and losses ("" all)
}

// run is main without os.Exit, so tests can drive it.
func run(args []string, stdout, stderr io.Writer, getenv func(string) string, now time.Time) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, "flowstat: no command given\n\n"+usage())
		return exitUsage
	}
	switch args[0] {
	case "help", "-h", "--help", "-help":
		if len(args) == 1 {
			fmt.Fprint(stdout, usage())
			return exitOK
		}
		if c := commandByName(args[1]); c != nil && len(args) == 2 {
			fmt.Fprint(stdout, c.help())
			return exitOK
		}
		fmt.Fprintf(stderr, "flowstat help: want one command name (%s), not %q\n", commandNames(), strings.Join(args[1:], " "))
		return exitUsage
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, buildinfo.Line("flowstat"))
		return exitOK
	}
	cfg, err := parseArgs(args[0], args[1:], getenv, now)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(stdout, commandByName(args[0]).help())
		return exitOK
	}
	if err != nil {
		hint := "Run 'flowstat help' for the commands."
		if commandByName(args[0]) != nil {
			hint = fmt.Sprintf("Run 'flowstat %s --help' for its flags.", args[0])
		}
		fmt.Fprintf(stderr, "flowstat %s: invalid settings:\n%s\n%s\n", args[0], cli.Indent(err), hint)
		return exitUsage
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := execute(ctx, cfg, stdout, stderr); err != nil {
		fmt.Fprintf(stderr, "flowstat %s: %s\n", cfg.cmd, cli.Explain(err))
		return exitError
	}
	return exitOK
}

// queryCommands read only the database. They take --nats and --stream like every flowbus consumer (a
// shared wrapper or alias may pass them): --nats is checked but not used, --stream narrows what summary
// shows of checkpoints and stream losses.
var queryCommands = map[string]bool{"top": true, "new": true, "hosts": true, "summary": true}

// parseArgs parses and validates one command's flags and the environment, reporting every problem at
// once. getenv and now are parameters so tests control them.
func parseArgs(cmd string, args []string, getenv func(string) string, now time.Time) (*config, error) {
	c := commandByName(cmd)
	if c == nil {
		return nil, fmt.Errorf("unknown command %q (want %s)", cmd, commandNames())
	}
	fs := flag.NewFlagSet("flowstat "+cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	vals := map[string]*string{}
	bools := map[string]*bool{}
	for _, f := range c.flags {
		if f.arg == "" {
			bools[f.name] = fs.Bool(f.name, false, "")
		} else {
			vals[f.name] = fs.String(f.name, "", "")
		}
	}
	errs, err := cli.ParseFlags(fs, args, "flowstat "+cmd, " for `flowstat "+cmd+"`")
	if err != nil {
		return nil, err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	bad := func(src string, err error) { errs = append(errs, fmt.Errorf("%s: %w", src, err)) }

	// value returns a setting from its flag, else its environment variable, else def, and where it came
	// from, so an error names what to fix.
	value := func(name, env, def string) (string, string) {
		if set[name] {
			return *vals[name], "--" + name
		}
		if env != "" {
			if e := getenv(env); e != "" {
				return e, env
			}
		}
		return def, "default"
	}

	cfg := &config{cmd: cmd, json: bools["json"] != nil && *bools["json"], local: bools["local"] != nil && *bools["local"]}
	dsn, src := value("db", "FLOWBUS_DB", "")
	if dsn == "" {
		dsn = filepath.Join(cli.StateDir(getenv), "flowstat.db")
		src = "the default database path (set --db or FLOWBUS_DB)"
		cfg.dbDefault = true
	}
	if kind, path, err := store.ParseDSN(dsn); err != nil {
		bad(src, err)
	} else if kind == store.SQLite {
		// Checked here, not at open, so that it is listed with the other problems. A query command
		// only needs the directory check: opening reports a missing file with its own fix.
		fi, serr := os.Stat(path)
		if cmd == "run" || serr == nil && fi.IsDir() {
			if err := store.CheckSQLitePath(path, cfg.dbDefault); err != nil {
				bad(src, err)
			}
		}
	}
	cfg.dsn = dsn

	has := func(n string) bool { return vals[n] != nil || bools[n] != nil }
	var urls []string
	var streamName, consumer string
	if queryCommands[cmd] {
		// Only the flags: a query must not fail on a FLOWBUS_NATS_URL it does not use.
		if set["nats"] {
			if _, err := cli.ParseURLs(*vals["nats"]); err != nil {
				bad("--nats", err)
			}
		}
		if set["stream"] {
			cfg.stream = *vals["stream"]
			if err := stream.ValidateName("stream name", cfg.stream); err != nil {
				bad("--stream", err)
			}
		}
	} else if has("nats") {
		v, src := value("nats", "FLOWBUS_NATS_URL", stream.DefaultURL)
		var err error
		if urls, err = cli.ParseURLs(v); err != nil {
			bad(src, err)
		}
		streamName, src = value("stream", "FLOWBUS_STREAM", stream.DefaultStream)
		if err := stream.ValidateName("stream name", streamName); err != nil {
			bad(src, err)
		}
		consumer, src = value("consumer", envConsumer, flowstat.DefaultDurable)
		if err := stream.ValidateName("consumer name", consumer); err != nil {
			bad(src, err)
		}
	}

	var prefix string
	if has("prefix") {
		var psrc string
		prefix, psrc = value("prefix", "FLOWBUS_SUBJECT_PREFIX", schema.DefaultPrefix)
		if err := schema.ValidatePrefix(prefix); err != nil {
			bad(psrc, err)
		}
	}

	switch cmd {
	case "run":
		o := &cfg.run
		o.URLs, o.Stream, o.Durable, o.Prefix = urls, streamName, consumer, prefix
		f, src := value("filter", envFilter, prefix+".>")
		for _, s := range strings.Split(f, ",") {
			s = strings.TrimSpace(s)
			if err := stream.ValidateFilter(s); err != nil {
				bad(src, err)
			} else if schema.ValidatePrefix(prefix) == nil {
				if err := stream.CheckFilterPrefix(s, prefix); err != nil {
					bad(src, err)
				}
			}
			o.Filters = append(o.Filters, s)
		}
		var starts []string
		for _, n := range []string{"start", "since", "from-seq"} {
			if set[n] {
				starts = append(starts, "--"+n)
			}
		}
		if len(starts) > 1 {
			errs = append(errs, fmt.Errorf("%s are mutually exclusive: choose one place to start", strings.Join(starts, ", ")))
		}
		sv, src := value("start", envStart, "all")
		switch {
		case set["since"]:
			sv, src = *vals["since"], "--since"
		case set["from-seq"]:
			sv, src = "seq:"+*vals["from-seq"], "--from-seq"
		}
		var err error
		if o.Start, o.Since, o.FromSeq, err = parseStart(sv, now); err != nil {
			bad(src, err)
		}
		b, src := value("bucket", envBucket, "1m")
		if o.Bucket, err = time.ParseDuration(b); err != nil || o.Bucket < time.Second || o.Bucket%time.Second != 0 {
			bad(src, fmt.Errorf("bucket %q: want a whole number of seconds, at least 1s (e.g. 1m, 10s, 1h)", b))
		}
		dl, src := value("deadletter", envDeadLetter, flowstat.DefaultDeadLetterSubject)
		if err := flowstat.ValidateDeadLetterSubject(dl); err != nil {
			bad(src, err)
		}
		o.DeadLetterSubject = dl
		cfg.metricsAddr, src = value("metrics-addr", envMetrics, defaultMetricsAddr)
		if cfg.metricsAddr == "off" {
			cfg.metricsAddr = ""
		}
		if err := checkListenAddr(cfg.metricsAddr); err != nil {
			bad(src, err)
		}
		o.ExitWhenCaughtUp = *bools["once"]
		o.IdleExit = durationFlag(set, vals, "idle-exit", 0, bad)
		o.StreamWait = durationFlag(set, vals, "stream-wait", time.Minute, bad)
		o.MaxChunkAge = durationFlag(set, vals, "commit-interval", 0, bad)
		if set["commit-events"] {
			n, err := strconv.Atoi(*vals["commit-events"])
			if err != nil || n < 1 {
				bad("--commit-events", fmt.Errorf("%q is not a positive integer", *vals["commit-events"]))
			}
			o.MaxChunkEvents = n
		}
	case "replay":
		o := &cfg.replay
		o.URLs, o.Stream, o.Durable, o.Prefix = urls, streamName, consumer, prefix
		if !set["from"] {
			errs = append(errs, errors.New("--from is required: the start of the range to rebuild (RFC3339 time or a duration back from now)"))
		} else if t, err := parseWhen(*vals["from"], now); err != nil {
			bad("--from", err)
		} else {
			o.From = t
		}
		o.To = now
		if set["to"] {
			t, err := parseWhen(*vals["to"], now)
			if err != nil {
				bad("--to", err)
			}
			o.To = t
		}
		if set["from"] && !o.From.IsZero() && !o.To.After(o.From) {
			errs = append(errs, fmt.Errorf("--to %s is not after --from %s", o.To.UTC().Format(time.RFC3339), o.From.UTC().Format(time.RFC3339)))
		}
		o.Margin = durationFlag(set, vals, "margin", 0, bad)
		o.Force = *bools["force"]
	case "top", "new", "hosts":
		def := time.Hour
		if cmd == "new" {
			def = 24 * time.Hour
		}
		cfg.filter.Since = now.Add(-def)
		if set["since"] {
			t, err := parseWhen(*vals["since"], now)
			if err != nil {
				bad("--since", err)
			}
			cfg.filter.Since = t
		}
		if set["until"] {
			t, err := parseWhen(*vals["until"], now)
			if err != nil {
				bad("--until", err)
			}
			cfg.filter.Until = t
			if !t.After(cfg.filter.Since) {
				errs = append(errs, fmt.Errorf("--until %s is not after the start %s", t.UTC().Format(time.RFC3339), cfg.filter.Since.UTC().Format(time.RFC3339)))
			}
		}
		if set["host"] {
			if err := schema.ValidateHostToken(*vals["host"]); err != nil {
				bad("--host", err)
			}
			cfg.filter.Host = *vals["host"]
		}
		d := ""
		if cmd == "new" {
			d = "outgoing"
		}
		if set["direction"] {
			d = *vals["direction"]
			if d == "all" {
				d = ""
			} else if _, err := schema.ParseDirection(d); err != nil {
				bad("--direction", fmt.Errorf("%q: want incoming, outgoing or all", d))
			}
		}
		cfg.filter.Direction = d
		cfg.limit = map[string]int{"top": 10, "new": 100}[cmd]
		if set["limit"] {
			n, err := strconv.Atoi(*vals["limit"])
			if err != nil || n < 1 {
				bad("--limit", fmt.Errorf("%q is not a positive integer", *vals["limit"]))
			}
			cfg.limit = n
		}
		if set["by"] {
			cfg.by = *vals["by"]
			ok := false
			for _, b := range store.TopBy {
				ok = ok || b == cfg.by
			}
			if !ok {
				bad("--by", fmt.Errorf("%q: want one of %s", cfg.by, strings.Join(store.TopBy, ", ")))
			}
		}
		cfg.step = durationFlag(set, vals, "step", 0, bad)
	case "summary":
		cfg.maxGaps = 20
		if set["gaps"] {
			n, err := strconv.Atoi(*vals["gaps"])
			if err != nil || n < 0 {
				bad("--gaps", fmt.Errorf("%q is not a number >= 0", *vals["gaps"]))
			}
			cfg.maxGaps = n
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return cfg, nil
}

// checkListenAddr accepts "" (disabled) or host:port with a numeric port (0: any free port).
func checkListenAddr(a string) error {
	if a == "" {
		return nil
	}
	_, port, err := net.SplitHostPort(a)
	if _, perr := strconv.ParseUint(port, 10, 16); err != nil || perr != nil {
		return fmt.Errorf("%q is not host:port (e.g. 127.0.0.1:9465, or :9465 for every interface; empty or off disables)", a)
	}
	return nil
}

// durationFlag parses a positive duration flag, def when it is not set.
func durationFlag(set map[string]bool, vals map[string]*string, name string, def time.Duration, bad func(string, error)) time.Duration {
	if !set[name] {
		return def
	}
	d, err := time.ParseDuration(*vals[name])
	if err != nil || d <= 0 {
		bad("--"+name, fmt.Errorf("%q is not a positive duration (e.g. 30s, 5m)", *vals[name]))
	}
	return d
}

// parseStart parses a start policy: all, new, seq:N, or a time (see parseWhen).
func parseStart(s string, now time.Time) (stream.Start, time.Time, uint64, error) {
	switch {
	case s == "all" || s == "new":
		st, err := stream.ParseStart(s)
		return st, time.Time{}, 0, err
	case strings.HasPrefix(s, "seq:"):
		n, err := strconv.ParseUint(strings.TrimPrefix(s, "seq:"), 10, 64)
		if err != nil || n == 0 {
			return 0, time.Time{}, 0, fmt.Errorf("start %q: the stream sequence must be an integer >= 1 (e.g. seq:1000)", s)
		}
		return stream.StartSeq, time.Time{}, n, nil
	}
	t, err := parseWhen(s, now)
	if err != nil {
		return 0, time.Time{}, 0, fmt.Errorf("start %q: want all, new, seq:N, an RFC3339 time or a duration back from now (2h)", s)
	}
	return stream.StartTime, t, 0, nil
}

// parseWhen accepts "now", a duration back from now or an RFC3339 time.
func parseWhen(s string, now time.Time) (time.Time, error) {
	if s == "now" {
		return now, nil
	}
	if d, err := time.ParseDuration(s); err == nil {
		if d <= 0 {
			return time.Time{}, fmt.Errorf("%q: the duration must be positive (how far back)", s)
		}
		return now.Add(-d), nil
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("%q is neither a duration back from now (30m, 2h) nor an RFC3339 time (2026-11-24T10:00:00Z)", s)
	}
	return t, nil
}

// execute runs a validated command.
func execute(ctx context.Context, cfg *config, stdout, stderr io.Writer) error {
	var mon *flowstat.Monitor
	if cfg.cmd == "run" && cfg.metricsAddr != "" {
		// Before the database opens, so a probe sees the process alive (and not ready) from the start.
		mon = flowstat.NewMonitor()
		stopServe, err := serveMonitor(cfg.metricsAddr, mon, stderr)
		if err != nil {
			return err
		}
		defer stopServe()
	}
	st, err := store.OpenWith(ctx, cfg.dsn, store.OpenOptions{MustExist: cfg.cmd != "run", CreateDir: cfg.cmd == "run" && cfg.dbDefault})
	if err != nil {
		return err
	}
	defer st.Close()
	switch cfg.cmd {
	case "run":
		if testHookStore != nil {
			testHookStore(st)
		}
		o := cfg.run
		o.Log = stderr
		o.Monitor = mon
		stats, err := flowstat.Run(ctx, st, o)
		if err != nil {
			return err
		}
		fmt.Fprintf(stderr, "flowstat: stopped (%s) at stream sequence %d: %d events, %d batches, %d dead letters, %d gaps, %d duplicates\n",
			stats.Reason, stats.LastSeq, stats.Events, stats.Messages, stats.DeadLetters, stats.Gaps, stats.Duplicates)
		return nil
	case "replay":
		o := cfg.replay
		o.Log = stderr
		stats, err := flowstat.Replay(ctx, st, o)
		if err != nil {
			return err
		}
		fmt.Fprintf(stderr, "flowstat: rebuilt %s .. %s from the stream up to sequence %d: %d events from %d batches\n",
			o.From.UTC().Format(time.RFC3339), o.To.UTC().Format(time.RFC3339), stats.LastSeq, stats.Events, stats.Messages)
		return nil
	}
	var out any
	var table func(w *tabwriter.Writer)
	switch cfg.cmd {
	case "top":
		out, table, err = top(ctx, st, cfg)
	case "new":
		out, table, err = newDests(ctx, st, cfg)
	case "hosts":
		out, table, err = hosts(ctx, st, cfg)
	case "summary":
		out, table, err = summary(ctx, st, cfg)
	}
	if err != nil {
		return err
	}
	if cfg.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	table(tw)
	return tw.Flush()
}

// serveMonitor serves mon's /healthz, /readyz and /metrics on addr until the returned stop is called.
func serveMonitor(addr string, mon *flowstat.Monitor, log io.Writer) (stop func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("cannot serve health and metrics on %s: %v (set --metrics-addr or %s to a free address, or to empty to disable)", addr, errors.Unwrap(err), envMetrics)
	}
	srv := &http.Server{Handler: mon.Handler(), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	fmt.Fprintf(log, "flowstat: health and metrics on http://%s (/healthz, /readyz, /metrics)\n", ln.Addr())
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	}, nil
}

// timeLayout is RFC3339: "Z" for UTC (the default), the offset with --local, so a time read off a table
// is unambiguous and can be given back to --since and --until.
const timeLayout = "2006-01-02T15:04:05Z07:00"

// fmtTime formats a table time in UTC, or in the local zone with --local.
func (cfg *config) fmtTime(t time.Time) string {
	if cfg.local {
		return t.Local().Format(timeLayout)
	}
	return t.UTC().Format(timeLayout)
}

func (cfg *config) rangeText() string {
	f := cfg.filter
	s := "since " + cfg.fmtTime(f.Since)
	if !f.Until.IsZero() {
		s += " until " + cfg.fmtTime(f.Until)
	}
	if f.Host != "" {
		s += ", host " + f.Host
	}
	if f.Direction != "" {
		s += ", " + f.Direction
	}
	return s
}

func top(ctx context.Context, st *store.Store, cfg *config) (any, func(*tabwriter.Writer), error) {
	bys := []string{"peer", "port"}
	if cfg.by != "" {
		bys = []string{cfg.by}
	}
	res := map[string][]store.TopRow{}
	for _, by := range bys {
		rows, err := st.Top(ctx, by, cfg.filter, cfg.limit)
		if err != nil {
			return nil, nil, err
		}
		res[by] = rows
	}
	out := map[string]any{"since": cfg.filter.Since.UTC(), "host": cfg.filter.Host, "direction": cfg.filter.Direction}
	if !cfg.filter.Until.IsZero() {
		out["until"] = cfg.filter.Until.UTC()
	}
	for by, rows := range res {
		out[by+"s"] = topJSON(by, rows)
	}
	return out, func(w *tabwriter.Writer) {
		for i, by := range bys {
			if i > 0 {
				fmt.Fprintln(w)
			}
			fmt.Fprintf(w, "Top %ss by connections, %s\n", by, cfg.rangeText())
			if by == "peer" {
				fmt.Fprintln(w, "PEER\tNAME\tCONNECTIONS")
			} else {
				fmt.Fprintf(w, "%s\tCONNECTIONS\n", strings.ToUpper(by))
			}
			if len(res[by]) == 0 {
				fmt.Fprintln(w, "(none)")
			}
			for _, r := range res[by] {
				if by == "peer" {
					fmt.Fprintf(w, "%s\t%s\t%d\n", orDash(r.Key), orDash(r.Name), r.Conns)
				} else {
					fmt.Fprintf(w, "%s\t%d\n", orDash(r.Key), r.Conns)
				}
			}
		}
	}, nil
}

// topRowJSON is a store.TopRow as JSON output: a port is a number there, as in every other output.
type topRowJSON struct {
	Key   any    `json:"key"`
	Name  string `json:"name,omitempty"`
	Conns int64  `json:"connections"`
}

func topJSON(by string, rows []store.TopRow) []topRowJSON {
	out := make([]topRowJSON, len(rows))
	for i, r := range rows {
		out[i] = topRowJSON{Key: r.Key, Name: r.Name, Conns: r.Conns}
		if by == "port" {
			if n, err := strconv.Atoi(r.Key); err == nil {
				out[i].Key = n
			}
		}
	}
	return out
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func newDests(ctx context.Context, st *store.Store, cfg *config) (any, func(*tabwriter.Writer), error) {
	rows, err := st.NewDestinations(ctx, cfg.filter, cfg.limit)
	if err != nil {
		return nil, nil, err
	}
	return rows, func(w *tabwriter.Writer) {
		fmt.Fprintf(w, "Peers first seen %s\n", cfg.rangeText())
		fmt.Fprintln(w, "FIRST SEEN\tLAST SEEN\tHOST\tDIRECTION\tPEER\tPORT\tNAME")
		if len(rows) == 0 {
			fmt.Fprintln(w, "(none)")
		}
		for _, r := range rows {
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%d\t%s\n", cfg.fmtTime(r.First), cfg.fmtTime(r.Last), r.Host, r.Direction, orDash(r.Peer), r.Port, orDash(r.Name))
		}
	}, nil
}

func hosts(ctx context.Context, st *store.Store, cfg *config) (any, func(*tabwriter.Writer), error) {
	rows, err := st.PerHost(ctx, cfg.filter, cfg.step)
	if err != nil {
		return nil, nil, err
	}
	return rows, func(w *tabwriter.Writer) {
		fmt.Fprintf(w, "Connections per host, %s\n", cfg.rangeText())
		fmt.Fprintln(w, "START\tHOST\tCONNECTIONS")
		if len(rows) == 0 {
			fmt.Fprintln(w, "(none)")
		}
		for _, r := range rows {
			fmt.Fprintf(w, "%s\t%s\t%d\n", cfg.fmtTime(r.Start), r.Host, r.Conns)
		}
	}, nil
}

func summary(ctx context.Context, st *store.Store, cfg *config) (any, func(*tabwriter.Writer), error) {
	s, err := st.Summary(ctx, cfg.maxGaps)
	if err != nil {
		return nil, nil, err
	}
	if cfg.stream != "" {
		var known []string
		for _, c := range s.Checkpoints {
			if !slices.Contains(known, c.Stream) {
				known = append(known, c.Stream)
			}
		}
		if !slices.Contains(known, cfg.stream) {
			// Most likely a typo: an empty answer would look like a stream without problems.
			k := "none yet: run `flowstat run` first"
			if len(known) > 0 {
				k = "known: " + strings.Join(known, ", ")
			}
			return nil, nil, fmt.Errorf("stream %s has no checkpoints in database %s (%s)", cfg.stream, st.Where(), k)
		}
		s.Checkpoints = slices.DeleteFunc(s.Checkpoints, func(c store.CheckpointRow) bool { return c.Stream != cfg.stream })
		s.Losses = slices.DeleteFunc(s.Losses, func(l store.LossRow) bool { return l.Stream != cfg.stream })
	}
	return s, func(w *tabwriter.Writer) {
		fmt.Fprintf(w, "Database %s (schema %d, buckets of %v)\n\n", s.Database, s.SchemaVersion, time.Duration(s.BucketSeconds)*time.Second)
		fmt.Fprintln(w, "HOST\tDIRECTION\tCONNECTIONS\tBATCHES\tDROPPED\tGAPS\tFIRST BATCH\tLAST BATCH")
		if len(s.Hosts) == 0 {
			fmt.Fprintln(w, "(no data yet)")
		}
		for _, h := range s.Hosts {
			fmt.Fprintf(w, "%s\t%s\t%d\t%d\t%d\t%d\t%s\t%s\n", h.Host, h.Direction, h.Conns, h.Batches, h.Drops, h.Gaps, cfg.fmtTime(h.First), cfg.fmtTime(h.Last))
		}
		if s.GapCount > 0 {
			fmt.Fprintf(w, "\nMissing batches (%d gaps, newest first):\n", s.GapCount)
			fmt.Fprintln(w, "HOST\tRUN\tDIRECTION\tWHAT\tSTREAM SEQ\tSTORED")
			for _, g := range s.Gaps {
				missing := fmt.Sprintf("batch %d follows %d, but %d was the last seen", g.Seq, g.PrevSeq, g.AfterSeq)
				if g.AfterSeq == 0 {
					missing = fmt.Sprintf("run first seen at batch %d (follows %d): its earlier batches were never read", g.Seq, g.PrevSeq)
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%s\n", g.Host, g.RunID, g.Direction, missing, g.StreamSeq, cfg.fmtTime(g.Stored))
			}
		}
		for _, l := range s.Losses {
			fmt.Fprintf(w, "\nStream %s deleted sequences %d..%d before consumer %s read them.\n", l.Stream, l.From, l.To, l.Consumer)
		}
		if s.DeadLetters > 0 {
			fmt.Fprintf(w, "\nDead letters: %d %v", s.DeadLetters, s.DeadByReason)
			if s.NotCopied > 0 {
				fmt.Fprintf(w, " (%d could not be copied to the dead-letter subject)", s.NotCopied)
			}
			fmt.Fprintln(w)
		}
		if s.Duplicates > 0 {
			fmt.Fprintf(w, "\nDuplicate batches: %d messages repeated a batch already counted (a retry stored again after the stream's duplicates window); each was counted once.\n", s.Duplicates)
		}
		if s.Unfinished > 0 {
			fmt.Fprintf(w, "\n%d replay(s) did not finish: their ranges are incomplete until replayed again.\n", s.Unfinished)
		}
		if len(s.Checkpoints) > 0 {
			fmt.Fprintln(w, "\nCONSUMER\tSTREAM\tCOMMITTED UP TO\tUPDATED\tFILTERS")
			for _, c := range s.Checkpoints {
				fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\n", c.Consumer, c.Stream, c.Seq, cfg.fmtTime(c.Updated), c.Filters)
			}
		}
	}, nil
}
