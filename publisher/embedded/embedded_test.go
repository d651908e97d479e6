package embedded

import (
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/internal/syncbuf"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func start(t *testing.T, o Options) *Options {
	t.Helper()
	srv, err := Start(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	o.Listen = srv.Addr().String()
	if a := srv.MonitorAddr(); a != nil {
		o.Monitor = a.String()
	}
	return &o
}

// The system user reaches the server-level requests that `nats server info`
// and `nats server report jetstream` make, while clients without
// credentials still get JetStream in the global account; the monitoring
// port serves /varz when asked for.
func TestSystemAccountAndMonitor(t *testing.T) {
	var log syncbuf.Buffer
	dir := t.TempDir()
	o := start(t, Options{Listen: "127.0.0.1:0", StoreDir: dir, Monitor: "127.0.0.1:0", Log: slog.New(slog.NewTextHandler(&log, nil))})

	app, err := nats.Connect("nats://" + o.Listen)
	if err != nil {
		t.Fatalf("a client without credentials must still connect: %v", err)
	}
	defer app.Close()
	js, _ := jetstream.New(app)
	if _, err := js.CreateStream(t.Context(), jetstream.StreamConfig{Name: "S", Subjects: []string{"s.>"}}); err != nil {
		t.Fatalf("JetStream for a client without credentials: %v", err)
	}

	b, err := os.ReadFile(SystemPasswordFile(dir))
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(SystemPasswordFile(dir)); fi.Mode().Perm() != 0o600 {
		t.Errorf("password file mode %v, want 0600", fi.Mode().Perm())
	}
	pw := strings.TrimSpace(string(b))
	sys, err := nats.Connect("nats://"+o.Listen, nats.UserInfo(SystemUser, pw))
	if err != nil {
		t.Fatalf("system user: %v", err)
	}
	defer sys.Close()
	m, err := sys.Request("$SYS.REQ.SERVER.PING", nil, 2*time.Second)
	if err != nil {
		t.Fatalf("$SYS.REQ.SERVER.PING: %v", err)
	}
	var ping struct {
		Server struct {
			Name      string `json:"name"`
			JetStream bool   `json:"jetstream"`
		} `json:"server"`
	}
	if err := json.Unmarshal(m.Data, &ping); err != nil || ping.Server.Name != "flowbus-embedded" || !ping.Server.JetStream {
		t.Errorf("PING answer %s (err %v): want server flowbus-embedded with JetStream", m.Data, err)
	}
	m, err = sys.Request("$SYS.REQ.SERVER.PING.JSZ", []byte(`{"accounts":true}`), 2*time.Second)
	if err != nil {
		t.Fatalf("$SYS.REQ.SERVER.PING.JSZ: %v", err)
	}
	var jsz struct {
		Data struct {
			Streams int `json:"streams"`
		} `json:"data"`
	}
	if err := json.Unmarshal(m.Data, &jsz); err != nil || jsz.Data.Streams != 1 {
		t.Errorf("JSZ answer %s (err %v): want 1 stream", m.Data, err)
	}
	if _, err := nats.Connect("nats://"+o.Listen, nats.UserInfo(SystemUser, "wrong-password")); err == nil {
		t.Error("the system user with a wrong password was let in")
	}

	resp, err := http.Get("http://" + o.Monitor + "/varz")
	if err != nil {
		t.Fatalf("monitoring port: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"server_name": "flowbus-embedded"`) {
		t.Errorf("/varz: %s %.200s", resp.Status, body)
	}
	if strings.Contains(log.String(), "Plaintext") {
		t.Errorf("log warns about the generated password:\n%s", log.String())
	}
}

// The password is kept across restarts on the same store.
func TestSystemPasswordKept(t *testing.T) {
	dir := t.TempDir()
	srv, err := Start(Options{Listen: "127.0.0.1:0", StoreDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	first, _ := os.ReadFile(SystemPasswordFile(dir))
	srv.Shutdown()
	srv.WaitForShutdown()
	srv, err = Start(Options{Listen: "127.0.0.1:0", StoreDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	second, _ := os.ReadFile(SystemPasswordFile(dir))
	if len(first) < 16 || !bytes.Equal(first, second) {
		t.Errorf("password %q then %q: want one, kept", first, second)
	}
}

// A taken port fails at once, naming the variable, instead of after a wait.
func TestPortInUseFailsAtOnce(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	busy := ln.Addr().String()
	for _, tc := range []struct {
		v string
		o Options
	}{
		{"FLOWBUS_EMBEDDED_LISTEN", Options{Listen: busy}},
		{"FLOWBUS_EMBEDDED_MONITOR", Options{Listen: "127.0.0.1:0", Monitor: busy}},
	} {
		tc.o.StoreDir = t.TempDir()
		t0 := time.Now()
		srv, err := Start(tc.o)
		if err == nil {
			srv.Shutdown()
			t.Fatalf("%s on a taken port: started", tc.v)
		}
		if d := time.Since(t0); d > 3*time.Second {
			t.Errorf("%s: failed after %v, want at once", tc.v, d)
		}
		if msg := err.Error(); !strings.Contains(msg, tc.v+"="+busy) || !strings.Contains(msg, "address already in use") {
			t.Errorf("%s: error %q does not name the variable, the address and the cause", tc.v, msg)
		}
	}
}

// With a user set, a real client connection without credentials, or with a
// wrong password, is refused; the right credentials get JetStream in the
// global account, and the system user still works.
func TestUserRequired(t *testing.T) {
	dir := t.TempDir()
	o := start(t, Options{Listen: "127.0.0.1:0", StoreDir: dir, User: "flows", Password: "s3cret-pass-word"})
	url := "nats://" + o.Listen
	for name, opts := range map[string][]nats.Option{
		"no credentials": nil,
		"wrong password": {nats.UserInfo("flows", "wrong")},
	} {
		nc, err := nats.Connect(url, append(opts, nats.MaxReconnects(0))...)
		if err == nil {
			nc.Close()
			t.Errorf("%s: connected, want a refusal", name)
		} else if !strings.Contains(strings.ToLower(err.Error()), "authorization") {
			t.Errorf("%s: %v, want an authorization error", name, err)
		}
	}
	nc, err := nats.Connect(url, nats.UserInfo("flows", "s3cret-pass-word"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.AccountInfo(t.Context()); err != nil {
		t.Errorf("JetStream with credentials: %v", err)
	}
	pw, err := os.ReadFile(SystemPasswordFile(dir))
	if err != nil {
		t.Fatal(err)
	}
	sc, err := nats.Connect(url, nats.UserInfo(SystemUser, strings.TrimSpace(string(pw))))
	if err != nil {
		t.Fatalf("system user: %v", err)
	}
	sc.Close()
}
