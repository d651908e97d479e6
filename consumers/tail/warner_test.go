package tail

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/schema"
)

// Whatever a warning quotes from the stream (a subject, a host in an error) is escaped and cut: a 1 MB
// host string gives a line of about MaxLog characters, not two million.
func TestWarningsEscapedAndBounded(t *testing.T) {
	var out bytes.Buffer
	w := newWarner(&out)
	host := strings.Repeat("\x1b[31mh", 1_000_000/6)
	err := errors.Join(schema.ErrMalformed, errors.New("host "+host+" is not a subject token"))
	w.skip("flows.web\x1b[2J.outgoing", 7, err)
	w.printf("warning: gap: host %s run %s missing batch %d\n", host, "run\x1b[31mRED", 3)
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines: %.500q", len(lines), out.String())
	}
	if strings.ContainsRune(out.String(), 0x1b) {
		t.Fatalf("ESC in the output: %.500q", out.String())
	}
	for _, want := range []string{`skipping message 7 on flows.web\x1b[2J.outgoing: not a valid flowbus batch: `, `\x1b[31mh\x1b[31mh`, "…"} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("line %.300q lacks %q", lines[0], want)
		}
	}
	if !strings.Contains(lines[1], `run run\x1b[31mRED missing batch 3`) {
		t.Errorf("line %.300q lacks the escaped run id", lines[1])
	}
	for _, l := range lines {
		if len(l) > 3*stream.MaxLog {
			t.Errorf("line of %d bytes", len(l))
		}
	}
}
