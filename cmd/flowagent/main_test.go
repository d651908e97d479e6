package main

import (
	"bytes"
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/flowbus/flowbus/agent"
	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/cmd/internal/buildinfo"
)

func TestMain(m *testing.M) {
	cgrouptest.MaybeRunHelper()
	// The agents these tests start keep their state (run records) in a
	// directory of this test run, never in the host's state directory: a
	// test must neither leave files there nor link to an earlier run's.
	dir, err := os.MkdirTemp("", "flowbus-test-state-")
	if err != nil {
		panic(err)
	}
	os.Setenv("STATE_DIRECTORY", dir)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// runFlowagent runs the program's main logic with args and env.
func runFlowagent(t *testing.T, env map[string]string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = run(args, env, &out, &errOut)
	return code, out.String(), errOut.String()
}

// Every configuration problem, the cgroup path included, exits with status
// 2 and is reported at once; unknown variables are mentioned first.
func TestConfigErrorsExitStatus2(t *testing.T) {
	code, out, errOut := runFlowagent(t, map[string]string{
		"FLOWBUS_CGROUP_PATH":   "/etc/passwd",
		"FLOWBUS_BATCH_LINGER":  "abc",
		"FLOWBUS_BATCH_LINGERR": "1s",
	})
	if code != 2 || out != "" {
		t.Errorf("exit status %d (want 2), stdout %q", code, out)
	}
	for _, want := range []string{
		"flowagent: warning: FLOWBUS_BATCH_LINGERR is not a flowbus setting and is ignored; did you mean FLOWBUS_BATCH_LINGER?",
		"invalid configuration (2 problems)",
		"FLOWBUS_CGROUP_PATH: /etc/passwd is not a directory",
		`FLOWBUS_BATCH_LINGER: "abc" is not a duration such as 100ms or 2s`,
	} {
		if !strings.Contains(errOut, want) {
			t.Errorf("stderr lacks %q:\n%s", want, errOut)
		}
	}
	if strings.Index(errOut, "warning:") > strings.Index(errOut, "invalid configuration") {
		t.Errorf("the warning comes after the errors:\n%s", errOut)
	}
}

// flowagent takes no arguments but --help, --version and probe; a flag that names
// a setting gets the variable to set.
func TestConfigArguments(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"run"}, `unexpected argument "run": flowagent takes no arguments but --help, --version and probe`},
		{[]string{"--help", "extra"}, `unexpected argument "--help"`},
		{[]string{"--batch-linger=1s"}, "set the environment variable FLOWBUS_BATCH_LINGER=1s instead"},
		{[]string{"--nats-url", "nats://a:4222"}, "set the environment variable FLOWBUS_NATS_URL=nats://a:4222 instead"},
		{[]string{"-stream"}, "set the environment variable FLOWBUS_STREAM=... instead"},
		{[]string{"--bogus"}, "configure it with FLOWBUS_* environment variables (flowagent --help lists them)"},
	} {
		code, out, errOut := runFlowagent(t, nil, c.args...)
		if code != 2 || out != "" || !strings.Contains(errOut, c.want) {
			t.Errorf("flowagent %q: status %d (want 2), stdout %q, stderr %q (want %q)", c.args, code, out, errOut, c.want)
		}
	}
}

func TestVersion(t *testing.T) {
	for _, arg := range []string{"--version", "version", "-version"} {
		code, out, errOut := runFlowagent(t, nil, arg)
		want := buildinfo.Line("flowagent") + "\nembedded nats-server " + server.VERSION + "\n"
		if code != 0 || out != want || errOut != "" {
			t.Errorf("flowagent %s: status %d, stdout %q (want %q), stderr %q", arg, code, out, want, errOut)
		}
	}
	if !strings.HasPrefix(versionText(), "flowagent ") || !regexp.MustCompile(`nats-server \d+\.\d+\.\d+`).MatchString(versionText()) {
		t.Errorf("version text %q", versionText())
	}
}

// --help lists every variable the agent reads, with its default and meaning.
func TestHelpListsEveryVariable(t *testing.T) {
	code, help, errOut := runFlowagent(t, nil, "--help")
	if code != 0 || errOut != "" {
		t.Fatalf("--help: status %d, stderr %q", code, errOut)
	}
	for _, arg := range []string{"-h", "help"} {
		if _, out, _ := runFlowagent(t, nil, arg); out != help {
			t.Errorf("flowagent %s differs from --help", arg)
		}
	}
	ct := reflect.TypeOf(agent.Config{})
	for i := 0; i < ct.NumField(); i++ {
		f := ct.Field(i)
		name, meaning := "FLOWBUS_"+f.Tag.Get("env"), f.Tag.Get("help")
		if f.Tag.Get("env") == "" || meaning == "" {
			t.Errorf("Config.%s has no env or help tag", f.Name)
			continue
		}
		def := f.Tag.Get("envDefault")
		if def == "" {
			def = f.Tag.Get("helpDefault")
		}
		if def == "" {
			// Only settings that are off when unset have no default.
			if f.Type.Kind() != reflect.String {
				t.Errorf("Config.%s has no default to show", f.Name)
			}
			def = "unset"
		}
		line := regexp.MustCompile(`(?m)^  ` + regexp.QuoteMeta(name) + ` +default: ` + regexp.QuoteMeta(def) + "\n      " + regexp.QuoteMeta(meaning) + "$")
		if !line.MatchString(help) {
			t.Errorf("--help does not list %s with default %q and meaning %q", name, def, meaning)
		}
	}
	for _, want := range []string{"FLOWBUS_BATCH_LINGER        default: 100ms\n", "FLOWBUS_METRICS_ADDR        default: 127.0.0.1:9464\n", "<state dir> is $STATE_DIRECTORY"} {
		if !strings.Contains(help, want) {
			t.Errorf("--help lacks %q", want)
		}
	}
	for _, l := range strings.Split(help, "\n") {
		if len(l) > 80 {
			t.Errorf("--help line wider than 80 columns: %q", l)
		}
	}
}

// flowbus_build_info has the labels --version prints.
func TestMetricBuildInfo(t *testing.T) {
	b := buildInfo()
	if in := buildinfo.Get(); b.Version != in.Version || b.Commit != in.CommitShort() || b.GoVersion != in.GoVersion {
		t.Errorf("the metric's build %+v is not this binary's %+v", b, in)
	}
	if v := versionText(); !strings.Contains(v, buildinfo.Get().String()) || !strings.Contains(v, server.VERSION) {
		t.Errorf("--version %q and the metric's labels disagree", v)
	}
}
