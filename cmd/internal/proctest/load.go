package proctest

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// LoadStormResult is what a load storm prints (JSON on stdout).
type LoadStormResult struct {
	Conns  uint64 `json:"conns"`  // connect() calls that succeeded
	Failed uint64 `json:"failed"` // connect() calls that failed or timed out
	// Errors counts the failures by error text (a few kinds at most).
	Errors     map[string]uint64 `json:"errors,omitempty"`
	Seconds    float64           `json:"seconds"` // from the first connect to the last worker's end
	ListenPort int               `json:"listen_port"`
	// PortCounts maps a client port to how many successful connections used
	// it (only with -ports): ports are reused during a long storm, so B2
	// compares multisets, not sets.
	PortCounts map[uint16]uint32 `json:"port_counts,omitempty"`
	// FailedPortCounts is the same for failed attempts that had bound a
	// port: connections that may legitimately have begun (SYN-ACK seen).
	FailedPortCounts map[uint16]uint32 `json:"failed_port_counts,omitempty"`
	// Rate is the paced target (0: unpaced); Lost counts the tokens a paced
	// storm could not use in time (the bucket's burst was exceeded).
	Rate float64 `json:"rate,omitempty"`
	Lost uint64  `json:"lost_tokens,omitempty"`
}

// pacer is a token bucket shared by the storm's goroutines: connection i is
// due at start + i/rate; a goroutine that falls behind by more than the burst
// loses the missed tokens instead of catching up in one rush.
type pacer struct {
	mu       sync.Mutex
	next     time.Time
	interval time.Duration
	burst    time.Duration
	lost     uint64
}

func newPacer(rate float64, start time.Time) *pacer {
	return &pacer{next: start, interval: time.Duration(float64(time.Second) / rate), burst: 10 * time.Millisecond}
}

// wait blocks until the next token is due; false once it would be past the
// deadline.
func (p *pacer) wait(deadline time.Time) bool {
	p.mu.Lock()
	now := time.Now()
	if floor := now.Add(-p.burst); p.next.Before(floor) {
		p.lost += uint64(floor.Sub(p.next) / p.interval)
		p.next = floor
	}
	t := p.next
	p.next = p.next.Add(p.interval)
	p.mu.Unlock()
	if !t.Before(deadline) {
		return false
	}
	if d := t.Sub(now); d > 0 {
		time.Sleep(d)
	}
	return true
}

// BulkResult is what the bulk load prints.
type BulkResult struct {
	Bytes   int64   `json:"bytes"`
	Seconds float64 `json:"seconds"`
}

// LoadMain is the whole life of a benchmark's load process, started inside
// the cgroup whose cost is measured: args[0] is the kind, "storm" (as many
// connections as the workers can make, or paced with -rate) or "bulk" (one
// TCP stream), and the rest its flags. It prints the result as JSON.
//
// Unlike StormMain, which makes every connection complete for tests that
// count them exactly, a load storm measures the rate: raw blocking syscalls,
// a short connect timeout, failures counted rather than fatal.
func LoadMain(args []string) error {
	if len(args) == 0 {
		return errors.New("worker: missing kind (storm|bulk)")
	}
	switch args[0] {
	case "storm":
		return stormWorker(args[1:])
	case "bulk":
		return bulkWorker(args[1:])
	}
	return fmt.Errorf("worker: unknown kind %q", args[0])
}

// stormWorker connects and closes as fast as W goroutines can, to a listener
// in the same process. Raw blocking syscalls keep the per-connection cost in
// the kernel (where the agent's hooks run), not in Go's netpoller.
func stormWorker(args []string) error {
	fs := flag.NewFlagSet("storm", flag.ContinueOnError)
	workers := fs.Int("workers", 4, "connecting goroutines")
	seconds := fs.Float64("seconds", 3, "storm duration")
	maxConns := fs.Uint64("max", 10_000_000, "stop after this many connections")
	ports := fs.Bool("ports", false, "report client port counts")
	rate := fs.Float64("rate", 0, "pace to this many connections/s (token bucket); 0: as fast as possible")
	if err := fs.Parse(args); err != nil {
		return err
	}

	lfd, port, err := listenLoopback()
	if err != nil {
		return err
	}
	// Two acceptors so a full accept queue never drops SYNs (that would stall
	// a client for the 1 s SYN retransmit and measure the queue, not the hook).
	for i := 0; i < 2; i++ {
		go func() {
			for {
				nfd, _, err := syscall.Accept4(lfd, syscall.SOCK_CLOEXEC)
				if err != nil {
					if err == syscall.EINTR || err == syscall.ECONNABORTED || err == syscall.EAGAIN {
						continue
					}
					return
				}
				_ = syscall.SetsockoptLinger(nfd, syscall.SOL_SOCKET, syscall.SO_LINGER, &syscall.Linger{Onoff: 1, Linger: 0})
				syscall.Close(nfd)
			}
		}()
	}

	var total, failed atomic.Uint64
	var errMu sync.Mutex
	errs := map[string]uint64{}
	counts := make([][]uint32, *workers)
	failCounts := make([][]uint32, *workers)
	dst := &syscall.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}}
	start := time.Now()
	deadline := start.Add(time.Duration(*seconds * float64(time.Second)))
	var pace *pacer
	if *rate > 0 {
		pace = newPacer(*rate, start)
	}
	var wg sync.WaitGroup
	for w := 0; w < *workers; w++ {
		if *ports {
			counts[w] = make([]uint32, 65536)
			failCounts[w] = make([]uint32, 65536)
		}
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			// syscall.Connect writes into the address it is given: one copy
			// per goroutine.
			dst := *dst
			for time.Now().Before(deadline) && total.Load() < *maxConns {
				if pace != nil && !pace.wait(deadline) {
					break
				}
				cport, err := connectClose(&dst, *ports)
				if err != nil {
					failed.Add(1)
					errMu.Lock()
					errs[err.Error()]++
					errMu.Unlock()
					if *ports && cport != 0 {
						failCounts[w][cport]++
					}
					continue
				}
				total.Add(1)
				if *ports {
					counts[w][cport]++
				}
			}
		}(w)
	}
	wg.Wait()
	res := LoadStormResult{Conns: total.Load(), Failed: failed.Load(), Seconds: time.Since(start).Seconds(), ListenPort: port, Errors: errs, Rate: *rate}
	if pace != nil {
		res.Seconds = min(res.Seconds, *seconds) // the last wait ends at the deadline, not past it
		res.Lost = pace.lost
	}
	if *ports {
		res.PortCounts, res.FailedPortCounts = sumCounts(counts), sumCounts(failCounts)
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// sumCounts merges per-worker port counts into a sparse map.
func sumCounts(per [][]uint32) map[uint16]uint32 {
	m := map[uint16]uint32{}
	for _, c := range per {
		for p, n := range c {
			if n > 0 {
				m[uint16(p)] += n
			}
		}
	}
	return m
}

// connectClose makes one connection and resets it (SO_LINGER 0: no
// TIME_WAIT, so ports do not run out), returning the client port (also when
// connect failed, if one was bound: its SYN-ACK may still have passed).
func connectClose(dst *syscall.SockaddrInet4, wantPort bool) (int, error) {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		// EMFILE and the like: back off briefly instead of spinning.
		time.Sleep(time.Millisecond)
		return 0, err
	}
	defer syscall.Close(fd)
	_ = syscall.SetsockoptLinger(fd, syscall.SOL_SOCKET, syscall.SO_LINGER, &syscall.Linger{Onoff: 1, Linger: 0})
	// A blocking connect honours SO_SNDTIMEO: a lost SYN would otherwise stall
	// this worker for the 1 s retransmit and measure that, not the hooks.
	tv := syscall.Timeval{Usec: 250_000}
	_ = syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_SNDTIMEO, &tv)
	err = syscall.Connect(fd, dst)
	if err == syscall.EINTR {
		// Go's preemption signal can interrupt a blocking connect; the
		// handshake goes on in the kernel, so wait for it rather than count
		// a connection whose SYN-ACK the agent may well see as failed.
		err = awaitConnect(fd)
	}
	if !wantPort {
		return 0, err
	}
	port := 0
	if sa, gerr := syscall.Getsockname(fd); gerr == nil {
		port = sa.(*syscall.SockaddrInet4).Port
	} else if err == nil {
		err = gerr
	}
	return port, err
}

// awaitConnect waits (at most 1 s) for an interrupted connect to finish.
func awaitConnect(fd int) error {
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	for {
		n, err := unix.Poll(pfd, 1000)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return syscall.ETIMEDOUT
		}
		break
	}
	soErr, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_ERROR)
	if err != nil {
		return err
	}
	if soErr != 0 {
		return syscall.Errno(soErr)
	}
	return nil
}

// listenLoopback opens a blocking listener on 127.0.0.1 with an ephemeral port.
func listenLoopback() (int, int, error) {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, 0, err
	}
	_ = syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		return 0, 0, err
	}
	if err := syscall.Listen(fd, 4096); err != nil {
		return 0, 0, err
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		return 0, 0, err
	}
	return fd, sa.(*syscall.SockaddrInet4).Port, nil
}

// bulkWorker sends one TCP stream of the given size over loopback to a reader
// in the same process and reports the throughput seen by the reader.
func bulkWorker(args []string) error {
	fs := flag.NewFlagSet("bulk", flag.ContinueOnError)
	size := fs.Int64("bytes", 1<<30, "bytes to send")
	timeout := fs.Duration("timeout", 60*time.Second, "give up after")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	deadline := time.Now().Add(*timeout)
	type recv struct {
		n   int64
		end time.Time
		err error
	}
	done := make(chan recv, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- recv{err: err}
			return
		}
		defer c.Close()
		_ = c.SetDeadline(deadline)
		n, err := io.CopyBuffer(io.Discard, c, make([]byte, 256<<10))
		done <- recv{n: n, end: time.Now(), err: err}
	}()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		return err
	}
	_ = c.SetDeadline(deadline)
	buf := make([]byte, 256<<10)
	start := time.Now()
	for left := *size; left > 0; {
		n := int64(len(buf))
		if left < n {
			n = left
		}
		if _, err := c.Write(buf[:n]); err != nil {
			c.Close()
			return err
		}
		left -= n
	}
	c.Close()
	r := <-done
	if r.err != nil {
		return r.err
	}
	if r.n != *size {
		return fmt.Errorf("bulk: received %d of %d bytes", r.n, *size)
	}
	return json.NewEncoder(os.Stdout).Encode(BulkResult{Bytes: r.n, Seconds: r.end.Sub(start).Seconds()})
}
