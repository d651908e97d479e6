package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/flowbus/flowbus/internal/statedir"
	"golang.org/x/sys/unix"
)

// fileLock is an exclusive flock held for the agent's life. The kernel
// releases it when the process dies, however it dies, so a crash never
// leaves a stale lock behind.
type fileLock struct {
	f    *os.File
	path string
}

// lockInfo is what a lock file says about its holder.
type lockInfo struct {
	pid     int
	runID   string
	started string
}

// acquireLock takes the lock at path without waiting. When another process
// holds it, the error says which one (pid, run id, since when), what is
// shared (what) and how to fix it (fix, given the holder's pid).
func acquireLock(path, runID, what string, fix func(pid string) string) (*fileLock, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("creating the directory of the lock %s: %w", path, err)
	}
	for range 10 {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil, fmt.Errorf("opening the lock %s: %w", path, err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			b, _ := os.ReadFile(path)
			f.Close()
			if !errors.Is(err, unix.EWOULDBLOCK) {
				return nil, fmt.Errorf("locking %s: %w", path, err)
			}
			h := parseLock(string(b))
			holder, pid := "another process", "it"
			if h.pid > 0 {
				holder = fmt.Sprintf("flowagent pid %d", h.pid)
				if h.runID != "" {
					holder += " (run " + h.runID + ", started " + h.started + ")"
				}
				pid = "pid " + strconv.Itoa(h.pid)
			}
			return nil, fmt.Errorf("%s is in use by %s (lock %s): %s", what, holder, path, fix(pid))
		}
		// The holder before us may have removed the file between our open
		// and our lock: then we hold a lock nobody else can see; start over.
		var st, fst unix.Stat_t
		if unix.Stat(path, &st) != nil || unix.Fstat(int(f.Fd()), &fst) != nil || st.Ino != fst.Ino || st.Dev != fst.Dev {
			f.Close()
			continue
		}
		content := fmt.Sprintf("pid=%d\nrun_id=%s\nstarted=%s\n", os.Getpid(), runID, time.Now().UTC().Format(time.RFC3339))
		if err := f.Truncate(0); err == nil {
			_, _ = f.WriteAt([]byte(content), 0)
		}
		return &fileLock{f: f, path: path}, nil
	}
	return nil, fmt.Errorf("locking %s: the file keeps being replaced; is another agent starting and stopping in a loop?", path)
}

func parseLock(s string) lockInfo {
	var h lockInfo
	for _, l := range strings.Split(s, "\n") {
		k, v, _ := strings.Cut(l, "=")
		switch k {
		case "pid":
			h.pid, _ = strconv.Atoi(v)
		case "run_id":
			h.runID = v
		case "started":
			h.started = v
		}
	}
	return h
}

// release removes the file while still holding the lock (so no one can
// take a lock on it meanwhile and lose it) and then unlocks.
func (l *fileLock) release() {
	if l == nil {
		return
	}
	_ = os.Remove(l.path)
	l.f.Close()
}

// lockDir holds the locks that are per host rather than per directory:
// /run/flowbus for root (the user's runtime directory for others), else,
// where that cannot be written (a read-only root file system in a
// container, systemd's ProtectSystem), the default state directory, which
// deployments keep on the host.
func lockDir() string {
	var first string
	if os.Geteuid() == 0 {
		first = "/run/flowbus"
	} else if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		first = filepath.Join(d, "flowbus")
	}
	if first != "" && os.MkdirAll(first, 0o750) == nil && unix.Access(first, unix.W_OK) == nil {
		return first
	}
	return statedir.Dir(os.Getenv)
}

// captureLockPath is the lock of one capture: a cgroup (by its id, the
// directory's inode, which no rename or second mount path changes) and a
// host token. Two agents with both equal would publish every event twice.
func captureLockPath(cgroupPath, host string) (string, uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(cgroupPath, &st); err != nil {
		return "", 0, fmt.Errorf("FLOWBUS_CGROUP_PATH %s: %w", cgroupPath, err)
	}
	return filepath.Join(lockDir(), fmt.Sprintf("capture-cgroup%d-%s.lock", st.Ino, host)), st.Ino, nil
}

// agentLocks are the locks one agent holds.
type agentLocks []*fileLock

func (ls agentLocks) release() {
	for i := len(ls) - 1; i >= 0; i-- {
		ls[i].release()
	}
}

// lockFileName is the name of the lock in the store and spool directories.
const lockFileName = "flowagent.lock"

// takeLocks refuses to run beside another agent on the same capture (cgroup
// and host token), the same JetStream store or the same spool.
func takeLocks(cfg Config, cgroupPath, runID string) (agentLocks, error) {
	var ls agentLocks
	fail := func(err error) (agentLocks, error) {
		ls.release()
		return nil, err
	}
	p, id, err := captureLockPath(cgroupPath, cfg.Host)
	if err != nil {
		return fail(err)
	}
	l, err := acquireLock(p, runID, fmt.Sprintf("the capture of cgroup %s (id %d) as host %q", cgroupPath, id, cfg.Host),
		func(pid string) string {
			return "a second agent there would publish every connection twice: stop " + pid + ", or give this agent another FLOWBUS_HOST or FLOWBUS_CGROUP_PATH"
		})
	if err != nil {
		return fail(err)
	}
	ls = append(ls, l)
	if cfg.NATSURL == "" {
		l, err := acquireLock(filepath.Join(cfg.EmbeddedStoreDir, lockFileName), runID, "the JetStream store "+cfg.EmbeddedStoreDir,
			func(pid string) string {
				return "two servers on one store corrupt it: stop " + pid + ", or give this agent its own FLOWBUS_EMBEDDED_STORE_DIR (and FLOWBUS_SPOOL_DIR, FLOWBUS_EMBEDDED_LISTEN, FLOWBUS_METRICS_ADDR)"
			})
		if err != nil {
			return fail(err)
		}
		ls = append(ls, l)
	}
	if cfg.SpoolDir != "off" {
		l, err := acquireLock(filepath.Join(cfg.SpoolDir, lockFileName), runID, "the spool "+cfg.SpoolDir,
			func(pid string) string {
				return "two agents on one spool publish and delete each other's batches: stop " + pid + ", or give this agent its own FLOWBUS_SPOOL_DIR"
			})
		if err != nil {
			return fail(err)
		}
		ls = append(ls, l)
	}
	return ls, nil
}
