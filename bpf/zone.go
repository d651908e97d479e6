package bpf

import (
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"golang.org/x/sys/unix"

	"github.com/flowbus/flowbus/schema"
)

// A link-local IPv6 address means nothing without its interface: the kernel
// hands over the interface index and the cookie of the network namespace it
// belongs to, and the reader names it. The name is that of the interface in
// the namespace the packet was in (a container's eth0, not the host's end of
// its veth pair). An index no namespace we can find knows any more is given
// as the number, which RFC 4007 allows as a zone too; so is every index when
// the kernel cannot tell the namespace (bpf_get_netns_cookie is missing for
// the program, or SO_NETNS_COOKIE for us): the index is not guessed to be
// ours.

const (
	// zoneCacheMax bounds the names kept; past it the cache starts over.
	zoneCacheMax = 1024
	// zoneTTL is how long a name is trusted: interfaces can be renamed or
	// removed and their index reused.
	zoneTTL = 10 * time.Second
)

type zoneKey struct {
	netns   uint64
	ifindex uint32
}

type zoneName struct {
	name string
	at   time.Time
}

// zoneNames caches interface names by namespace and index. Only the reader
// goroutine uses it.
type zoneNames struct {
	names   map[zoneKey]zoneName
	own     uint64 // cookie of our own network namespace, 0 if unknown
	ownRead bool
}

// apply sets the zone of ev's link-local addresses from the flow record b.
func (z *zoneNames) apply(ev *schema.Event, b []byte) {
	if !ev.Src.Is6() || !(ev.Src.IsLinkLocalUnicast() || ev.Dst.IsLinkLocalUnicast()) || len(b) < recSize {
		return
	}
	ne := binary.NativeEndian
	idx := ne.Uint32(b[offIfindex:])
	if idx == 0 {
		return
	}
	name := z.name(ne.Uint64(b[offNetns:]), idx)
	if ev.Src.IsLinkLocalUnicast() {
		ev.Src = ev.Src.WithZone(name)
	}
	if ev.Dst.IsLinkLocalUnicast() {
		ev.Dst = ev.Dst.WithZone(name)
	}
}

// name returns the name of interface idx in the namespace with cookie
// netns, from the cache or looked up afresh.
func (z *zoneNames) name(netns uint64, idx uint32) string {
	now := time.Now()
	k := zoneKey{netns, idx}
	if n, ok := z.names[k]; ok && now.Sub(n.at) < zoneTTL {
		return n.name
	}
	if !z.ownRead {
		z.own, _ = ownNetnsCookie()
		z.ownRead = true
	}
	var name string
	var ok bool
	switch {
	case netns == 0 || z.own == 0:
		// Namespace unknown: the number.
	case netns == z.own:
		name, ok = ifName(idx)
	default:
		name, ok = ifNameInNetns(netns, idx)
	}
	if !ok {
		name = strconv.FormatUint(uint64(idx), 10)
	}
	if z.names == nil || len(z.names) >= zoneCacheMax {
		z.names = make(map[zoneKey]zoneName)
	}
	z.names[k] = zoneName{name, now}
	return name
}

func ifName(idx uint32) (string, bool) {
	ifc, err := net.InterfaceByIndex(int(idx))
	if err != nil {
		return "", false
	}
	return ifc.Name, true
}

// ownNetnsCookie is the cookie of the calling thread's network namespace.
func ownNetnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	v, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, err
	}
	return v, nil
}

// ifNameInNetns finds the namespace with the cookie among those of the
// processes and those iproute2 names (/run/netns), and asks it for the name
// of interface idx. Only a cache miss for a foreign namespace gets here.
func ifNameInNetns(cookie uint64, idx uint32) (string, bool) {
	var paths []string
	for _, pat := range []string{"/run/netns/*", "/var/run/netns/*", "/proc/[0-9]*/ns/net"} {
		m, _ := filepath.Glob(pat)
		paths = append(paths, m...)
	}
	type nsID struct{ dev, ino uint64 }
	tried := map[nsID]bool{}
	for _, p := range paths {
		var st unix.Stat_t
		if unix.Stat(p, &st) != nil {
			continue
		}
		id := nsID{st.Dev, st.Ino}
		if tried[id] {
			continue
		}
		tried[id] = true
		if name, found, ok := inNetns(p, cookie, idx); found {
			return name, ok
		}
	}
	return "", false
}

// inNetns enters the namespace at path on a thread of its own and, if its
// cookie is cookie (found), looks up interface idx there.
func inNetns(path string, cookie uint64, idx uint32) (name string, found, ok bool) {
	f, err := os.Open(path)
	if err != nil {
		return "", false, false
	}
	defer f.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			return
		}
		defer orig.Close()
		if unix.Setns(int(f.Fd()), unix.CLONE_NEWNET) != nil {
			runtime.UnlockOSThread()
			return
		}
		if c, err := ownNetnsCookie(); err == nil && c == cookie {
			found = true
			name, ok = ifName(idx)
		}
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) != nil {
			// The thread stays in the other namespace: leave it locked,
			// so that it ends with this goroutine.
			return
		}
		runtime.UnlockOSThread()
	}()
	<-done
	return name, found, ok
}

// setNetnsCookieFlags tells the programs whether this kernel lets them call
// bpf_get_netns_cookie (see skb_netns_cookie in flowbus.c).
func setNetnsCookieFlags(spec *ebpf.CollectionSpec) error {
	for _, f := range []struct {
		name string
		typ  ebpf.ProgramType
	}{{flowbusVarSkbNetnsCookie, ebpf.CGroupSKB}, {flowbusVarSockopsNetnsCookie, ebpf.SockOps}} {
		var on uint8
		if features.HaveProgramHelper(f.typ, asm.FnGetNetnsCookie) == nil {
			on = 1
		}
		if err := spec.Variables[f.name].Set(on); err != nil {
			return fmt.Errorf("setting %s: %w", f.name, err)
		}
	}
	return nil
}
