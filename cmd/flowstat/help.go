package main

import (
	"fmt"
	"strings"
)

// flagDoc documents one flag of one command. The flags a command accepts are the ones documented here,
// so its help can never miss one.
type flagDoc struct {
	name string
	arg  string // value placeholder, "" for a boolean flag
	help string // may hold newlines
}

// command is one flowstat command: what it does in a line, and its flags.
type command struct {
	name, summary string
	flags         []flagDoc
}

// Flags several commands share.
var (
	dbFlag = flagDoc{"db", "DSN", `a SQLite file path, a postgres:// URL or PostgreSQL key=value settings
(host=db dbname=stats user=flowstat); default $FLOWBUS_DB, else flowstat.db in
the state directory ($STATE_DIRECTORY, $XDG_STATE_HOME/flowbus, /var/lib/flowbus
for root, ~/.local/state/flowbus)`}
	natsFlag = flagDoc{"nats", "URL", `NATS server URL(s), comma-separated
(default $FLOWBUS_NATS_URL, else nats://127.0.0.1:4222)`}
	streamFlag   = flagDoc{"stream", "NAME", "JetStream stream (default $FLOWBUS_STREAM, else FLOWS)"}
	consumerFlag = flagDoc{"consumer", "NAME", `durable consumer name, also the checkpoint's name in the database; each database
needs its own (default $FLOWBUS_FLOWSTAT_CONSUMER, else flowstat)`}
	prefixFlag = flagDoc{"prefix", "PREFIX", `subject prefix the agents publish under (default $FLOWBUS_SUBJECT_PREFIX, else
flows); a batch not on <prefix>.<its host>.<its direction> is dead-lettered`}
	queryNatsFlag = flagDoc{"nats", "URL", "accepted like every flowbus consumer's, checked, not used: queries read only the database"}
	queryStream   = flagDoc{"stream", "NAME", "accepted like every flowbus consumer's, not used"}
	untilFlag     = flagDoc{"until", "WHEN", "end of the range (default: now, open-ended)"}
	hostFlag      = flagDoc{"host", "H", "one host token only"}
	jsonFlag      = flagDoc{"json", "", "JSON instead of a table (times in UTC, ports and counts as numbers)"}
	localFlag     = flagDoc{"local", "", "table times in the local time zone (default UTC, shown with a trailing Z)"}
	directionFlag = flagDoc{"direction", "DIR", "incoming or outgoing (default both)"}
)

func sinceFlag(def string) flagDoc {
	return flagDoc{"since", "WHEN", "start of the range: an RFC3339 time or a duration back from now (default " + def + ")"}
}

var commands = []command{
	{"run", "consume the stream and keep the aggregates up to date (the service)", []flagDoc{
		dbFlag, natsFlag, streamFlag, consumerFlag, prefixFlag,
		{"filter", "SUBJECTS", `comma-separated subject filters under the prefix, e.g. flows.*.incoming
(default $FLOWBUS_FLOWSTAT_FILTER, else <prefix>.>)`},
		{"start", "POLICY", `where a consumer new to this database starts: all (the whole stream), new, a time
(RFC3339, or a duration back from now such as 2h) or seq:N (default
$FLOWBUS_FLOWSTAT_START, else all); later runs resume at the checkpoint`},
		{"since", "WHEN", "same as --start WHEN"},
		{"from-seq", "N", "same as --start seq:N"},
		{"bucket", "DURATION", "aggregation bucket, fixed per database (default $FLOWBUS_FLOWSTAT_BUCKET, else 1m)"},
		{"deadletter", "SUBJECT", `where messages that are not valid batches are copied
(default $FLOWBUS_FLOWSTAT_DEADLETTER, else flowbus.deadletter)`},
		{"metrics-addr", "HOST:PORT", `serve /healthz, /readyz and /metrics (Prometheus) there; empty or off disables
(default $FLOWBUS_STAT_METRICS_ADDR, else 127.0.0.1:9465)`},
		{"once", "", "exit once everything the stream holds is committed"},
		{"idle-exit", "DURATION", "exit when no message arrives for DURATION"},
		{"stream-wait", "DURATION", "how long to wait for a missing stream to appear (default 1m)"},
		{"commit-interval", "DURATION", "commit at least this often while reading a backlog (default 2s)"},
		{"commit-events", "N", "commit at least every N events (default 1000000)"},
		{"max-chains", "N", `batch chains (one per host, agent run and direction) kept in memory; the others
are read from the database by key when a batch of theirs arrives (default 65536)`},
		{"chain-retention", "DURATION", `delete the state of chains without a new batch for this long, at start and
hourly; off keeps it forever (default 720h)`},
	}},
	{"top", "top peers and service ports (talkers) over a time range", []flagDoc{
		dbFlag, sinceFlag("1h"), untilFlag, hostFlag, directionFlag,
		{"by", "WHAT", `peer, port, name or host (connections), bytes (peers and ports by the bytes
of the connections that ended: ends, bytes sent and received by the host, mean
and max duration, reasons) or process (connections by comm[pid]; begins taken
in softirq carry none: "-") (default: peers and ports)`},
		{"limit", "N", "rows per table (default 10)"},
		jsonFlag, localFlag, queryNatsFlag, queryStream,
	}},
	{"new", "peers first seen since a time (new destinations)", []flagDoc{
		dbFlag, sinceFlag("24h"), untilFlag, hostFlag,
		{"direction", "DIR", "incoming, outgoing or all (default outgoing)"},
		{"limit", "N", "rows (default 100)"},
		jsonFlag, localFlag, queryNatsFlag, queryStream,
	}},
	{"hosts", "connections per host over time", []flagDoc{
		dbFlag, sinceFlag("1h"), untilFlag, hostFlag, directionFlag,
		{"step", "DURATION", "interval per line, a multiple of the bucket (default one bucket)"},
		jsonFlag, localFlag, queryNatsFlag, queryStream,
	}},
	{"summary", "totals per host and direction, gaps, drops, agent restarts, dead letters, checkpoints", []flagDoc{
		dbFlag,
		{"gaps", "N", "newest gaps and agent restarts to list (default 20 each)"},
		jsonFlag, localFlag, queryNatsFlag,
		{"stream", "NAME", "only that stream's checkpoints and stream losses (it must have a checkpoint)"},
	}},
	{"replay", "rebuild the aggregates of a time range from the stream", []flagDoc{
		dbFlag, natsFlag, streamFlag, consumerFlag, prefixFlag,
		{"from", "WHEN", "start of the range, required: an RFC3339 time or a duration back from now"},
		{"to", "WHEN", "end of the range (default now)"},
		{"margin", "DURATION", `how much earlier than --from a batch holding events of the range may have been
stored (default 10m)`},
		{"force", "", "rebuild even when the stream no longer holds the whole range"},
	}},
}

// commandByName finds a command; nil when there is none of that name.
func commandByName(name string) *command {
	for i := range commands {
		if commands[i].name == name {
			return &commands[i]
		}
	}
	return nil
}

func commandNames() string {
	var n []string
	for _, c := range commands {
		n = append(n, c.name)
	}
	return strings.Join(n, ", ") + ", version or help"
}

// usage is the text of `flowstat --help`: the commands, not their flags.
func usage() string {
	var b strings.Builder
	b.WriteString("Usage: flowstat <command> [flags]\n\nAggregates the flowbus stream into a database and answers questions from it.\n\nCommands:\n")
	for _, c := range commands {
		fmt.Fprintf(&b, "  %-9s %s\n", c.name, c.summary)
	}
	b.WriteString(`  probe     exit 0 when 'flowstat run' here is ready: its /readyz at [HOST:PORT], else
            $FLOWBUS_STAT_METRICS_ADDR, else 127.0.0.1:9465 (the container's health check)
  version   print the version and exit (also --version)
  help      this help; 'flowstat help <command>' or 'flowstat <command> --help' lists a command's flags

Every command reads --db (default $FLOWBUS_DB, else flowstat.db in the state directory).

Exit status: 0 done (run: stopped by SIGINT/SIGTERM, --once or --idle-exit), 1 runtime failure,
2 invalid command line or settings (all problems are listed at once).
`)
	return b.String()
}

// help is the text of `flowstat <command> --help`: what it does and its flags.
func (c *command) help() string {
	const col = 24
	var b strings.Builder
	fmt.Fprintf(&b, "Usage: flowstat %s [flags]\n\n%s%s.\n\nFlags:\n", c.name, strings.ToUpper(c.summary[:1]), c.summary[1:])
	for _, f := range c.flags {
		left := "  --" + f.name
		if f.arg != "" {
			left += " " + f.arg
		}
		lines := strings.Split(f.help, "\n")
		if len(left) < col-1 {
			fmt.Fprintf(&b, "%-*s%s\n", col, left, lines[0])
			lines = lines[1:]
		} else {
			b.WriteString(left + "\n") // too long for the column: its text goes below
		}
		for _, l := range lines {
			fmt.Fprintf(&b, "%*s%s\n", col, "", l)
		}
	}
	b.WriteString("  -h, --help            this help\n")
	return b.String()
}
