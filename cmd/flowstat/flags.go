package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/flowbus/flowbus/cmd/internal/cli"
	"github.com/flowbus/flowbus/consumers/flowstat"
	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/internal/statedir"
	"github.com/flowbus/flowbus/schema"
)

// queryCommands read only the database. They take --nats and --stream like every flowbus consumer (a
// shared wrapper or alias may pass them): --nats is checked but not used, --stream narrows what summary
// shows of checkpoints and stream losses.
var queryCommands = map[string]bool{"top": true, "new": true, "hosts": true, "summary": true}

// parser collects every problem of one command's settings.
type parser struct {
	*cli.Values
	fs   *flag.FlagSet
	cmd  string
	now  time.Time
	errs []error
}

// bad records a problem of the setting from src.
func (p *parser) bad(src string, err error) { p.errs = append(p.errs, fmt.Errorf("%s: %w", src, err)) }

// has reports whether the command takes flag name.
func (p *parser) has(name string) bool { return p.fs.Lookup(name) != nil }

// bool is the value of a boolean flag, false when the command does not take it.
func (p *parser) bool(name string) bool {
	return p.has(name) && p.fs.Lookup(name).Value.String() == "true"
}

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
	for _, f := range c.flags {
		if f.arg == "" {
			fs.Bool(f.name, false, "")
		} else {
			fs.String(f.name, "", "")
		}
	}
	errs, err := cli.ParseFlags(fs, args, "flowstat "+cmd, " for `flowstat "+cmd+"`")
	if err != nil {
		return nil, err
	}
	p := &parser{Values: cli.NewValues(fs, getenv), fs: fs, cmd: cmd, now: now, errs: errs}
	cfg := &config{cmd: cmd, json: p.bool("json"), local: p.bool("local")}
	p.database(cfg, getenv)
	urls, streamName, consumer := p.connection(cfg)
	prefix := p.prefix()
	switch cmd {
	case "run":
		o := &cfg.run
		o.URLs, o.Stream, o.Durable, o.Prefix = urls, streamName, consumer, prefix
		p.run(cfg)
	case "replay":
		o := &cfg.replay
		o.URLs, o.Stream, o.Durable, o.Prefix = urls, streamName, consumer, prefix
		p.replay(o)
	case "serve":
		p.serve(cfg, urls, streamName, prefix)
	case "top", "new", "hosts":
		p.query(cfg)
	case "summary":
		cfg.maxGaps = 20
		if p.Set("gaps") {
			n, err := strconv.Atoi(p.Flag("gaps"))
			if err != nil || n < 0 {
				p.bad("--gaps", fmt.Errorf("%q is not a number >= 0", p.Flag("gaps")))
			}
			cfg.maxGaps = n
		}
	}
	if len(p.errs) > 0 {
		return nil, errors.Join(p.errs...)
	}
	return cfg, nil
}

// database checks --db / FLOWBUS_DB, or the default path in the state directory.
func (p *parser) database(cfg *config, getenv func(string) string) {
	dsn, src := p.Get("db", "FLOWBUS_DB", "")
	if dsn == "" {
		dsn = filepath.Join(statedir.Dir(getenv), "flowstat.db")
		src = "the default database path (set --db or FLOWBUS_DB)"
		cfg.dbDefault = true
	}
	if kind, path, err := store.ParseDSN(dsn); err != nil {
		p.bad(src, err)
	} else if kind == store.SQLite {
		// Checked here, not at open, so that it is listed with the other problems. A query command
		// only needs the directory check: opening reports a missing file with its own fix.
		fi, serr := os.Stat(path)
		if p.cmd == "run" || serr == nil && fi.IsDir() {
			if err := store.CheckSQLitePath(path, cfg.dbDefault); err != nil {
				p.bad(src, err)
			}
		}
	}
	cfg.dsn = dsn
}

// connection checks the NATS servers, the stream and the durable consumer of the commands that read the
// stream; a query command checks only the --nats and --stream it was given.
func (p *parser) connection(cfg *config) (urls []string, streamName, consumer string) {
	if queryCommands[p.cmd] {
		// Only the flags: a query must not fail on a FLOWBUS_NATS_URL it does not use.
		if p.Set("nats") {
			if _, err := cli.ParseURLs(p.Flag("nats")); err != nil {
				p.bad("--nats", err)
			}
		}
		if p.Set("stream") {
			cfg.stream = p.Flag("stream")
			if err := stream.ValidateName("stream name", cfg.stream); err != nil {
				p.bad("--stream", err)
			}
		}
		return nil, "", ""
	}
	if !p.has("nats") {
		return nil, "", ""
	}
	v, src := p.Get("nats", "FLOWBUS_NATS_URL", stream.DefaultURL)
	var err error
	if urls, err = cli.ParseURLs(v); err != nil {
		p.bad(src, err)
	}
	streamName, src = p.Get("stream", "FLOWBUS_STREAM", stream.DefaultStream)
	if err := stream.ValidateName("stream name", streamName); err != nil {
		p.bad(src, err)
	}
	consumer, src = p.Get("consumer", envConsumer, flowstat.DefaultDurable)
	if err := stream.ValidateName("consumer name", consumer); err != nil {
		p.bad(src, err)
	}
	return urls, streamName, consumer
}

// prefix checks the subject prefix of the commands that take one ("" for the others).
func (p *parser) prefix() string {
	if !p.has("prefix") {
		return ""
	}
	prefix, src := p.Get("prefix", "FLOWBUS_SUBJECT_PREFIX", schema.DefaultPrefix)
	if err := schema.ValidatePrefix(prefix); err != nil {
		p.bad(src, err)
	}
	return prefix
}

// run checks the settings of `flowstat run` beyond the connection.
func (p *parser) run(cfg *config) {
	o := &cfg.run
	prefix := o.Prefix
	f, src := p.Get("filter", envFilter, prefix+".>")
	for _, s := range strings.Split(f, ",") {
		s = strings.TrimSpace(s)
		if err := stream.ValidateFilter(s); err != nil {
			p.bad(src, err)
		} else if schema.ValidatePrefix(prefix) == nil {
			if err := stream.CheckFilterPrefix(s, prefix); err != nil {
				p.bad(src, err)
			}
		}
		o.Filters = append(o.Filters, s)
	}
	starts := slices.DeleteFunc([]string{"start", "since", "from-seq"}, func(n string) bool { return !p.Set(n) })
	if len(starts) > 1 {
		p.errs = append(p.errs, fmt.Errorf("--%s are mutually exclusive: choose one place to start", strings.Join(starts, ", --")))
	}
	sv, src := p.Get("start", envStart, "all")
	switch {
	case p.Set("since"):
		sv, src = p.Flag("since"), "--since"
	case p.Set("from-seq"):
		sv, src = "seq:"+p.Flag("from-seq"), "--from-seq"
	}
	var err error
	if o.Start, o.Since, o.FromSeq, err = parseStart(sv, p.now); err != nil {
		p.bad(src, err)
	}
	b, src := p.Get("bucket", envBucket, "1m")
	if o.Bucket, err = time.ParseDuration(b); err != nil || o.Bucket < time.Second || o.Bucket%time.Second != 0 {
		p.bad(src, fmt.Errorf("bucket %q: want a whole number of seconds, at least 1s (e.g. 1m, 10s, 1h)", b))
	}
	dl, src := p.Get("deadletter", envDeadLetter, flowstat.DefaultDeadLetterSubject)
	if err := flowstat.ValidateDeadLetterSubject(dl); err != nil {
		p.bad(src, err)
	}
	o.DeadLetterSubject = dl
	cfg.metricsAddr, src = p.Get("metrics-addr", envMetrics, defaultMetricsAddr)
	if cfg.metricsAddr == "off" {
		cfg.metricsAddr = ""
	}
	if err := checkListenAddr(cfg.metricsAddr); err != nil {
		p.bad(src, err)
	}
	o.ExitWhenCaughtUp = p.bool("once")
	o.IdleExit = p.duration("idle-exit", 0)
	o.StreamWait = p.duration("stream-wait", time.Minute)
	o.MaxChunkAge = p.duration("commit-interval", 0)
	o.MaxChunkEvents = p.positive("commit-events")
	o.MaxChains = p.positive("max-chains")
	if p.Set("chain-retention") {
		if v := p.Flag("chain-retention"); v == "off" {
			o.ChainRetention = -1
		} else if d, err := time.ParseDuration(v); err != nil || d < time.Hour {
			p.bad("--chain-retention", fmt.Errorf("%q is not a duration of at least 1h (e.g. 720h), or off", v))
		} else {
			o.ChainRetention = d
		}
	}
}

// replay checks the range of `flowstat replay`.
func (p *parser) replay(o *flowstat.ReplayOptions) {
	if !p.Set("from") {
		p.errs = append(p.errs, errors.New("--from is required: the start of the range to rebuild (RFC3339 time or a duration back from now)"))
	} else if t, err := parseWhen(p.Flag("from"), p.now); err != nil {
		p.bad("--from", err)
	} else {
		o.From = t
	}
	o.To = p.now
	if p.Set("to") {
		t, err := parseWhen(p.Flag("to"), p.now)
		if err != nil {
			p.bad("--to", err)
		}
		o.To = t
	}
	if p.Set("from") && !o.From.IsZero() && !o.To.After(o.From) {
		p.errs = append(p.errs, fmt.Errorf("--to %s is not after --from %s", o.To.UTC().Format(time.RFC3339), o.From.UTC().Format(time.RFC3339)))
	}
	o.Margin = p.duration("margin", 0)
	o.Force = p.bool("force")
}

// query checks the range, host, direction and limits of top, new and hosts.
func (p *parser) query(cfg *config) {
	def := time.Hour
	if p.cmd == "new" {
		def = 24 * time.Hour
	}
	cfg.filter.Since = p.now.Add(-def)
	if p.Set("since") {
		t, err := parseWhen(p.Flag("since"), p.now)
		if err != nil {
			p.bad("--since", err)
		}
		cfg.filter.Since = t
	}
	if p.Set("until") {
		t, err := parseWhen(p.Flag("until"), p.now)
		if err != nil {
			p.bad("--until", err)
		}
		cfg.filter.Until = t
		if !t.After(cfg.filter.Since) {
			p.errs = append(p.errs, fmt.Errorf("--until %s is not after the start %s", t.UTC().Format(time.RFC3339), cfg.filter.Since.UTC().Format(time.RFC3339)))
		}
	}
	if p.Set("host") {
		if err := schema.ValidateHostToken(p.Flag("host")); err != nil {
			p.bad("--host", err)
		}
		cfg.filter.Host = p.Flag("host")
	}
	d := ""
	if p.cmd == "new" {
		d = "outgoing"
	}
	if p.Set("direction") {
		d = p.Flag("direction")
		if d == "all" {
			d = ""
		} else if _, err := schema.ParseDirection(d); err != nil {
			p.bad("--direction", fmt.Errorf("%q: want incoming, outgoing or all", d))
		}
	}
	cfg.filter.Direction = d
	cfg.limit = map[string]int{"top": 10, "new": 100}[p.cmd]
	if p.Set("limit") {
		n, err := strconv.Atoi(p.Flag("limit"))
		if err != nil || n < 1 {
			p.bad("--limit", fmt.Errorf("%q is not a positive integer", p.Flag("limit")))
		}
		cfg.limit = n
	}
	if p.Set("by") {
		cfg.by = p.Flag("by")
		if !slices.Contains(topBy, cfg.by) {
			p.bad("--by", fmt.Errorf("%q: want one of %s", cfg.by, strings.Join(topBy, ", ")))
		}
	}
	cfg.step = p.duration("step", 0)
}

// duration parses a positive duration flag, def when it is not set.
// positive is the value of an integer flag that must be at least 1, 0 when
// it is not set (the option's default).
func (p *parser) positive(name string) int {
	if !p.Set(name) {
		return 0
	}
	n, err := strconv.Atoi(p.Flag(name))
	if err != nil || n < 1 {
		p.bad("--"+name, fmt.Errorf("%q is not a positive integer", p.Flag(name)))
	}
	return n
}

func (p *parser) duration(name string, def time.Duration) time.Duration {
	if !p.Set(name) {
		return def
	}
	d, err := time.ParseDuration(p.Flag(name))
	if err != nil || d <= 0 {
		p.bad("--"+name, fmt.Errorf("%q is not a positive duration (e.g. 30s, 5m)", p.Flag(name)))
	}
	return d
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

// parseWhen accepts "now" or what cli.ParseWhen does.
func parseWhen(s string, now time.Time) (time.Time, error) {
	if s == "now" {
		return now, nil
	}
	return cli.ParseWhen(s, now)
}
