package publisher

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/flowbus/flowbus/internal/syncbuf"
	"github.com/flowbus/flowbus/publisher/embedded"
)

// An update keeps what an operator changed with `nats stream edit` and
// changes only flowbus's own settings, one log line each with old and new.
func TestEnsureStreamKeepsOperatorSettings(t *testing.T) {
	srv, err := embedded.Start(embedded.Options{Listen: "127.0.0.1:0", StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var log syncbuf.Buffer
	settings := StreamSettings{
		Name: "FLOWS", Prefix: "flows", MaxAge: 24 * time.Hour, MaxBytes: 1 << 30, Replicas: 1,
		Storage: jetstream.FileStorage, Duplicates: 2 * time.Minute,
		MaxMsgSize: 64<<10 + MaxMsgHeadroom, Log: slog.New(slog.NewTextHandler(&log, nil)),
	}
	info := func() jetstream.StreamConfig {
		t.Helper()
		st, err := js.Stream(ctx, "FLOWS")
		if err != nil {
			t.Fatal(err)
		}
		return st.CachedInfo().Config
	}

	if _, err := EnsureStream(ctx, js, settings); err != nil {
		t.Fatal(err)
	}
	if c := info(); c.MaxMsgSize != settings.MaxMsgSize || c.MaxAge != 24*time.Hour || c.Duplicates != 2*time.Minute {
		t.Errorf("created with max_msg_size %d max_age %v duplicates %v, want %d 24h 2m", c.MaxMsgSize, c.MaxAge, c.Duplicates, settings.MaxMsgSize)
	}
	if l := log.Take(); strings.Contains(l, "stream setting changed") {
		t.Errorf("creating logged changes:\n%s", l)
	}

	// The operator's edit: their own settings, and one of flowbus's.
	c := info()
	c.Description = "flows of the fleet"
	c.AllowDirect = true
	c.MaxMsgSize = 4 << 20
	c.MaxMsgsPerSubject = 1000
	c.Subjects = append(c.Subjects, "audit.>")
	c.MaxAge = time.Hour
	if _, err := js.UpdateStream(ctx, c); err != nil {
		t.Fatal(err)
	}

	if _, err := EnsureStream(ctx, js, settings); err != nil {
		t.Fatal(err)
	}
	c = info()
	if c.Description != "flows of the fleet" || !c.AllowDirect || c.MaxMsgSize != 4<<20 || c.MaxMsgsPerSubject != 1000 || len(c.Subjects) != 2 {
		t.Errorf("operator settings lost: description %q allow_direct %v max_msg_size %d max_msgs_per_subject %d subjects %v",
			c.Description, c.AllowDirect, c.MaxMsgSize, c.MaxMsgsPerSubject, c.Subjects)
	}
	if c.MaxAge != 24*time.Hour {
		t.Errorf("max_age %v, want the configured 24h back", c.MaxAge)
	}
	l := log.Take()
	if n := strings.Count(l, "stream setting changed"); n != 1 || !strings.Contains(l, "setting=max_age old=1h0m0s new=24h0m0s why=FLOWBUS_STREAM_MAX_AGE") {
		t.Errorf("want exactly one line for max_age with old, new and why; log:\n%s", l)
	}

	// A max message size too small for the agent's batches is raised.
	c.MaxMsgSize = 1000
	if _, err := js.UpdateStream(ctx, c); err != nil {
		t.Fatal(err)
	}
	if _, err := EnsureStream(ctx, js, settings); err != nil {
		t.Fatal(err)
	}
	if got := info().MaxMsgSize; got != settings.MaxMsgSize {
		t.Errorf("max_msg_size %d, want it raised to %d", got, settings.MaxMsgSize)
	}
	if l := log.Take(); !strings.Contains(l, "setting=max_msg_size old=1000 new=") || strings.Count(l, "stream setting changed") != 1 {
		t.Errorf("want one line for max_msg_size; log:\n%s", l)
	}

	// Nothing to change: nothing logged.
	if _, err := EnsureStream(ctx, js, settings); err != nil {
		t.Fatal(err)
	}
	if l := log.Take(); l != "" {
		t.Errorf("an unchanged stream logged:\n%s", l)
	}
}
