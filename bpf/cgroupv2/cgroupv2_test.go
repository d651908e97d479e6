package cgroupv2

import (
	"strings"
	"testing"
)

func TestCgroup2FromMountinfo(t *testing.T) {
	hybrid := `25 30 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 25 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`
	got, err := cgroup2FromMountinfo(strings.NewReader(hybrid))
	if err != nil || got != "/sys/fs/cgroup/unified" {
		t.Fatalf("hybrid: got %q, %v", got, err)
	}
	unified := `33 25 0:30 / /run/other\040dir rw - cgroup2 cgroup2 rw
34 25 0:31 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
`
	got, err = cgroup2FromMountinfo(strings.NewReader(unified))
	if err != nil || got != "/sys/fs/cgroup" {
		t.Fatalf("unified: got %q, %v", got, err)
	}
	got, err = cgroup2FromMountinfo(strings.NewReader("33 25 0:30 / /x\\040y rw - cgroup2 none rw\n"))
	if err != nil || got != "/x y" {
		t.Fatalf("escaped: got %q, %v", got, err)
	}
	if _, err := cgroup2FromMountinfo(strings.NewReader("26 25 0:23 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")); err != ErrNotMounted {
		t.Fatalf("v1 only: want ErrNotMounted, got %v", err)
	}
}

func TestCheckDir(t *testing.T) {
	if err := CheckDir("/nonexistent/flowbus"); err == nil || !strings.Contains(err.Error(), "FLOWBUS_CGROUP_PATH") {
		t.Fatalf("missing path: %v", err)
	}
	if err := CheckDir(t.TempDir()); err == nil || !strings.Contains(err.Error(), "not on a cgroup v2") {
		t.Fatalf("plain dir: %v", err)
	}
}
