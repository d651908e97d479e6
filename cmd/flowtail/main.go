// Command flowtail prints net_flow_tcp_begin events from the flowbus JetStream stream, live or replayed,
// as an aligned table or as JSON lines.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/flowbus/flowbus/cmd/internal/buildinfo"
	"github.com/flowbus/flowbus/cmd/internal/cli"
	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/consumers/tail"
	"github.com/flowbus/flowbus/schema"
)

// Exit statuses, documented in the help text.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

const usageText = `Usage: flowtail [flags]

Prints net_flow_tcp_begin events from the flowbus JetStream stream. By default it follows new events
only (like tail -f); --all, --since or --from-seq replay stored events first, then keep following.

Flags:
  --nats URL            NATS server URL(s), comma-separated
                        (default $FLOWBUS_NATS_URL, else nats://127.0.0.1:4222)
  --stream NAME         JetStream stream (default $FLOWBUS_STREAM, else FLOWS)
  --prefix PREFIX       subject prefix (default $FLOWBUS_SUBJECT_PREFIX, else flows)
  --host H              only events of host token H
  --direction DIR       only incoming or outgoing events
  --since WHEN          start with events stored since WHEN: a duration back from now (5m, 2h)
                        or an RFC3339 time (2026-11-24T10:00:00Z)
  --from-seq N          start at stream sequence N
  --all                 replay the whole stream
                        (--since, --from-seq and --all are mutually exclusive)
  --json                one JSON object per event and line instead of a table
  --local               table times in the local time zone (default UTC)
  --count N             exit after N events
  --idle-exit DURATION  exit when no message arrives for DURATION (e.g. 2s)
  --version             print the version and exit
  -h, --help            show this help

The table's header is printed as soon as the stream is open; its times are RFC3339, in UTC ("Z") unless
--local, so one can be given back to --since. Messages that are not valid flowbus batches are skipped
with a warning on stderr; agent drop counters and missing batches are reported on stderr too, as are a
start past the end of the stream and an --idle-exit without any event.

Exit status:
  0  stopped normally: --count reached, --idle-exit elapsed, or interrupted (SIGINT/SIGTERM)
  1  runtime failure: cannot connect, stream missing, connection lost, output not writable
  2  invalid flags
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// config is the validated command line.
type config struct {
	opts  tail.Options
	json  bool
	local bool // table times in the local zone instead of UTC
}

// errVersion is returned by parseArgs when --version was given.
var errVersion = errors.New("version requested")

// run is main without os.Exit, so tests can drive it.
func run(args []string, stdout, stderr io.Writer) int {
	cfg, err := parseArgs(args, os.Getenv, time.Now())
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(stdout, usageText)
		return exitOK
	}
	if errors.Is(err, errVersion) {
		fmt.Fprintln(stdout, buildinfo.Line("flowtail"))
		return exitOK
	}
	if err != nil {
		fmt.Fprintf(stderr, "flowtail: invalid arguments:\n%v\nRun 'flowtail --help' for usage.\n", cli.Indent(err))
		return exitUsage
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	bw := bufio.NewWriterSize(stdout, 64<<10)
	var p printer
	var table *tablePrinter
	if cfg.json {
		p = &jsonPrinter{w: bw}
	} else {
		table = newTablePrinter(bw, cfg.local)
		p = table
	}
	cfg.opts.Warnings = stderr
	cfg.opts.ClientName = "flowtail"
	cfg.opts.OnIdle = bw.Flush
	cfg.opts.OnReady = func(r tail.Ready) error {
		if msg := pastEnd(&cfg.opts, r); msg != "" {
			fmt.Fprintf(stderr, "flowtail: %s: only new events will show\n", msg)
		}
		if table == nil {
			return nil
		}
		// At once, so a quiet filter shows that flowtail runs and what it would print.
		table.header()
		_, err := bw.Write(table.buf)
		table.buf = table.buf[:0]
		if err == nil {
			err = bw.Flush()
		}
		return err
	}

	st, err := tail.Run(ctx, cfg.opts, p.event)
	if ferr := bw.Flush(); err == nil && ferr != nil {
		err = fmt.Errorf("writing output: %w", ferr)
	}
	if err != nil {
		fmt.Fprintf(stderr, "flowtail: %s\n", cli.Explain(err))
		return exitError
	}
	if st.Reason == "idle" && st.Events == 0 {
		skipped := ""
		if st.Skipped > 0 {
			skipped = fmt.Sprintf("; %d messages skipped, see the warnings above", st.Skipped)
		}
		fmt.Fprintf(stderr, "flowtail: no events arrived within --idle-exit %v (stream %s, subjects %s%s)\n",
			cfg.opts.IdleExit, cfg.opts.Stream, st.Filter, skipped)
	}
	return exitOK
}

// pastEnd says when the chosen start lies after everything the stream holds, "" otherwise: the tail
// then waits for new events, which looks like a hang unless it is said.
func pastEnd(o *tail.Options, r tail.Ready) string {
	switch o.Start {
	case stream.StartSeq:
		if o.FromSeq > r.LastSeq {
			return fmt.Sprintf("--from-seq %d is past the end of stream %s (its last sequence is %d)", o.FromSeq, r.Stream, r.LastSeq)
		}
	case stream.StartTime:
		since := o.Since.UTC().Format(time.RFC3339)
		if r.Msgs == 0 {
			return fmt.Sprintf("--since %s: stream %s is empty", since, r.Stream)
		}
		if r.LastTime.Before(o.Since) {
			return fmt.Sprintf("--since %s is past the end of stream %s (its last message was stored at %s)", since, r.Stream, r.LastTime.UTC().Format(time.RFC3339))
		}
	case stream.StartAll:
		if r.Msgs == 0 {
			return fmt.Sprintf("--all: stream %s is empty", r.Stream)
		}
	}
	return ""
}

// parseArgs parses and validates the command line, reporting every problem at once rather than making
// the user fix them one run at a time. getenv and now are parameters so tests control them.
func parseArgs(args []string, getenv func(string) string, now time.Time) (*config, error) {
	fs := flag.NewFlagSet("flowtail", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	for _, name := range []string{"nats", "stream", "prefix"} {
		fs.String(name, "", "") // read through cli.Values: flag, else environment, else default
	}
	var (
		host     = fs.String("host", "", "")
		dir      = fs.String("direction", "", "")
		since    = fs.String("since", "", "")
		fromSeq  = fs.String("from-seq", "", "")
		all      = fs.Bool("all", false, "")
		jsonOut  = fs.Bool("json", false, "")
		local    = fs.Bool("local", false, "")
		version  = fs.Bool("version", false, "")
		count    = fs.String("count", "", "")
		idleExit = fs.String("idle-exit", "", "")
	)
	errs, err := cli.ParseFlags(fs, args, "flowtail", "")
	if err != nil {
		return nil, err
	}
	if *version {
		return nil, errVersion
	}
	v := cli.NewValues(fs, getenv)

	cfg := &config{json: *jsonOut, local: *local}
	o := &cfg.opts

	// A value from the environment is reported under the variable's name, so the user knows where to fix it.
	natsURL, src := v.Get("nats", "FLOWBUS_NATS_URL", stream.DefaultURL)
	if urls, err := cli.ParseURLs(natsURL); err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", src, err))
	} else {
		o.URLs = urls
	}

	o.Stream, src = v.Get("stream", "FLOWBUS_STREAM", stream.DefaultStream)
	if err := stream.ValidateName("stream name", o.Stream); err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", src, err))
	}

	o.Prefix, src = v.Get("prefix", "FLOWBUS_SUBJECT_PREFIX", schema.DefaultPrefix)
	if err := schema.ValidatePrefix(o.Prefix); err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", src, err))
	}

	if v.Set("host") {
		if err := schema.ValidateHostToken(*host); err != nil {
			errs = append(errs, fmt.Errorf("--host: %w", err))
		}
		o.Host = *host
	}
	if v.Set("direction") {
		d, err := schema.ParseDirection(*dir)
		if err != nil {
			errs = append(errs, fmt.Errorf("--direction: %w", err))
		}
		o.Direction = d
	}

	var starts []string
	if v.Set("all") && *all {
		starts = append(starts, "--all")
		o.Start = stream.StartAll
	}
	if v.Set("since") {
		starts = append(starts, "--since")
		t, err := parseSince(*since, now)
		if err != nil {
			errs = append(errs, fmt.Errorf("--since: %w", err))
		}
		o.Start, o.Since = stream.StartTime, t
	}
	if v.Set("from-seq") {
		starts = append(starts, "--from-seq")
		n, err := strconv.ParseUint(*fromSeq, 10, 64)
		if err != nil || n == 0 {
			errs = append(errs, fmt.Errorf("--from-seq: %q is not a stream sequence (want an integer >= 1)", *fromSeq))
		}
		o.Start, o.FromSeq = stream.StartSeq, n
	}
	if len(starts) > 1 {
		errs = append(errs, fmt.Errorf("%s are mutually exclusive: choose one place to start", strings.Join(starts, ", ")))
	}

	if v.Set("count") {
		n, err := strconv.Atoi(*count)
		if err != nil || n < 1 {
			errs = append(errs, fmt.Errorf("--count: %q is not a positive integer", *count))
		}
		o.Count = n
	}
	if v.Set("idle-exit") {
		d, err := time.ParseDuration(*idleExit)
		if err != nil || d <= 0 {
			errs = append(errs, fmt.Errorf("--idle-exit: %q is not a positive duration (e.g. 5s, 1m)", *idleExit))
		}
		o.IdleExit = d
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return cfg, nil
}

// parseSince accepts what cli.ParseWhen does, but not a time in the future: the tail would show nothing
// until then, which looks like a hang.
func parseSince(s string, now time.Time) (time.Time, error) {
	t, err := cli.ParseWhen(s, now)
	if err != nil {
		return time.Time{}, err
	}
	if t.After(now) {
		return time.Time{}, fmt.Errorf("%q is in the future", s)
	}
	return t, nil
}

// printer writes one event.
type printer interface {
	event(m *tail.Meta, ev *schema.Event) error
}

type jsonPrinter struct {
	w   *bufio.Writer
	buf []byte
}

func (p *jsonPrinter) event(m *tail.Meta, ev *schema.Event) error {
	p.buf = ev.AppendJSON(p.buf[:0], m.Host)
	p.buf = append(p.buf, '\n')
	_, err := p.w.Write(p.buf)
	return err
}

// tablePrinter writes aligned columns. A live tail cannot know the widest value in advance, so columns
// start at typical widths and only ever grow; the header is printed once.
type tablePrinter struct {
	w       *bufio.Writer
	widths  [6]int // all columns but the last
	printed bool   // the header
	loc     *time.Location
	buf     []byte
}

// timeLayout is RFC3339 with milliseconds: "Z" for UTC, the offset otherwise, so a time read off the
// table is unambiguous and can be given back to --since.
const timeLayout = "2006-01-02T15:04:05.000Z07:00"

func newTablePrinter(w *bufio.Writer, local bool) *tablePrinter {
	p := &tablePrinter{w: w, loc: time.UTC}
	if local {
		p.loc = time.Local
	}
	p.widths = [6]int{len(p.fmtTime(0)), 10, 8, 21, 21, 12}
	return p
}

func (p *tablePrinter) fmtTime(ns int64) string { return time.Unix(0, ns).In(p.loc).Format(timeLayout) }

// header appends the header line to buf the first time.
func (p *tablePrinter) header() {
	if !p.printed {
		p.printed = true
		p.row("TIME", "HOST", "DIRECTION", "SRC", "DST", "SRC_DNS", "DST_DNS")
	}
}

// maxNameWidth keeps one long CDN name list from pushing the last column off screen for good.
const maxNameWidth = 40

func (p *tablePrinter) event(m *tail.Meta, ev *schema.Event) error {
	p.header()
	p.row(p.fmtTime(ev.Timestamp),
		m.Host,
		ev.Direction.String(),
		endpoint(ev.Src, ev.SrcPort),
		endpoint(ev.Dst, ev.DstPort),
		names(ev.SrcDNS),
		names(ev.DstDNS))
	_, err := p.w.Write(p.buf)
	p.buf = p.buf[:0]
	return err
}

func (p *tablePrinter) row(cols ...string) {
	for i, c := range cols {
		if i == len(cols)-1 {
			p.buf = append(p.buf, c...)
			break
		}
		if i < len(p.widths) && len(c) > p.widths[i] && (i != 5 || len(c) <= maxNameWidth) {
			p.widths[i] = len(c)
		}
		p.buf = append(p.buf, c...)
		for n := len(c); n < p.widths[i]; n++ {
			p.buf = append(p.buf, ' ')
		}
		p.buf = append(p.buf, ' ', ' ')
	}
	p.buf = append(p.buf, '\n')
}

// endpoint formats addr:port with IPv6 in brackets.
func endpoint(a netip.Addr, port uint16) string {
	if !a.IsValid() {
		return "?:" + strconv.Itoa(int(port))
	}
	return netip.AddrPortFrom(a, port).String()
}

func names(n []string) string {
	if len(n) == 0 {
		return "-"
	}
	return strings.Join(n, ",")
}
