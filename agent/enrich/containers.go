package enrich

import (
	"io/fs"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Containers maps cgroup ids (as the kernel reports them for a socket) to the
// id of the container that cgroup belongs to. On cgroup v2 a cgroup's id is
// the inode number of its directory, and container runtimes name the
// directory after the container: docker-<id>.scope, cri-containerd-<id>.scope,
// crio-<id>.scope, libpod-<id>.scope, or a plain /docker/<id>.
//
// Lookups never block and never allocate: an unknown id answers "" at once
// and asks a background walk of the hierarchy, at most once per MinRefresh.
type Containers struct {
	root       string
	minRefresh time.Duration

	ids     atomic.Pointer[map[uint64]string] // replaced whole by each walk
	wake    chan struct{}
	stop    chan struct{}
	done    chan struct{}
	walks   atomic.Uint64
	closeMu sync.Once
}

// NewContainers starts a resolver for the hierarchy mounted at root.
func NewContainers(root string, minRefresh time.Duration) *Containers {
	c := &Containers{root: root, minRefresh: minRefresh, wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
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
	}
	return cid
}

// Walks is the number of walks of the hierarchy so far.
func (c *Containers) Walks() uint64 { return c.walks.Load() }

// Close stops the background walks.
func (c *Containers) Close() {
	c.closeMu.Do(func() {
		close(c.stop)
		<-c.done
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
