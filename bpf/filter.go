package bpf

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
)

// Filter selects, in the kernel, the begins that leave it: a begin dropped
// never reaches the ring buffer, and its connection gets no end either. The
// zero value keeps every begin and costs nothing (the filter code is not
// even loaded). Each list holds when empty; a begin is kept when it passes
// every test: its direction is Direction (or Direction is empty), its
// responder port is in Ports (or Ports is empty) and not in ExcludePorts,
// its remote address in CIDRs (or CIDRs is empty) and not in ExcludeCIDRs,
// its process's command name in Comms (or Comms is empty) and not in
// ExcludeComms.
type Filter struct {
	// Direction is "incoming" or "outgoing" for only those begins; "" or
	// "both" keeps both.
	Direction string
	// Ports and ExcludePorts are matched against the responder's port (the
	// event's dst_port): the local port of an incoming connection, the
	// remote one of an outgoing connection.
	Ports, ExcludePorts []PortRange
	// CIDRs and ExcludeCIDRs are matched against the remote address: the
	// initiator of an incoming connection, the responder of an outgoing.
	// IPv4 prefixes match IPv4 addresses only, IPv6 prefixes IPv6 only.
	CIDRs, ExcludeCIDRs []netip.Prefix
	// Comms and ExcludeComms are matched against the command name of the
	// socket's process (the listener's for incoming). A begin whose
	// process is unknown matches no name: an include list drops it, an
	// exclude list keeps it.
	Comms, ExcludeComms []string
	// ExcludeSelf drops the begins of the connections the loading process
	// itself makes (the agent's NATS connections), at the cheapest point:
	// the socket's storage, which is read for every begin anyway.
	ExcludeSelf bool
}

// PortRange is an inclusive range of ports; a single port has First == Last.
type PortRange struct{ First, Last uint16 }

func (r PortRange) String() string {
	if r.First == r.Last {
		return strconv.Itoa(int(r.First))
	}
	return fmt.Sprintf("%d-%d", r.First, r.Last)
}

// FilterReasons are the reasons a begin is dropped, as Counters.Filtered
// and the metrics name them: the first test that fails, in this order
// (cheapest first).
var FilterReasons = []string{"self", "direction", "port", "cidr", "comm"}

// MaxFilterCIDRs bounds each CIDR list (the LPM trie's size); MaxFilterComms
// the two comm lists together.
const (
	MaxFilterCIDRs = 1024
	MaxFilterComms = 256
	// MaxCommLen is the longest command name the kernel keeps (TASK_COMM_LEN
	// less the NUL).
	MaxCommLen = 15
)

// Active tells whether any filter is set.
func (f *Filter) Active() bool {
	return f.direction() != 0 || len(f.Ports) > 0 || len(f.ExcludePorts) > 0 || len(f.CIDRs) > 0 || len(f.ExcludeCIDRs) > 0 ||
		len(f.Comms) > 0 || len(f.ExcludeComms) > 0 || f.ExcludeSelf
}

// direction is the kernel's DIR_* value kept, 0 for both.
func (f *Filter) direction() uint8 {
	switch f.Direction {
	case "outgoing":
		return 1
	case "incoming":
		return 2
	}
	return 0
}

// Validate checks what the parsers cannot: the direction word, the lists'
// sizes, the names' lengths.
func (f *Filter) Validate() error {
	switch f.Direction {
	case "", "both", "incoming", "outgoing":
	default:
		return fmt.Errorf("direction %q: must be both, incoming or outgoing", f.Direction)
	}
	if n := max(len(f.CIDRs), len(f.ExcludeCIDRs)); n > MaxFilterCIDRs {
		return fmt.Errorf("%d prefixes in one CIDR list: at most %d", n, MaxFilterCIDRs)
	}
	if n := len(f.Comms) + len(f.ExcludeComms); n > MaxFilterComms {
		return fmt.Errorf("%d command names: at most %d in the two lists together", n, MaxFilterComms)
	}
	for _, c := range append(append([]string(nil), f.Comms...), f.ExcludeComms...) {
		if err := checkComm(c); err != nil {
			return err
		}
	}
	return nil
}

// String describes the filter for the log, "none" when no filter is set.
func (f *Filter) String() string {
	var parts []string
	if d := f.direction(); d != 0 {
		parts = append(parts, "direction="+f.Direction)
	}
	ports := func(name string, rs []PortRange) {
		if len(rs) > 0 {
			s := make([]string, len(rs))
			for i, r := range rs {
				s[i] = r.String()
			}
			parts = append(parts, name+"="+strings.Join(s, ","))
		}
	}
	ports("ports", f.Ports)
	ports("exclude_ports", f.ExcludePorts)
	cidrs := func(name string, ps []netip.Prefix) {
		if len(ps) > 0 {
			s := make([]string, len(ps))
			for i, p := range ps {
				s[i] = p.String()
			}
			parts = append(parts, name+"="+strings.Join(s, ","))
		}
	}
	cidrs("cidrs", f.CIDRs)
	cidrs("exclude_cidrs", f.ExcludeCIDRs)
	if len(f.Comms) > 0 {
		parts = append(parts, "comms="+strings.Join(f.Comms, ","))
	}
	if len(f.ExcludeComms) > 0 {
		parts = append(parts, "exclude_comms="+strings.Join(f.ExcludeComms, ","))
	}
	if f.ExcludeSelf {
		parts = append(parts, "exclude_self")
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, " ")
}

// ParsePorts reads a comma-separated list of ports and ranges ("80,443,
// 8000-8999"); empty is an empty list.
func ParsePorts(s string) ([]PortRange, error) {
	var out []PortRange
	for _, item := range splitList(s) {
		lo, hi, isRange := strings.Cut(item, "-")
		first, err := parsePort(lo)
		if err != nil {
			return nil, err
		}
		last := first
		if isRange {
			if last, err = parsePort(hi); err != nil {
				return nil, err
			}
			if last < first {
				return nil, fmt.Errorf("range %q runs backwards: write the lower port first (%d-%d)", item, last, first)
			}
		}
		out = append(out, PortRange{first, last})
	}
	return out, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 32)
	if err != nil || n == 0 || n > 65535 {
		return 0, fmt.Errorf("%q is not a port: write a number from 1 to 65535, or a range such as 8000-8999", s)
	}
	return uint16(n), nil
}

// ParseCIDRs reads a comma-separated list of prefixes (10.0.0.0/8,
// fd00::/8); a bare address is a prefix of its full length. An IPv4-mapped
// IPv6 prefix (::ffff:10.0.0.0/104) is taken as the IPv4 one, as the events
// carry such addresses.
func ParseCIDRs(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, item := range splitList(s) {
		var p netip.Prefix
		var err error
		if strings.Contains(item, "/") {
			p, err = netip.ParsePrefix(item)
		} else {
			var a netip.Addr
			if a, err = netip.ParseAddr(item); err == nil {
				p = netip.PrefixFrom(a, a.BitLen())
			}
		}
		if err != nil || strings.Contains(item, "%") {
			return nil, fmt.Errorf("%q is not a CIDR prefix: write e.g. 10.0.0.0/8 or fd00::/8 (no zone)", item)
		}
		if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// ParseComms reads a comma-separated list of command names (as in
// /proc/<pid>/comm: at most 15 bytes).
func ParseComms(s string) ([]string, error) {
	var out []string
	for _, item := range splitList(s) {
		if err := checkComm(item); err != nil {
			return nil, err
		}
		out = append(out, item)
	}
	return out, nil
}

func checkComm(c string) error {
	if c == "" || len(c) > MaxCommLen {
		return fmt.Errorf("command name %q: must be 1 to %d bytes, as the kernel keeps it (see /proc/<pid>/comm; longer names are cut there)", c, MaxCommLen)
	}
	if strings.IndexByte(c, 0) >= 0 {
		return fmt.Errorf("command name %q holds a NUL byte", c)
	}
	return nil
}

// splitList splits on commas, trimming blanks and dropping empty items.
func splitList(s string) []string {
	var out []string
	for _, item := range strings.Split(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

// portDrop is the kernel's port_drop bitmap: a bit set for every port whose
// begins are dropped.
func (f *Filter) portDrop() []uint64 {
	bits := make([]uint64, 1024)
	set := func(p int) { bits[p>>6] |= 1 << (p & 63) }
	in := make([]bool, 65536)
	for _, r := range f.Ports {
		for p := int(r.First); p <= int(r.Last); p++ {
			in[p] = true
		}
	}
	for p := 0; p < 65536; p++ {
		if len(f.Ports) > 0 && !in[p] {
			set(p)
		}
	}
	for _, r := range f.ExcludePorts {
		for p := int(r.First); p <= int(r.Last); p++ {
			set(p)
		}
	}
	return bits
}

// cidrKey is struct cidr_key (packed: 4 + 1 + 16 bytes).
func cidrKey(p netip.Prefix) []byte {
	k := make([]byte, 21)
	a := p.Addr()
	binary.NativeEndian.PutUint32(k, uint32(8+p.Bits()))
	if a.Is4() {
		k[4] = 4
		b := a.As4()
		copy(k[5:], b[:])
	} else {
		k[4] = 6
		b := a.As16()
		copy(k[5:], b[:])
	}
	return k
}

// setFilterVars sets the filter constants in spec before loading.
func setFilterVars(spec *ebpf.CollectionSpec, f *Filter) error {
	if !f.Active() {
		return nil
	}
	b := func(v bool) uint8 {
		if v {
			return 1
		}
		return 0
	}
	for name, v := range map[string]uint8{
		flowbusVarFilterOn:        1,
		flowbusVarFilterDirection: f.direction(),
		flowbusVarFilterPorts:     b(len(f.Ports) > 0 || len(f.ExcludePorts) > 0),
		flowbusVarFilterCidrIncl:  b(len(f.CIDRs) > 0),
		flowbusVarFilterCidrExcl:  b(len(f.ExcludeCIDRs) > 0),
		flowbusVarFilterCommIncl:  b(len(f.Comms) > 0),
		flowbusVarFilterCommExcl:  b(len(f.ExcludeComms) > 0),
		flowbusVarFilterSelf:      b(f.ExcludeSelf),
	} {
		if err := spec.Variables[name].Set(v); err != nil {
			return fmt.Errorf("setting %s: %w", name, err)
		}
	}
	return nil
}

// fillFilterMaps writes the filter's sets into the loaded maps, before the
// programs are attached.
func (c *Capture) fillFilterMaps() error {
	f := &c.opts.Filter
	if !f.Active() {
		return nil
	}
	if len(f.Ports) > 0 || len(f.ExcludePorts) > 0 {
		if err := c.objs.PortDrop.Put(uint32(0), f.portDrop()); err != nil {
			return fmt.Errorf("writing the port filter: %w", err)
		}
	}
	for _, l := range []struct {
		m  *ebpf.Map
		ps []netip.Prefix
	}{{c.objs.CidrIncl, f.CIDRs}, {c.objs.CidrExcl, f.ExcludeCIDRs}} {
		for _, p := range l.ps {
			if err := l.m.Put(cidrKey(p), uint8(1)); err != nil {
				return fmt.Errorf("writing CIDR filter %s: %w", p, err)
			}
		}
	}
	flags := map[string]uint8{}
	for _, c := range f.Comms {
		flags[c] |= 1
	}
	for _, c := range f.ExcludeComms {
		flags[c] |= 2
	}
	for name, v := range flags {
		var k [16]byte
		copy(k[:], name)
		if err := c.objs.Comms.Put(k, v); err != nil {
			return fmt.Errorf("writing comm filter %q: %w", name, err)
		}
	}
	return nil
}
