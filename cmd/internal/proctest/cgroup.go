package proctest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/flowbus/flowbus/bpf/cgroupv2"
)

// Cgroup is a child cgroup v2 made for a benchmark. Tests use
// bpf/cgrouptest, whose cgroups go away with the test.
type Cgroup struct {
	Path string
	fd   int
}

// NewCgroup creates a fresh child of the cgroup v2 root, named prefix and a
// random suffix.
func NewCgroup(prefix string) (*Cgroup, error) {
	root, err := cgroupv2.DetectRoot()
	if err != nil {
		return nil, err
	}
	path, err := os.MkdirTemp(root, prefix)
	if err != nil {
		return nil, fmt.Errorf("creating a child cgroup under %s: %w", root, err)
	}
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
	if err != nil {
		_ = os.Remove(path)
		return nil, err
	}
	return &Cgroup{Path: path, fd: fd}, nil
}

// Remove kills anything left inside and removes the directory; the kernel
// refuses rmdir while a process is still inside, so it retries briefly.
func (c *Cgroup) Remove() error {
	syscall.Close(c.fd)
	_ = os.WriteFile(filepath.Join(c.Path, "cgroup.kill"), []byte("1"), 0)
	var err error
	for i := 0; i < 100; i++ {
		if err = os.Remove(c.Path); err == nil || os.IsNotExist(err) {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("could not remove cgroup %s: %w", c.Path, err)
}

// Command returns exe with args started directly inside the cgroup (clone3
// CLONE_INTO_CGROUP), so that no packet of it escapes the cgroup's
// accounting; it is killed when ctx ends or this process dies.
func (c *Cgroup) Command(ctx context.Context, exe string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, exe, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: c.fd, Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 5 * time.Second
	return cmd
}
