package webview

import (
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"

	"github.com/flowbus/flowbus/schema"
)

// maxFilterLen bounds every text filter: a filter is typed by a person, not pasted from a stream.
const maxFilterLen = 256

// Filter selects the live flows one client sees. The zero value passes everything. Filters combine with
// AND; each one applies on the server, so a narrow view costs the browser nothing.
type Filter struct {
	Host      string           // host token, exact
	Direction schema.Direction // 0: both
	Port      uint16           // either end's port; 0: any
	Name      string           // case-insensitive substring of any DNS name of either end
	Addr      string           // substring of either end's address text (e.g. "10.1." or "::1")
	// Process is a pid (all digits) or a case-insensitive substring of comm. Events that carry neither
	// (sockets no process holds, kernel sockets: see the README's process attribution) never match it.
	Process   string
	Cgroup    uint64 // cgroup v2 id, exact; 0: any
	Container string // prefix of the container id
}

// filterKeys are the query parameters ParseFilter reads, in the order the page shows them.
var filterKeys = []string{"host", "direction", "port", "name", "addr", "process", "cgroup", "container"}

// ParseFilter reads a Filter from query parameters (see filterKeys), reporting every bad one at once.
func ParseFilter(q url.Values) (Filter, error) {
	var f Filter
	var errs []error
	bad := func(k string, err error) { errs = append(errs, fmt.Errorf("%s: %w", k, err)) }
	for _, k := range filterKeys {
		if len(q.Get(k)) > maxFilterLen {
			bad(k, fmt.Errorf("longer than %d bytes", maxFilterLen))
		}
	}
	if len(errs) > 0 {
		return f, errors.Join(errs...)
	}
	if h := strings.TrimSpace(q.Get("host")); h != "" {
		if err := schema.ValidateHostToken(h); err != nil {
			bad("host", err)
		}
		f.Host = h
	}
	switch d := q.Get("direction"); d {
	case "", "all", "both":
	default:
		dir, err := schema.ParseDirection(d)
		if err != nil {
			bad("direction", fmt.Errorf("%q: want incoming, outgoing or all", d))
		}
		f.Direction = dir
	}
	if p := strings.TrimSpace(q.Get("port")); p != "" {
		n, err := strconv.ParseUint(p, 10, 16)
		if err != nil || n == 0 {
			bad("port", fmt.Errorf("%q is not a TCP port (1-65535)", p))
		}
		f.Port = uint16(n)
	}
	f.Name = strings.ToLower(strings.TrimSpace(q.Get("name")))
	f.Addr = strings.ToLower(strings.TrimSpace(q.Get("addr")))
	f.Process = strings.ToLower(strings.TrimSpace(q.Get("process")))
	if c := strings.TrimSpace(q.Get("cgroup")); c != "" {
		n, err := strconv.ParseUint(c, 10, 64)
		if err != nil || n == 0 {
			bad("cgroup", fmt.Errorf("%q is not a cgroup id (the inode number of the cgroup's directory)", c))
		}
		f.Cgroup = n
	}
	f.Container = strings.ToLower(strings.TrimSpace(q.Get("container")))
	return f, errors.Join(errs...)
}

// Values is f as query parameters, empty ones left out.
func (f Filter) Values() url.Values {
	v := url.Values{}
	set := func(k, s string) {
		if s != "" {
			v.Set(k, s)
		}
	}
	set("host", f.Host)
	if f.Direction != 0 {
		v.Set("direction", f.Direction.String())
	}
	if f.Port != 0 {
		v.Set("port", strconv.Itoa(int(f.Port)))
	}
	set("name", f.Name)
	set("addr", f.Addr)
	set("process", f.Process)
	if f.Cgroup != 0 {
		v.Set("cgroup", strconv.FormatUint(f.Cgroup, 10))
	}
	set("container", f.Container)
	return v
}

// match reports whether the flow passes f.
func (f *Filter) match(it *item) bool {
	switch {
	case f.Host != "" && it.host != f.Host,
		f.Direction != 0 && it.dir != f.Direction,
		f.Port != 0 && it.srcPort != f.Port && it.dstPort != f.Port,
		f.Addr != "" && !strings.Contains(it.src, f.Addr) && !strings.Contains(it.dst, f.Addr),
		f.Cgroup != 0 && it.cgroup != f.Cgroup,
		f.Container != "" && !strings.HasPrefix(it.container, f.Container):
		return false
	}
	if f.Name != "" && !anyContains(it.names, f.Name) {
		return false
	}
	if f.Process != "" {
		if isDigits(f.Process) {
			return it.pid != 0 && strconv.FormatUint(uint64(it.pid), 10) == f.Process
		}
		return it.comm != "" && strings.Contains(it.comm, f.Process)
	}
	return true
}

func anyContains(names []string, sub string) bool {
	for _, n := range names {
		if strings.Contains(n, sub) {
			return true
		}
	}
	return false
}

func isDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return s != ""
}
