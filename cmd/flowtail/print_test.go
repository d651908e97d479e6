package main

import (
	"bufio"
	"net/netip"
	"strings"
	"testing"

	"github.com/flowbus/flowbus/consumers/tail"
	"github.com/flowbus/flowbus/schema"
)

// A row wider than the columns so far gets the header again above it, at the new widths, and every
// row lines up with the header above it.
func TestTableHeaderAgainWhenAColumnGrows(t *testing.T) {
	var sb strings.Builder
	w := bufio.NewWriter(&sb)
	p := newTablePrinter(w, false, tail.EventsBegin)
	ev := schema.Event{Timestamp: 1, Direction: schema.Outgoing, Src: netip.MustParseAddr("10.0.0.1"), SrcPort: 1, Dst: netip.MustParseAddr("10.0.0.2"), DstPort: 443}
	for _, host := range []string{"web-01", "a-host-name-longer-than-its-column", "db-02"} {
		if err := p.event(&tail.Meta{Host: host}, &ev); err != nil {
			t.Fatal(err)
		}
	}
	w.Flush()
	lines := strings.Split(strings.TrimSuffix(sb.String(), "\n"), "\n")
	t.Logf("\n%s", sb.String())
	if len(lines) != 5 || !strings.HasPrefix(lines[0], "TIME") || !strings.HasPrefix(lines[2], "TIME") {
		t.Fatalf("want header, row, header, two rows; got:\n%s", sb.String())
	}
	for i, l := range lines {
		if strings.HasPrefix(l, "TIME") {
			continue
		}
		head := lines[0]
		if i > 2 {
			head = lines[2]
		}
		at := strings.Index(head, "DIRECTION")
		if !strings.HasPrefix(l[at:], "outgoing") {
			t.Errorf("row %q: DIRECTION not under its header %q", l, head)
		}
	}
}
