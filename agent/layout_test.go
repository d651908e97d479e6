package agent

import (
	"go/build"
	"slices"
	"strings"
	"testing"
)

// Each stage imports only what lies before it on an event's route
// (capture, enrich, publisher), so no event can go back to a stage it has
// left; only this package wires them.
func TestStageImports(t *testing.T) {
	const mod = "github.com/flowbus/flowbus/"
	for dir, allowed := range map[string][]string{
		"../bpf":                {"bpf/cgroupv2", "schema"},
		"../bpf/cgroupv2":       nil,
		"enrich":                {"dnscache", "schema"},
		"../dnscache":           nil,
		"../publisher":          {"publisher/spool", "schema"},
		"../publisher/spool":    nil,
		"../publisher/embedded": nil,
	} {
		p, err := build.ImportDir(dir, 0)
		if err != nil {
			t.Fatalf("%s: %v", dir, err)
		}
		for _, imp := range p.Imports {
			if rel, ok := strings.CutPrefix(imp, mod); ok && !slices.Contains(allowed, rel) {
				t.Errorf("%s imports %s: the stages may import only %q", p.ImportPath, rel, allowed)
			}
		}
	}
}
