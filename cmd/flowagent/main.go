// Command flowagent is the flowbus host agent: it reports the beginning of
// every TCP connection on a cgroup to NATS JetStream. Configuration comes
// from FLOWBUS_* environment variables (see the README).
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
)

func main() {
	// The agent is one pipeline (read, enrich, batch, publish) whose work is
	// small next to what it watches. With more than one P the Go scheduler
	// spins idle threads looking for work at every wake-up, which measured
	// as about 40% of the agent's CPU; one P halves its footprint on the
	// host. GOMAXPROCS in the environment still wins.
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}
	os.Exit(run(os.Args[1:]))
}

func environ() map[string]string {
	m := map[string]string{}
	for _, kv := range os.Environ() {
		if k, v, ok := strings.Cut(kv, "="); ok {
			m[k] = v
		}
	}
	return m
}

func run(args []string) int {
	if len(args) > 0 {
		if args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
			fmt.Println("flowagent: reports TCP connection beginnings (net_flow_tcp_begin) to NATS JetStream.\nIt takes no arguments; configure it with FLOWBUS_* environment variables (see README.md).")
			return 0
		}
		fmt.Fprintf(os.Stderr, "flowagent takes no arguments (got %q); configure it with FLOWBUS_* environment variables, see --help\n", args)
		return 2
	}
	cfg, err := LoadConfig(environ())
	if err != nil {
		fmt.Fprintln(os.Stderr, "flowagent:", err)
		return 2
	}
	log := newLogger(cfg)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	a, err := Start(ctx, cfg, log)
	if err != nil {
		// One plain line: it names the problem and the fix.
		fmt.Fprintln(os.Stderr, "flowagent:", err)
		return 1
	}
	if cfg.MetricsAddr != "" && cfg.MetricsAddr != "off" {
		if _, err := serveMetrics(ctx, cfg.MetricsAddr, a, log); err != nil {
			log.Error("metrics endpoint could not start (set FLOWBUS_METRICS_ADDR, or off)", "addr", cfg.MetricsAddr, "err", err)
		}
	}
	if err := a.Run(ctx); err != nil {
		log.Error("flowagent stopped with an error", "err", err)
		return 1
	}
	return 0
}

func newLogger(cfg Config) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(cfg.LogLevel))
	opts := &slog.HandlerOptions{Level: lvl}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}
