package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/flowbus/flowbus/bpf/cgroupv2"
	"github.com/flowbus/flowbus/schema"
)

// Layout of struct proc_info (bpf/flowbus.c), at offProc in a flow record
// and at offEndProc in an end record.
const (
	offProc       = 72
	offEndProc    = 120
	procSize      = 32
	offProcTgid   = 0
	offProcUID    = 4
	offProcComm   = 8
	offProcSource = 24
	offProcSelf   = 25
)

// Where a socket's process came from (proc_info.source).
const (
	procUnknown = 0
	procCreate  = 1
	procBind    = 2
	procConnect = 3
	procWalk    = 4
)

// procHooks are the attribution programs: each runs in the context of the
// process that makes the system call, and each is optional.
var procHooks = []struct {
	prog   string
	attach ebpf.AttachType
	label  string
}{
	{flowbusProgFlowbusSockCreate, ebpf.AttachCGroupInetSockCreate, "sock_create"},
	{flowbusProgFlowbusPostBind4, ebpf.AttachCGroupInet4PostBind, "post_bind4"},
	{flowbusProgFlowbusPostBind6, ebpf.AttachCGroupInet6PostBind, "post_bind6"},
	{flowbusProgFlowbusConnect4, ebpf.AttachCGroupInet4Connect, "connect4"},
	{flowbusProgFlowbusConnect6, ebpf.AttachCGroupInet6Connect, "connect6"},
	// Not a process hook: it gives back the slot sock_create took for a
	// socket that has no end to come (see flowbus_sock_release). Without
	// it, slots stay taken and later sockets use socket storage instead.
	{flowbusProgFlowbusSockRelease, ebpf.AttachCgroupInetSockRelease, "sock_release"},
}

// HookStatus is the state of one attribution hook on this kernel.
type HookStatus struct {
	Hook     string // sock_create, post_bind4, post_bind6, connect4, connect6, sock_release
	Attached bool
	// Problem says why the hook is not attached (the kernel refused the
	// program or the attachment); "" when attached.
	Problem string
}

// Attribution says which hooks fill the process fields (pid, comm, uid)
// on this kernel. The three fields always come together, from the same
// hooks: a socket seen by none of them has no process.
type Attribution struct {
	Hooks []HookStatus
}

// Attached lists the hooks that are attached.
func (a Attribution) Attached() []string {
	var out []string
	for _, h := range a.Hooks {
		if h.Attached {
			out = append(out, h.Hook)
		}
	}
	return out
}

// Mechanism is the one line the agent logs at start: where each field
// comes from, and which hooks are missing.
func (a Attribution) Mechanism() string {
	on := a.Attached()
	if len(on) == 0 {
		return "pid, comm, uid: unknown (no attribution hook attached)"
	}
	hooks := "cgroup/" + strings.Join(on, ", cgroup/")
	s := "pid: bpf_get_current_pid_tgid, comm: bpf_get_current_comm, uid: bpf_get_current_uid_gid, each at " + hooks +
		" into the socket's slot (a preallocated array) or, once bound, its storage (cloned into accepted sockets), read by the skb and sock_ops programs; sockets open before the start: from /proc at start"
	var missing []string
	for _, h := range a.Hooks {
		if !h.Attached {
			missing = append(missing, h.Hook+" ("+h.Problem+")")
		}
	}
	if len(missing) > 0 {
		s += "; missing: " + strings.Join(missing, ", ")
	}
	return s
}

// Attribution reports the attribution hooks' state since the last attach.
func (c *Capture) Attribution() Attribution {
	c.linksMu.Lock()
	defer c.linksMu.Unlock()
	var a Attribution
	for _, h := range procHooks {
		st := HookStatus{Hook: h.label}
		if p, bad := c.procRefused[h.prog]; bad {
			st.Problem = p
		} else if p, bad := c.procUnattached[h.prog]; bad {
			st.Problem = p
		} else if c.attachedID == 0 {
			st.Problem = "not attached yet"
		} else {
			st.Attached = true
		}
		a.Hooks = append(a.Hooks, st)
	}
	return a
}

// loadObjects loads the collection. When the kernel refuses it, each
// attribution program is tried alone, and those the kernel refuses are
// replaced by one that only allows the operation and is never attached:
// their fields stay unknown instead of the agent failing.
func (c *Capture) loadObjects(spec *ebpf.CollectionSpec) error {
	if err := spec.LoadAndAssign(&c.objs, nil); err == nil {
		return nil
	} else if c.procRefused = probeProcHooks(spec); len(c.procRefused) == 0 {
		return err
	}
	for name := range c.procRefused {
		p := spec.Programs[name]
		p.Instructions = asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()}
	}
	return spec.LoadAndAssign(&c.objs, nil)
}

// probeProcHooks loads each attribution program alone (with a small ring)
// and returns those the kernel refuses, with the first line of why.
func probeProcHooks(spec *ebpf.CollectionSpec) map[string]string {
	refused := map[string]string{}
	for _, h := range procHooks {
		one := spec.Copy()
		for name := range one.Programs {
			if name != h.prog {
				delete(one.Programs, name)
			}
		}
		one.Maps[flowbusMapEvents].MaxEntries = uint32(os.Getpagesize())
		coll, err := ebpf.NewCollection(one)
		if err != nil {
			msg := err.Error()
			if i := strings.IndexByte(msg, '\n'); i >= 0 {
				msg = msg[:i]
			}
			refused[h.prog] = "refused by the kernel: " + msg
			continue
		}
		coll.Close()
	}
	return refused
}

// attachProcHooks attaches the attribution programs the kernel loaded;
// one that cannot be attached is left out and reported by Attribution.
// Called with linksMu held.
func (c *Capture) attachProcHooks(fdPath string) []link.Link {
	if c.opts.NoAttribution {
		c.procUnattached = map[string]string{}
		for _, h := range procHooks {
			c.procUnattached[h.prog] = "turned off (NoAttribution)"
		}
		return nil
	}
	progs := map[string]*ebpf.Program{
		flowbusProgFlowbusSockCreate:  c.objs.FlowbusSockCreate,
		flowbusProgFlowbusPostBind4:   c.objs.FlowbusPostBind4,
		flowbusProgFlowbusPostBind6:   c.objs.FlowbusPostBind6,
		flowbusProgFlowbusConnect4:    c.objs.FlowbusConnect4,
		flowbusProgFlowbusConnect6:    c.objs.FlowbusConnect6,
		flowbusProgFlowbusSockRelease: c.objs.FlowbusSockRelease,
	}
	c.procUnattached = map[string]string{}
	var links []link.Link
	for _, h := range procHooks {
		if _, bad := c.procRefused[h.prog]; bad {
			continue
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: fdPath, Attach: h.attach, Program: progs[h.prog]})
		if err != nil {
			c.procUnattached[h.prog] = "attaching: " + err.Error()
			continue
		}
		links = append(links, l)
	}
	return links
}

// procNames turns the kernel's comm bytes into strings without allocating
// for the names it has seen (a host runs few distinct programs).
type procNames struct {
	m map[[16]byte]string
}

const maxProcNames = 4096

func (p *procNames) name(b []byte) string {
	var k [16]byte
	copy(k[:], b)
	if s, ok := p.m[k]; ok {
		return s
	}
	n := bytes.IndexByte(k[:], 0)
	if n < 0 {
		n = len(k)
	}
	s := string(k[:n])
	if p.m == nil || len(p.m) >= maxProcNames {
		p.m = make(map[[16]byte]string)
	}
	p.m[k] = s
	return s
}

// proc reads the proc_info at b; ok is false when the socket had none.
func (p *procNames) proc(b []byte) (pid uint32, comm string, uid uint32, ok bool) {
	if len(b) < procSize || b[offProcSource] == procUnknown {
		return 0, "", 0, false
	}
	ne := binary.NativeEndian
	return ne.Uint32(b[offProcTgid:]), p.name(b[offProcComm : offProcComm+16]), ne.Uint32(b[offProcUID:]), true
}

// apply sets a begin's process from its record's proc_info (nil: none).
func (p *procNames) apply(ev *schema.Event, b []byte) {
	if pid, comm, uid, ok := p.proc(b); ok {
		ev.PID, ev.Comm, ev.UID, ev.UIDKnown = pid, comm, uid, true
	}
}

// applyEnd sets an end's process from its record.
func (p *procNames) applyEnd(ev *schema.EndEvent, b []byte) {
	if len(b) < offEndProc+procSize {
		return
	}
	if pid, comm, uid, ok := p.proc(b[offEndProc:]); ok {
		ev.PID, ev.Comm, ev.UID, ev.UIDKnown = pid, comm, uid, true
	}
}

// ExistingStats is what FillExisting found.
type ExistingStats struct {
	Processes int // processes in the watched cgroup or below whose descriptors were read
	Sockets   int // TCP sockets given their process
	Already   int // TCP sockets a hook had seen since the attach (kept as the hook wrote them)
	Failed    int // processes that exited, or whose descriptors could not be taken, during the walk
	// Refused counts TCP sockets the kernel would not store an entry for;
	// FirstError says why, for the log.
	Refused    int
	FirstError string
	// MPTCP counts Multipath TCP sockets, which stay unknown: the packets
	// are their TCP subflows', kernel sockets no descriptor reaches (Go
	// listens with MPTCP by default since 1.24, where the kernel has it).
	MPTCP int
	Took  time.Duration
}

// FillExisting gives the TCP sockets that existed before the programs
// attached their process, which no hook saw: it walks /proc for the
// processes whose cgroup is the watched one or below, takes each socket
// descriptor (pidfd_getfd) and writes the process into the socket's
// storage, unless a hook already did. A socket several processes hold
// (workers forked after the listener was opened) gets the one with the
// lowest pid, normally the parent that opened it. Call it after Attach.
//
// Unknown stay: sockets no process holds a descriptor of (a connection
// being closed, a listener's queued connections, which take the listener's
// entry only when accepted after this), processes outside the cgroup
// (a socket passed to them from inside, or a process moved out),
// processes that exit during the walk, kernels without pidfd_getfd, and
// Multipath TCP sockets (see ExistingStats.MPTCP).
func (c *Capture) FillExisting() (ExistingStats, error) {
	start := time.Now()
	var st ExistingStats
	rel, err := cgroupRel(c.CgroupPath)
	if err != nil {
		return st, err
	}
	pids, err := procPids()
	if err != nil {
		return st, err
	}
	self := os.Getpid()
	seen := map[string]bool{} // socket inodes done
	for _, pid := range pids {
		if !inCgroup(pid, rel) {
			continue
		}
		n, already, err := c.fillProcess(pid, pid == self, seen, &st)
		st.Sockets += n
		st.Already += already
		if err != nil {
			if st.FirstError == "" {
				st.FirstError = fmt.Sprintf("pid %d: %v", pid, err)
			}
			st.Failed++
			continue
		}
		st.Processes++
	}
	st.Took = time.Since(start)
	return st, nil
}

// fillProcess fills the TCP sockets of one process not filled yet.
func (c *Capture) fillProcess(pid int, self bool, seen map[string]bool, st *ExistingStats) (filled, already int, err error) {
	fdDir := "/proc/" + strconv.Itoa(pid) + "/fd"
	ents, err := os.ReadDir(fdDir)
	if err != nil {
		return 0, 0, err
	}
	type sock struct {
		fd    int
		inode string
	}
	var socks []sock
	for _, e := range ents {
		target, err := os.Readlink(fdDir + "/" + e.Name())
		if err != nil || !strings.HasPrefix(target, "socket:[") || seen[target] {
			continue
		}
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		socks = append(socks, sock{fd, target})
	}
	if len(socks) == 0 {
		return 0, 0, nil
	}
	v, err := procValue(pid, self)
	if err != nil {
		return 0, 0, err
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return 0, 0, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	defer unix.Close(pidfd)
	for _, sk := range socks {
		sfd, err := unix.PidfdGetfd(pidfd, sk.fd, 0)
		if err != nil {
			if errors.Is(err, unix.ESRCH) {
				return filled, already, err
			}
			continue // closed meanwhile
		}
		seen[sk.inode] = true
		switch inetProto(sfd) {
		case unix.IPPROTO_MPTCP:
			st.MPTCP++
		case unix.IPPROTO_TCP:
			switch err := c.objs.Procs.Update(uint32(sfd), &v, ebpf.UpdateNoExist); {
			case err == nil:
				filled++
			case errors.Is(err, ebpf.ErrKeyExist):
				already++
			default:
				st.Refused++
				if st.FirstError == "" {
					st.FirstError = fmt.Sprintf("pid %d fd %d: %v", pid, sk.fd, err)
				}
			}
		}
		unix.Close(sfd)
	}
	return filled, already, nil
}

// inetProto is the protocol of an IPv4 or IPv6 socket, -1 for others.
func inetProto(fd int) int {
	dom, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil || (dom != unix.AF_INET && dom != unix.AF_INET6) {
		return -1
	}
	proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		return -1
	}
	return proto
}

// procValue is a socket's state for a process, as the hooks would have
// written it: its tgid, real uid and comm, and no begin yet.
func procValue(pid int, self bool) (flowbusSockState, error) {
	var st flowbusSockState
	v := &st.Proc
	base := "/proc/" + strconv.Itoa(pid)
	comm, err := os.ReadFile(base + "/comm")
	if err != nil {
		return st, err
	}
	status, err := os.ReadFile(base + "/status")
	if err != nil {
		return st, err
	}
	uid := -1
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "Uid:" {
			uid, err = strconv.Atoi(f[1])
			if err != nil {
				return st, fmt.Errorf("%s/status: Uid %q", base, f[1])
			}
		}
	}
	if uid < 0 {
		return st, fmt.Errorf("%s/status: no Uid", base)
	}
	v.Tgid, v.Uid, v.Source = uint32(pid), uint32(uid), procWalk
	for i, ch := range bytes.TrimSuffix(comm, []byte("\n")) {
		if i == len(v.Comm)-1 {
			break
		}
		v.Comm[i] = int8(ch)
	}
	if self {
		v.Self = 1
	}
	return st, nil
}

// cgroupRel is the watched cgroup's path as /proc/<pid>/cgroup names it
// ("/" for the root).
func cgroupRel(dir string) (string, error) {
	root, err := cgroupv2.DetectRoot()
	if err != nil {
		return "", err
	}
	rel, err := filepath.Rel(root, dir)
	if err != nil || strings.HasPrefix(rel, "..") {
		return "", fmt.Errorf("cgroup %s is not under the cgroup v2 mount %s", dir, root)
	}
	if rel == "." {
		return "/", nil
	}
	return "/" + rel, nil
}

// inCgroup tells whether the process's cgroup v2 is rel or below it.
func inCgroup(pid int, rel string) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		p, ok := strings.CutPrefix(line, "0::")
		if !ok {
			continue
		}
		return rel == "/" || p == rel || strings.HasPrefix(p, rel+"/")
	}
	return false
}

// procPids lists the processes in /proc, lowest pid first.
func procPids() ([]int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil && e.IsDir() {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	return pids, nil
}
