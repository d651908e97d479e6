package bpf

import (
	"fmt"
	"reflect"

	"github.com/cilium/ebpf"
)

// Programs returns the loaded programs by their ELF name (flowbus_ingress,
// ...), for reading their kernel run statistics (Program.Stats). It walks
// the generated objects by reflection, so a program added to flowbus.c is
// included without a change here. The programs stay owned by c: callers
// must not close them.
func (c *Capture) Programs() map[string]*ebpf.Program {
	out := map[string]*ebpf.Program{}
	v := reflect.ValueOf(&c.objs.flowbusPrograms).Elem()
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		name := t.Field(i).Tag.Get("ebpf")
		p, ok := v.Field(i).Interface().(*ebpf.Program)
		if name == "" || !ok || p == nil {
			continue
		}
		out[name] = p
	}
	return out
}

// ProgramKind is how a program of the collection attaches.
type ProgramKind struct {
	Type       ebpf.ProgramType
	AttachType ebpf.AttachType
}

// ProgramKinds returns the type and attach type of every program in the
// embedded collection, by ELF name, without loading anything: what a
// benchmark needs to build stand-in programs for the same hooks.
func ProgramKinds() (map[string]ProgramKind, error) {
	spec, err := loadFlowbus()
	if err != nil {
		return nil, fmt.Errorf("reading the embedded programs: %w", err)
	}
	out := make(map[string]ProgramKind, len(spec.Programs))
	for name, p := range spec.Programs {
		out[name] = ProgramKind{Type: p.Type, AttachType: p.AttachType}
	}
	return out, nil
}
