// Command flowstat aggregates the flowbus stream into a database (SQLite by default, or PostgreSQL) and
// answers questions from it: top talkers, new destinations, connections per host over time.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/flowbus/flowbus/cmd/internal/buildinfo"
	"github.com/flowbus/flowbus/cmd/internal/cli"
	"github.com/flowbus/flowbus/cmd/internal/probe"
	"github.com/flowbus/flowbus/consumers/flowstat"
	"github.com/flowbus/flowbus/consumers/flowstat/store"
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
	serve  serveConfig

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
	case "probe":
		return probeRun(args[1:], getenv, stdout, stderr)
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

// execute runs a validated command.
func execute(ctx context.Context, cfg *config, stdout, stderr io.Writer) error {
	if cfg.cmd == "serve" {
		return serveView(ctx, cfg, stderr)
	}
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
		fmt.Fprintf(stderr, "flowstat: stopped (%s) at stream sequence %d: %d events, %d batches, %d dead letters, %d gaps, %d duplicates, %d agent restarts\n",
			stats.Reason, stats.LastSeq, stats.Events, stats.Messages, stats.DeadLetters, stats.Gaps, stats.Duplicates, stats.Restarts)
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
	return query(ctx, st, cfg, stdout)
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

// probeRun is `flowstat probe [HOST:PORT]`, the container's health check: the /readyz of `flowstat run`
// at HOST:PORT, else $FLOWBUS_STAT_METRICS_ADDR, else its default; exit 0 when ready.
func probeRun(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	addr := getenv(envMetrics)
	if addr == "" {
		addr = defaultMetricsAddr
	}
	switch {
	case len(args) == 1:
		addr = args[0]
	case len(args) > 1:
		fmt.Fprintf(stderr, "flowstat probe: want at most one HOST:PORT (the --metrics-addr of flowstat run), not %q\n", strings.Join(args, " "))
		return exitUsage
	}
	url, err := probe.URL(addr)
	if err != nil {
		fmt.Fprintf(stderr, "flowstat probe: %v\n", err)
		return exitUsage
	}
	return probe.Run(url, stdout, stderr)
}
