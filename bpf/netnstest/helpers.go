package netnstest

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
)

// The helpers run as the test binary re-executed (cgrouptest.Command), in a
// namespace (Wrap); a test package that uses them calls
// cgrouptest.MaybeRunHelper in its TestMain.
func init() {
	cgrouptest.Register("netns-server", serverHelper)
	cgrouptest.Register("netns-clients", clientsHelper)
}

// serverHelper: args backlog [fastopen|inet4]. A dual-stack listener on
// [::]:0 with the given backlog (with TCP Fast Open; or an IPv4-only one on
// 0.0.0.0:0); prints its port, then serves connections (one byte echoed
// each) until stdin closes, and prints the accepted connections as JSON.
func serverHelper(args []string) error {
	if len(args) != 1 && len(args) != 2 {
		return fmt.Errorf("want backlog [fastopen], got %q", args)
	}
	backlog, _ := strconv.Atoi(args[0])
	// net.Listen takes the system's backlog; a small one is what makes the
	// kernel answer with SYN cookies under a burst.
	opt := ""
	if len(args) == 2 {
		opt = args[1]
	}
	family := syscall.AF_INET6
	if opt == "inet4" {
		family = syscall.AF_INET // an IPv4-only socket, not dual-stack
	}
	fd, err := syscall.Socket(family, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	if family == syscall.AF_INET6 {
		if err := syscall.SetsockoptInt(fd, syscall.IPPROTO_IPV6, syscall.IPV6_V6ONLY, 0); err != nil {
			return err
		}
		err = syscall.Bind(fd, &syscall.SockaddrInet6{})
	} else {
		err = syscall.Bind(fd, &syscall.SockaddrInet4{})
	}
	if err != nil {
		return err
	}
	if opt == "fastopen" {
		if err := syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, unix.TCP_FASTOPEN, 64); err != nil {
			return err
		}
		// Data in the SYN taken without a cookie.
		if err := syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, unix.TCP_FASTOPEN_NO_COOKIE, 1); err != nil {
			return err
		}
	}
	if err := syscall.Listen(fd, backlog); err != nil {
		return err
	}
	fmt.Println(sockaddrPort(fd))
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		// Wakes the blocked accept below (EINVAL from then on).
		_ = syscall.Shutdown(fd, syscall.SHUT_RD)
	}()
	// A blocking accept on a thread of its own: woken by the kernel the
	// moment a child is queued, not by the poller and a goroutine switch,
	// so that the accept queue stays as short as it can.
	runtime.LockOSThread()
	var wg sync.WaitGroup
	var conns []cgrouptest.Conn
	for {
		nfd, sa, err := syscall.Accept4(fd, syscall.SOCK_CLOEXEC)
		if err != nil {
			if err == syscall.EINTR || err == syscall.ECONNABORTED {
				continue
			}
			break
		}
		lsa, _ := syscall.Getsockname(nfd)
		conns = append(conns, cgrouptest.Conn{Client: sockaddrString(sa), Server: sockaddrString(lsa)})
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer syscall.Close(nfd)
			tv := syscall.Timeval{Sec: 5}
			_ = syscall.SetsockoptTimeval(nfd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv)
			var b [1]byte
			if n, _ := syscall.Read(nfd, b[:]); n == 1 {
				_, _ = syscall.Write(nfd, b[:])
			}
		}()
	}
	wg.Wait()
	return json.NewEncoder(os.Stdout).Encode(conns)
}

func sockaddrPort(fd int) int {
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		return 0
	}
	switch a := sa.(type) {
	case *syscall.SockaddrInet6:
		return a.Port
	case *syscall.SockaddrInet4:
		return a.Port
	}
	return 0
}

// sockaddrString is ip:port as net.Conn addresses print it (IPv4 unmapped).
func sockaddrString(sa syscall.Sockaddr) string {
	switch a := sa.(type) {
	case *syscall.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr).Unmap(), uint16(a.Port)).String()
	case *syscall.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)).String()
	}
	return ""
}

// ClientsResult is what the client helper reports.
type ClientsResult struct {
	Conns  []cgrouptest.Conn `json:"conns"`  // got their byte back
	Failed int               `json:"failed"` // did not, within the timeouts
	Err    string            `json:"err,omitempty"`
}

// clientsHelper: args n addr... . n connections to each address, all at
// once (a burst), each sending a byte and reading it back; prints a
// ClientsResult. Timeouts are short: under a burst on a small backlog the
// kernel drops some handshakes for good.
func clientsHelper(args []string) error {
	if len(args) < 2 {
		return fmt.Errorf("want n addr..., got %q", args)
	}
	// "fo:n": connect with TCP Fast Open, the byte going out in the SYN.
	fastopen := strings.HasPrefix(args[0], "fo:")
	n, _ := strconv.Atoi(strings.TrimPrefix(args[0], "fo:"))
	d := net.Dialer{Timeout: 4 * time.Second}
	if fastopen {
		d.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, unix.TCP_FASTOPEN_CONNECT, 1)
			}); err != nil {
				return err
			}
			return serr
		}
	}
	var mu sync.Mutex
	var res ClientsResult
	var wg sync.WaitGroup
	for _, addr := range args[1:] {
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := func() error {
					c, err := d.Dial("tcp", addr)
					if err != nil {
						return err
					}
					defer c.Close()
					_ = c.SetDeadline(time.Now().Add(3 * time.Second))
					if _, err := c.Write([]byte{'x'}); err != nil {
						return err
					}
					var b [1]byte
					if _, err := io.ReadFull(c, b[:]); err != nil {
						return err
					}
					mu.Lock()
					res.Conns = append(res.Conns, cgrouptest.Conn{Client: c.LocalAddr().String(), Server: c.RemoteAddr().String()})
					mu.Unlock()
					return nil
				}()
				if err != nil {
					mu.Lock()
					res.Failed++
					if res.Err == "" {
						res.Err = err.Error()
					}
					mu.Unlock()
				}
			}()
		}
	}
	wg.Wait()
	return json.NewEncoder(os.Stdout).Encode(res)
}

// Server starts the server helper in cgroup cg and namespace ns and
// returns its port and a function that stops it and returns the
// connections it accepted.
func Server(t testing.TB, cg *cgrouptest.Cgroup, ns string, backlog int, extra ...string) (int, func() []cgrouptest.Conn) {
	t.Helper()
	cmd := Wrap(cg.Command("netns-server", append([]string{strconv.Itoa(backlog)}, extra...)...), ns)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	br := bufio.NewReader(out)
	line, err := br.ReadString('\n')
	port, perr := strconv.Atoi(strings.TrimSpace(line))
	if err != nil || perr != nil {
		t.Fatalf("server helper printed no port: %q %v", line, err)
	}
	return port, func() []cgrouptest.Conn {
		t.Helper()
		stdin.Close()
		var conns []cgrouptest.Conn
		if err := json.NewDecoder(br).Decode(&conns); err != nil {
			t.Fatalf("server helper's connections: %v", err)
		}
		return conns
	}
}

// Clients runs the client helper in cgroup cg and namespace ns: n
// connections to each of addrs, all at once ("fo:n": with TCP Fast Open).
func Clients(t testing.TB, cg *cgrouptest.Cgroup, ns string, n string, addrs ...string) ClientsResult {
	t.Helper()
	cmd := Wrap(cg.Command("netns-clients", append([]string{n}, addrs...)...), ns)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("clients in %s: %v", ns, err)
	}
	var res ClientsResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("clients output %q: %v", out, err)
	}
	return res
}
