// Package cgroupv2 finds and checks cgroup v2 directories.
package cgroupv2

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrNotMounted means the host has no cgroup v2 hierarchy mounted.
var ErrNotMounted = errors.New("no cgroup v2 file system is mounted: mount one (mount -t cgroup2 none /sys/fs/cgroup/unified) or set FLOWBUS_CGROUP_PATH")

// DetectRoot returns the mount point of the cgroup v2 hierarchy.
// Hybrid hosts mount it beside the v1 controllers (often at
// /sys/fs/cgroup/unified), so it is read from the mount table, not assumed.
func DetectRoot() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("reading the mount table to find cgroup v2: %w", err)
	}
	defer f.Close()
	return cgroup2FromMountinfo(f)
}

// cgroup2FromMountinfo picks the cgroup2 mount from /proc/self/mountinfo text,
// preferring /sys/fs/cgroup where several exist.
func cgroup2FromMountinfo(r io.Reader) (string, error) {
	var found []string
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		// Fields: id parent major:minor root mountpoint options [optional...] - fstype source superopts
		line := sc.Text()
		sep := strings.Index(line, " - ")
		if sep < 0 {
			continue
		}
		post := strings.Fields(line[sep+3:])
		pre := strings.Fields(line[:sep])
		if len(post) < 1 || post[0] != "cgroup2" || len(pre) < 5 {
			continue
		}
		found = append(found, unescapeMount(pre[4]))
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("reading the mount table: %w", err)
	}
	if len(found) == 0 {
		return "", ErrNotMounted
	}
	for _, p := range found {
		if p == "/sys/fs/cgroup" {
			return p, nil
		}
	}
	return found[0], nil
}

// unescapeMount undoes the octal escapes (\040 for space) of mountinfo paths.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + byte(c-'0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// CheckDir returns an error naming the problem and the fix when path is
// not a directory of a cgroup v2 file system.
func CheckDir(path string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("cgroup path %s does not exist: point FLOWBUS_CGROUP_PATH at a cgroup v2 directory, or leave it empty to watch the whole host", path)
		}
		return fmt.Errorf("cgroup path %s: %w", path, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("cgroup path %s is not on a cgroup v2 file system (it may be a v1 controller): point FLOWBUS_CGROUP_PATH at a cgroup v2 directory, or leave it empty to detect the v2 root", path)
	}
	return nil
}
