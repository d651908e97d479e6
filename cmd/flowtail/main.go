// Command flowtail prints net_flow_tcp_begin events (and, with --event, net_flow_tcp_end events) from
// the flowbus JetStream stream, live or replayed, as an aligned table or as JSON lines.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/flowbus/flowbus/cmd/internal/buildinfo"
	"github.com/flowbus/flowbus/cmd/internal/cli"
	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/consumers/tail"
)

// Exit statuses, documented in the help text.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

const usageText = `Usage: flowtail [flags]

Prints net_flow_tcp_begin events from the flowbus JetStream stream, and with
--event the net_flow_tcp_end events of connections that ended. By default it
follows new events only (like tail -f); --all, --since or --from-seq replay
stored events first, then keep following.

Flags:
  --nats URL            NATS server URL(s), comma-separated
                        (default $FLOWBUS_NATS_URL, else nats://127.0.0.1:4222)
  --stream NAME         JetStream stream (default $FLOWBUS_STREAM, else FLOWS)
  --prefix PREFIX       subject prefix
                        (default $FLOWBUS_SUBJECT_PREFIX, else flows)
  --host H              only events of host token H
  --direction DIR       only incoming or outgoing events
  --event KIND          begin, end or both (default begin: begins only, as
                        before end events existed); both: in stream order
  --since WHEN          start with events stored since WHEN: a duration back
                        from now (5m, 2h) or an RFC3339 time
                        (2026-11-24T10:00:00Z)
  --from-seq N          start at stream sequence N
  --all                 replay the whole stream
                        (--since, --from-seq and --all are mutually exclusive)
  --json                one JSON object per event and line instead of a table;
                        an end object has "event":"net_flow_tcp_end"
  --local               table times in the local time zone (default UTC)
  --count N             exit after N events (begins and ends)
  --idle-exit DURATION  exit when no message arrives for DURATION (e.g. 2s)
  --version             print the version and exit
  -h, --help            show this help

The table's header is printed as soon as the stream is open, and again above a
row that widens a column (columns only grow); its times are RFC3339, in UTC
("Z") unless --local, so one can be given back to --since. End rows: TIME is
when the connection ended, DURATION how long it lasted, BYTES what src sent /
what dst sent, REASON fin, rst_sent, rst_received, timeout, never_established
or unknown; with --event both, EVENT says begin or end.

Messages that are not valid flowbus batches are skipped with a warning on
stderr; agent drop counters, missing batches and agent restarts (how many
batches of the previous run never arrived, how long capture was down) are
reported on stderr too (also with --json), as are a start past the end of the
stream and an --idle-exit without any event.

Exit status:
  0  stopped normally: --count reached, --idle-exit elapsed, or interrupted
     (SIGINT/SIGTERM)
  1  runtime failure: cannot connect, stream missing, connection lost, output
     not writable
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
		table = newTablePrinter(bw, cfg.local, cfg.opts.Events)
		p = table
	}
	cfg.opts.Warnings = stderr
	cfg.opts.ClientName = "flowtail"
	cfg.opts.OnIdle = bw.Flush
	cfg.opts.OnEnd = p.end
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
