// The agent's own listeners (the embedded NATS server, metrics) are plain
// TCP: Go makes listeners Multipath TCP by default, and the socket of an
// MPTCP listener opened before the programs attach cannot be attributed
// (its accepted TCP subflows get no process), so the demo's first incoming
// rows would say "-".
//go:debug multipathtcp=0

// Command flowagent is the flowbus host agent: it reports the beginning of
// every TCP connection on a cgroup to NATS JetStream. Configuration comes
// from FLOWBUS_* environment variables (see the README); the agent itself
// is package agent.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"reflect"
	"runtime"
	"strings"
	"syscall"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/flowbus/flowbus/agent"
	"github.com/flowbus/flowbus/cmd/internal/buildinfo"
	"github.com/flowbus/flowbus/cmd/internal/probe"
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
	os.Exit(run(os.Args[1:], environ(), os.Stdout, os.Stderr))
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

// versionText is flowagent --version: the build, and the nats-server
// compiled in, which is what a bug report about the embedded server needs.
func versionText() string {
	return buildinfo.Line("flowagent") + "\nembedded nats-server " + server.VERSION + "\n"
}

// buildInfo is this build, for the flowbus_build_info metric: the same as
// --version says.
func buildInfo() agent.Build {
	in := buildinfo.Get()
	return agent.Build{Version: in.Version, Commit: in.CommitShort(), GoVersion: in.GoVersion}
}

// run is the whole program: arguments, environment and output are passed
// in, so that tests can run it.
func run(args []string, env map[string]string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		if len(args) == 1 {
			switch args[0] {
			case "-h", "-help", "--help", "help":
				fmt.Fprint(stdout, agent.HelpText())
				return 0
			case "-version", "--version", "version":
				fmt.Fprint(stdout, versionText())
				return 0
			case "probe":
				return probeAgent(env, stdout, stderr)
			}
		}
		fmt.Fprintln(stderr, "flowagent:", argsProblem(args))
		return 2
	}
	warnings := agent.UnknownVariables(env)
	cfg, err := agent.LoadConfig(env)
	if err != nil {
		// A misspelt variable may be why a setting is missing: say so first.
		for _, w := range warnings {
			fmt.Fprintln(stderr, "flowagent: warning:", w)
		}
		fmt.Fprintln(stderr, "flowagent:", err)
		return 2
	}
	log := agent.NewLogger(cfg, stderr)
	agent.WarnUnknown(log, warnings)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	a, err := agent.Start(ctx, cfg, log)
	if err != nil {
		// One plain line: it names the problem and the fix.
		fmt.Fprintln(stderr, "flowagent:", err)
		return 1
	}
	if cfg.MetricsAddr != "" && cfg.MetricsAddr != "off" {
		if _, err := agent.ServeMetrics(ctx, cfg.MetricsAddr, a, buildInfo(), log); err != nil {
			// Start checked the address; something took it since. Exit like
			// Start would, after an orderly stop (nothing captured is lost).
			fmt.Fprintf(stderr, "flowagent: FLOWBUS_METRICS_ADDR=%s: %v: set it to a free address, or off\n", cfg.MetricsAddr, err)
			stop()
			_ = a.Run(ctx)
			return 1
		}
	}
	if err := a.Run(ctx); err != nil {
		log.Error("flowagent stopped with an error", "err", err)
		return 1
	}
	return 0
}

// argsProblem explains why args are refused. A flag that names a setting
// (--batch-linger=1s) gets the variable to set instead.
// probeAgent is `flowagent probe`, the container's health check: the agent's /readyz at
// FLOWBUS_METRICS_ADDR (its default when unset), exit 0 when ready.
func probeAgent(env map[string]string, stdout, stderr io.Writer) int {
	addr := env[agent.EnvPrefix+"METRICS_ADDR"]
	if addr == "" {
		// The default the agent itself takes: Config's tag, one source.
		f, _ := reflect.TypeOf(agent.Config{}).FieldByName("MetricsAddr")
		addr = f.Tag.Get("envDefault")
	}
	if addr == "off" {
		fmt.Fprintln(stderr, "flowagent probe: FLOWBUS_METRICS_ADDR=off: the agent serves no /readyz to probe; set it to host:port")
		return 1
	}
	url, err := probe.URL(addr)
	if err != nil {
		fmt.Fprintf(stderr, "flowagent probe: FLOWBUS_METRICS_ADDR: %v\n", err)
		return 2
	}
	return probe.Run(url, stdout, stderr)
}

func argsProblem(args []string) string {
	msg := fmt.Sprintf("unexpected argument %q: flowagent takes no arguments but --help, --version and probe; "+
		"configure it with FLOWBUS_* environment variables (flowagent --help lists them)", args[0])
	flag, value, hasValue := strings.Cut(strings.TrimLeft(args[0], "-"), "=")
	if strings.HasPrefix(args[0], "-") && flag != "" {
		name := agent.EnvPrefix + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
		if agent.KnownVariables()[name] {
			if !hasValue {
				value = "..."
				if len(args) > 1 {
					value = args[1]
				}
			}
			msg = fmt.Sprintf("unexpected argument %q: flowagent takes no flags; set the environment variable %s=%s instead", args[0], name, value)
		}
	}
	return msg
}
