package netnstest

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
)

func init() {
	cgrouptest.Register("netns-conn", connHelper)
}

// Ways a scripted connection (Conn) ends. The client sends the request
// bytes, the server the response bytes, then:
const (
	// EndFIN: the client closes once it has the response, the server when
	// it reads the client's FIN: FINs both ways.
	EndFIN = "fin"
	// EndServerRST: the server closes with the request unread: it sends a
	// RST (it only sends one byte, once the request is all in).
	EndServerRST = "server-rst"
	// EndClientRST: the client closes with SO_LINGER 0 once it has the
	// response: it sends a RST.
	EndClientRST = "client-rst"
	// EndStall: after the request the server prints "ready" and waits for
	// a line on stdin (the test cuts the link meanwhile), then sends the
	// response, which nothing acknowledges: its retransmissions time out.
	EndStall = "stall"
)

// connHelper: args server mode reqBytes respBytes | client mode addr
// reqBytes respBytes. The server listens on [::]:0, prints its port, serves
// one connection and prints "done" and the error that ended it, if any.
func connHelper(args []string) error {
	if len(args) < 4 {
		return fmt.Errorf("want server|client mode [addr] req resp, got %q", args)
	}
	role, mode := args[0], args[1]
	var addr string
	if role == "client" {
		addr, args = args[2], args[1:]
	}
	req, _ := strconv.Atoi(args[2])
	resp, _ := strconv.Atoi(args[3])
	if role == "server" {
		return connServer(mode, req, resp)
	}
	return connClient(mode, addr, req, resp)
}

func netDialer() *net.Dialer { return &net.Dialer{Timeout: 5 * time.Second} }

func sockFD(c interface {
	SyscallConn() (syscall.RawConn, error)
}) int {
	rc, _ := c.SyscallConn()
	var fd int
	_ = rc.Control(func(f uintptr) { fd = int(f) })
	return fd
}

// waitOutq waits until everything written on fd was acknowledged.
func waitOutq(fd int) {
	for i := 0; i < 2000; i++ {
		n, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ)
		if err != nil || n == 0 {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

func connServer(mode string, req, resp int) error {
	fd, err := syscall.Socket(syscall.AF_INET6, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	_ = syscall.SetsockoptInt(fd, syscall.IPPROTO_IPV6, syscall.IPV6_V6ONLY, 0)
	if err := syscall.Bind(fd, &syscall.SockaddrInet6{}); err != nil {
		return err
	}
	if err := syscall.Listen(fd, 16); err != nil {
		return err
	}
	fmt.Println(sockaddrPort(fd))
	nfd, _, err := syscall.Accept4(fd, syscall.SOCK_CLOEXEC)
	if err != nil {
		return err
	}
	syscall.Close(fd)
	f := os.NewFile(uintptr(nfd), "conn")
	err = serveOne(f, nfd, mode, req, resp)
	if err == nil {
		fmt.Println("done")
	} else {
		fmt.Println("done", err)
	}
	return nil
}

func serveOne(f *os.File, fd int, mode string, req, resp int) error {
	defer f.Close()
	switch mode {
	case EndServerRST:
		// Wait for the whole request, unread, then answer one byte and
		// close once it is acknowledged: unread data makes close a RST.
		for i := 0; i < 5000; i++ {
			n, _ := unix.IoctlGetInt(fd, unix.SIOCINQ)
			if n >= req {
				break
			}
			time.Sleep(time.Millisecond)
		}
		if _, err := f.Write([]byte{'r'}); err != nil {
			return err
		}
		waitOutq(fd)
		time.Sleep(20 * time.Millisecond) // the client's ACK was taken
		return nil
	}
	if _, err := io.ReadFull(f, make([]byte, req)); err != nil {
		return err
	}
	if mode == EndStall {
		fmt.Println("ready")
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
	}
	if _, err := f.Write(make([]byte, resp)); err != nil {
		return err
	}
	waitOutq(fd)
	// Read until the client's FIN or RST (or the retransmissions give up).
	_, err := io.Copy(io.Discard, f)
	return err
}

func connClient(mode, addr string, req, resp int) error {
	d := netDialer()
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return err
	}
	tc := c.(interface {
		SyscallConn() (syscall.RawConn, error)
		Write([]byte) (int, error)
		Read([]byte) (int, error)
		Close() error
	})
	fd := sockFD(tc)
	if _, err := tc.Write(make([]byte, req)); err != nil {
		return err
	}
	waitOutq(fd)
	switch mode {
	case EndServerRST:
		// The one byte, then the server's RST.
		_, err := io.Copy(io.Discard, c)
		fmt.Println("done", err)
		return nil
	case EndStall:
		// The response never comes; the test ends this process.
		_, _ = io.Copy(io.Discard, c)
		return nil
	}
	if _, err := io.ReadFull(c, make([]byte, resp)); err != nil {
		return err
	}
	if mode == EndClientRST {
		// Let the ACK of the response reach the server first.
		time.Sleep(20 * time.Millisecond)
		_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	}
	fmt.Println("done")
	return c.Close()
}

// ConnServer is a running server of one scripted connection.
type ConnServer struct {
	Port  int
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
}

// StartConnServer starts the server of one scripted connection (mode: one
// of the End* constants) in cgroup cg and namespace ns.
func StartConnServer(t testing.TB, cg *cgrouptest.Cgroup, ns, mode string, req, resp int) *ConnServer {
	t.Helper()
	cmd := Wrap(cg.Command("netns-conn", "server", mode, strconv.Itoa(req), strconv.Itoa(resp)), ns)
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
	s := &ConnServer{cmd: cmd, stdin: stdin, out: bufio.NewReader(out)}
	line, err := s.out.ReadString('\n')
	if s.Port, _ = strconv.Atoi(strings.TrimSpace(line)); err != nil || s.Port == 0 {
		t.Fatalf("conn server printed no port: %q %v", line, err)
	}
	return s
}

// Line reads the server's next line of output ("ready", "done [error]").
func (s *ConnServer) Line(t testing.TB) string {
	t.Helper()
	line, err := s.out.ReadString('\n')
	if err != nil {
		t.Fatalf("conn server: %v (after %q)", err, line)
	}
	return strings.TrimSpace(line)
}

// Go lets a stalled server go on.
func (s *ConnServer) Go() { _, _ = io.WriteString(s.stdin, "go\n") }

// StartConnClient starts the client of a scripted connection to addr in
// cgroup cg and namespace ns; wait returns its output once it exits.
func StartConnClient(t testing.TB, cg *cgrouptest.Cgroup, ns, mode, addr string, req, resp int) (wait func() string) {
	t.Helper()
	cmd := Wrap(cg.Command("netns-conn", "client", mode, addr, strconv.Itoa(req), strconv.Itoa(resp)), ns)
	var b strings.Builder
	cmd.Stdout = &b
	cmd.Stderr = &b
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-done })
	return func() string {
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		return strings.TrimSpace(b.String())
	}
}
