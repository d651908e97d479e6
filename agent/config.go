package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/caarlos0/env/v10"

	"github.com/flowbus/flowbus/bpf"
	"github.com/flowbus/flowbus/bpf/cgroupv2"
	"github.com/flowbus/flowbus/internal/statedir"
	"github.com/flowbus/flowbus/publisher/embedded"
	"github.com/flowbus/flowbus/schema"
)

// Config is the agent's configuration, read from FLOWBUS_* variables. Every
// field is documented in the README with its default.
type Config struct {
	NATSURL          string        `env:"NATS_URL" helpDefault:"empty: the embedded server" help:"comma-separated NATS URLs of an external server or cluster"`
	NATSCA           string        `env:"NATS_CA" help:"CA file that signed the server's certificate (TLS)"`
	NATSCert         string        `env:"NATS_CERT" help:"client certificate file for mutual TLS (with FLOWBUS_NATS_KEY)"`
	NATSKey          string        `env:"NATS_KEY" help:"key file of FLOWBUS_NATS_CERT"`
	NATSCreds        string        `env:"NATS_CREDS" help:".creds file (JWT and NKey) for operator-mode servers"`
	NATSNKey         string        `env:"NATS_NKEY" help:"NKey seed file"`
	NATSUser         string        `env:"NATS_USER" help:"user name (with FLOWBUS_NATS_PASSWORD)"`
	NATSPassword     string        `env:"NATS_PASSWORD" help:"password of FLOWBUS_NATS_USER"`
	NATSToken        string        `env:"NATS_TOKEN" help:"authentication token"`
	EmbeddedListen   string        `env:"EMBEDDED_LISTEN" envDefault:"127.0.0.1:4222" help:"where the embedded server listens for consumers (port 0: any free port)"`
	EmbeddedStoreDir string        `env:"EMBEDDED_STORE_DIR" helpDefault:"<state dir>/jetstream" help:"JetStream storage of the embedded server"`
	EmbeddedUser     string        `env:"EMBEDDED_USER" helpDefault:"empty: no login (loopback only)" help:"user consumers must log in as (with FLOWBUS_EMBEDDED_PASS_FILE)"`
	EmbeddedPassFile string        `env:"EMBEDDED_PASS_FILE" helpDefault:"empty" help:"file holding FLOWBUS_EMBEDDED_USER's password"`
	CgroupPath       string        `env:"CGROUP_PATH" helpDefault:"the cgroup v2 root (whole host)" help:"the cgroup v2 directory to watch, all its descendants included"`
	Host             string        `env:"HOST" helpDefault:"sanitized host name" help:"host token in subjects and message ids"`
	SubjectPrefix    string        `env:"SUBJECT_PREFIX" envDefault:"flows" help:"subject prefix: batches go to <prefix>.<host>.<direction>"`
	Stream           string        `env:"STREAM" envDefault:"FLOWS" help:"JetStream stream name"`
	ManageStream     bool          `env:"MANAGE_STREAM" envDefault:"true" help:"create or update the stream (subjects <prefix>.>) at start"`
	StreamMaxAge     time.Duration `env:"STREAM_MAX_AGE" envDefault:"24h" help:"stream retention by age (0: forever)"`
	StreamMaxBytes   int64         `env:"STREAM_MAX_BYTES" envDefault:"1073741824" help:"stream retention by size; the oldest batches go first"`
	StreamReplicas   int           `env:"STREAM_REPLICAS" envDefault:"1" help:"stream replicas, 1 to 5 (a cluster wants 3)"`
	StreamStorage    string        `env:"STREAM_STORAGE" envDefault:"file" help:"stream storage: file or memory"`
	StreamDuplicates time.Duration `env:"STREAM_DUPLICATES" envDefault:"2m" help:"deduplication window of Nats-Msg-Id: retries within it are stored once"`
	BatchMaxEvents   int           `env:"BATCH_MAX_EVENTS" envDefault:"4096" help:"a batch is sent when it holds this many events"`
	BatchMaxBytes    int           `env:"BATCH_MAX_BYTES" envDefault:"65536" help:"a batch is sent at this encoded size (capped by the server's max_payload)"`
	BatchLinger      time.Duration `env:"BATCH_LINGER" envDefault:"100ms" help:"a batch is sent at the latest this long after its first event"`
	QueueBytes       int           `env:"QUEUE_BYTES" envDefault:"33554432" help:"memory for unacknowledged batches; past it new ones go to the spool"`
	MaxInflight      int           `env:"MAX_INFLIGHT" envDefault:"256" help:"batches published and awaiting their ack"`
	AckTimeout       time.Duration `env:"ACK_TIMEOUT" envDefault:"5s" help:"an unacknowledged publish is retried after this, with the same message id"`
	SpoolDir         string        `env:"SPOOL_DIR" helpDefault:"<state dir>/spool" help:"on-disk spool for batches NATS has not taken (off: drop them instead)"`
	SpoolBytes       int64         `env:"SPOOL_BYTES" envDefault:"268435456" help:"bound of the spool on disk; past it whole batches are dropped and counted"`
	RunStateFile     string        `env:"RUN_STATE_FILE" helpDefault:"<state dir>/run-<host>.state" help:"what this run sealed, for the next run's link to it (off: no link)"`
	RingbufBytes     int           `env:"RINGBUF_BYTES" envDefault:"4194304" help:"kernel ring buffer size, a power of two"`
	PollInterval     time.Duration `env:"POLL_INTERVAL" envDefault:"20ms" help:"how often the reader drains the ring buffer"`
	EndEvents        bool          `env:"END_EVENTS" envDefault:"true" help:"publish net_flow_tcp_end events (false: begins only)"`
	HalfOpenTimeout  time.Duration `env:"HALF_OPEN_TIMEOUT" helpDefault:"from tcp_synack_retries" help:"an incoming handshake not done by then ends never_established"`
	FilterDirection  string        `env:"FILTER_DIRECTION" envDefault:"both" help:"begins kept, in the kernel: both, incoming or outgoing"`
	FilterPorts      string        `env:"FILTER_PORTS" helpDefault:"empty: all" help:"responder ports kept, in the kernel (e.g. 80,443,8000-8999)"`
	FilterSkipPorts  string        `env:"FILTER_SKIP_PORTS" helpDefault:"empty: none" help:"responder ports dropped, in the kernel"`
	FilterCIDRs      string        `env:"FILTER_CIDRS" helpDefault:"empty: all" help:"remote addresses kept, in the kernel (e.g. 10.0.0.0/8,fd00::/8)"`
	FilterSkipCIDRs  string        `env:"FILTER_SKIP_CIDRS" helpDefault:"empty: none" help:"remote addresses dropped, in the kernel"`
	FilterComms      string        `env:"FILTER_COMMS" helpDefault:"empty: all" help:"process command names kept, in the kernel (e.g. nginx,curl)"`
	FilterSkipComms  string        `env:"FILTER_SKIP_COMMS" helpDefault:"empty: none" help:"command names dropped, in the kernel"`
	DNSCacheEntries  int           `env:"DNS_CACHE_ENTRIES" envDefault:"65536" help:"addresses the DNS cache keeps (least recently used goes first)"`
	DNSCacheBytes    int64         `env:"DNS_CACHE_BYTES" envDefault:"8388608" help:"bytes the DNS cache may hold (a shared name counts once); LRU past it"`
	DNSMaxNames      int           `env:"DNS_MAX_NAMES" envDefault:"8" help:"names kept per address (a CDN address serves many)"`
	DNSMinTTL        time.Duration `env:"DNS_MIN_TTL" envDefault:"60s" help:"floor of a cached name's life"`
	DNSMaxTTL        time.Duration `env:"DNS_MAX_TTL" envDefault:"6h" help:"ceiling of a cached name's life"`
	MetricsAddr      string        `env:"METRICS_ADDR" envDefault:"127.0.0.1:9464" help:"Prometheus /metrics, /healthz and /readyz (off: disabled)"`
	LogLevel         string        `env:"LOG_LEVEL" envDefault:"info" help:"debug, info, warn or error"`
	LogFormat        string        `env:"LOG_FORMAT" envDefault:"text" help:"text or json"`
	ShutdownTimeout  time.Duration `env:"SHUTDOWN_TIMEOUT" envDefault:"10s" help:"on SIGINT or SIGTERM, how long to wait for outstanding acks"`
	EmbeddedMonitor  string        `env:"EMBEDDED_MONITOR" helpDefault:"empty: off" help:"host:port of the embedded server's HTTP monitoring (/varz, /jsz, ...)"`
	ReadyFile        string        `env:"READY_FILE" helpDefault:"empty: none" help:"file written once the agent runs (pid, run id, NATS URL), removed at exit"`
}

// validateEmbeddedAuth reads the embedded server's password and refuses a
// listen address beyond loopback without one: the embedded server would
// otherwise let anyone who reaches it read, forge, purge or delete the
// stream.
func (c *Config) validateEmbeddedAuth(bad func(v, format string, a ...any)) {
	switch {
	case c.EmbeddedUser == "" && c.EmbeddedPassFile != "":
		bad("EMBEDDED_PASS_FILE", "is set without FLOWBUS_EMBEDDED_USER: set both, or neither")
	case c.EmbeddedUser != "" && c.EmbeddedPassFile == "":
		bad("EMBEDDED_USER", "is set without FLOWBUS_EMBEDDED_PASS_FILE: set both, or neither")
	case c.EmbeddedUser != "":
		if strings.ContainsAny(c.EmbeddedUser, " \t\r\n") || c.EmbeddedUser == embedded.SystemUser {
			bad("EMBEDDED_USER", "%q: use a name without spaces, other than %q (the system user)", c.EmbeddedUser, embedded.SystemUser)
		}
		if _, err := readEmbeddedPassword(c.EmbeddedPassFile); err != nil {
			bad("EMBEDDED_PASS_FILE", "%v", err)
		}
	}
	host, _, err := net.SplitHostPort(c.EmbeddedListen)
	if err == nil && !isLoopback(host) && c.EmbeddedUser == "" {
		bad("EMBEDDED_LISTEN", "%q is reachable beyond this host, and the embedded server has no login: anyone there could read, forge, purge or delete the stream. Set FLOWBUS_EMBEDDED_USER and FLOWBUS_EMBEDDED_PASS_FILE, or listen on 127.0.0.1", c.EmbeddedListen)
	}
}

// readEmbeddedPassword reads FLOWBUS_EMBEDDED_PASS_FILE, trimmed, and
// refuses a password short enough to guess.
func readEmbeddedPassword(file string) (string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("cannot be read: %v", err)
	}
	pw := strings.TrimSpace(string(b))
	if len(pw) < 12 {
		return "", fmt.Errorf("%s holds a password of %d characters: use at least 12 (e.g. openssl rand -hex 16 > %s)", file, len(pw), file)
	}
	return pw, nil
}

// isLoopback tells whether a listen host is reachable only from this host;
// an empty host means every interface.
func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// LoadConfig reads and validates the environment. All problems are reported
// at once, each naming its variable.
func LoadConfig(environ map[string]string) (Config, error) {
	var cfg Config
	var problems []string
	failed := map[string]bool{} // variables that did not parse are not validated again
	if err := env.ParseWithOptions(&cfg, env.Options{Prefix: EnvPrefix, Environment: environ}); err != nil {
		var agg env.AggregateError
		if errors.As(err, &agg) {
			for _, e := range agg.Errors {
				var pe env.ParseError
				if errors.As(e, &pe) {
					name := envName(pe.Name)
					failed[name] = true
					problems = append(problems, name+": "+parseProblem(environ[name], pe))
					continue
				}
				problems = append(problems, e.Error())
			}
		} else {
			problems = append(problems, err.Error())
		}
	}
	for _, p := range cfg.validate() {
		if name, _, _ := strings.Cut(p, ":"); !failed[name] {
			problems = append(problems, p)
		}
	}
	if len(problems) > 0 {
		return cfg, &ConfigError{Problems: problems}
	}
	return cfg, nil
}

// EnvPrefix starts the name of every flowbus environment variable.
const EnvPrefix = "FLOWBUS_"

// envName maps a Config field to its environment variable.
func envName(field string) string {
	if f, ok := reflect.TypeOf(Config{}).FieldByName(field); ok {
		return EnvPrefix + f.Tag.Get("env")
	}
	return field
}

// parseProblem says in words what a value that did not parse should look
// like: users set durations and numbers, not Go types.
func parseProblem(value string, pe env.ParseError) string {
	switch pe.Type {
	case reflect.TypeOf(time.Duration(0)):
		if _, err := strconv.ParseFloat(value, 64); err == nil {
			return fmt.Sprintf("%q has no unit: write a duration such as 100ms or 2s (units: ms, s, m, h)", value)
		}
		return fmt.Sprintf("%q is not a duration such as 100ms or 2s (units: ms, s, m, h)", value)
	case reflect.TypeOf(true):
		return fmt.Sprintf("%q must be true or false", value)
	}
	switch pe.Type.Kind() {
	case reflect.Int, reflect.Int64:
		if errors.Is(pe.Err, strconv.ErrRange) {
			return fmt.Sprintf("%q is out of range for a whole number", value)
		}
		return fmt.Sprintf("%q is not a whole number such as 4096 (digits only, no unit)", value)
	}
	return fmt.Sprintf("%q cannot be read", value)
}

// ConfigError lists every invalid setting.
type ConfigError struct{ Problems []string }

func (e *ConfigError) Error() string {
	n := "1 problem"
	if len(e.Problems) != 1 {
		n = fmt.Sprintf("%d problems", len(e.Problems))
	}
	return fmt.Sprintf("invalid configuration (%s):\n  - %s", n, strings.Join(e.Problems, "\n  - "))
}

// validate checks values and fills the defaults that depend on the host.
func (c *Config) validate() []string {
	var p []string
	bad := func(v, format string, a ...any) {
		p = append(p, "FLOWBUS_"+v+": "+fmt.Sprintf(format, a...))
	}
	if c.Host == "" {
		name, err := os.Hostname()
		if err != nil {
			name = ""
		}
		c.Host = schema.SanitizeHost(name)
	} else if err := schema.ValidateHostToken(c.Host); err != nil {
		bad("HOST", "%v", err)
	}
	if c.CgroupPath != "" {
		if msg := cgroupProblem(c.CgroupPath); msg != "" {
			bad("CGROUP_PATH", "%s", msg)
		}
	}
	if err := schema.ValidatePrefix(c.SubjectPrefix); err != nil {
		bad("SUBJECT_PREFIX", "%v", err)
	}
	if c.Stream == "" || strings.ContainsAny(c.Stream, ".*> \t") {
		bad("STREAM", "%q is not a valid stream name (no spaces, dots, * or >): use e.g. FLOWS", c.Stream)
	} else if err := schema.CheckReserved(c.Stream); err != nil {
		bad("STREAM", "%v", err)
	}
	if c.NATSURL == "" {
		if _, _, err := net.SplitHostPort(c.EmbeddedListen); err != nil {
			bad("EMBEDDED_LISTEN", "%q is not host:port (e.g. 127.0.0.1:4222)", c.EmbeddedListen)
		}
		if _, _, err := net.SplitHostPort(c.EmbeddedMonitor); c.EmbeddedMonitor != "" && err != nil {
			bad("EMBEDDED_MONITOR", "%q is not host:port (e.g. 127.0.0.1:8222); leave it empty for no monitoring port", c.EmbeddedMonitor)
		}
		if c.EmbeddedStoreDir == "" {
			c.EmbeddedStoreDir = filepath.Join(statedir.Dir(os.Getenv), "jetstream")
		}
		c.validateEmbeddedAuth(bad)
	} else {
		for _, u := range strings.Split(c.NATSURL, ",") {
			u = strings.TrimSpace(u)
			if u == "" || (strings.Contains(u, "://") && !strings.HasPrefix(u, "nats://") && !strings.HasPrefix(u, "tls://") && !strings.HasPrefix(u, "ws://") && !strings.HasPrefix(u, "wss://")) {
				bad("NATS_URL", "%q is not a NATS URL (e.g. nats://10.0.0.5:4222, comma-separated for a cluster)", u)
			}
		}
	}
	c.validateNATSAuth(bad)
	switch c.SpoolDir {
	case "":
		c.SpoolDir = filepath.Join(statedir.Dir(os.Getenv), "spool")
	case "off":
	default:
		if !filepath.IsAbs(c.SpoolDir) {
			bad("SPOOL_DIR", "%q must be an absolute path (or \"off\")", c.SpoolDir)
		}
	}
	switch c.RunStateFile {
	case "":
		c.RunStateFile = filepath.Join(statedir.Dir(os.Getenv), "run-"+c.Host+".state")
	case "off":
	default:
		if !filepath.IsAbs(c.RunStateFile) {
			bad("RUN_STATE_FILE", "%q must be an absolute path (or \"off\")", c.RunStateFile)
		}
	}
	if c.SpoolBytes < 1<<20 {
		bad("SPOOL_BYTES", "%d: must be at least 1048576", c.SpoolBytes)
	}
	switch c.StreamStorage {
	case "file", "memory":
	default:
		bad("STREAM_STORAGE", "%q: must be file or memory", c.StreamStorage)
	}
	if c.StreamReplicas < 1 || c.StreamReplicas > 5 {
		bad("STREAM_REPLICAS", "%d: must be 1 to 5", c.StreamReplicas)
	}
	if c.StreamMaxAge < 0 {
		bad("STREAM_MAX_AGE", "must not be negative (0 keeps messages forever)")
	}
	if c.StreamDuplicates <= 0 {
		bad("STREAM_DUPLICATES", "must be positive: it is the window in which retries are deduplicated")
	}
	if c.BatchMaxEvents < 1 || c.BatchMaxEvents > 1<<20 {
		bad("BATCH_MAX_EVENTS", "%d: must be 1 to 1048576", c.BatchMaxEvents)
	}
	if c.BatchMaxBytes < 1024 || c.BatchMaxBytes > 8<<20 {
		bad("BATCH_MAX_BYTES", "%d: must be 1024 to 8388608, and below the server's max_payload (1 MiB by default)", c.BatchMaxBytes)
	}
	if c.BatchLinger < time.Millisecond || c.BatchLinger > time.Minute {
		bad("BATCH_LINGER", "%v: must be 1ms to 1m", c.BatchLinger)
	}
	if c.QueueBytes < 4*c.BatchMaxBytes {
		bad("QUEUE_BYTES", "%d: must be at least 4 x FLOWBUS_BATCH_MAX_BYTES (%d)", c.QueueBytes, 4*c.BatchMaxBytes)
	}
	if c.MaxInflight < 1 || c.MaxInflight > 65536 {
		bad("MAX_INFLIGHT", "%d: must be 1 to 65536", c.MaxInflight)
	}
	if c.AckTimeout < 100*time.Millisecond {
		bad("ACK_TIMEOUT", "%v: must be at least 100ms", c.AckTimeout)
	}
	if c.RingbufBytes < 64<<10 || c.RingbufBytes&(c.RingbufBytes-1) != 0 || c.RingbufBytes > 1<<30 {
		bad("RINGBUF_BYTES", "%d: must be a power of two from 65536 to 1073741824", c.RingbufBytes)
	}
	if c.PollInterval < time.Millisecond || c.PollInterval > time.Second {
		bad("POLL_INTERVAL", "%v: must be 1ms to 1s", c.PollInterval)
	}
	if c.HalfOpenTimeout != 0 && (c.HalfOpenTimeout < time.Second || c.HalfOpenTimeout > time.Hour) {
		bad("HALF_OPEN_TIMEOUT", "%v: must be 1s to 1h (unset: the SYN-ACK retry window of net.ipv4.tcp_synack_retries, plus 2s)", c.HalfOpenTimeout)
	}
	c.validateFilter(bad)
	if c.DNSCacheEntries < 1 || c.DNSCacheEntries > 1<<24 {
		bad("DNS_CACHE_ENTRIES", "%d: must be 1 to 16777216", c.DNSCacheEntries)
	}
	if c.DNSCacheBytes < 64<<10 || c.DNSCacheBytes > 4<<30 {
		bad("DNS_CACHE_BYTES", "%d: must be 65536 to 4294967296", c.DNSCacheBytes)
	}
	if c.DNSMaxNames < 1 || c.DNSMaxNames > 64 {
		bad("DNS_MAX_NAMES", "%d: must be 1 to 64", c.DNSMaxNames)
	}
	if c.DNSMinTTL < 0 {
		bad("DNS_MIN_TTL", "must not be negative")
	}
	if c.DNSMaxTTL < c.DNSMinTTL || c.DNSMaxTTL <= 0 {
		bad("DNS_MAX_TTL", "%v: must be positive and at least FLOWBUS_DNS_MIN_TTL (%v)", c.DNSMaxTTL, c.DNSMinTTL)
	}
	if c.MetricsAddr != "" && c.MetricsAddr != "off" {
		if _, _, err := net.SplitHostPort(c.MetricsAddr); err != nil {
			bad("METRICS_ADDR", "%q is not host:port (or \"off\")", c.MetricsAddr)
		}
	}
	switch strings.ToLower(c.LogLevel) {
	case "debug", "info", "warn", "error":
	default:
		bad("LOG_LEVEL", "%q: must be debug, info, warn or error", c.LogLevel)
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		bad("LOG_FORMAT", "%q: must be text or json", c.LogFormat)
	}
	if c.ShutdownTimeout <= 0 {
		bad("SHUTDOWN_TIMEOUT", "must be positive")
	}
	return p
}

// validateFilter checks the FLOWBUS_FILTER_* variables, each on its own,
// so that every bad one is reported.
func (c *Config) validateFilter(bad func(v, format string, a ...any)) {
	switch c.FilterDirection {
	case "both", "incoming", "outgoing":
	default:
		bad("FILTER_DIRECTION", "%q: must be both, incoming or outgoing", c.FilterDirection)
	}
	for _, v := range []struct{ name, val string }{{"FILTER_PORTS", c.FilterPorts}, {"FILTER_SKIP_PORTS", c.FilterSkipPorts}} {
		if _, err := bpf.ParsePorts(v.val); err != nil {
			bad(v.name, "%v", err)
		}
	}
	for _, v := range []struct{ name, val string }{{"FILTER_CIDRS", c.FilterCIDRs}, {"FILTER_SKIP_CIDRS", c.FilterSkipCIDRs}} {
		if ps, err := bpf.ParseCIDRs(v.val); err != nil {
			bad(v.name, "%v", err)
		} else if len(ps) > bpf.MaxFilterCIDRs {
			bad(v.name, "%d prefixes: at most %d; merge neighbours into shorter prefixes", len(ps), bpf.MaxFilterCIDRs)
		}
	}
	comms := 0
	for _, v := range []struct{ name, val string }{{"FILTER_COMMS", c.FilterComms}, {"FILTER_SKIP_COMMS", c.FilterSkipComms}} {
		if cs, err := bpf.ParseComms(v.val); err != nil {
			bad(v.name, "%v", err)
		} else {
			comms += len(cs)
		}
	}
	if comms > bpf.MaxFilterComms {
		bad("FILTER_COMMS", "%d command names in FLOWBUS_FILTER_COMMS and FLOWBUS_FILTER_SKIP_COMMS: at most %d together", comms, bpf.MaxFilterComms)
	}
}

// Filter is the kernel filter the FLOWBUS_FILTER_* variables describe, with
// the agent's own connections excluded; the configuration must have been
// validated (LoadConfig).
func (c *Config) Filter() bpf.Filter {
	f := bpf.Filter{ExcludeSelf: true}
	if c.FilterDirection != "both" {
		f.Direction = c.FilterDirection
	}
	f.Ports, _ = bpf.ParsePorts(c.FilterPorts)
	f.ExcludePorts, _ = bpf.ParsePorts(c.FilterSkipPorts)
	f.CIDRs, _ = bpf.ParseCIDRs(c.FilterCIDRs)
	f.ExcludeCIDRs, _ = bpf.ParseCIDRs(c.FilterSkipCIDRs)
	f.Comms, _ = bpf.ParseComms(c.FilterComms)
	f.ExcludeComms, _ = bpf.ParseComms(c.FilterSkipComms)
	return f
}

// cgroupProblem checks FLOWBUS_CGROUP_PATH with the other settings, so that
// a wrong path is reported with them (exit status 2) instead of when the
// programs load. It needs no privileges: stat and statfs only.
func cgroupProblem(path string) string {
	st, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Sprintf("%s does not exist: %s", path, cgroupHint())
	case err != nil:
		return fmt.Sprintf("%s cannot be checked (%v): %s", path, err, cgroupHint())
	case !st.IsDir():
		return fmt.Sprintf("%s is not a directory, and a cgroup is one: %s", path, cgroupHint())
	}
	// A directory: the same check the programs' loader makes, so that the
	// two cannot disagree.
	if err := cgroupv2.CheckDir(path); err != nil {
		// Hybrid hosts mount v2 beside the v1 controllers: say where.
		if root, rerr := cgroupv2.DetectRoot(); rerr == nil {
			return fmt.Sprintf("%v (this host's cgroup v2 root is %s)", err, root)
		}
		return err.Error()
	}
	return ""
}

// cgroupHint says where the cgroups of this host are and how to find one.
func cgroupHint() string {
	root, err := cgroupv2.DetectRoot()
	if err != nil {
		return "this host has no cgroup v2 file system mounted, and the agent needs one (mount -t cgroup2 none /sys/fs/cgroup/unified)"
	}
	return fmt.Sprintf("set it to a directory under the cgroup v2 root %s (list them with systemd-cgls or find %s -type d; "+
		"a process's cgroup is that root joined with the path in /proc/<pid>/cgroup), or leave it empty to watch the whole host", root, root)
}

// validateNATSAuth checks the TLS and credential settings: files must be
// readable, and one way to authenticate at most.
func (c *Config) validateNATSAuth(bad func(v, format string, a ...any)) {
	set := map[string]string{"NATS_CA": c.NATSCA, "NATS_CERT": c.NATSCert, "NATS_KEY": c.NATSKey,
		"NATS_CREDS": c.NATSCreds, "NATS_NKEY": c.NATSNKey, "NATS_USER": c.NATSUser, "NATS_PASSWORD": c.NATSPassword, "NATS_TOKEN": c.NATSToken}
	if c.NATSURL == "" {
		for _, v := range []string{"NATS_CA", "NATS_CERT", "NATS_KEY", "NATS_CREDS", "NATS_NKEY", "NATS_USER", "NATS_PASSWORD", "NATS_TOKEN"} {
			if set[v] != "" {
				bad(v, "is set but FLOWBUS_NATS_URL is empty: the embedded server needs no TLS or credentials; set FLOWBUS_NATS_URL or unset it")
			}
		}
		return
	}
	for _, v := range []string{"NATS_CA", "NATS_CERT", "NATS_KEY", "NATS_CREDS", "NATS_NKEY"} {
		if f := set[v]; f != "" {
			if fh, err := os.Open(f); err != nil {
				bad(v, "cannot read %s: %v", f, err)
			} else {
				fh.Close()
			}
		}
	}
	if (c.NATSCert == "") != (c.NATSKey == "") {
		bad("NATS_CERT", "FLOWBUS_NATS_CERT and FLOWBUS_NATS_KEY go together (client certificate and its key)")
	}
	if (c.NATSUser == "") != (c.NATSPassword == "") {
		bad("NATS_USER", "FLOWBUS_NATS_USER and FLOWBUS_NATS_PASSWORD go together")
	}
	methods := 0
	for _, on := range []bool{c.NATSCreds != "", c.NATSNKey != "", c.NATSUser != "", c.NATSToken != ""} {
		if on {
			methods++
		}
	}
	if methods > 1 {
		bad("NATS_CREDS", "set one way to authenticate: FLOWBUS_NATS_CREDS, FLOWBUS_NATS_NKEY, FLOWBUS_NATS_USER/PASSWORD or FLOWBUS_NATS_TOKEN")
	}
}

// otherVariables are the FLOWBUS_* variables that the rest of flowbus reads:
// the consumers, the deployment files and the tests. They are known, so
// setting them for the agent too (one environment for all) draws no warning.
var otherVariables = []string{
	"FLOWBUS_DB",                       // flowstat: its database
	"FLOWBUS_FLOWSTAT_CONSUMER",        // flowstat run
	"FLOWBUS_FLOWSTAT_FILTER",          // flowstat run
	"FLOWBUS_FLOWSTAT_START",           // flowstat run
	"FLOWBUS_FLOWSTAT_BUCKET",          // flowstat run
	"FLOWBUS_FLOWSTAT_DEADLETTER",      // flowstat run
	"FLOWBUS_STAT_METRICS_ADDR",        // flowstat run: its metrics endpoint
	"FLOWBUS_HOST_CGROUP2",             // docker-compose.yml: the host's cgroup v2 mount
	"FLOWBUS_CONSUMER_PASSWORD_BCRYPT", // deploy/nats: NATS server accounts
	"FLOWBUS_ADMIN_PASSWORD_BCRYPT",    // deploy/nats: NATS server accounts
	"FLOWBUS_DEMO_LOG",                 // deploy/run-demo.sh
	"FLOWBUS_DEMO_WEB",                 // deploy/run-demo.sh: flowstat beside the agent
	"FLOWBUS_DEMO_WEB_LISTEN",          // deploy/run-demo.sh
	"FLOWBUS_DEMO_STAT_LOG",            // deploy/run-demo.sh
	"FLOWBUS_VERSION",                  // docker-compose.yml: the image version to build and tag
	"FLOWBUS_DEPLOY_STRICT",            // deploy tests
	"FLOWBUS_REQUIRE_PRIVILEGED",       // tests: fail instead of skip without root
	"FLOWBUS_REQUIRE_POSTGRES",         // tests: fail instead of skip without PostgreSQL
	"FLOWBUS_PG_BIN",                   // tests: where PostgreSQL's binaries are
	"FLOWBUS_TEST_HELPER",              // tests: a re-executed test binary's role
}

// KnownVariables are every FLOWBUS_* variable a flowbus program reads.
func KnownVariables() map[string]bool {
	known := map[string]bool{}
	t := reflect.TypeOf(Config{})
	for i := 0; i < t.NumField(); i++ {
		known[EnvPrefix+t.Field(i).Tag.Get("env")] = true
	}
	for _, v := range otherVariables {
		known[v] = true
	}
	return known
}

// UnknownVariables returns one warning for every FLOWBUS_* variable of
// environ that no flowbus program reads, naming the closest known ones: a
// misspelt setting would otherwise be ignored without a word.
func UnknownVariables(environ map[string]string) []string {
	known := KnownVariables()
	names := make([]string, 0, len(known))
	for k := range known {
		names = append(names, k)
	}
	sort.Strings(names)
	var warnings []string
	for k := range environ {
		upper := strings.ToUpper(k)
		if !strings.HasPrefix(upper, EnvPrefix) || known[k] {
			continue
		}
		if known[upper] {
			warnings = append(warnings, fmt.Sprintf("%s is ignored: variable names are case-sensitive; did you mean %s?", k, upper))
			continue
		}
		w := k + " is not a flowbus setting and is ignored"
		if s := suggest(upper, names); len(s) > 0 {
			w += "; did you mean " + strings.Join(s, " or ") + "?"
		} else {
			w += " (flowagent --help lists the settings)"
		}
		warnings = append(warnings, w)
	}
	sort.Strings(warnings)
	return warnings
}

// suggest returns the known names closest to name: those at the smallest
// edit distance if it is small for the name's length, else those that hold
// every word of name (LINGER: BATCH_LINGER). More than three
// equally close names are no useful hint, so then it returns none.
func suggest(name string, known []string) []string {
	tail := strings.TrimPrefix(name, EnvPrefix)
	limit := 1
	switch {
	case len(tail) > 8:
		limit = 3
	case len(tail) > 4:
		limit = 2
	}
	var best []string
	bestD := limit + 1
	for _, k := range known {
		d := editDistance(tail, strings.TrimPrefix(k, EnvPrefix))
		switch {
		case d < bestD:
			best, bestD = []string{k}, d
		case d == bestD:
			best = append(best, k)
		}
	}
	if len(best) == 0 {
		words := strings.Split(tail, "_")
		fewest := -1
		for _, k := range known {
			kw := strings.Split(strings.TrimPrefix(k, EnvPrefix), "_")
			if !containsAll(kw, words) {
				continue
			}
			switch extra := len(kw) - len(words); {
			case fewest < 0 || extra < fewest:
				best, fewest = []string{k}, extra
			case extra == fewest:
				best = append(best, k)
			}
		}
	}
	if len(best) > 3 {
		return nil
	}
	return best
}

func containsAll(set, words []string) bool {
	for _, w := range words {
		if w != "" && !slices.Contains(set, w) {
			return false
		}
	}
	return true
}

// editDistance is the number of single-character insertions, deletions,
// substitutions and swaps of neighbours that turn a into b (the optimal
// string alignment distance): a swap is one typo, not two.
func editDistance(a, b string) int {
	prev2 := make([]int, len(b)+1)
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				cur[j] = min(cur[j], prev2[j-2]+1)
			}
		}
		prev2, prev, cur = prev, cur, prev2
	}
	return prev[len(b)]
}

// HelpText is flowagent --help. The variables, defaults and meanings come
// from Config's struct tags, so the list cannot drift from what is read.
func HelpText() string {
	var b strings.Builder
	b.WriteString(`flowagent reports every TCP connection that begins on a cgroup
(net_flow_tcp_begin), and its end (net_flow_tcp_end), to NATS JetStream.

Usage:
  flowagent             run the agent
  flowagent --version   print its version and the embedded nats-server's, exit
  flowagent --help      print this help, exit
  flowagent probe       exit 0 if the agent at FLOWBUS_METRICS_ADDR is ready
                        (its /readyz), else 1 with the failing check: the
                        container's health check

It takes no other arguments: every setting is an environment variable. Invalid
settings are all reported at once, and the agent exits with status 2; a
FLOWBUS_* variable that no flowbus program reads is reported as a warning.

Settings, each with its default and meaning:
`)
	t := reflect.TypeOf(Config{})
	width := 0
	for i := 0; i < t.NumField(); i++ {
		width = max(width, len(EnvPrefix+t.Field(i).Tag.Get("env")))
	}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		// The meaning has a line of its own, so that the page fits 80 columns.
		fmt.Fprintf(&b, "  %-*s  default: %s\n      %s\n", width, EnvPrefix+f.Tag.Get("env"), helpDefault(f), f.Tag.Get("help"))
	}
	b.WriteString(`
<state dir> is $STATE_DIRECTORY (set by systemd), else $XDG_STATE_HOME/flowbus,
else /var/lib/flowbus for root and ~/.local/state/flowbus for other users.
More in README.md, section Configuration.
`)
	return b.String()
}

// helpDefault is the default --help shows for a field: envDefault, else the
// helpDefault tag of a default the agent works out at start, else "unset".
func helpDefault(f reflect.StructField) string {
	if d := f.Tag.Get("envDefault"); d != "" {
		return d
	}
	if d := f.Tag.Get("helpDefault"); d != "" {
		return d
	}
	return "unset"
}
