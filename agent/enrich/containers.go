package enrich

import (
	"encoding/binary"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Containers maps cgroup ids (as the kernel reports them for a socket) to the
// id of the container that cgroup belongs to. On cgroup v2 a cgroup's id is
// the inode number of its directory, and container runtimes name the
// directory after the container: docker-<id>.scope, cri-containerd-<id>.scope,
// crio-<id>.scope, libpod-<id>.scope, or a plain /docker/<id>.
//
// Lookups of known ids never block and never allocate. An id the last walk
// did not see (a container started since) is resolved at once on a cgroup
// v2 mount by opening the cgroup by its id (open_by_handle_at: two system
// calls and a readlink), so that its first connection carries its container
// id; the answer is kept until the next walk, which a miss also asks for
// (at most once per MinRefresh). Elsewhere, or without the privilege, an
// unknown id answers "" until that walk.
type Containers struct {
	root       string
	minRefresh time.Duration

	rootFd  int // the hierarchy's root, for open_by_handle_at; -1 when not cgroup v2
	extraMu sync.Mutex
	extra   map[uint64]string // resolved by id since the last walk
	direct  atomic.Uint64

	ids     atomic.Pointer[map[uint64]string] // replaced whole by each walk
	wake    chan struct{}
	stop    chan struct{}
	done    chan struct{}
	walks   atomic.Uint64
	closeMu sync.Once
}

// NewContainers starts a resolver for the hierarchy mounted at root.
func NewContainers(root string, minRefresh time.Duration) *Containers {
	c := &Containers{root: root, minRefresh: minRefresh, rootFd: -1, wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	var sfs unix.Statfs_t
	if unix.Statfs(root, &sfs) == nil && sfs.Type == unix.CGROUP2_SUPER_MAGIC {
		if fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err == nil {
			c.rootFd = fd
		}
	}
	m := c.walk()
	c.ids.Store(&m)
	go c.loop()
	return c
}

// ContainerID returns the container id of cgroup id, or "".
func (c *Containers) ContainerID(id uint64) string {
	if id == 0 {
		return ""
	}
	m := *c.ids.Load()
	cid, ok := m[id]
	if !ok {
		select {
		case c.wake <- struct{}{}:
		default:
		}
		return c.resolve(id)
	}
	return cid
}

// maxExtra bounds the ids resolved between two walks: past it a miss waits
// for the walk, as without direct lookups.
const maxExtra = 4096

// fileidKernfs is the handle type of kernfs (cgroup) file handles: its 8
// bytes are the cgroup id.
const fileidKernfs = 0xfe

// resolve finds the container of a cgroup the last walk did not see by
// opening it by id.
func (c *Containers) resolve(id uint64) string {
	if c.rootFd < 0 {
		return ""
	}
	c.extraMu.Lock()
	defer c.extraMu.Unlock()
	if cid, ok := c.extra[id]; ok {
		return cid
	}
	if c.extra == nil {
		c.extra = make(map[uint64]string)
	}
	if len(c.extra) >= maxExtra {
		return ""
	}
	c.direct.Add(1)
	cid := ""
	if path, err := cgroupPathByID(c.rootFd, id); err == nil {
		cid = ContainerIDFromPath(path)
	}
	// A failure (the cgroup is already gone) is kept too: the next walk
	// decides, and a storm from one cgroup costs one lookup.
	c.extra[id] = cid
	return cid
}

// cgroupPathByID opens the cgroup with id under the hierarchy open at
// rootFd and returns its path.
func cgroupPathByID(rootFd int, id uint64) (string, error) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], id)
	fd, err := unix.OpenByHandleAt(rootFd, unix.NewFileHandle(fileidKernfs, b[:]), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	return os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
}

// DirectLookups is the number of cgroups resolved by id between walks.
func (c *Containers) DirectLookups() uint64 { return c.direct.Load() }

// Walks is the number of walks of the hierarchy so far.
func (c *Containers) Walks() uint64 { return c.walks.Load() }

// Close stops the background walks.
func (c *Containers) Close() {
	c.closeMu.Do(func() {
		close(c.stop)
		<-c.done
		if c.rootFd >= 0 {
			_ = unix.Close(c.rootFd)
		}
	})
}

func (c *Containers) loop() {
	defer close(c.done)
	last := time.Now()
	for {
		select {
		case <-c.stop:
			return
		case <-c.wake:
		}
		if wait := c.minRefresh - time.Since(last); wait > 0 {
			select {
			case <-c.stop:
				return
			case <-time.After(wait):
			}
		}
		m := c.walk()
		c.ids.Store(&m)
		// The walk saw everything resolved before it started.
		c.extraMu.Lock()
		c.extra = nil
		c.extraMu.Unlock()
		last = time.Now()
	}
}

// walk maps every cgroup directory's id to its container id. Cgroups that
// belong to no container map to "" so that they are not looked for again
// until the next walk.
func (c *Containers) walk() map[uint64]string {
	c.walks.Add(1)
	m := make(map[uint64]string)
	_ = filepath.WalkDir(c.root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return nil
		}
		st, ok := info.Sys().(*syscall.Stat_t)
		if !ok {
			return nil
		}
		m[st.Ino] = ContainerIDFromPath(path)
		return nil
	})
	return m
}

// ContainerIDFromPath returns the last 64-hex-digit container id in a
// cgroup path, or "".
func ContainerIDFromPath(path string) string {
	for rest := path; rest != ""; {
		i := strings.LastIndexByte(rest, '/')
		seg := rest[i+1:]
		rest = rest[:max(i, 0)]
		if id := hexID(seg); id != "" {
			return id
		}
		if i < 0 {
			break
		}
	}
	return ""
}

// hexID finds a run of exactly 64 lowercase hex digits in a path segment,
// as runtimes write it: the whole segment, or between a prefix ending in '-'
// and a ".scope" suffix.
func hexID(seg string) string {
	seg = strings.TrimSuffix(seg, ".scope")
	if i := strings.LastIndexByte(seg, '-'); i >= 0 {
		seg = seg[i+1:]
	}
	if len(seg) != 64 {
		return ""
	}
	for i := 0; i < len(seg); i++ {
		ch := seg[i]
		if (ch < '0' || ch > '9') && (ch < 'a' || ch > 'f') {
			return ""
		}
	}
	return seg
}
