package cli

import (
	"errors"
	"flag"
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

func TestValues(t *testing.T) {
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	fs.String("nats", "", "")
	fs.String("stream", "", "")
	fs.String("prefix", "", "")
	if err := fs.Parse([]string{"--nats", "nats://a:1"}); err != nil {
		t.Fatal(err)
	}
	v := NewValues(fs, func(k string) string {
		return map[string]string{"FLOWBUS_NATS_URL": "nats://env:1", "FLOWBUS_STREAM": "S"}[k]
	})
	for _, c := range []struct{ name, env, def, want, src string }{
		{"nats", "FLOWBUS_NATS_URL", "nats://def:1", "nats://a:1", "--nats"},
		{"stream", "FLOWBUS_STREAM", "FLOWS", "S", "FLOWBUS_STREAM"},
		{"prefix", "FLOWBUS_SUBJECT_PREFIX", "flows", "flows", "default"},
		{"prefix", "", "flows", "flows", "default"},
	} {
		if got, src := v.Get(c.name, c.env, c.def); got != c.want || src != c.src {
			t.Errorf("Get(%q) = %q from %s, want %q from %s", c.name, got, src, c.want, c.src)
		}
	}
	if !v.Set("nats") || v.Set("stream") || v.Flag("stream") != "" || v.Flag("nats") != "nats://a:1" {
		t.Error("Set or Flag do not follow the command line")
	}
}
