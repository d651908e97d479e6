// Package statedir decides where every flowbus program keeps its state by
// default, so that flowagent (JetStream store, spool, locks) and flowstat
// (its SQLite database) agree. It lives at the top level, under internal/,
// because both the agent package and the commands import it.
package statedir

import (
	"os"
	"path/filepath"
	"strings"
)

// Dir is the state directory: the first directory of $STATE_DIRECTORY under
// systemd (it lists one per StateDirectory=, separated by ':'), else
// $XDG_STATE_HOME/flowbus, else /var/lib/flowbus for root, else
// ~/.local/state/flowbus. getenv is a parameter so tests control it.
func Dir(getenv func(string) string) string {
	if d := getenv("STATE_DIRECTORY"); d != "" {
		return strings.SplitN(d, ":", 2)[0]
	}
	if d := getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "flowbus")
	}
	if os.Geteuid() == 0 {
		return "/var/lib/flowbus"
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".local", "state", "flowbus")
	}
	return filepath.Join(os.TempDir(), "flowbus")
}
