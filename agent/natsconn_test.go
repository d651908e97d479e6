package agent

import (
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/agent/enrich"
	"github.com/flowbus/flowbus/internal/redact"
)

// fileLog is a log file that the NATS client's goroutines write while the
// test reads it.
type fileLog struct{ f *os.File }

func newFileLog(t *testing.T) *fileLog {
	f, err := os.Create(filepath.Join(t.TempDir(), "log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &fileLog{f}
}

func (l *fileLog) String() string {
	b, _ := os.ReadFile(l.f.Name())
	return string(b)
}

// unusedURL is a NATS URL that nothing listens on.
func unusedURL(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	return "nats://" + ln.Addr().String()
}

// An agent started while NATS is away connects in the background and says
// so, once, instead of retrying in silence.
func TestUnreachableNATSIsLoggedOnce(t *testing.T) {
	url := unusedURL(t)
	out := newFileLog(t)
	log := slog.New(slog.NewTextHandler(out.f, nil))
	cfg := Config{NATSURL: url, Host: "web-01"}
	opts, err := NATSOptions(cfg, enrich.NewSelfFilter(), log)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := ConnectNATS(cfg, opts)
	if err != nil {
		t.Fatalf("an unreachable server must not be fatal: %v", err)
	}
	defer nc.Close()
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(out.String(), "NATS is not reachable") {
		if time.Now().After(deadline) {
			t.Fatalf("no log line about the unreachable server after 15 s; log:\n%s", out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(3 * time.Second) // several more failed attempts (1 s apart)
	if !strings.Contains(out.String(), "url="+url) {
		t.Errorf("the line does not name %s:\n%s", url, out.String())
	}
	if n := strings.Count(out.String(), "NATS is not reachable"); n != 1 {
		t.Errorf("%d log lines about the unreachable server in a few seconds, want 1 (rate-limited)", n)
	}
}

// Every URL of a list is redacted, also when the password holds an "@".
func TestRedactURLList(t *testing.T) {
	got := redact.List("nats://a:s3cret@h1:4222, tls://b:p@ss@h2:4222,nats://h3:4222")
	if strings.Contains(got, "s3cret") || strings.Contains(got, "p@ss") || strings.Contains(got, ":p") {
		t.Errorf("a password is left in %q", got)
	}
	if want := "nats://a:xxxxx@h1:4222, tls://b:xxxxx@h2:4222,nats://h3:4222"; got != want {
		t.Errorf("redact.List = %q, want %q", got, want)
	}
}
