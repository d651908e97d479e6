package proctest

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat: 100
// on every Linux architecture Go supports.
const clockTicks = 100

// ProcCPU returns a process's user+sys CPU time so far (all its threads).
func ProcCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// comm (field 2) may contain spaces: fields count from after its ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no comm", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); utime is field 14, stime field 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: short", pid)
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: bad utime/stime", pid)
	}
	return time.Duration(ut+st) * time.Second / clockTicks, nil
}

// ProcMem returns VmRSS and VmHWM (peak RSS) in bytes.
func ProcMem(pid int) (rss, hwm int64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok || (k != "VmRSS" && k != "VmHWM") {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		n, _ := strconv.ParseInt(f[0], 10, 64)
		if k == "VmRSS" {
			rss = n << 10
		} else {
			hwm = n << 10
		}
	}
	return rss, hwm, nil
}

// Window measures a process's CPU over a window and samples its RSS.
type Window struct {
	pid     int
	start   time.Time
	cpu0    time.Duration
	stop    chan struct{}
	wg      sync.WaitGroup
	mu      sync.Mutex
	rssMax  int64
	rssSum  float64
	samples int
}

// WatchProc starts a window: CPU now, RSS sampled every 250 ms.
func WatchProc(pid int) (*Window, error) {
	c, err := ProcCPU(pid)
	if err != nil {
		return nil, err
	}
	w := &Window{pid: pid, start: time.Now(), cpu0: c, stop: make(chan struct{})}
	w.sample()
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-w.stop:
				return
			case <-t.C:
				w.sample()
			}
		}
	}()
	return w, nil
}

func (w *Window) sample() {
	rss, _, err := ProcMem(w.pid)
	if err != nil {
		return
	}
	w.mu.Lock()
	w.rssMax = max(w.rssMax, rss)
	w.rssSum += float64(rss)
	w.samples++
	w.mu.Unlock()
}

// Usage is what a window measured.
type Usage struct {
	Seconds   float64 `json:"seconds"`     // wall time of the window
	CPU       float64 `json:"cpu_seconds"` // user+sys over the window
	Cores     float64 `json:"cores"`       // CPU / wall
	RSSMaxMiB float64 `json:"rss_max_mib"` // largest VmRSS sample
	RSSAvgMiB float64 `json:"rss_avg_mib"`
	HWMMiB    float64 `json:"vmhwm_mib"` // VmHWM at the end (peak since start)
	Samples   int     `json:"rss_samples"`
}

// End closes the window.
func (w *Window) End() (Usage, error) {
	close(w.stop)
	w.wg.Wait()
	w.sample()
	c, err := ProcCPU(w.pid)
	if err != nil {
		return Usage{}, err
	}
	_, hwm, err := ProcMem(w.pid)
	if err != nil {
		return Usage{}, err
	}
	u := Usage{Seconds: time.Since(w.start).Seconds(), CPU: (c - w.cpu0).Seconds(), HWMMiB: float64(hwm) / (1 << 20)}
	u.Cores = u.CPU / u.Seconds
	w.mu.Lock()
	u.RSSMaxMiB, u.Samples = float64(w.rssMax)/(1<<20), w.samples
	if w.samples > 0 {
		u.RSSAvgMiB = w.rssSum / float64(w.samples) / (1 << 20)
	}
	w.mu.Unlock()
	return u, nil
}

// SysBusy returns the whole machine's busy CPU time so far (every state but
// idle and iowait), from /proc/stat.
func SysBusy() (time.Duration, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	var busy uint64
	for i, v := range f[1:] {
		if i == 3 || i == 4 || i >= 8 { // idle, iowait; guest time is already in user
			continue
		}
		n, _ := strconv.ParseUint(v, 10, 64)
		busy += n
	}
	return time.Duration(busy) * time.Second / clockTicks, nil
}

// CgroupCPU is the CPU time used so far by every process of a cgroup v2
// (cpu.stat usage_usec, always present).
func CgroupCPU(path string) (time.Duration, error) {
	b, err := os.ReadFile(path + "/cpu.stat")
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "usage_usec "); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			return time.Duration(n) * time.Microsecond, err
		}
	}
	return 0, fmt.Errorf("%s/cpu.stat: no usage_usec", path)
}
