package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"time"

	"github.com/caarlos0/env/v10"

	"github.com/flowbus/flowbus/schema"
)

// Config is the agent's configuration, read from FLOWBUS_* variables. Every
// field is documented in the README with its default.
type Config struct {
	NATSURL          string        `env:"NATS_URL"`
	NATSCA           string        `env:"NATS_CA"`
	NATSCert         string        `env:"NATS_CERT"`
	NATSKey          string        `env:"NATS_KEY"`
	NATSCreds        string        `env:"NATS_CREDS"`
	NATSNKey         string        `env:"NATS_NKEY"`
	NATSUser         string        `env:"NATS_USER"`
	NATSPassword     string        `env:"NATS_PASSWORD"`
	NATSToken        string        `env:"NATS_TOKEN"`
	EmbeddedListen   string        `env:"EMBEDDED_LISTEN" envDefault:"127.0.0.1:4222"`
	EmbeddedStoreDir string        `env:"EMBEDDED_STORE_DIR"`
	CgroupPath       string        `env:"CGROUP_PATH"`
	Host             string        `env:"HOST"`
	SubjectPrefix    string        `env:"SUBJECT_PREFIX" envDefault:"flows"`
	Stream           string        `env:"STREAM" envDefault:"FLOWS"`
	ManageStream     bool          `env:"MANAGE_STREAM" envDefault:"true"`
	StreamMaxAge     time.Duration `env:"STREAM_MAX_AGE" envDefault:"24h"`
	StreamMaxBytes   int64         `env:"STREAM_MAX_BYTES" envDefault:"1073741824"`
	StreamReplicas   int           `env:"STREAM_REPLICAS" envDefault:"1"`
	StreamStorage    string        `env:"STREAM_STORAGE" envDefault:"file"`
	StreamDuplicates time.Duration `env:"STREAM_DUPLICATES" envDefault:"2m"`
	BatchMaxEvents   int           `env:"BATCH_MAX_EVENTS" envDefault:"4096"`
	BatchMaxBytes    int           `env:"BATCH_MAX_BYTES" envDefault:"65536"`
	BatchLinger      time.Duration `env:"BATCH_LINGER" envDefault:"100ms"`
	QueueBytes       int           `env:"QUEUE_BYTES" envDefault:"33554432"`
	MaxInflight      int           `env:"MAX_INFLIGHT" envDefault:"256"`
	AckTimeout       time.Duration `env:"ACK_TIMEOUT" envDefault:"5s"`
	SpoolDir         string        `env:"SPOOL_DIR"`
	SpoolBytes       int64         `env:"SPOOL_BYTES" envDefault:"268435456"`
	RingbufBytes     int           `env:"RINGBUF_BYTES" envDefault:"4194304"`
	PollInterval     time.Duration `env:"POLL_INTERVAL" envDefault:"20ms"`
	DNSCacheEntries  int           `env:"DNS_CACHE_ENTRIES" envDefault:"65536"`
	DNSMaxNames      int           `env:"DNS_MAX_NAMES" envDefault:"8"`
	DNSMinTTL        time.Duration `env:"DNS_MIN_TTL" envDefault:"60s"`
	DNSMaxTTL        time.Duration `env:"DNS_MAX_TTL" envDefault:"6h"`
	MetricsAddr      string        `env:"METRICS_ADDR" envDefault:"127.0.0.1:9464"`
	LogLevel         string        `env:"LOG_LEVEL" envDefault:"info"`
	LogFormat        string        `env:"LOG_FORMAT" envDefault:"text"`
	ShutdownTimeout  time.Duration `env:"SHUTDOWN_TIMEOUT" envDefault:"10s"`
}

// LoadConfig reads and validates the environment. All problems are reported
// at once, each naming its variable.
func LoadConfig(environ map[string]string) (Config, error) {
	var cfg Config
	var problems []string
	failed := map[string]bool{} // variables that did not parse are not validated again
	if err := env.ParseWithOptions(&cfg, env.Options{Prefix: "FLOWBUS_", Environment: environ}); err != nil {
		var agg env.AggregateError
		if errors.As(err, &agg) {
			for _, e := range agg.Errors {
				var pe env.ParseError
				if errors.As(e, &pe) {
					name := envName(pe.Name)
					failed[name] = true
					problems = append(problems, fmt.Sprintf("%s: %q is not a valid %s%s", name, environ[name], pe.Type, example(pe.Type)))
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

// envName maps a Config field to its environment variable.
func envName(field string) string {
	if f, ok := reflect.TypeOf(Config{}).FieldByName(field); ok {
		return "FLOWBUS_" + f.Tag.Get("env")
	}
	return field
}

func example(t reflect.Type) string {
	switch t {
	case reflect.TypeOf(time.Duration(0)):
		return " (e.g. 100ms, 5s, 24h)"
	case reflect.TypeOf(true):
		return " (true or false)"
	}
	return ""
}

// ConfigError lists every invalid setting.
type ConfigError struct{ Problems []string }

func (e *ConfigError) Error() string {
	return fmt.Sprintf("invalid configuration (%d problems):\n  - %s", len(e.Problems), strings.Join(e.Problems, "\n  - "))
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
	if err := schema.ValidatePrefix(c.SubjectPrefix); err != nil {
		bad("SUBJECT_PREFIX", "%v", err)
	}
	if c.Stream == "" || strings.ContainsAny(c.Stream, ".*> \t") {
		bad("STREAM", "%q is not a valid stream name (no spaces, dots, * or >): use e.g. FLOWS", c.Stream)
	}
	if c.NATSURL == "" {
		if _, _, err := net.SplitHostPort(c.EmbeddedListen); err != nil {
			bad("EMBEDDED_LISTEN", "%q is not host:port (e.g. 127.0.0.1:4222)", c.EmbeddedListen)
		}
		if c.EmbeddedStoreDir == "" {
			c.EmbeddedStoreDir = filepath.Join(StateDir(), "jetstream")
		}
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
		c.SpoolDir = filepath.Join(StateDir(), "spool")
	case "off":
	default:
		if !filepath.IsAbs(c.SpoolDir) {
			bad("SPOOL_DIR", "%q must be an absolute path (or \"off\")", c.SpoolDir)
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
	if c.DNSCacheEntries < 1 || c.DNSCacheEntries > 1<<24 {
		bad("DNS_CACHE_ENTRIES", "%d: must be 1 to 16777216", c.DNSCacheEntries)
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

// StateDir is where flowbus keeps state by default: $STATE_DIRECTORY under
// systemd, else $XDG_STATE_HOME/flowbus, else ~/.local/state/flowbus (root:
// /var/lib/flowbus).
func StateDir() string {
	if d := os.Getenv("STATE_DIRECTORY"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "flowbus")
	}
	if os.Geteuid() == 0 {
		return "/var/lib/flowbus"
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".local", "state", "flowbus")
	}
	return filepath.Join(os.TempDir(), "flowbus")
}
