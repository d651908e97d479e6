package enrich

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowbus/flowbus/bpf/cgroupv2"
)

const hex64 = "3f2a9c0d1e5b4a7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e"

func TestContainerIDFromPath(t *testing.T) {
	for path, want := range map[string]string{
		"/sys/fs/cgroup/system.slice/docker-" + hex64 + ".scope":                               hex64,
		"/sys/fs/cgroup/kubepods.slice/kubepods-pod1.slice/cri-containerd-" + hex64 + ".scope": hex64,
		"/sys/fs/cgroup/machine.slice/libpod-" + hex64 + ".scope/container":                    hex64,
		"/sys/fs/cgroup/docker/" + hex64:                                                       hex64,
		"/sys/fs/cgroup/system.slice/sshd.service":                                             "",
		"/sys/fs/cgroup/user.slice/" + strings.ToUpper(hex64):                                  "",
		"/sys/fs/cgroup/x/" + hex64[:63]:                                                       "",
		"/":                                                                                    "",
		"":                                                                                     "",
	} {
		if got := ContainerIDFromPath(path); got != want {
			t.Errorf("%q: got %q, want %q", path, got, want)
		}
	}
}

// On cgroup v2 the id the kernel reports for a socket's cgroup is the inode
// of its directory; a container-named child is resolved after a refresh.
func TestContainersResolveNewCgroup(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("FLOWBUS_REQUIRE_PRIVILEGED") == "1" {
			t.Fatal("privileged test: needs root to create a cgroup")
		}
		t.Skip("privileged test: needs root to create a cgroup")
	}
	root, err := cgroupv2.DetectRoot()
	if err != nil {
		t.Fatal(err)
	}
	parent, err := os.MkdirTemp(root, "flowbus-test-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(parent)
	c := NewContainers(parent, 10*time.Millisecond)
	defer c.Close()

	dir := filepath.Join(parent, "docker-"+hex64+".scope")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(dir)
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for c.ContainerID(st.Ino) != hex64 {
		if time.Now().After(deadline) {
			t.Fatalf("cgroup %d (%s) not resolved after %d walks", st.Ino, dir, c.Walks())
		}
		time.Sleep(5 * time.Millisecond)
	}
	var pst syscall.Stat_t
	_ = syscall.Stat(parent, &pst)
	if got := c.ContainerID(pst.Ino); got != "" {
		t.Errorf("a plain cgroup resolved to %q", got)
	}
	if n := testing.AllocsPerRun(100, func() { c.ContainerID(st.Ino) }); n != 0 {
		t.Errorf("lookup allocates %v times", n)
	}
}

// A container cgroup created after the resolver started is known on its
// first lookup, without waiting for a walk (here: none for an hour), and a
// plain cgroup created beside it stays without a container.
func TestContainersResolveAtFirstSight(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("FLOWBUS_REQUIRE_PRIVILEGED") == "1" {
			t.Fatal("privileged test: needs root to create a cgroup")
		}
		t.Skip("privileged test: needs root to create a cgroup")
	}
	root, err := cgroupv2.DetectRoot()
	if err != nil {
		t.Fatal(err)
	}
	parent, err := os.MkdirTemp(root, "flowbus-test-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(parent)
	c := NewContainers(parent, time.Hour)
	defer c.Close()
	walks := c.Walks()

	dir := filepath.Join(parent, "cri-containerd-"+hex64+".scope")
	plain := filepath.Join(parent, "plain.service")
	for _, d := range []string{dir, plain} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		defer os.Remove(d)
	}
	ino := func(p string) uint64 {
		var st syscall.Stat_t
		if err := syscall.Stat(p, &st); err != nil {
			t.Fatal(err)
		}
		return st.Ino
	}
	if got := c.ContainerID(ino(dir)); got != hex64 {
		t.Errorf("first lookup of a new container cgroup: %q, want %q", got, hex64)
	}
	if got := c.ContainerID(ino(plain)); got != "" {
		t.Errorf("a plain cgroup resolved to %q", got)
	}
	if got := c.ContainerID(ino(dir)); got != hex64 {
		t.Errorf("second lookup: %q", got)
	}
	if n := c.DirectLookups(); n != 2 {
		t.Errorf("%d lookups by id, want 2 (one per new cgroup, then kept)", n)
	}
	if c.Walks() != walks {
		t.Errorf("a walk ran (%d, was %d): the lookup should not need one", c.Walks(), walks)
	}
	// An id no cgroup has is "", not an error, and costs one lookup.
	if got := c.ContainerID(1 << 62); got != "" {
		t.Errorf("unknown id resolved to %q", got)
	}
}
