// Package buildinfo tells which build of flowbus is running: the release
// version stamped at link time, the VCS commit the Go toolchain records, and
// the Go version. Every binary prints it for --version.
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Version is the release version, stamped by the Makefile and the Dockerfile
// with -ldflags "-X github.com/flowbus/flowbus/cmd/internal/buildinfo.Version=...".
// A plain `go build` leaves it "dev".
var Version = "dev"

// Info describes one build.
type Info struct {
	Version   string // release version, or "dev"
	Commit    string // VCS revision, "unknown" when not built from a checkout
	Modified  bool   // the checkout had uncommitted changes
	GoVersion string // Go toolchain that built the binary
}

// Get returns the running binary's build information.
func Get() Info {
	in := Info{Version: Version, Commit: "unknown", GoVersion: runtime.Version()}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				in.Commit = s.Value
			case "vcs.modified":
				in.Modified = s.Value == "true"
			}
		}
	}
	return in
}

// CommitShort is the commit, cut to 12 hex digits, with "-dirty" when the
// checkout had uncommitted changes.
func (in Info) CommitShort() string {
	c := in.Commit
	if len(c) > 12 {
		c = c[:12]
	}
	if in.Modified {
		c += "-dirty"
	}
	return c
}

// String is the --version line: "<prog> <version> (commit <c>, <go>)".
func (in Info) String() string {
	return fmt.Sprintf("%s (commit %s, %s)", in.Version, in.CommitShort(), in.GoVersion)
}

// Line is the whole --version output of the named program.
func Line(prog string) string {
	return prog + " " + Get().String()
}
