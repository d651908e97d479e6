package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/bpf/cgroupv2"
	"github.com/flowbus/flowbus/internal/redact"
)

func TestConfigDefaults(t *testing.T) {
	cfg, err := LoadConfig(map[string]string{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.NATSURL != "" || cfg.EmbeddedListen != "127.0.0.1:4222" || cfg.SubjectPrefix != "flows" || cfg.Stream != "FLOWS" ||
		cfg.MetricsAddr != "127.0.0.1:9464" || cfg.BatchLinger != 100*time.Millisecond || cfg.EmbeddedStoreDir == "" ||
		cfg.DNSCacheBytes != 8<<20 {
		t.Errorf("defaults: %+v", cfg)
	}
	if cfg.Host == "" || strings.ContainsAny(cfg.Host, ". ABCDEFGHIJKLMNOPQRSTUVWXYZ") {
		t.Errorf("default host %q is not a sanitized token", cfg.Host)
	}
}

// Every problem is reported at once, each naming its variable.
func TestConfigReportsAllProblems(t *testing.T) {
	_, err := LoadConfig(map[string]string{
		"FLOWBUS_HOST":             "Web.01",
		"FLOWBUS_SUBJECT_PREFIX":   "flows.*",
		"FLOWBUS_BATCH_LINGER":     "soon",
		"FLOWBUS_BATCH_MAX_EVENTS": "0",
		"FLOWBUS_STREAM_STORAGE":   "tape",
		"FLOWBUS_RINGBUF_BYTES":    "1000",
		"FLOWBUS_EMBEDDED_LISTEN":  "4222",
		"FLOWBUS_LOG_LEVEL":        "loud",
		"FLOWBUS_DNS_CACHE_BYTES":  "4096",
	})
	var ce *ConfigError
	if !errors.As(err, &ce) {
		t.Fatalf("want a ConfigError, got %v", err)
	}
	msg := err.Error()
	for _, v := range []string{"FLOWBUS_HOST", "FLOWBUS_SUBJECT_PREFIX", "FLOWBUS_BATCH_LINGER", "FLOWBUS_BATCH_MAX_EVENTS",
		"FLOWBUS_STREAM_STORAGE", "FLOWBUS_RINGBUF_BYTES", "FLOWBUS_EMBEDDED_LISTEN", "FLOWBUS_LOG_LEVEL", "FLOWBUS_DNS_CACHE_BYTES"} {
		if !strings.Contains(msg, v) {
			t.Errorf("error does not name %s:\n%s", v, msg)
		}
	}
	if len(ce.Problems) != 9 {
		t.Errorf("got %d problems, want 9:\n%s", len(ce.Problems), msg)
	}
	// The host problem suggests the fix.
	if !strings.Contains(msg, `"web-01"`) {
		t.Errorf("host error does not suggest the sanitized token:\n%s", msg)
	}
}

func TestConfigRemoteURLs(t *testing.T) {
	if _, err := LoadConfig(map[string]string{"FLOWBUS_NATS_URL": "nats://a:4222, nats://b:4222"}); err != nil {
		t.Errorf("cluster URLs rejected: %v", err)
	}
	if _, err := LoadConfig(map[string]string{"FLOWBUS_NATS_URL": "http://a:4222"}); err == nil || !strings.Contains(err.Error(), "FLOWBUS_NATS_URL") {
		t.Errorf("http URL accepted: %v", err)
	}
}

func TestRedactURL(t *testing.T) {
	if got := redact.List("nats://user:secret@host:4222"); strings.Contains(got, "secret") {
		t.Errorf("secret in %q", got)
	}
}

// Values that do not parse are described in words, never by Go type.
func TestConfigParseErrorsInWords(t *testing.T) {
	for _, c := range []struct{ name, value, want string }{
		{"FLOWBUS_BATCH_LINGER", "abc", `"abc" is not a duration such as 100ms or 2s`},
		{"FLOWBUS_ACK_TIMEOUT", "5", `"5" has no unit: write a duration such as 100ms or 2s`},
		{"FLOWBUS_BATCH_MAX_EVENTS", "4k", `"4k" is not a whole number such as 4096`},
		{"FLOWBUS_STREAM_MAX_BYTES", "1.5", `"1.5" is not a whole number such as 4096`},
		{"FLOWBUS_QUEUE_BYTES", "99999999999999999999", `"99999999999999999999" is out of range for a whole number`},
		{"FLOWBUS_MANAGE_STREAM", "yes", `"yes" must be true or false`},
	} {
		_, err := LoadConfig(map[string]string{c.name: c.value})
		var ce *ConfigError
		if !errors.As(err, &ce) || len(ce.Problems) != 1 {
			t.Errorf("%s=%s: want exactly one problem, got %v", c.name, c.value, err)
			continue
		}
		if p := ce.Problems[0]; p != c.name+": "+c.want && !strings.HasPrefix(p, c.name+": "+c.want+" ") {
			t.Errorf("%s=%s:\n got %q\nwant %q", c.name, c.value, p, c.name+": "+c.want)
		}
		for _, goism := range []string{"time.Duration", "int64", "int ", "bool", "strconv", "parse error", "field"} {
			if strings.Contains(err.Error(), goism) {
				t.Errorf("%s=%s: message names %q: %v", c.name, c.value, goism, err)
			}
		}
	}
}

// parseProblem has words for the type of every setting; a new type would
// need its own (env's own messages name Go types).
func TestConfigFieldTypesHaveWords(t *testing.T) {
	ct := reflect.TypeOf(Config{})
	for i := 0; i < ct.NumField(); i++ {
		switch f := ct.Field(i); f.Type.Kind() {
		case reflect.String, reflect.Bool, reflect.Int, reflect.Int64:
		default:
			t.Errorf("Config.%s is a %s: teach parseProblem to describe it", f.Name, f.Type)
		}
	}
}

// A wrong FLOWBUS_CGROUP_PATH is a configuration problem like the others,
// found without privileges, with a message for each way it can be wrong.
func TestConfigCgroupPath(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ path, want string }{
		{filepath.Join(dir, "missing"), "does not exist: "},
		{file, "is not a directory"},
		{"/etc/passwd", "is not a directory"},
		{dir, "not on a cgroup v2 file system (it may be a v1 controller)"},
	} {
		_, err := LoadConfig(map[string]string{"FLOWBUS_CGROUP_PATH": c.path, "FLOWBUS_LOG_LEVEL": "loud"})
		var ce *ConfigError
		if !errors.As(err, &ce) || len(ce.Problems) != 2 {
			t.Errorf("%s: want the cgroup and the log level problems together, got %v", c.path, err)
			continue
		}
		if p := ce.Problems[0]; !strings.HasPrefix(p, "FLOWBUS_CGROUP_PATH: ") || !strings.Contains(p, c.path+" ") || !strings.Contains(p, c.want) {
			t.Errorf("%s: got %q, want it to name the variable, the path and %q", c.path, p, c.want)
		}
	}
	if _, err := LoadConfig(map[string]string{"FLOWBUS_CGROUP_PATH": "/etc/passwd"}); err == nil || !strings.HasPrefix(err.Error(), "invalid configuration (1 problem):\n  - FLOWBUS_CGROUP_PATH: /etc/passwd is not a directory") {
		t.Errorf("one problem: %v", err)
	}
	root, err := cgroupv2.DetectRoot()
	if err != nil {
		t.Skipf("no cgroup v2 hierarchy here to check the good case: %v", err)
	}
	// A missing path tells where the cgroups are and how to list them.
	_, err = LoadConfig(map[string]string{"FLOWBUS_CGROUP_PATH": filepath.Join(root, "no-such-cgroup-flowbus")})
	if err == nil || !strings.Contains(err.Error(), "find "+root+" -type d") || !strings.Contains(err.Error(), "/proc/<pid>/cgroup") {
		t.Errorf("missing cgroup: no hint how to list the cgroups: %v", err)
	}
	_, err = LoadConfig(map[string]string{"FLOWBUS_CGROUP_PATH": t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "this host's cgroup v2 root is "+root) {
		t.Errorf("a directory off cgroup v2: the root is not named: %v", err)
	}
	if _, err := LoadConfig(map[string]string{"FLOWBUS_CGROUP_PATH": root}); err != nil {
		t.Errorf("the cgroup v2 root %s is refused: %v", root, err)
	}
}

// The README's table documents every variable with the default of the code.
func TestConfigREADMEDocumentsEveryVariable(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, _ := strings.Cut(string(readme), "\n## Configuration\n")
	section, _, _ = strings.Cut(section, "\n## ")
	rows := map[string]string{}
	for _, l := range strings.Split(section, "\n") {
		if !strings.HasPrefix(l, "| `FLOWBUS_") {
			continue
		}
		cells := strings.Split(l, "|")
		for _, m := range regexp.MustCompile("`(FLOWBUS_[A-Z0-9_]+)`").FindAllStringSubmatch(cells[1], -1) {
			rows[m[1]] = strings.TrimSpace(cells[2])
		}
	}
	ct := reflect.TypeOf(Config{})
	for i := 0; i < ct.NumField(); i++ {
		f := ct.Field(i)
		name := "FLOWBUS_" + f.Tag.Get("env")
		def, ok := rows[name]
		if !ok {
			t.Errorf("README.md, Configuration: no row for %s", name)
			continue
		}
		if d := f.Tag.Get("envDefault"); d != "" && def != "`"+d+"`" {
			t.Errorf("README.md: %s defaults to %s, the code to `%s`", name, def, d)
		}
	}
}

func TestUnknownVariables(t *testing.T) {
	got := UnknownVariables(map[string]string{
		"FLOWBUS_BATCH_LINGERR": "1s",     // one letter too many
		"FLOWBUS_HOTS":          "web-01", // two letters swapped
		"FLOWBUS_LINGER":        "1s",     // a word missing
		"FLOWBUS_MAX_BYTES":     "1",      // two settings fit
		"FLOWBUS_ZZZ":           "1",      // nothing near
		"flowbus_stream":        "X",      // wrong case
		// Known: the agent's, the consumers', the tests' and the deployment's.
		"FLOWBUS_BATCH_LINGER": "1s", "FLOWBUS_DB": "x.db", "FLOWBUS_NATS_URL": "nats://a", "FLOWBUS_STAT_METRICS_ADDR": ":1",
		"FLOWBUS_FLOWSTAT_FILTER": "flows.>", "FLOWBUS_REQUIRE_PRIVILEGED": "1", "FLOWBUS_REQUIRE_POSTGRES": "1",
		"FLOWBUS_DEMO_LOG": "/tmp/x", "FLOWBUS_HOST_CGROUP2": "/sys/fs/cgroup",
		"PATH": "/bin", "XFLOWBUS_HOST": "x", // not ours
	})
	want := []string{
		"FLOWBUS_BATCH_LINGERR is not a flowbus setting and is ignored; did you mean FLOWBUS_BATCH_LINGER?",
		"FLOWBUS_HOTS is not a flowbus setting and is ignored; did you mean FLOWBUS_HOST?",
		"FLOWBUS_LINGER is not a flowbus setting and is ignored; did you mean FLOWBUS_BATCH_LINGER?",
		"FLOWBUS_MAX_BYTES is not a flowbus setting and is ignored; did you mean FLOWBUS_BATCH_MAX_BYTES or FLOWBUS_STREAM_MAX_BYTES?",
		"FLOWBUS_ZZZ is not a flowbus setting and is ignored (flowagent --help lists the settings)",
		"flowbus_stream is ignored: variable names are case-sensitive; did you mean FLOWBUS_STREAM?",
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}

// The warnings of a valid configuration go to the log.
func TestUnknownVariablesLogged(t *testing.T) {
	var buf bytes.Buffer
	cfg, err := LoadConfig(map[string]string{"FLOWBUS_LOG_FORMAT": "json", "FLOWBUS_BATCH_LINGERR": "1s"})
	if err != nil {
		t.Fatal(err)
	}
	WarnUnknown(NewLogger(cfg, &buf), UnknownVariables(map[string]string{"FLOWBUS_BATCH_LINGERR": "1s"}))
	var rec struct{ Level, Msg string }
	if err := json.Unmarshal(buf.Bytes(), &rec); err != nil {
		t.Fatalf("log %q: %v", buf.String(), err)
	}
	if rec.Level != "WARN" || !strings.Contains(rec.Msg, "did you mean FLOWBUS_BATCH_LINGER?") {
		t.Errorf("log record %+v", rec)
	}
}

// Every FLOWBUS_* name anywhere in the repository (code, scripts,
// deployment files, docs) is a known variable, so none draws a warning.
func TestUnknownVariablesKnowsTheRepository(t *testing.T) {
	known := KnownVariables()
	name := regexp.MustCompile(`\bFLOWBUS_[A-Z0-9]+(?:_[A-Z0-9]+)*\b`)
	seen := 0
	err := filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if n := d.Name(); n == ".git" || n == "bin" || n == "node_modules" {
				return filepath.SkipDir
			}
			return nil
		}
		// Tests may set names no program reads on purpose.
		if strings.HasSuffix(path, "_test.go") || !d.Type().IsRegular() {
			return nil
		}
		if info, err := d.Info(); err != nil || info.Size() > 4<<20 {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, v := range name.FindAllString(string(b), -1) {
			seen++
			if !known[v] {
				t.Errorf("%s names %s, which the agent would warn about: add it to otherVariables in agent/config.go", path, v)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen < 100 {
		t.Errorf("found only %d FLOWBUS_* names in the repository: is the walk broken?", seen)
	}
}

// A prefix or stream name that NATS reserves ('$...', _INBOX...) is refused: under _INBOX the stream
// would store every consumer delivery again, in a loop.
func TestConfigReservedNames(t *testing.T) {
	for _, c := range []struct{ v, val string }{
		{"FLOWBUS_SUBJECT_PREFIX", "_INBOX"},
		{"FLOWBUS_SUBJECT_PREFIX", "_INBOX.flows"},
		{"FLOWBUS_SUBJECT_PREFIX", "$JS"},
		{"FLOWBUS_SUBJECT_PREFIX", "$SYS.flows"},
		{"FLOWBUS_STREAM", "$G"},
		{"FLOWBUS_STREAM", "$KV"},
		{"FLOWBUS_STREAM", "_INBOX"},
	} {
		_, err := LoadConfig(map[string]string{c.v: c.val})
		var ce *ConfigError
		if !errors.As(err, &ce) || len(ce.Problems) != 1 || !strings.Contains(err.Error(), c.v+":") || !strings.Contains(err.Error(), "reserves") {
			t.Errorf("%s=%s: %v, want one problem naming it as reserved", c.v, c.val, err)
		}
	}
	if _, err := LoadConfig(map[string]string{"FLOWBUS_SUBJECT_PREFIX": "inbox.flows", "FLOWBUS_STREAM": "INBOX_FLOWS"}); err != nil {
		t.Errorf("ordinary names refused: %v", err)
	}
}

// The embedded server listens beyond loopback only with a login: without
// one, anyone reaching it could read, forge, purge or delete the stream.
func TestConfigEmbeddedLoginBeyondLoopback(t *testing.T) {
	for _, l := range []string{"127.0.0.1:4222", "[::1]:4222", "localhost:0"} {
		if _, err := LoadConfig(map[string]string{"FLOWBUS_EMBEDDED_LISTEN": l}); err != nil {
			t.Errorf("%s: %v", l, err)
		}
	}
	for _, l := range []string{"0.0.0.0:4222", ":4222", "[::]:4222", "10.1.2.3:0"} {
		_, err := LoadConfig(map[string]string{"FLOWBUS_EMBEDDED_LISTEN": l})
		if err == nil || !strings.Contains(err.Error(), "FLOWBUS_EMBEDDED_LISTEN") || !strings.Contains(err.Error(), "FLOWBUS_EMBEDDED_USER and FLOWBUS_EMBEDDED_PASS_FILE") {
			t.Errorf("%s without a login: %v, want a refusal saying how to set one", l, err)
		}
	}
	pwFile := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pwFile, []byte("0123456789abcdef\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := LoadConfig(map[string]string{"FLOWBUS_EMBEDDED_LISTEN": "0.0.0.0:0", "FLOWBUS_EMBEDDED_USER": "flows", "FLOWBUS_EMBEDDED_PASS_FILE": pwFile})
	if err != nil || cfg.EmbeddedUser != "flows" {
		t.Errorf("with a login: %v", err)
	}
	short := filepath.Join(t.TempDir(), "short")
	if err := os.WriteFile(short, []byte("abc\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]struct {
		env  map[string]string
		want string
	}{
		"user alone":     {map[string]string{"FLOWBUS_EMBEDDED_USER": "flows"}, "FLOWBUS_EMBEDDED_USER: is set without FLOWBUS_EMBEDDED_PASS_FILE"},
		"file alone":     {map[string]string{"FLOWBUS_EMBEDDED_PASS_FILE": pwFile}, "FLOWBUS_EMBEDDED_PASS_FILE: is set without FLOWBUS_EMBEDDED_USER"},
		"missing file":   {map[string]string{"FLOWBUS_EMBEDDED_USER": "flows", "FLOWBUS_EMBEDDED_PASS_FILE": pwFile + ".none"}, "FLOWBUS_EMBEDDED_PASS_FILE: cannot be read"},
		"short password": {map[string]string{"FLOWBUS_EMBEDDED_USER": "flows", "FLOWBUS_EMBEDDED_PASS_FILE": short}, "use at least 12"},
		"system user":    {map[string]string{"FLOWBUS_EMBEDDED_USER": "sys", "FLOWBUS_EMBEDDED_PASS_FILE": pwFile}, "the system user"},
	} {
		if _, err := LoadConfig(c.env); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", name, err, c.want)
		}
	}
}

func TestConfigRunStateFile(t *testing.T) {
	t.Setenv("STATE_DIRECTORY", "/var/lib/fb")
	cfg, err := LoadConfig(map[string]string{"FLOWBUS_HOST": "web-01"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.RunStateFile != "/var/lib/fb/run-web-01.state" {
		t.Errorf("default run state file %q, want /var/lib/fb/run-web-01.state (the host token in its name)", cfg.RunStateFile)
	}
	for v, ok := range map[string]bool{"off": true, "/tmp/x.state": true, "run.state": false} {
		cfg, err := LoadConfig(map[string]string{"FLOWBUS_RUN_STATE_FILE": v})
		if ok && (err != nil || cfg.RunStateFile != v) {
			t.Errorf("FLOWBUS_RUN_STATE_FILE=%s: %v, %q", v, err, cfg.RunStateFile)
		}
		if !ok && (err == nil || !strings.Contains(err.Error(), "FLOWBUS_RUN_STATE_FILE: \"run.state\" must be an absolute path")) {
			t.Errorf("FLOWBUS_RUN_STATE_FILE=%s: %v, want refused", v, err)
		}
	}
}
