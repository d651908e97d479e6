package tail_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/consumers/tail"
)

func TestParseURLs(t *testing.T) {
	got, err := tail.ParseURLs(" nats://a:4222 , 127.0.0.1:4223,wss://u:p@h")
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
		_, err := tail.ParseURLs(in)
		if err == nil || !strings.Contains(err.Error(), want) || strings.Contains(err.Error(), "pw") || strings.Contains(err.Error(), "tok3n") {
			t.Errorf("%q: %v, want %q without the secret", in, err, want)
		}
	}
}

func TestExplain(t *testing.T) {
	err := &stream.ConnectError{URL: "nats://u:xxxxx@h:1", Err: errors.New("refused")}
	if e := tail.Explain(err); !strings.Contains(e, "FLOWBUS_NATS_URL") {
		t.Errorf("no fix in %q", e)
	}
	if e := tail.Indent(errors.New("a\nb")); e != "  a\n  b" {
		t.Errorf("Indent: %q", e)
	}
}
