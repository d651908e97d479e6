package cli

import (
	"errors"
	"strings"
	"testing"

	"github.com/flowbus/flowbus/consumers/stream"
)

func TestParseURLs(t *testing.T) {
	got, err := ParseURLs(" nats://a:4222 , 127.0.0.1:4223,wss://u:p@h")
	if err != nil || strings.Join(got, " ") != "nats://a:4222 127.0.0.1:4223 wss://u:p@h" {
		t.Errorf("got %q, %v", got, err)
	}
	for in, want := range map[string]string{
		"nats://u:pw@a:1,":      "empty server URL",
		"http://u:pw@a:1":       "unsupported scheme",
		"nats://u:pw@":          "has no host",
		"nats://u:pw@a:1/%zz":   "invalid URL",
		"nats://tok3n@a:1,,b:2": "empty server URL",
	} {
		_, err := ParseURLs(in)
		if err == nil || !strings.Contains(err.Error(), want) || strings.Contains(err.Error(), "pw") || strings.Contains(err.Error(), "tok3n") {
			t.Errorf("%q: %v, want %q without the secret", in, err, want)
		}
	}
}

func TestExplain(t *testing.T) {
	err := &stream.ConnectError{URL: "nats://u:xxxxx@h:1", Err: errors.New("refused")}
	if e := Explain(err); !strings.Contains(e, "FLOWBUS_NATS_URL") {
		t.Errorf("no fix in %q", e)
	}
	if e := Indent(errors.New("a\nb")); e != "  a\n  b" {
		t.Errorf("Indent: %q", e)
	}
}

func TestStateDir(t *testing.T) {
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	if d := StateDir(env(map[string]string{"STATE_DIRECTORY": "/var/lib/flowstat"})); d != "/var/lib/flowstat" {
		t.Errorf("under systemd: %q", d)
	}
	if d := StateDir(env(map[string]string{"STATE_DIRECTORY": "/var/lib/flowbus:/var/lib/other"})); d != "/var/lib/flowbus" {
		t.Errorf("several state directories: %q, want the first", d)
	}
	if d := StateDir(env(map[string]string{"XDG_STATE_HOME": "/home/u/.state"})); d != "/home/u/.state/flowbus" {
		t.Errorf("XDG: %q", d)
	}
}
