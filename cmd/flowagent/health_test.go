package main

// Readiness must not lie: real nats-server processes, the real flowagent
// binary and real traffic from a child cgroup. The stream deleted, the
// watched cgroup removed, the server hung: /readyz says so with the cause,
// the log says it once, and every connection made meanwhile arrives once
// it is fixed. A spool directory the agent cannot write is refused at start.

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sys/unix"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/cmd/internal/proctest"
)

func mCheck(check string) string { return `flowbus_agent_check_ok{check="` + check + `"}` }

// readyz returns the status and body of the agent's /readyz (0 when it
// does not answer).
func (a *agentProc) readyz() (int, string) {
	c := &http.Client{Timeout: time.Second}
	resp, err := c.Get("http://" + a.MetricsAddr + "/readyz")
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// waitReadyz polls /readyz every 50 ms until cond holds and returns how
// long that took and the last body; it fails the test after d.
func (a *agentProc) waitReadyz(d time.Duration, what string, cond func(code int, body string) bool) (time.Duration, string) {
	a.t.Helper()
	start := time.Now()
	var code int
	var body string
	for time.Since(start) < d {
		if code, body = a.readyz(); cond(code, body) {
			return time.Since(start), body
		}
		time.Sleep(50 * time.Millisecond)
	}
	a.t.Fatalf("agent %s: /readyz not %s after %v: %d %q\n%s", a.name, what, d, code, body, proctest.Tail(a.LogPath, 15))
	return 0, ""
}

func notReadyFor(check string) func(int, string) bool {
	return func(code int, body string) bool {
		return code == http.StatusServiceUnavailable && strings.Contains(body, "\n"+check+": ")
	}
}

func isReady(code int, _ string) bool { return code == http.StatusOK }

// logLines returns the lines of the agent's log that contain s.
func logLines(a *agentProc, s string) []string {
	var out []string
	for _, l := range strings.Split(a.Log(), "\n") {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return out
}

func deleteStream(t *testing.T, url string) {
	t.Helper()
	js, err := jetstream.New(natsConnect(t, url))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := js.DeleteStream(ctx, "FLOWS"); err != nil {
		t.Fatal(err)
	}
}

// 1. The stream is deleted while the agent runs (`nats stream rm`). Managed
// (the default): the agent recreates it, says so in one line, and every
// connection made after the deletion is in the new stream, once. Not
// managed: /readyz names the stream until an operator creates it, the log
// says so once, and the connections made meanwhile arrive then.
func TestFaultStreamDeleted(t *testing.T) {
	cgrouptest.RequirePrivileged(t)

	t.Run("managed", func(t *testing.T) {
		srv := newNATS(t, proctest.NATSOptions{})
		srv.Start()
		cg := cgrouptest.NewChild(t)
		a := startAgentProc(t, "agent", agentEnv(cg.Path, srv.URL(), "host-del", t.TempDir()))
		a.waitReadyz(20*time.Second, "ready", isReady)
		first := cg.Traffic(t, "127.0.0.1", 10, false)
		a.WaitMetrics(20*time.Second, "the first connections acknowledged", func(m map[string]float64) bool {
			return drained(m) && m[mPublished] == float64(2*len(first.Conns))
		})

		deleteStream(t, srv.URL())
		deleted := time.Now()
		after := newMultiset()
		after.addConns(cg.Traffic(t, "127.0.0.1", 40, false).Conns)
		if !a.WaitLog(15*time.Second, "stream FLOWS was deleted") {
			t.Fatalf("no line saying the stream was deleted and recreated:\n%s", proctest.Tail(a.LogPath, 15))
		}
		recreated := time.Since(deleted)
		m := a.WaitMetrics(30*time.Second, "everything acknowledged by the new stream", func(m map[string]float64) bool {
			return drained(m) && m[mPublished] == float64(2*len(first.Conns)+after.n)
		})
		drain := time.Since(deleted)
		got := waitStream(t, srv.URL(), "FLOWS", after.n, 30*time.Second)
		t.Logf("stream deleted: recreated within %v, all %d events made after the deletion acknowledged %v after it; %g publish attempts failed meanwhile",
			recreated.Round(time.Millisecond), after.n, drain.Round(time.Millisecond), m[mPubErrors])
		checkExact(t, "after the deletion", got, after)
		if m[mPubErrors] == 0 {
			t.Errorf("no publish failed between the deletion and the recreation: the test did not publish into a missing stream")
		}
		lines := logLines(a, "was deleted")
		for _, l := range lines {
			t.Logf("agent: %s", l)
		}
		if len(lines) != 1 {
			t.Errorf("%d lines about the deleted stream, want one", len(lines))
		}
		if n := len(logLines(a, "no response from stream")); n != 0 {
			t.Errorf("%d per-publish warnings about the missing stream; the state is named once", n)
		}
		a.Stop()
	})

	// The server comes back from an outage without its storage (a new
	// node, a lost volume): the agent looks at the stream after it
	// reconnects, recreates it, and what was made during the outage
	// arrives.
	t.Run("lost with the server", func(t *testing.T) {
		store := t.TempDir()
		srv := newNATS(t, proctest.NATSOptions{Extra: fmt.Sprintf("jetstream {\n  store_dir: %q\n}\n", store)})
		srv.Start()
		cg := cgrouptest.NewChild(t)
		a := startAgentProc(t, "agent", agentEnv(cg.Path, srv.URL(), "host-lost", t.TempDir()))
		a.waitReadyz(20*time.Second, "ready", isReady)
		first := cg.Traffic(t, "127.0.0.1", 5, false)
		a.WaitMetrics(20*time.Second, "the first connections acknowledged", func(m map[string]float64) bool {
			return drained(m) && m[mPublished] == float64(2*len(first.Conns))
		})

		srv.Stop(syscall.SIGTERM)
		down := time.Now()
		a.waitReadyz(10*time.Second, "failing on the connection", notReadyFor("nats"))
		during := newMultiset()
		during.addConns(cg.Traffic(t, "127.0.0.1", 20, false).Conns)
		if err := os.RemoveAll(store); err != nil {
			t.Fatal(err)
		}
		srv.Start()
		back := time.Now()
		if !a.WaitLog(20*time.Second, "stream FLOWS was deleted (or lost with the server's storage): recreated it") {
			t.Fatalf("no line saying the stream was recreated after the outage:\n%s", proctest.Tail(a.LogPath, 15))
		}
		m := a.WaitMetrics(30*time.Second, "the outage's connections acknowledged", func(m map[string]float64) bool {
			return drained(m) && m[mPublished] == float64(2*len(first.Conns)+during.n)
		})
		got := waitStream(t, srv.URL(), "FLOWS", during.n, 30*time.Second)
		t.Logf("server down %v, back without its store: stream recreated and all %d events of the outage acknowledged %v after the restart; %g publish attempts failed",
			back.Sub(down).Round(time.Millisecond), during.n, time.Since(back).Round(time.Millisecond), m[mPubErrors])
		checkExact(t, "made during the outage", got, during)
		if n := len(logLines(a, "was deleted")); n != 1 {
			t.Errorf("%d lines about the lost stream, want one", n)
		}
		a.Stop()
	})

	t.Run("unmanaged", func(t *testing.T) {
		srv := newNATS(t, proctest.NATSOptions{})
		srv.Start()
		nc := natsConnect(t, srv.URL())
		defaultStream(t, nc, 1)
		cg := cgrouptest.NewChild(t)
		env := agentEnv(cg.Path, srv.URL(), "host-unmanaged", t.TempDir())
		env["FLOWBUS_MANAGE_STREAM"] = "false"
		a := startAgentProc(t, "agent", env)
		a.waitReadyz(20*time.Second, "ready", isReady)
		first := cg.Traffic(t, "127.0.0.1", 5, false)
		a.WaitMetrics(20*time.Second, "the first connections acknowledged", func(m map[string]float64) bool {
			return drained(m) && m[mPublished] == float64(2*len(first.Conns))
		})

		deleteStream(t, srv.URL())
		deleted := time.Now()
		meanwhile := newMultiset()
		meanwhile.addConns(cg.Traffic(t, "127.0.0.1", 20, false).Conns)
		took, body := a.waitReadyz(10*time.Second, "failing on the stream", notReadyFor("stream"))
		t.Logf("stream deleted: /readyz 503 %v after the traffic: %q", took.Round(time.Millisecond), body)
		for _, want := range []string{"FLOWBUS_MANAGE_STREAM=true", "nats stream add FLOWS"} {
			if !strings.Contains(body, want) {
				t.Errorf("/readyz does not name the fix %q: %q", want, body)
			}
		}
		// It stays so: nothing is acknowledged, and one line says why
		// however many publishes fail.
		time.Sleep(3 * time.Second)
		m, _ := a.Metrics()
		if code, _ := a.readyz(); code != http.StatusServiceUnavailable || m[mReady] != 0 || m[mCheck("stream")] != 0 {
			t.Errorf("3 s later: /readyz %d, ready %g, check_ok{stream} %g; want 503, 0, 0", code, m[mReady], m[mCheck("stream")])
		}
		if m[mAcked] != float64(2*len(first.Conns)) {
			t.Errorf("%g events acknowledged with no stream, want %d", m[mAcked], 2*len(first.Conns))
		}
		notReady := logLines(a, "not ready: no stream takes")
		if len(notReady) != 1 {
			t.Errorf("%d lines saying the stream is missing, want one (%g publish attempts failed):\n%s", len(notReady), m[mPubErrors], strings.Join(notReady, "\n"))
		} else {
			t.Logf("agent: %s", notReady[0])
		}
		if n := len(logLines(a, "publish failed")); n != 0 {
			t.Errorf("%d per-publish warnings while the stream is missing; the state is named once", n)
		}

		defaultStream(t, nc, 1) // the operator creates it again
		created := time.Now()
		took, _ = a.waitReadyz(20*time.Second, "ready again", isReady)
		m = a.WaitMetrics(30*time.Second, "the connections made meanwhile acknowledged", func(m map[string]float64) bool {
			return drained(m) && m[mPublished] == float64(2*len(first.Conns)+meanwhile.n)
		})
		got := waitStream(t, srv.URL(), "FLOWS", meanwhile.n, 30*time.Second)
		t.Logf("stream missing for %v; ready %v after the operator created it; %g publish attempts failed meanwhile",
			created.Sub(deleted).Round(time.Millisecond), took.Round(time.Millisecond), m[mPubErrors])
		checkExact(t, "made while the stream was missing", got, meanwhile)
		if n := len(logLines(a, "ready again: stream FLOWS takes")); n != 1 {
			t.Errorf("%d lines saying the stream is back, want one", n)
		}
		a.Stop()
	})
}

// removeCgroup removes an empty cgroup: the traffic helper has exited, but
// the kernel may take a moment to let go of it.
func removeCgroup(t *testing.T, path string) {
	t.Helper()
	var err error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if err = os.Remove(path); err == nil {
			return
		}
	}
	t.Fatalf("removing the cgroup: %v", err)
}

// 2. The watched cgroup is removed (its service stopped): /readyz names it
// and one line says so; a cgroup made again at the same path (the service
// restarted) is attached to, with the capture lock, and its connections
// arrive; so are those of a cgroup that replaced it between two looks.
func TestFaultCgroupRemoved(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	srv := newNATS(t, proctest.NATSOptions{})
	srv.Start()
	cg := cgrouptest.NewChild(t)
	env := agentEnv(cg.Path, srv.URL(), "host-cgroup", t.TempDir())
	a := startAgentProc(t, "agent", env)
	a.waitReadyz(20*time.Second, "ready", isReady)
	want := newMultiset()
	want.addConns(cg.Traffic(t, "127.0.0.1", 5, false).Conns)
	a.WaitMetrics(20*time.Second, "the first connections acknowledged", func(m map[string]float64) bool {
		return drained(m) && m[mPublished] == float64(want.n)
	})

	removeCgroup(t, cg.Path)
	took, body := a.waitReadyz(5*time.Second, "failing on the cgroup", notReadyFor("cgroup"))
	t.Logf("cgroup removed: /readyz 503 after %v: %q", took.Round(time.Millisecond), body)
	if !strings.Contains(body, cg.Path) || !strings.Contains(body, "FLOWBUS_CGROUP_PATH") {
		t.Errorf("/readyz does not name the cgroup and the fix: %q", body)
	}
	time.Sleep(2 * time.Second)
	if m, _ := a.Metrics(); m[mReady] != 0 || m[mCheck("cgroup")] != 0 {
		t.Errorf("2 s after the removal: ready %g, check_ok{cgroup} %g; want 0, 0", m[mReady], m[mCheck("cgroup")])
	}
	if lines := logLines(a, "not ready: the watched cgroup"); len(lines) != 1 {
		t.Errorf("%d lines saying the cgroup is gone, want one:\n%s", len(lines), strings.Join(lines, "\n"))
	} else {
		t.Logf("agent: %s", lines[0])
	}

	cg2 := cgrouptest.NewChildAt(t, cg.Path)
	took, _ = a.waitReadyz(5*time.Second, "ready again", isReady)
	back := logLines(a, "programs attached to it")
	t.Logf("cgroup made again at %s (id %d, was %d): ready after %v; %q", cg.Path, cg2.ID(), cg.ID(), took.Round(time.Millisecond), back)
	if len(back) != 1 {
		t.Errorf("%d lines saying the agent attached to the new cgroup, want one", len(back))
	}
	want.addConns(cg2.Traffic(t, "127.0.0.1", 5, false).Conns)
	a.WaitMetrics(20*time.Second, "the new cgroup's connections acknowledged", func(m map[string]float64) bool {
		return drained(m) && m[mPublished] == float64(want.n)
	})

	// Removed and made again between two looks (a quick restart): never
	// seen gone, but the agent follows to the new cgroup and says so.
	removeCgroup(t, cg2.Path)
	cg3 := cgrouptest.NewChildAt(t, cg.Path)
	if !a.WaitLog(5*time.Second, "replaced by a new one at the same path") {
		t.Fatalf("no line saying the cgroup was replaced:\n%s", proctest.Tail(a.LogPath, 10))
	}
	t.Logf("cgroup replaced at once (id %d): %q", cg3.ID(), logLines(a, "replaced by a new one"))
	want.addConns(cg3.Traffic(t, "127.0.0.1", 5, false).Conns)
	m := a.WaitMetrics(20*time.Second, "the replacement's connections acknowledged", func(m map[string]float64) bool {
		return drained(m) && m[mPublished] == float64(want.n)
	})
	got := waitStream(t, srv.URL(), "FLOWS", want.n, 30*time.Second)
	checkExact(t, "before the removal, after the new cgroup and after its replacement", got, want)
	if m[mCheck("cgroup")] != 1 {
		t.Errorf("check_ok{cgroup} %g after the re-attach, want 1", m[mCheck("cgroup")])
	}

	// The capture lock followed the cgroup: a second agent on the new one
	// as the same host is refused.
	env2 := agentEnv(cg.Path, srv.URL(), "host-cgroup", t.TempDir())
	line := exitLine(t, startAgentProc(t, "second", env2))
	t.Logf("second agent on the new cgroup: %s", line)
	if !strings.Contains(line, "in use by flowagent pid") {
		t.Errorf("a second agent on the re-attached cgroup was not refused by the capture lock: %s", line)
	}
	a.Stop()
}

// 3. The server hangs (SIGSTOP) while traffic flows: the TCP connection
// stays up, but /readyz names the missing acks within about
// FLOWBUS_ACK_TIMEOUT; after SIGCONT it is ready again and every event is
// stored once.
func TestFaultNATSHangReadiness(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	const (
		ackTimeout = time.Second
		hang       = 4 * time.Second
	)
	srv := newNATS(t, proctest.NATSOptions{})
	srv.Start()
	cg := cgrouptest.NewChild(t)
	env := agentEnv(cg.Path, srv.URL(), "host-hang", t.TempDir())
	env["FLOWBUS_ACK_TIMEOUT"] = ackTimeout.String()
	a := startAgentProc(t, "agent", env)
	a.waitReadyz(20*time.Second, "ready", isReady)

	st := startStorm(t, cg, 2, hang+4*time.Second, 100, 1_000_000)
	time.Sleep(2 * time.Second)
	if err := syscall.Kill(srv.Pid(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	continued := false
	cont := func() {
		if !continued {
			continued = true
			_ = syscall.Kill(srv.Pid(), syscall.SIGCONT)
		}
	}
	t.Cleanup(cont)
	took, body := a.waitReadyz(ackTimeout+5*time.Second, "failing on the acks", notReadyFor("acks"))
	t.Logf("nats-server stopped: /readyz 503 after %v: %q", took.Round(time.Millisecond), body)
	if limit := ackTimeout + 2*time.Second; took > limit {
		t.Errorf("/readyz took %v to name the hung server, want at most %v (FLOWBUS_ACK_TIMEOUT + 2 s)", took, limit)
	}
	if m, _ := a.Metrics(); m[mCheck("acks")] != 0 || m[mCheck("nats")] != 1 {
		t.Errorf("while hung: check_ok{acks} %g, check_ok{nats} %g; want 0 (no answer) and 1 (the connection is up)", m[mCheck("acks")], m[mCheck("nats")])
	}
	time.Sleep(hang - time.Since(stopped))
	cont()
	resumed := time.Now()
	took, _ = a.waitReadyz(30*time.Second, "ready again", isReady)
	res := st.Wait()
	m := a.WaitMetrics(60*time.Second, "all acknowledged after the hang", drained)
	want := newMultiset()
	want.addStorm(res)
	got := waitStream(t, srv.URL(), "FLOWS", want.n, 30*time.Second)
	t.Logf("hang of %v during a storm of %d connections: ready %v after SIGCONT; %g publish attempts failed, %g duplicate acks",
		resumed.Sub(stopped).Round(time.Millisecond), len(res.Ports), took.Round(time.Millisecond), m[mPubErrors], m[mDupAcks])
	checkExact(t, "hang", got, want)
	stall := logLines(a, "not ready: no answer from the stream")
	if len(stall) != 1 {
		t.Errorf("%d lines naming the missing acks, want one:\n%s", len(stall), strings.Join(stall, "\n"))
	} else {
		t.Logf("agent: %s", stall[0])
	}
	if n := len(logLines(a, "ready again: the stream acknowledges")); n != 1 {
		t.Errorf("%d lines saying acks are back, want one", n)
	}
	// Before the acks check names the hang the publisher warns about
	// timeouts (at most once a second); after, the check's line is all.
	perPublish := len(logLines(a, "publish failed"))
	t.Logf("per-publish warnings over the %v hang: %d", hang, perPublish)
	if limit := int((ackTimeout+2*time.Second)/time.Second) + 1; perPublish > limit {
		t.Errorf("%d per-publish warnings during the hang, want at most %d: the acks check names it once", perPublish, limit)
	}

	// Idle, nothing waits for an ack: the agent's own look at the stream
	// (5 s after the last ack, on a 1 s tick) goes unanswered for
	// FLOWBUS_ACK_TIMEOUT and, at the next 1 s tick, names the hang too.
	if err := syscall.Kill(srv.Pid(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	continued = false
	took, body = a.waitReadyz(15*time.Second, "failing on the acks while idle", notReadyFor("acks"))
	t.Logf("idle agent, nats-server stopped: /readyz 503 after %v: %q", took.Round(time.Millisecond), body)
	if limit := 5*time.Second + ackTimeout + 3*time.Second; took > limit {
		t.Errorf("idle: /readyz took %v to name the hung server, want at most %v", took, limit)
	}
	cont()
	took, _ = a.waitReadyz(15*time.Second, "ready again", isReady)
	t.Logf("idle: ready %v after SIGCONT", took.Round(time.Millisecond))
	if n := len(logLines(a, "not ready: no answer from the stream")); n != 2 {
		t.Errorf("%d lines naming the missing answers over two hangs, want two", n)
	}
	a.Stop()
}

// 4. A spool directory the agent cannot write is refused at start, with
// one line naming FLOWBUS_SPOOL_DIR and both fixes, instead of dropping
// batches at the first outage.
func TestSpoolUnwritableRefused(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	srv := newNATS(t, proctest.NATSOptions{})
	srv.Start()
	cg := cgrouptest.NewChild(t)
	dir := t.TempDir()
	// Root writes through mode bits: a read-only mount stops it.
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_RDONLY, "size=64k"); err != nil {
		t.Fatalf("mounting a read-only tmpfs on %s: %v", dir, err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, 0) })
	start := time.Now()
	line := exitLine(t, startAgentProc(t, "agent", agentEnv(cg.Path, srv.URL(), "host-rospool", dir)))
	t.Logf("read-only spool: exit after %v: %s", time.Since(start).Round(time.Millisecond), line)
	for _, want := range []string{"FLOWBUS_SPOOL_DIR " + dir + " is not writable", "read-only file system", "make it writable", "FLOWBUS_SPOOL_DIR=off"} {
		if !strings.Contains(line, want) {
			t.Errorf("the line does not say %q", want)
		}
	}
}
