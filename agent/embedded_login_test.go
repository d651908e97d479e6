package agent

import (
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/internal/syncbuf"
)

// An embedded server on every interface with FLOWBUS_EMBEDDED_USER set: a
// real client without credentials, or with a wrong password, is refused;
// the agent itself and a client with the credentials reach the stream, which
// holds the captured connections. Metrics on every interface log a warning
// naming the exposure.
func TestEmbeddedLoginAgent(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	cg := cgrouptest.NewChild(t)
	pwFile := filepath.Join(t.TempDir(), "pw")
	const pw = "0123456789abcdef0123"
	if err := os.WriteFile(pwFile, []byte(pw+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := LoadConfig(map[string]string{
		"FLOWBUS_EMBEDDED_LISTEN":    "0.0.0.0:0",
		"FLOWBUS_EMBEDDED_USER":      "flows",
		"FLOWBUS_EMBEDDED_PASS_FILE": pwFile,
		"FLOWBUS_EMBEDDED_STORE_DIR": t.TempDir(),
		"FLOWBUS_SPOOL_DIR":          t.TempDir(),
		"FLOWBUS_CGROUP_PATH":        cg.Path,
		"FLOWBUS_HOST":               "test-host",
		"FLOWBUS_BATCH_LINGER":       "20ms",
		"FLOWBUS_METRICS_ADDR":       "0.0.0.0:0",
	})
	if err != nil {
		t.Fatal(err)
	}
	var logs syncbuf.Buffer
	ctx, cancel := context.WithCancel(context.Background())
	a, err := Start(ctx, cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent Run: %v", err)
		}
	}()
	if l := logs.String(); !strings.Contains(l, "level=WARN") || !strings.Contains(l, "metrics are served beyond this host") || !strings.Contains(l, "metrics_addr=0.0.0.0:0") {
		t.Errorf("no warning about metrics on every interface:\n%s", l)
	}

	_, port, err := net.SplitHostPort(strings.TrimPrefix(a.ClientURL(), "nats://"))
	if err != nil {
		t.Fatal(err)
	}
	url := "nats://127.0.0.1:" + port
	for name, opts := range map[string][]nats.Option{
		"no credentials": nil,
		"wrong password": {nats.UserInfo("flows", "0123456789abcdef0124")},
	} {
		nc, err := nats.Connect(url, append(opts, nats.MaxReconnects(0))...)
		if err == nil {
			nc.Close()
			t.Errorf("%s: connected, want a refusal", name)
		} else if !strings.Contains(strings.ToLower(err.Error()), "authorization") {
			t.Errorf("%s: %v, want an authorization error", name, err)
		}
	}

	const n = 5
	cg.Traffic(t, "127.0.0.1", n, false)
	nc, err := nats.Connect(url, nats.UserInfo("flows", pw))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	var msgs uint64
	for time.Now().Before(deadline) {
		st, err := js.Stream(ctx, cfg.Stream)
		if err == nil {
			info, err := st.Info(ctx)
			if err == nil && info.State.Msgs > 0 && a.Snapshot().Publisher.EventsAcked >= 2*n {
				msgs = info.State.Msgs
				break
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if msgs == 0 {
		t.Errorf("no batch reached stream %s through the login", cfg.Stream)
	}
	if got := a.Snapshot().Publisher.EventsAcked; got < 2*n {
		t.Errorf("the agent's own connection: %d events acknowledged, want at least %d", got, 2*n)
	}
}
