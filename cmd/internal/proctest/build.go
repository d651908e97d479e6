package proctest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// NATSServerModule is the module whose nats-server the agent embeds.
const NATSServerModule = "github.com/nats-io/nats-server/v2"

// ModRoot is the directory of the go.mod the go command uses from the
// working directory.
func ModRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("go env GOMOD: not inside the module")
	}
	return filepath.Dir(gomod), nil
}

// ModuleVersion is the version the go.mod in modRoot selects for a module.
func ModuleVersion(modRoot, path string) (string, error) {
	out, err := exec.Command("go", "list", "-C", modRoot, "-m", "-f", "{{.Version}}", path).Output()
	if err != nil {
		return "", fmt.Errorf("go list -m %s: %w", path, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// GoBuild builds pkg of the module in modRoot into dst (an error carries the
// compiler output after its first line). It builds into a
// temporary file beside dst and renames it into place, so that a running
// copy of dst is never overwritten and no half-written binary is left.
func GoBuild(ctx context.Context, modRoot, pkg, dst string) error {
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".build-*")
	if err != nil {
		return err
	}
	tmp.Close()
	defer os.Remove(tmp.Name())
	cmd := exec.CommandContext(ctx, "go", "build", "-o", tmp.Name(), pkg)
	cmd.Dir = modRoot
	// -mod=readonly: building must never rewrite go.mod.
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=readonly")
	if msg, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, bytes.TrimSpace(msg))
	}
	return os.Rename(tmp.Name(), dst)
}

// BuildNATSServer builds nats-server at the version go.mod selects into
// cacheDir, once: a binary already there for that version is reused.
func BuildNATSServer(ctx context.Context, modRoot, cacheDir string) (bin, version string, err error) {
	version, err = ModuleVersion(modRoot, NATSServerModule)
	if err != nil {
		return "", "", err
	}
	bin = filepath.Join(cacheDir, "nats-server-"+version)
	if _, err := os.Stat(bin); err == nil {
		return bin, version, nil
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", "", err
	}
	if err := GoBuild(ctx, modRoot, NATSServerModule, bin); err != nil {
		return "", "", fmt.Errorf("building nats-server %s: %w", version, err)
	}
	return bin, version, nil
}
