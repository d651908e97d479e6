package bpf

import (
	"os"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
)

// egressPrograms counts the programs attached for egress to the cgroup at
// path (the kernel's own answer, not the capture's bookkeeping).
func egressPrograms(t *testing.T, path string) int {
	t.Helper()
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	res, err := link.QueryPrograms(link.QueryOptions{Target: fd, Attach: ebpf.AttachCGroupInetEgress})
	if err != nil {
		t.Fatal(err)
	}
	return len(res.Programs)
}

// A cgroup removed and made again at the same path is a new cgroup: Reattach
// moves the programs to it, AttachedID follows, and once the capture is
// closed nothing attaches any more.
func TestReattachFollowsTheCgroupAtThePath(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	cg := cgrouptest.NewChild(t)
	c, err := Open(Options{CgroupPath: cg.Path})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if id := c.AttachedID(); id != cg.ID() {
		t.Fatalf("AttachedID %d, want the cgroup's id %d", id, cg.ID())
	}
	if n := egressPrograms(t, cg.Path); n != 1 {
		t.Fatalf("%d egress programs on the watched cgroup, want 1", n)
	}

	if err := os.Remove(cg.Path); err != nil {
		t.Fatal(err)
	}
	if err := c.Reattach(); err == nil {
		t.Error("Reattach with no cgroup at the path succeeded")
	}
	cg2 := cgrouptest.NewChildAt(t, cg.Path)
	if err := c.Reattach(); err != nil {
		t.Fatal(err)
	}
	if id := c.AttachedID(); id != cg2.ID() || id == cg.ID() {
		t.Errorf("AttachedID %d after Reattach, want the new cgroup's id %d (old %d)", id, cg2.ID(), cg.ID())
	}
	if n := egressPrograms(t, cg2.Path); n != 1 {
		t.Errorf("%d egress programs on the new cgroup, want 1", n)
	}
	// Again: the links to the current cgroup are replaced, not added to.
	if err := c.Reattach(); err != nil {
		t.Fatal(err)
	}
	if n := egressPrograms(t, cg2.Path); n != 1 {
		t.Errorf("%d egress programs after a second Reattach, want 1", n)
	}

	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if n := egressPrograms(t, cg2.Path); n != 0 {
		t.Errorf("%d egress programs after Close, want 0", n)
	}
	if err := c.Reattach(); err == nil {
		t.Error("Reattach after Close succeeded")
	}
	if id := c.AttachedID(); id != 0 {
		t.Errorf("AttachedID %d after Close, want 0", id)
	}
}
