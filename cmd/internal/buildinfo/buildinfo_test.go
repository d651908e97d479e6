package buildinfo

import (
	"runtime"
	"strings"
	"testing"
)

func TestLine(t *testing.T) {
	old := Version
	Version = "1.2.3"
	defer func() { Version = old }()
	l := Line("flowtail")
	if !strings.HasPrefix(l, "flowtail 1.2.3 (commit ") || !strings.Contains(l, runtime.Version()) {
		t.Fatalf("Line = %q", l)
	}
}

func TestCommitShort(t *testing.T) {
	in := Info{Commit: "0123456789abcdef0123", Modified: true}
	if got := in.CommitShort(); got != "0123456789ab-dirty" {
		t.Fatalf("CommitShort = %q", got)
	}
	if got := (Info{Commit: "unknown"}).CommitShort(); got != "unknown" {
		t.Fatalf("CommitShort = %q", got)
	}
}
