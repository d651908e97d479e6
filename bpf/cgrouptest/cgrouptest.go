// Package cgrouptest is the harness of flowbus's privileged tests: it creates
// a child cgroup v2, runs helper processes inside it (the test binary
// re-executed), and makes real TCP traffic from there.
package cgrouptest

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowbus/flowbus/bpf/cgroupv2"
)

// EnvRequire makes a skipped privileged test a failure (set by CI).
const EnvRequire = "FLOWBUS_REQUIRE_PRIVILEGED"

const envHelper = "FLOWBUS_TEST_HELPER"

// RequirePrivileged skips the test with one clear line when it cannot load
// eBPF programs, or fails it when FLOWBUS_REQUIRE_PRIVILEGED=1.
func RequirePrivileged(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	msg := "privileged test: needs root (loads eBPF programs and creates a cgroup); run as root or via .ci/run"
	if os.Getenv(EnvRequire) == "1" {
		t.Fatal(msg + " (" + EnvRequire + "=1 makes this a failure)")
	}
	t.Skip(msg)
}

// Cgroup is a child cgroup v2 made for one test.
type Cgroup struct {
	Path string
	fd   int
}

// NewChild creates a fresh child of the cgroup v2 root; it is removed when
// the test ends.
func NewChild(t testing.TB) *Cgroup {
	t.Helper()
	root, err := cgroupv2.DetectRoot()
	if err != nil {
		t.Fatal(err)
	}
	path, err := os.MkdirTemp(root, "flowbus-test-")
	if err != nil {
		t.Fatalf("creating a child cgroup under %s: %v", root, err)
	}
	return open(t, path)
}

// NewChildNamed creates a child named name inside a fresh test cgroup (as a
// container runtime would name it).
func NewChildNamed(t testing.TB, name string) *Cgroup {
	t.Helper()
	parent := NewChild(t)
	path := filepath.Join(parent.Path, name)
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	return open(t, path)
}

// Child creates a child named name inside c (as a container runtime
// would, at any time); it is removed when the test ends, before c.
func (c *Cgroup) Child(t testing.TB, name string) *Cgroup {
	t.Helper()
	path := filepath.Join(c.Path, name)
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	return open(t, path)
}

// NewChildAt creates a cgroup at path (one a test removed, made again as a
// restarted service or container would be); it is removed when the test
// ends.
func NewChildAt(t testing.TB, path string) *Cgroup {
	t.Helper()
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	return open(t, path)
}

// ID is the cgroup's id: the inode of its directory on cgroup v2.
func (c *Cgroup) ID() uint64 {
	var st syscall.Stat_t
	if err := syscall.Fstat(c.fd, &st); err != nil {
		return 0
	}
	return st.Ino
}

func open(t testing.TB, path string) *Cgroup {
	t.Helper()
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
	if err != nil {
		_ = os.Remove(path)
		t.Fatal(err)
	}
	c := &Cgroup{Path: path, fd: fd}
	t.Cleanup(func() {
		syscall.Close(fd)
		// The kernel refuses while a process is still inside; retry briefly.
		for i := 0; i < 50; i++ {
			if err := os.Remove(path); err == nil || os.IsNotExist(err) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("could not remove cgroup %s", path)
	})
	return c
}

// Command returns the test binary re-executed as helper name with args,
// started directly inside the cgroup (clone3 CLONE_INTO_CGROUP), so that every
// socket it creates belongs to the cgroup from the first packet.
func (c *Cgroup) Command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], append([]string{"-test.run=^$"}, args...)...)
	cmd.Env = append(os.Environ(), envHelper+"="+name)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: c.fd}
	cmd.Stderr = os.Stderr
	return cmd
}

var helpers = map[string]func(args []string) error{
	"traffic": trafficHelper,
}

// Register adds a helper that Command can start.
func Register(name string, fn func(args []string) error) { helpers[name] = fn }

// MaybeRunHelper runs the requested helper and exits when this process was
// started by Command; call it first in TestMain.
func MaybeRunHelper() {
	name := os.Getenv(envHelper)
	if name == "" {
		return
	}
	fn, ok := helpers[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "unknown test helper %q\n", name)
		os.Exit(3)
	}
	var args []string
	for _, a := range os.Args[1:] {
		if !strings.HasPrefix(a, "-test.") {
			args = append(args, a)
		}
	}
	if err := fn(args); err != nil {
		fmt.Fprintln(os.Stderr, "helper", name+":", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// Conn is one connection made by the traffic helper, as "ip:port" texts.
type Conn struct {
	Client string `json:"client"`
	Server string `json:"server"`
}

// TrafficResult is what the traffic helper reports.
type TrafficResult struct {
	Conns       []Conn `json:"conns"`
	RefusedPort int    `json:"refused_port,omitempty"`
}

// Traffic runs the traffic helper inside the cgroup: a listener on addr and n
// connections to it (plus, with refused, one connection attempt to a port
// with no listener), and returns what it did.
func (c *Cgroup) Traffic(t testing.TB, addr string, n int, refused bool) TrafficResult {
	t.Helper()
	cmd := c.Command("traffic", addr, strconv.Itoa(n), strconv.FormatBool(refused))
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("traffic helper in cgroup %s: %v", filepath.Base(c.Path), err)
	}
	var res TrafficResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("traffic helper output %q: %v", out, err)
	}
	return res
}
