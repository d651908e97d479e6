package proctest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// StormArgs are the arguments of StormMain: a listener on addr, workers
// dialing it at rate connections per second each (0: as fast as they can),
// for dur or until maxConns connections are made.
func StormArgs(addr string, workers int, dur time.Duration, rate, maxConns int) []string {
	return []string{addr, strconv.Itoa(workers), dur.String(), strconv.Itoa(rate), strconv.Itoa(maxConns)}
}

// StormResult is what StormMain prints: the listener the storm connected to
// and the client port of every connection made, with the wall clock (unix
// ns) just before its dial in At (same index), for tests that place each
// connection in time (a restart's window).
type StormResult struct {
	Server string   `json:"server"`
	Ports  []uint16 `json:"ports"`
	At     []int64  `json:"at"`
	Errors int      `json:"errors"`
	LastEr string   `json:"last_error,omitempty"`
}

// StormMain is the body of a storm process, run inside the cgroup whose
// connections are to be seen (see StormArgs for its arguments). Each
// worker dials a listener of this process and closes with SO_LINGER 0 (RST,
// no TIME_WAIT), paced at rate per second (0: as fast as it can), until
// duration passes, max connections are made, or SIGTERM comes. It prints the
// client ports and dial times as JSON.
func StormMain(args []string) error {
	if len(args) != 5 {
		return fmt.Errorf("want addr workers duration rate max, got %q", args)
	}
	workers, err1 := strconv.Atoi(args[1])
	dur, err2 := time.ParseDuration(args[2])
	rate, err3 := strconv.Atoi(args[3])
	maxConns, err4 := strconv.ParseInt(args[4], 10, 64)
	if err := errors.Join(err1, err2, err3, err4); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(args[0], "0"))
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			// Wait for the client's RST: a server that resets first can make
			// the client's connect fail after the handshake (ECONNRESET), a
			// connection made that the client would not report.
			go func() {
				_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
				var b [1]byte
				_, _ = c.Read(b[:])
				_ = c.(*net.TCPConn).SetLinger(0)
				c.Close()
			}()
		}
	}()
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	ctx, cancel := context.WithTimeout(context.Background(), dur)
	defer cancel()
	go func() {
		select {
		case <-stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	var (
		mu       sync.Mutex
		res      = StormResult{Server: ln.Addr().String()}
		attempts atomic.Int64
		wg       sync.WaitGroup
	)
	d := net.Dialer{Timeout: 2 * time.Second}
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var ports []uint16
			var ats []int64
			errs, lastErr := 0, ""
			next := time.Now()
			for ctx.Err() == nil && attempts.Add(1) <= maxConns {
				if rate > 0 {
					next = next.Add(time.Second / time.Duration(rate))
					if wait := time.Until(next); wait > 0 {
						select {
						case <-ctx.Done():
						case <-time.After(wait):
						}
						if ctx.Err() != nil {
							break
						}
					}
				}
				// Not the storm's context: a dial cut short could leave a
				// connection made but not reported.
				at := time.Now().UnixNano()
				c, err := d.Dial("tcp", ln.Addr().String())
				if err != nil {
					errs++
					lastErr = err.Error()
					continue
				}
				ports = append(ports, uint16(c.LocalAddr().(*net.TCPAddr).Port))
				ats = append(ats, at)
				_ = c.(*net.TCPConn).SetLinger(0)
				c.Close()
			}
			mu.Lock()
			res.Ports = append(res.Ports, ports...)
			res.At = append(res.At, ats...)
			res.Errors += errs
			if lastErr != "" {
				res.LastEr = lastErr
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	ln.Close()
	return json.NewEncoder(os.Stdout).Encode(res)
}

// Storm is a running storm process.
type Storm struct {
	cmd     *exec.Cmd
	out     bytes.Buffer
	exited  chan struct{}
	waitErr error
}

// StartStorm starts cmd, a process that runs StormMain with StormArgs
// (inside a cgroup, typically).
func StartStorm(cmd *exec.Cmd) (*Storm, error) {
	s := &Storm{cmd: cmd, exited: make(chan struct{})}
	cmd.Stdout = &s.out
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	go func() { s.waitErr = cmd.Wait(); close(s.exited) }()
	return s, nil
}

// Wait waits up to d for the storm to end and returns what it did; past d
// the storm is killed.
func (s *Storm) Wait(d time.Duration) (*StormResult, error) {
	select {
	case <-s.exited:
		if s.waitErr != nil {
			return nil, fmt.Errorf("storm process: %w", s.waitErr)
		}
	case <-time.After(d):
		s.Kill()
		return nil, errors.New("storm process did not end")
	}
	var r StormResult
	if err := json.Unmarshal(s.out.Bytes(), &r); err != nil {
		return nil, fmt.Errorf("storm output %q: %w", s.out.String(), err)
	}
	return &r, nil
}

// Kill ends the storm at once and waits for the process to be gone.
func (s *Storm) Kill() {
	_ = s.cmd.Process.Kill()
	<-s.exited
}
