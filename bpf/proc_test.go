package bpf

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/schema"
)

// The attribution tests run helpers (this binary re-executed, under names
// of their own, as other users) in cgroups and compare what the events say
// with the pids the kernel gave the processes the test started.

func init() {
	cgrouptest.Register("proc-listen", procListenHelper)
	cgrouptest.Register("proc-accept", procAcceptHelper)
	cgrouptest.Register("proc-connect", procConnectHelper)
	cgrouptest.Register("proc-socket", procSocketHelper)
	cgrouptest.Register("proc-connect-fd", procConnectFdHelper)
	cgrouptest.Register("proc-send", procSendHelper)
	cgrouptest.Register("proc-listen-autobind", procListenAutobindHelper)
}

// procListenAutobindHelper listens without binding first: listen() picks
// the port, so no post_bind hook runs for the listener.
func procListenAutobindHelper([]string) error {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	if err := syscall.Listen(fd, 16); err != nil {
		return err
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		return err
	}
	ln, err := net.FileListener(os.NewFile(uintptr(fd), "listener"))
	if err != nil {
		return err
	}
	go serveConns(ln)
	report(procReport{Pid: os.Getpid(), Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*syscall.SockaddrInet4).Port))})
	waitStdin()
	return nil
}

// procReport is the line a helper prints once it is ready.
type procReport struct {
	Pid    int    `json:"pid"`
	Addr   string `json:"addr,omitempty"`   // a listener's address
	Local  string `json:"local,omitempty"`  // a connection's local address
	Worker int    `json:"worker,omitempty"` // the pid of a forked worker
}

func report(r procReport) {
	b, _ := json.Marshal(r)
	fmt.Println(string(b))
}

// waitStdin returns when the test closes the helper's stdin.
func waitStdin() { _, _ = io.Copy(io.Discard, os.Stdin) }

// helperEnv is this process's environment with helper name to run.
func helperEnv(name string, extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "FLOWBUS_TEST_HELPER=") && !strings.HasPrefix(kv, "FLOWBUS_TEST_FD=") {
			env = append(env, kv)
		}
	}
	return append(append(env, "FLOWBUS_TEST_HELPER="+name), extra...)
}

// serveConns accepts, says one byte on each connection (so that a test
// knows which process accepted it) and reads it to the end.
func serveConns(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			_, _ = c.Write([]byte{'a'})
			_, _ = io.Copy(io.Discard, c)
			c.Close()
		}()
	}
}

// procListenHelper: [worker exe]. Listens on 127.0.0.1 (plain TCP, not
// Go's default Multipath TCP); with a worker exe, a worker started from it
// accepts on the inherited listener and this process never does.
func procListenHelper(args []string) error {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	r := procReport{Pid: os.Getpid(), Addr: ln.Addr().String()}
	if len(args) == 1 {
		f, err := ln.(*net.TCPListener).File()
		if err != nil {
			return err
		}
		w := exec.Command(args[0], "-test.run=^$")
		w.Env = helperEnv("proc-accept")
		w.ExtraFiles = []*os.File{f}
		w.Stderr = os.Stderr
		if err := w.Start(); err != nil {
			return err
		}
		defer func() { _ = w.Process.Kill(); _ = w.Wait() }()
		r.Worker = w.Process.Pid
	} else {
		go serveConns(ln)
	}
	report(r)
	waitStdin()
	return nil
}

// procAcceptHelper accepts on the listener at fd 3 until killed.
func procAcceptHelper([]string) error {
	ln, err := net.FileListener(os.NewFile(3, "listener"))
	if err != nil {
		return err
	}
	serveConns(ln)
	return nil
}

func procConnectHelper(args []string) error {
	c, err := net.Dial("tcp", args[0])
	if err != nil {
		return err
	}
	defer c.Close()
	report(procReport{Pid: os.Getpid(), Local: c.LocalAddr().String()})
	waitStdin()
	return nil
}

// tcpSocket makes an unconnected IPv4 TCP socket that survives an exec.
func tcpSocket() (int, error) {
	return unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
}

// procSocketHelper: addr exe inplace|child. Makes a socket, then execs exe
// in its place (same pid, another program) or starts exe as a child that
// inherits it; either way exe connects it to addr.
func procSocketHelper(args []string) error {
	fd, err := tcpSocket()
	if err != nil {
		return err
	}
	if args[2] == "inplace" {
		env := helperEnv("proc-connect-fd", "FLOWBUS_TEST_FD="+strconv.Itoa(fd))
		return syscall.Exec(args[1], []string{args[1], "-test.run=^$", args[0]}, env)
	}
	cmd := exec.Command(args[1], "-test.run=^$", args[0])
	cmd.Env = helperEnv("proc-connect-fd", "FLOWBUS_TEST_FD=3")
	cmd.ExtraFiles = []*os.File{os.NewFile(uintptr(fd), "sock")}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	return cmd.Run()
}

// procConnectFdHelper connects the socket at fd $FLOWBUS_TEST_FD to addr.
func procConnectFdHelper(args []string) error {
	ap, err := netip.ParseAddrPort(args[0])
	if err != nil {
		return err
	}
	fd, err := strconv.Atoi(os.Getenv("FLOWBUS_TEST_FD"))
	if err != nil {
		return err
	}
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}); err != nil {
		return err
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return err
	}
	in := sa.(*unix.SockaddrInet4)
	report(procReport{Pid: os.Getpid(), Local: netip.AddrPortFrom(netip.AddrFrom4(in.Addr), uint16(in.Port)).String()})
	waitStdin()
	return nil
}

// procSendHelper: unix socket path. Makes a TCP socket and passes it over
// the unix socket (SCM_RIGHTS) to whoever listens there.
func procSendHelper(args []string) error {
	fd, err := tcpSocket()
	if err != nil {
		return err
	}
	c, err := net.Dial("unix", args[0])
	if err != nil {
		return err
	}
	defer c.Close()
	if _, _, err := c.(*net.UnixConn).WriteMsgUnix([]byte{1}, unix.UnixRights(fd), nil); err != nil {
		return err
	}
	report(procReport{Pid: os.Getpid()})
	waitStdin()
	return nil
}

// helperExes copies the test binary where other users can run it, under
// the given names (symlinks: the kernel's comm is the name executed).
func helperExes(t *testing.T, names ...string) map[string]string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "flowbus-proc-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "flowbus-helper")
	if err := os.WriteFile(bin, src, 0o755); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, n := range names {
		p := filepath.Join(dir, n)
		if err := os.Symlink(bin, p); err != nil {
			t.Fatal(err)
		}
		out[n] = p
	}
	return out
}

// helper is a started helper process and its ready line.
type helper struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	r     procReport
}

// startHelper starts helper name in cg as exe, with uid (-1: the test's),
// and waits for its ready line; the helper stops when the test ends.
func startHelper(t *testing.T, cg *cgrouptest.Cgroup, exe string, uid int, name string, args ...string) *helper {
	t.Helper()
	cmd := cg.Command(name, args...)
	cmd.Path, cmd.Args[0] = exe, exe
	if uid >= 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &helper{cmd: cmd, stdin: stdin}
	t.Cleanup(h.stop)
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- s
		_, _ = io.Copy(io.Discard, stdout)
	}()
	select {
	case s := <-line:
		if err := json.Unmarshal([]byte(s), &h.r); err != nil {
			t.Fatalf("helper %s: ready line %q: %v", name, s, err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("helper %s: no ready line", name)
	}
	return h
}

func (h *helper) stop() {
	if h.stdin != nil {
		h.stdin.Close()
		h.stdin = nil
		done := make(chan struct{})
		go func() { _ = h.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = h.cmd.Process.Kill()
			<-done
		}
	}
}

// testServer listens on 127.0.0.1 in the test process (outside the watched
// cgroup: it makes no events of its own).
func testServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go serveConns(ln)
	return ln.Addr().String()
}

// procWant is a process as the test knows it.
type procWant struct {
	pid  int
	comm string
	uid  uint32
}

// findFlow waits for the event of direction dir whose source is src (an
// outgoing connection's local end, an incoming one's peer).
func findFlow(t *testing.T, col *collector, dir schema.Direction, src string) schema.Event {
	t.Helper()
	ap := netip.MustParseAddrPort(src)
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		col.mu.Lock()
		for _, ev := range col.evs {
			if ev.Direction == dir && ev.Src == ap.Addr() && ev.SrcPort == ap.Port() {
				col.mu.Unlock()
				return ev
			}
		}
		col.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no %v event from %s", dir, src)
	return schema.Event{}
}

// findEnd waits for the end of the connection with source src.
func findEnd(t *testing.T, col *collector, src string) schema.EndEvent {
	t.Helper()
	ap := netip.MustParseAddrPort(src)
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		col.mu.Lock()
		for _, ev := range col.ends {
			if ev.Src == ap.Addr() && ev.SrcPort == ap.Port() {
				col.mu.Unlock()
				return ev
			}
		}
		col.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no end event from %s", src)
	return schema.EndEvent{}
}

func checkProc(t *testing.T, what string, pid uint32, comm string, uid uint32, uidKnown bool, want procWant) {
	t.Helper()
	if int(pid) != want.pid || comm != want.comm || !uidKnown || uid != want.uid {
		t.Errorf("%s: pid %d comm %q uid %d (known %v), want pid %d comm %q uid %d", what, pid, comm, uid, uidKnown, want.pid, want.comm, want.uid)
	}
}

func checkUnknown(t *testing.T, what string, ev schema.Event) {
	t.Helper()
	if ev.PID != 0 || ev.Comm != "" || ev.UIDKnown {
		t.Errorf("%s: pid %d comm %q uid %d (known %v), want all unknown", what, ev.PID, ev.Comm, ev.UID, ev.UIDKnown)
	}
}

func dialFrom(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Connections from two programs, as two users, in two child cgroups of the
// watched one: each outgoing begin and its end carry their own process.
func TestProcTwoPrograms(t *testing.T) {
	procTwoPrograms(t, Options{})
}

// TestProcTwoProgramsOneSlot is TestProcTwoPrograms with one socket slot:
// at most one of the two connecting sockets holds it, the other's state
// goes to socket storage, and both begins and ends carry their process.
func TestProcTwoProgramsOneSlot(t *testing.T) {
	procTwoPrograms(t, Options{slots: 1})
}

func procTwoPrograms(t *testing.T, o Options) {
	cgrouptest.RequirePrivileged(t)
	exes := helperExes(t, "fbclient-a", "fbclient-b")
	watched := cgrouptest.NewChild(t)
	a, b := watched.Child(t, "a"), watched.Child(t, "b")
	o.CgroupPath = watched.Path
	c, col := runCaptureWith(t, o)
	if at := c.Attribution(); len(at.Attached()) != len(procHooks) {
		t.Fatalf("attribution hooks: %s", at.Mechanism())
	}
	srv := testServer(t)
	ha := startHelper(t, a, exes["fbclient-a"], 65534, "proc-connect", srv)
	hb := startHelper(t, b, exes["fbclient-b"], 4242, "proc-connect", srv)
	for _, x := range []struct {
		h    *helper
		want procWant
	}{
		{ha, procWant{ha.cmd.Process.Pid, "fbclient-a", 65534}},
		{hb, procWant{hb.cmd.Process.Pid, "fbclient-b", 4242}},
	} {
		if x.h.r.Pid != x.want.pid {
			t.Fatalf("helper says pid %d, started as %d", x.h.r.Pid, x.want.pid)
		}
		ev := findFlow(t, col, schema.Outgoing, x.h.r.Local)
		checkProc(t, "begin "+x.want.comm, ev.PID, ev.Comm, ev.UID, ev.UIDKnown, x.want)
		x.h.stop()
		end := findEnd(t, col, x.h.r.Local)
		checkProc(t, "end "+x.want.comm, end.PID, end.Comm, end.UID, end.UIDKnown, x.want)
	}
}

// An incoming connection carries the listener's process, and so does its end.
func TestProcIncoming(t *testing.T) {
	procIncoming(t, "fbserver", "proc-listen")
}

// A listener that listens without a bind (its port picked by listen, so no
// post_bind hook ran) hands its process to the sockets it accepts too.
func TestProcIncomingAutobound(t *testing.T) {
	procIncoming(t, "fbautobind", "proc-listen-autobind")
}

// procIncoming connects to the listener that helper (run as exe, uid 4242)
// opens and checks the incoming begin and end carry that process.
func procIncoming(t *testing.T, exe, helper string) {
	cgrouptest.RequirePrivileged(t)
	exes := helperExes(t, exe)
	watched := cgrouptest.NewChild(t)
	_, col := runCapture(t, watched)
	h := startHelper(t, watched, exes[exe], 4242, helper)
	want := procWant{h.cmd.Process.Pid, exe, 4242}
	conn := dialFrom(t, h.r.Addr)
	ev := findFlow(t, col, schema.Incoming, conn.LocalAddr().String())
	checkProc(t, "incoming begin", ev.PID, ev.Comm, ev.UID, ev.UIDKnown, want)
	conn.Close()
	end := findEnd(t, col, conn.LocalAddr().String())
	checkProc(t, "incoming end", end.PID, end.Comm, end.UID, end.UIDKnown, want)
}

// A listener opened before the capture started is attributed by
// FillExisting; one whose process left the watched cgroup stays unknown
// (its socket still belongs to the cgroup, the process is not walked).
func TestProcListenerBeforeStart(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	exes := helperExes(t, "fbearly", "fbmoved")
	watched := cgrouptest.NewChild(t)
	outside := cgrouptest.NewChild(t)
	early := startHelper(t, watched, exes["fbearly"], 33, "proc-listen")
	moved := startHelper(t, watched, exes["fbmoved"], 34, "proc-listen")
	if err := os.WriteFile(filepath.Join(outside.Path, "cgroup.procs"), []byte(strconv.Itoa(moved.cmd.Process.Pid)), 0); err != nil {
		t.Fatal(err)
	}
	c, col := runCapture(t, watched)
	st, err := c.FillExisting()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("FillExisting: %+v", st)
	if st.Sockets < 1 || st.Processes < 1 {
		t.Errorf("FillExisting filled %d sockets of %d processes, want the early listener", st.Sockets, st.Processes)
	}
	ce := dialFrom(t, early.r.Addr)
	ev := findFlow(t, col, schema.Incoming, ce.LocalAddr().String())
	checkProc(t, "listener before start", ev.PID, ev.Comm, ev.UID, ev.UIDKnown, procWant{early.cmd.Process.Pid, "fbearly", 33})
	cm := dialFrom(t, moved.r.Addr)
	checkUnknown(t, "listener of a process moved out", findFlow(t, col, schema.Incoming, cm.LocalAddr().String()))
	// A second walk finds the entries in place and changes nothing.
	st2, err := c.FillExisting()
	if err != nil {
		t.Fatal(err)
	}
	if st2.Sockets != 0 || st2.Already < st.Sockets {
		t.Errorf("second FillExisting: %+v, want nothing new and %d already there", st2, st.Sockets)
	}
}

// Forked workers accepting on a listener their parent opened: the incoming
// event names the parent (the process that created and bound the
// listener), not the worker that accepts: the kernel answers the SYN
// before any accept.
func TestProcForkedWorkers(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	exes := helperExes(t, "fbmaster", "fbworker")
	watched := cgrouptest.NewChild(t)
	_, col := runCapture(t, watched)
	h := startHelper(t, watched, exes["fbmaster"], 4242, "proc-listen", exes["fbworker"])
	if h.r.Worker == 0 || h.r.Worker == h.cmd.Process.Pid {
		t.Fatalf("no worker: %+v", h.r)
	}
	conn := dialFrom(t, h.r.Addr)
	// Only the worker accepts: its byte says it has the connection.
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(conn, make([]byte, 1)); err != nil {
		t.Fatalf("the worker did not accept: %v", err)
	}
	ev := findFlow(t, col, schema.Incoming, conn.LocalAddr().String())
	checkProc(t, "accepted by a worker", ev.PID, ev.Comm, ev.UID, ev.UIDKnown, procWant{h.cmd.Process.Pid, "fbmaster", 4242})
}

// A socket made by one program and connected after an exec (same pid) or
// by a child it was inherited by (another pid): the event names the
// process that connected it, as connect4 saw it.
func TestProcExecAndInherited(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	exes := helperExes(t, "fbmaker", "fbexeced", "fbchild")
	watched := cgrouptest.NewChild(t)
	_, col := runCapture(t, watched)
	srv := testServer(t)

	inplace := startHelper(t, watched, exes["fbmaker"], 4242, "proc-socket", srv, exes["fbexeced"], "inplace")
	if inplace.r.Pid != inplace.cmd.Process.Pid {
		t.Fatalf("exec changed the pid: %d, started %d", inplace.r.Pid, inplace.cmd.Process.Pid)
	}
	ev := findFlow(t, col, schema.Outgoing, inplace.r.Local)
	checkProc(t, "connected after exec", ev.PID, ev.Comm, ev.UID, ev.UIDKnown, procWant{inplace.cmd.Process.Pid, "fbexeced", 4242})

	child := startHelper(t, watched, exes["fbmaker"], 4242, "proc-socket", srv, exes["fbchild"], "child")
	if child.r.Pid == child.cmd.Process.Pid {
		t.Fatalf("the child reports its parent's pid %d", child.r.Pid)
	}
	ev = findFlow(t, col, schema.Outgoing, child.r.Local)
	checkProc(t, "connected by a child that inherited it", ev.PID, ev.Comm, ev.UID, ev.UIDKnown, procWant{child.r.Pid, "fbchild", 4242})
}

// A socket passed over SCM_RIGHTS to a process outside the watched cgroup
// (this test) and connected there: the socket stays the cgroup's, and the
// event names the process that connected it.
func TestProcPassedSocket(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	exes := helperExes(t, "fbsender")
	watched := cgrouptest.NewChild(t)
	_, col := runCapture(t, watched)
	srv := testServer(t)
	dir, err := os.MkdirTemp("", "flowbus-pass-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "pass.sock")
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ul.Close()
	// The sender runs as another user.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o777); err != nil {
		t.Fatal(err)
	}
	got := make(chan int, 1)
	go func() {
		c, err := ul.AcceptUnix()
		if err != nil {
			got <- -1
			return
		}
		defer c.Close()
		oob := make([]byte, unix.CmsgSpace(4))
		_, oobn, _, _, err := c.ReadMsgUnix(make([]byte, 1), oob)
		if err != nil {
			got <- -1
			return
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil || len(msgs) != 1 {
			got <- -1
			return
		}
		fds, err := unix.ParseUnixRights(&msgs[0])
		if err != nil || len(fds) != 1 {
			got <- -1
			return
		}
		got <- fds[0]
	}()
	startHelper(t, watched, exes["fbsender"], 4242, "proc-send", path)
	fd := <-got
	if fd < 0 {
		t.Fatal("no socket received")
	}
	f := os.NewFile(uintptr(fd), "passed")
	defer f.Close()
	ap := netip.MustParseAddrPort(srv)
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	in := sa.(*unix.SockaddrInet4)
	local := netip.AddrPortFrom(netip.AddrFrom4(in.Addr), uint16(in.Port)).String()
	comm, err := os.ReadFile("/proc/self/comm")
	if err != nil {
		t.Fatal(err)
	}
	ev := findFlow(t, col, schema.Outgoing, local)
	checkProc(t, "passed and connected here", ev.PID, ev.Comm, ev.UID, ev.UIDKnown,
		procWant{os.Getpid(), strings.TrimSpace(string(comm)), uint32(os.Getuid())})
}
