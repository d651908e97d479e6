package main

// Start-up refusals and identification, with the agent as a process: taken
// ports fail at once, a second agent on the same capture, store or spool
// is refused naming the holder, the ready file names the agent that wrote
// it, and the embedded server answers `nats server` requests.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/cmd/internal/proctest"
	"github.com/flowbus/flowbus/publisher/embedded"
)

// embeddedEnv is an agent on its own embedded server (free ports, own
// store and spool) that writes a ready file.
func embeddedEnv(t *testing.T, cgroupPath, host string) map[string]string {
	t.Helper()
	env := agentEnv(cgroupPath, "", host, t.TempDir())
	env["FLOWBUS_EMBEDDED_LISTEN"] = fmt.Sprintf("127.0.0.1:%d", freePort(t))
	env["FLOWBUS_EMBEDDED_STORE_DIR"] = t.TempDir()
	env["FLOWBUS_READY_FILE"] = filepath.Join(t.TempDir(), "ready")
	return env
}

// waitReady waits for the agent's ready file to name it and returns its
// fields.
func waitReady(t *testing.T, a *agentProc, env map[string]string) map[string]string {
	t.Helper()
	m, err := a.WaitReadyFile(env["FLOWBUS_READY_FILE"], 30*time.Second)
	if err != nil {
		t.Fatalf("agent %s: %v:\n%s", a.name, err, a.Log())
	}
	return m
}

// A taken FLOWBUS_EMBEDDED_LISTEN, FLOWBUS_EMBEDDED_MONITOR or
// FLOWBUS_METRICS_ADDR ends the agent at once, non-zero, with one line
// naming the variable, the cause and the process holding the port.
func TestPortInUseFailsAtOnce(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	cg := cgrouptest.NewChild(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	busy := ln.Addr().String()
	testBinaries(t) // the build does not count
	for _, v := range []string{"FLOWBUS_EMBEDDED_LISTEN", "FLOWBUS_EMBEDDED_MONITOR", "FLOWBUS_METRICS_ADDR"} {
		t.Run(v, func(t *testing.T) {
			env := embeddedEnv(t, cg.Path, "busy-port")
			env[v] = busy
			t0 := time.Now()
			line := exitLine(t, startAgentProc(t, "busy", env))
			if d := time.Since(t0); d > 5*time.Second {
				t.Errorf("exited after %v, want at once", d)
			}
			if !strings.Contains(line, v+"="+busy+": address already in use") || !strings.Contains(line, "set "+v) {
				t.Errorf("the line does not name %s=%s, the cause and the fix: %s", v, busy, line)
			}
			// The test process holds the port: the line names it.
			if !strings.Contains(line, fmt.Sprintf("pid %d (", os.Getpid())) {
				t.Errorf("the line does not name the holder, pid %d: %s", os.Getpid(), line)
			}
		})
	}
}

// A second agent on the same capture (cgroup and host token), JetStream
// store or spool is refused, naming the first one's pid and the fix; an
// agent that shares none of them runs beside it, and once the first is
// killed its locks are free again.
func TestSecondAgentRefused(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	cg := cgrouptest.NewChild(t)
	env1 := embeddedEnv(t, cg.Path, "lock-a")
	a1 := startAgentProc(t, "first", env1)
	ready := waitReady(t, a1, env1)
	if ready["run_id"] == "" || ready["nats_url"] != "nats://"+env1["FLOWBUS_EMBEDDED_LISTEN"] {
		t.Errorf("ready file %v: want the run id and the embedded server's URL", ready)
	}
	if !strings.Contains(a1.Log(), "run_id="+ready["run_id"]) {
		t.Errorf("ready file's run id %s is not the one the agent logged:\n%s", ready["run_id"], a1.Log())
	}
	holder := fmt.Sprintf("in use by flowagent pid %d (run %s", a1.Pid(), ready["run_id"])

	for _, tc := range []struct {
		name   string
		change func(env map[string]string)
		want   []string
	}{
		{"capture", func(env map[string]string) { env["FLOWBUS_HOST"] = "lock-a" },
			[]string{fmt.Sprintf("the capture of cgroup %s (id %d) as host \"lock-a\"", cg.Path, cg.ID()), "publish every connection twice", "FLOWBUS_HOST"}},
		{"store", func(env map[string]string) { env["FLOWBUS_EMBEDDED_STORE_DIR"] = env1["FLOWBUS_EMBEDDED_STORE_DIR"] },
			[]string{"the JetStream store " + env1["FLOWBUS_EMBEDDED_STORE_DIR"], "FLOWBUS_EMBEDDED_STORE_DIR"}},
		{"spool", func(env map[string]string) { env["FLOWBUS_SPOOL_DIR"] = env1["FLOWBUS_SPOOL_DIR"] },
			[]string{"the spool " + env1["FLOWBUS_SPOOL_DIR"], "FLOWBUS_SPOOL_DIR"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := embeddedEnv(t, cg.Path, "lock-b")
			tc.change(env)
			line := exitLine(t, startAgentProc(t, "second-"+tc.name, env))
			for _, w := range append(tc.want, holder, fmt.Sprintf("stop pid %d", a1.Pid())) {
				if !strings.Contains(line, w) {
					t.Errorf("the line lacks %q: %s", w, line)
				}
			}
		})
	}

	// Another host token on the same cgroup, own store and spool: allowed.
	envB := embeddedEnv(t, cg.Path, "lock-b")
	b := startAgentProc(t, "beside", envB)
	waitReady(t, b, envB)
	b.Stop()
	if _, err := os.Stat(envB["FLOWBUS_READY_FILE"]); !os.IsNotExist(err) {
		t.Errorf("ready file left after a clean stop (err %v)", err)
	}

	// The kernel drops a killed agent's locks: the same settings run again.
	a1.Signal(syscall.SIGKILL)
	a2 := startAgentProc(t, "after-kill", env1)
	if r := waitReady(t, a2, env1); r["run_id"] == ready["run_id"] {
		t.Errorf("the restarted agent reports the killed one's run id %s", r["run_id"])
	}
	a2.Stop()
}

// The embedded server has a system account and an optional monitoring
// port: the requests of `nats server info` and `nats server report
// jetstream` answer, with the password the agent wrote and logged where.
func TestEmbeddedServerInfo(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	cg := cgrouptest.NewChild(t)
	env := embeddedEnv(t, cg.Path, "sys-info")
	env["FLOWBUS_EMBEDDED_MONITOR"] = fmt.Sprintf("127.0.0.1:%d", freePort(t))
	a := startAgentProc(t, "sys", env)
	ready := waitReady(t, a, env)
	pwFile := embedded.SystemPasswordFile(env["FLOWBUS_EMBEDDED_STORE_DIR"])
	if !strings.Contains(a.Log(), "system_password_file="+pwFile) || !strings.Contains(a.Log(), "monitor=http://"+env["FLOWBUS_EMBEDDED_MONITOR"]) {
		t.Errorf("the start line does not say where the system password and the monitoring port are:\n%s", a.Log())
	}
	pw, err := os.ReadFile(pwFile)
	if err != nil {
		t.Fatal(err)
	}
	sys := natsConnect(t, ready["nats_url"], nats.UserInfo(embedded.SystemUser, strings.TrimSpace(string(pw))))
	// The stream exists once the agent is ready; JSZ must count it.
	m, err := sys.Request("$SYS.REQ.SERVER.PING.JSZ", []byte(`{"streams":true}`), 5*time.Second)
	if err != nil {
		t.Fatalf("$SYS.REQ.SERVER.PING.JSZ: %v", err)
	}
	var jsz struct {
		Server struct {
			Name string `json:"name"`
		} `json:"server"`
		Data struct {
			Streams int `json:"streams"`
		} `json:"data"`
	}
	if err := json.Unmarshal(m.Data, &jsz); err != nil || jsz.Server.Name != "flowbus-embedded" || jsz.Data.Streams != 1 {
		t.Errorf("JSZ answer %.300s (err %v): want server flowbus-embedded with 1 stream", m.Data, err)
	}
	if _, err := sys.Request("$SYS.REQ.SERVER.PING", nil, 5*time.Second); err != nil {
		t.Errorf("$SYS.REQ.SERVER.PING: %v", err)
	}
	resp, err := http.Get("http://" + env["FLOWBUS_EMBEDDED_MONITOR"] + "/jsz")
	if err != nil {
		t.Fatalf("monitoring port: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"streams": 1`) {
		t.Errorf("/jsz: %s %.300s", resp.Status, body)
	}
	// Consumers without credentials still read the stream.
	nc := natsConnect(t, ready["nats_url"])
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := js.Stream(ctx, "FLOWS"); err != nil {
		t.Errorf("a client without credentials does not see the stream: %v", err)
	}
	a.Stop()
}

// A stream an operator edited keeps the edits over a restart of the agent;
// the agent's own settings are put back, each with a log line, and the
// stream's max message size fits the agent's largest batch.
func TestAgentKeepsOperatorStreamEdits(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	cg := cgrouptest.NewChild(t)
	srv := newNATS(t, proctest.NATSOptions{})
	srv.Start()
	env := agentEnv(cg.Path, srv.URL(), "stream-edit", t.TempDir())
	env["FLOWBUS_READY_FILE"] = filepath.Join(t.TempDir(), "ready")
	a := startAgentProc(t, "first", env)
	waitReady(t, a, env)
	a.Stop()

	nc := natsConnect(t, srv.URL())
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	st, err := js.Stream(ctx, "FLOWS")
	if err != nil {
		t.Fatal(err)
	}
	c := st.CachedInfo().Config
	if want := int32(65536 + 65536); c.MaxMsgSize != want {
		t.Errorf("created with max_msg_size %d, want FLOWBUS_BATCH_MAX_BYTES plus 64 KiB = %d", c.MaxMsgSize, want)
	}
	c.Description = "edited by the operator"
	c.AllowDirect = true
	c.MaxMsgSize = 2 << 20
	c.MaxMsgsPerSubject = 5000
	c.MaxAge = 2 * time.Hour
	if _, err := js.UpdateStream(ctx, c); err != nil {
		t.Fatal(err)
	}

	a = startAgentProc(t, "second", env)
	waitReady(t, a, env)
	a.Stop()
	st, err = js.Stream(ctx, "FLOWS")
	if err != nil {
		t.Fatal(err)
	}
	c = st.CachedInfo().Config
	if c.Description != "edited by the operator" || !c.AllowDirect || c.MaxMsgSize != 2<<20 || c.MaxMsgsPerSubject != 5000 {
		t.Errorf("the restart reverted operator settings: description %q allow_direct %v max_msg_size %d max_msgs_per_subject %d",
			c.Description, c.AllowDirect, c.MaxMsgSize, c.MaxMsgsPerSubject)
	}
	if c.MaxAge != 24*time.Hour {
		t.Errorf("max_age %v, want FLOWBUS_STREAM_MAX_AGE's 24h", c.MaxAge)
	}
	log := a.Log()
	if n := strings.Count(log, "stream setting changed"); n != 1 || !strings.Contains(log, "setting=max_age old=2h0m0s new=24h0m0s") {
		t.Errorf("want one line for max_age (old 2h, new 24h), got %d lines:\n%s", n, log)
	}
}

// With NATS unreachable the agent says so, naming the URL (credentials
// redacted), and its stop line tells batches spooled from batches acked.
func TestUnreachableNATSSaysSoAndCountsSpooled(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	cg := cgrouptest.NewChild(t)
	port := freePort(t) // nothing listens there
	spoolDir := t.TempDir()
	env := agentEnv(cg.Path, fmt.Sprintf("nats://flow:secret@127.0.0.1:%d", port), "unreachable", spoolDir)
	env["FLOWBUS_READY_FILE"] = filepath.Join(t.TempDir(), "ready")
	a := startAgentProc(t, "unreachable", env)
	waitReady(t, a, env)
	cg.Traffic(t, "127.0.0.1", 20, false)
	url := fmt.Sprintf("nats://flow:xxxxx@127.0.0.1:%d", port)
	if !a.WaitLog(20*time.Second, "NATS is not reachable") {
		t.Fatalf("no line saying NATS is not reachable:\n%s", a.Log())
	}
	a.Stop()
	log := a.Log()
	if strings.Contains(log, "headers not supported") || strings.Contains(log, "secret") {
		t.Errorf("log blames headers or shows the password:\n%s", log)
	}
	if !strings.Contains(log, "url="+url) {
		t.Errorf("log does not name %s:\n%s", url, log)
	}
	var stop string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "flowagent stopped") {
			stop = l
		}
	}
	spooled := countSpoolFiles(t, spoolDir)
	if spooled == 0 {
		t.Fatalf("nothing in the spool after the outage:\n%s", log)
	}
	if !strings.Contains(stop, "batches_acked=0") || !strings.Contains(stop, "spool_batches_left="+strconv.Itoa(spooled)) {
		t.Errorf("stop line %q: want batches_acked=0 and spool_batches_left=%d (the files in the spool)", stop, spooled)
	}
	if strings.Contains(stop, "batches_spooled=0") {
		t.Errorf("stop line %q counts no spooled batch", stop)
	}
}

// demoTree lays out deploy/run-demo.sh beside bin/flowagent and a fresh
// bin/flowtail, as `make run` has them.
func demoTree(t *testing.T) string {
	t.Helper()
	_, agent := testBinaries(t)
	root, err := modRootFn()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, d := range []string{"deploy", "bin"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	script, err := os.ReadFile(filepath.Join(root, "deploy", "run-demo.sh"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "deploy", "run-demo.sh"), script, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(agent, filepath.Join(dir, "bin", "flowagent")); err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{"flowtail", "flowstat"} {
		if err := proctest.GoBuild(context.Background(), root, "./cmd/"+c, filepath.Join(dir, "bin", c)); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// demoOutput is a file the demo writes to; String is what it holds so far.
type demoOutput string

func (o demoOutput) String() string {
	b, _ := os.ReadFile(string(o))
	return string(b)
}

// runDemo starts the demo with env (FLOWBUS_* of this process left out).
func runDemo(t *testing.T, dir string, env map[string]string, args ...string) (*exec.Cmd, demoOutput, demoOutput) {
	t.Helper()
	cmd := exec.Command("bash", append([]string{filepath.Join(dir, "deploy", "run-demo.sh")}, args...)...)
	cmd.Env = proctest.Environ(proctest.EnvList(env)...)
	out := t.TempDir()
	stdout, stderr := demoOutput(filepath.Join(out, "stdout")), demoOutput(filepath.Join(out, "stderr"))
	fo, err := os.Create(string(stdout))
	if err != nil {
		t.Fatal(err)
	}
	defer fo.Close()
	fe, err := os.Create(string(stderr))
	if err != nil {
		t.Fatal(err)
	}
	defer fe.Close()
	cmd.Stdout, cmd.Stderr = fo, fe
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
	return cmd, stdout, stderr
}

// waitDemo waits up to d for the demo to end; past it the demo is killed
// (it is showing flows it should not, or none).
func waitDemo(cmd *exec.Cmd, d time.Duration) error {
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		// The whole group: bash defers its traps while a foreground child
		// (flowtail) runs.
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return fmt.Errorf("still running after %v", d)
	}
}

// `make run` while another agent holds the demo's ports: the demo says so
// at once, on screen, instead of showing the other agent's flows. With its
// ports free it shows its own agent's flows.
func TestDemoUsesItsOwnAgent(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	dir := demoTree(t)
	other := embeddedEnv(t, cgrouptest.NewChild(t).Path, "other-agent")
	o := startAgentProc(t, "other", other)
	waitReady(t, o, other)
	cg := cgrouptest.NewChild(t)
	demoEnv := func() map[string]string {
		return map[string]string{
			"FLOWBUS_CGROUP_PATH":        cg.Path,
			"FLOWBUS_HOST":               "demo-host",
			"FLOWBUS_EMBEDDED_STORE_DIR": t.TempDir(),
			"FLOWBUS_SPOOL_DIR":          t.TempDir(),
			"FLOWBUS_DEMO_LOG":           filepath.Join(t.TempDir(), "demo.log"),
			"FLOWBUS_BATCH_LINGER":       "20ms",
			// The demo's flowstat: its own database and ports.
			"FLOWBUS_DB":                filepath.Join(t.TempDir(), "flowstat.db"),
			"FLOWBUS_STAT_METRICS_ADDR": fmt.Sprintf("127.0.0.1:%d", freePort(t)),
			"FLOWBUS_DEMO_WEB_LISTEN":   fmt.Sprintf("127.0.0.1:%d", freePort(t)),
			"FLOWBUS_DEMO_STAT_LOG":     filepath.Join(t.TempDir(), "flowstat.log"),
		}
	}

	for _, tc := range []struct{ name, listen, metrics, variable string }{
		{"both ports", other["FLOWBUS_EMBEDDED_LISTEN"], other["FLOWBUS_METRICS_ADDR"], "FLOWBUS_METRICS_ADDR"},
		{"NATS port", other["FLOWBUS_EMBEDDED_LISTEN"], fmt.Sprintf("127.0.0.1:%d", freePort(t)), "FLOWBUS_EMBEDDED_LISTEN"},
	} {
		env := demoEnv()
		env["FLOWBUS_EMBEDDED_LISTEN"], env["FLOWBUS_METRICS_ADDR"] = tc.listen, tc.metrics
		t0 := time.Now()
		cmd, stdout, stderr := runDemo(t, dir, env)
		err := waitDemo(cmd, 15*time.Second)
		if d := time.Since(t0); d > 5*time.Second {
			t.Errorf("%s: the demo failed after %v, want at once", tc.name, d)
		}
		if err == nil {
			t.Errorf("%s: the demo exited 0 beside an agent holding its ports", tc.name)
		}
		if msg := stderr.String(); !strings.Contains(msg, "run-demo: flowagent (pid ") || !strings.Contains(msg, tc.variable+"=") || !strings.Contains(msg, "address already in use") {
			t.Errorf("%s: the screen does not show the agent's error naming %s:\n%s", tc.name, tc.variable, msg)
		}
		if stdout.String() != "" {
			t.Errorf("%s: the demo showed flows (whose?):\n%s", tc.name, stdout.String())
		}
	}

	env := demoEnv()
	env["FLOWBUS_EMBEDDED_LISTEN"] = fmt.Sprintf("127.0.0.1:%d", freePort(t))
	env["FLOWBUS_METRICS_ADDR"] = fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cmd, stdout, stderr := runDemo(t, dir, env, "--all", "--json", "--count", "2")
	webLine := "web view: http://" + env["FLOWBUS_DEMO_WEB_LISTEN"] + "/"
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(stderr.String(), webLine); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the demo did not start with its web view (%q) in 30s:\n%s", webLine, stderr.String())
		}
	}
	// The URL it printed serves the page.
	resp, err := http.Get("http://" + env["FLOWBUS_DEMO_WEB_LISTEN"] + "/")
	if err != nil {
		t.Fatalf("the demo's web view: %v", err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(page), "<html") {
		t.Errorf("the demo's web view answered %s: %.200s", resp.Status, page)
	}
	conn := cg.Traffic(t, "127.0.0.1", 1, false).Conns[0]
	if err := waitDemo(cmd, 30*time.Second); err != nil {
		t.Fatalf("demo: %v (want 2 events and exit 0)\n%s\n%s", err, stdout.String(), stderr.String())
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("want 2 events, got:\n%s", stdout.String())
	}
	for _, l := range lines {
		var ev struct {
			Host    string `json:"host"`
			SrcPort int    `json:"src_port"`
		}
		if err := json.Unmarshal([]byte(l), &ev); err != nil || ev.Host != "demo-host" || fmt.Sprintf("127.0.0.1:%d", ev.SrcPort) != conn.Client {
			t.Errorf("event %s (err %v): want host demo-host, the connection from %s", l, err, conn.Client)
		}
	}
}

// `flowagent probe`, the compose healthcheck: 0 and "ready" from a ready
// agent at FLOWBUS_METRICS_ADDR, 1 with the reason once it is gone.
func TestProbe(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	env := embeddedEnv(t, cgrouptest.NewChild(t).Path, "probe-agent")
	a := startAgentProc(t, "probe", env)
	waitReady(t, a, env)
	probeEnv := map[string]string{"FLOWBUS_METRICS_ADDR": env["FLOWBUS_METRICS_ADDR"]}
	var out, errb bytes.Buffer
	if code := run([]string{"probe"}, probeEnv, &out, &errb); code != 0 || !strings.Contains(out.String(), "ready") {
		t.Errorf("probe of a ready agent: exit %d, stdout %q, stderr %q; want 0 and ready", code, out.String(), errb.String())
	}
	a.Stop()
	out.Reset()
	errb.Reset()
	if code := run([]string{"probe"}, probeEnv, &out, &errb); code != 1 || !strings.Contains(errb.String(), "does not answer") {
		t.Errorf("probe of a stopped agent: exit %d, stderr %q; want 1 and why", code, errb.String())
	}
}
