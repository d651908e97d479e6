package bpf

import (
	"testing"

	"github.com/cilium/ebpf"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
)

// Programs lists every program of the loaded collection (what a benchmark
// reads the run statistics of), each with its kind from ProgramKinds.
func TestProgramsAndKinds(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	cg := cgrouptest.NewChild(t)
	c, err := Load(Options{CgroupPath: cg.Path})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	kinds, err := ProgramKinds()
	if err != nil {
		t.Fatal(err)
	}
	progs := c.Programs()
	if len(progs) != len(kinds) {
		t.Fatalf("Programs has %d programs, the collection %d", len(progs), len(kinds))
	}
	for name, p := range progs {
		k, ok := kinds[name]
		if !ok {
			t.Fatalf("program %s is not in ProgramKinds", name)
		}
		if p.Type() != k.Type {
			t.Errorf("%s: loaded type %s, kind %s", name, p.Type(), k.Type)
		}
	}
	for name, typ := range map[string]ebpf.AttachType{
		"flowbus_ingress": ebpf.AttachCGroupInetIngress,
		"flowbus_egress":  ebpf.AttachCGroupInetEgress,
		"flowbus_sockops": ebpf.AttachCGroupSockOps,
	} {
		if kinds[name].AttachType != typ || progs[name] == nil {
			t.Errorf("%s: attach type %s, loaded %v; want %s", name, kinds[name].AttachType, progs[name] != nil, typ)
		}
	}
}
