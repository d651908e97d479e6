package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/schema"
)

func TestMain(m *testing.M) {
	cgrouptest.MaybeRunHelper()
	// The agents these tests start keep their state (run records) in a
	// directory of this test run, never in the host's state directory: a
	// test must neither leave files there nor link to an earlier run's.
	dir, err := os.MkdirTemp("", "flowbus-test-state-")
	if err != nil {
		panic(err)
	}
	os.Setenv("STATE_DIRECTORY", dir)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// testConfig is a valid configuration for an agent watching cgroup path with
// an embedded server on a free port.
func testConfig(t *testing.T, cgroupPath string) Config {
	t.Helper()
	cfg, err := LoadConfig(map[string]string{
		"FLOWBUS_EMBEDDED_LISTEN":    "127.0.0.1:0",
		"FLOWBUS_EMBEDDED_STORE_DIR": t.TempDir(),
		"FLOWBUS_SPOOL_DIR":          t.TempDir(),
		"FLOWBUS_RUN_STATE_FILE":     t.TempDir() + "/run.state",
		"FLOWBUS_CGROUP_PATH":        cgroupPath,
		"FLOWBUS_HOST":               "test-host",
		"FLOWBUS_BATCH_LINGER":       "20ms",
		"FLOWBUS_METRICS_ADDR":       "off",
	})
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// startAgent runs an agent until the test ends.
func startAgent(t *testing.T, cfg Config) *Agent {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	a, err := Start(ctx, cfg, log)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent Run: %v", err)
		}
	})
	return a
}

// received is one event read back from the stream.
type received struct {
	Subject string
	Host    string
	Ev      schema.Event
}

// readStream reads every event in the stream, waiting until want events have
// arrived and then for quiet more, so that extra events are seen too.
func readStream(t *testing.T, url, stream string, want int, quiet time.Duration) []received {
	t.Helper()
	out, _ := readStreamEnds(t, url, stream, want, 0, quiet)
	return out
}

// receivedEnd is one end event as a consumer decodes it.
type receivedEnd struct {
	Subject string
	Host    string
	Ev      schema.EndEvent
}

// readStreamEnds reads begins and ends (each decoded by its own decoder,
// told apart by subject) until at least wantBegins and wantEnds arrived and
// quiet passed without more, or 15 s.
func readStreamEnds(t *testing.T, url, stream string, wantBegins, wantEnds int, quiet time.Duration) ([]received, []receivedEnd) {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cons, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverAllPolicy})
	if err != nil {
		t.Fatal(err)
	}
	var out []received
	var ends []receivedEnd
	var b schema.Batch
	var eb schema.EndBatch
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		enough := len(out) >= wantBegins && len(ends) >= wantEnds
		wait := 200 * time.Millisecond
		if enough {
			wait = quiet
		}
		msgs, err := cons.Fetch(100, jetstream.FetchMaxWait(wait))
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for m := range msgs.Messages() {
			n++
			if got := m.Headers().Get(schema.HeaderMsgID); !strings.HasPrefix(got, "test-host.") {
				t.Errorf("message id %q does not start with the host", got)
			}
			if schema.SubjectKind(m.Subject(), schema.DefaultPrefix) == schema.KindEnd {
				if err := schema.DecodeEndBatch(m.Data(), &eb); err != nil {
					t.Fatalf("decoding end batch on %s: %v", m.Subject(), err)
				}
				for _, ev := range eb.Events {
					ends = append(ends, receivedEnd{Subject: m.Subject(), Host: eb.Host, Ev: ev})
				}
				continue
			}
			if err := schema.DecodeBatch(m.Data(), &b); err != nil {
				t.Fatalf("decoding batch on %s: %v", m.Subject(), err)
			}
			for _, ev := range b.Events {
				out = append(out, received{Subject: m.Subject(), Host: b.Host, Ev: ev})
			}
		}
		if n == 0 && enough {
			break
		}
	}
	return out, ends
}

type tuple struct {
	dir      schema.Direction
	src, dst netip.AddrPort
}

func TestEndToEndLoopback(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	cg := cgrouptest.NewChild(t)
	a := startAgent(t, testConfig(t, cg.Path))

	const n = 25
	var want []tuple
	refused := map[uint16]bool{}
	for _, addr := range []string{"127.0.0.1", "::1"} {
		res := cg.Traffic(t, addr, n, true)
		if len(res.Conns) != n {
			t.Fatalf("%s: helper made %d connections, want %d", addr, len(res.Conns), n)
		}
		refused[uint16(res.RefusedPort)] = true
		for _, c := range res.Conns {
			cl, sv := netip.MustParseAddrPort(c.Client), netip.MustParseAddrPort(c.Server)
			want = append(want, tuple{schema.Outgoing, cl, sv}, tuple{schema.Incoming, cl, sv})
		}
	}
	// Traffic from outside the watched cgroup must not show up.
	outsider := outsideConnection(t)

	got := readStream(t, a.ClientURL(), "FLOWS", len(want), 500*time.Millisecond)
	var have []tuple
	for _, r := range got {
		ev := r.Ev
		tu := tuple{ev.Direction, netip.AddrPortFrom(ev.Src, ev.SrcPort), netip.AddrPortFrom(ev.Dst, ev.DstPort)}
		have = append(have, tu)
		wantSubj := "flows.test-host." + ev.Direction.String()
		if r.Subject != wantSubj || r.Host != "test-host" {
			t.Errorf("event %v on subject %s host %s, want %s", tu, r.Subject, r.Host, wantSubj)
		}
		if d := time.Since(time.Unix(0, ev.Timestamp)); d < 0 || d > time.Minute {
			t.Errorf("event %v timestamp %v is not the wall clock of now", tu, time.Unix(0, ev.Timestamp))
		}
		if ev.CgroupID != cg.ID() {
			t.Errorf("event %v has cgroup id %d, want the watched child's %d", tu, ev.CgroupID, cg.ID())
		}
		if ev.ContainerID != "" {
			t.Errorf("event %v has container id %q from a cgroup that is no container", tu, ev.ContainerID)
		}
		if refused[ev.DstPort] {
			t.Errorf("event %v for a SYN refused by RST", tu)
		}
		if tu.src == outsider || tu.dst == outsider {
			t.Errorf("event %v comes from outside the watched cgroup", tu)
		}
	}
	key := func(x tuple) string { return fmt.Sprintf("%d %s %s", x.dir, x.src, x.dst) }
	sort.Slice(want, func(i, j int) bool { return key(want[i]) < key(want[j]) })
	sort.Slice(have, func(i, j int) bool { return key(have[i]) < key(have[j]) })
	if len(have) != len(want) {
		t.Errorf("got %d events, want exactly %d (2 per connection)", len(have), len(want))
	}
	for i := 0; i < len(want) && i < len(have); i++ {
		if key(want[i]) != key(have[i]) {
			t.Errorf("event %d: got %s, want %s", i, key(have[i]), key(want[i]))
			break
		}
	}
	s := a.Snapshot()
	if s.Kernel.RingbufFull != 0 || s.Publisher.Drops.Total() != 0 {
		t.Errorf("drops: kernel %d, publisher %+v", s.Kernel.RingbufFull, s.Publisher.Drops)
	}
}

// outsideConnection makes a loopback connection from the test process, which
// is not in the watched cgroup, and returns its server address.
func outsideConnection(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Close()
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	return netip.MustParseAddrPort(ln.Addr().String())
}

// A cgroup named as container runtimes name them gives its events the
// container id.
func TestContainerID(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	const id = "3f2a9c0d1e5b4a7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e"
	cg := cgrouptest.NewChildNamed(t, "docker-"+id+".scope")
	a := startAgent(t, testConfig(t, cg.Path))
	cg.Traffic(t, "127.0.0.1", 3, false)
	got := readStream(t, a.ClientURL(), "FLOWS", 6, 200*time.Millisecond)
	if len(got) != 6 {
		t.Fatalf("got %d events, want 6", len(got))
	}
	for _, r := range got {
		if r.Ev.ContainerID != id || r.Ev.CgroupID != cg.ID() {
			t.Errorf("event %s %s:%d: container %q cgroup %d, want %q %d", r.Ev.Direction, r.Ev.Src, r.Ev.SrcPort, r.Ev.ContainerID, r.Ev.CgroupID, id, cg.ID())
		}
	}
}

// A container started after the agent has its container id from its first
// connection: no walk of the hierarchy is waited for (the agent walks at
// most every 2 s).
func TestContainerCreatedAfterStart(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	const id = "9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e3f2a9c0d1e5b4a7c8d"
	parent := cgrouptest.NewChild(t)
	a := startAgent(t, testConfig(t, parent.Path))
	// Let the agent's first walk (at start) finish before the container
	// exists, so that only a lookup at first sight can name it.
	time.Sleep(100 * time.Millisecond)
	cg := parent.Child(t, "cri-containerd-"+id+".scope")
	cg.Traffic(t, "127.0.0.1", 1, false)
	got := readStream(t, a.ClientURL(), "FLOWS", 2, 200*time.Millisecond)
	if len(got) != 2 {
		t.Fatalf("got %d events, want 2", len(got))
	}
	for _, r := range got {
		if r.Ev.ContainerID != id || r.Ev.CgroupID != cg.ID() {
			t.Errorf("event %s %s:%d: container %q cgroup %d, want %q %d", r.Ev.Direction, r.Ev.Src, r.Ev.SrcPort, r.Ev.ContainerID, r.Ev.CgroupID, id, cg.ID())
		}
	}
}

// A monitoring address that is no host:port is reported with the other
// settings, before anything starts.
func TestEmbeddedMonitorValidated(t *testing.T) {
	_, err := LoadConfig(map[string]string{"FLOWBUS_EMBEDDED_MONITOR": "8222", "FLOWBUS_BATCH_LINGER": "0s"})
	if err == nil || !strings.Contains(err.Error(), `FLOWBUS_EMBEDDED_MONITOR: "8222" is not host:port`) || !strings.Contains(err.Error(), "FLOWBUS_BATCH_LINGER") {
		t.Errorf("want FLOWBUS_EMBEDDED_MONITOR reported among the problems, got %v", err)
	}
	if _, err := LoadConfig(map[string]string{"FLOWBUS_EMBEDDED_MONITOR": "127.0.0.1:8222"}); err != nil && strings.Contains(err.Error(), "EMBEDDED_MONITOR") {
		t.Errorf("a valid monitoring address refused: %v", err)
	}
}
