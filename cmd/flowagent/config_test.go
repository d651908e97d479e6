package main

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestConfigDefaults(t *testing.T) {
	cfg, err := LoadConfig(map[string]string{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.NATSURL != "" || cfg.EmbeddedListen != "127.0.0.1:4222" || cfg.SubjectPrefix != "flows" || cfg.Stream != "FLOWS" ||
		cfg.MetricsAddr != "127.0.0.1:9464" || cfg.BatchLinger != 100*time.Millisecond || cfg.EmbeddedStoreDir == "" {
		t.Errorf("defaults: %+v", cfg)
	}
	if cfg.Host == "" || strings.ContainsAny(cfg.Host, ". ABCDEFGHIJKLMNOPQRSTUVWXYZ") {
		t.Errorf("default host %q is not a sanitized token", cfg.Host)
	}
}

// Every problem is reported at once, each naming its variable.
func TestConfigReportsAllProblems(t *testing.T) {
	_, err := LoadConfig(map[string]string{
		"FLOWBUS_HOST":             "Web.01",
		"FLOWBUS_SUBJECT_PREFIX":   "flows.*",
		"FLOWBUS_BATCH_LINGER":     "soon",
		"FLOWBUS_BATCH_MAX_EVENTS": "0",
		"FLOWBUS_STREAM_STORAGE":   "tape",
		"FLOWBUS_RINGBUF_BYTES":    "1000",
		"FLOWBUS_EMBEDDED_LISTEN":  "4222",
		"FLOWBUS_LOG_LEVEL":        "loud",
	})
	var ce *ConfigError
	if !errors.As(err, &ce) {
		t.Fatalf("want a ConfigError, got %v", err)
	}
	msg := err.Error()
	for _, v := range []string{"FLOWBUS_HOST", "FLOWBUS_SUBJECT_PREFIX", "FLOWBUS_BATCH_LINGER", "FLOWBUS_BATCH_MAX_EVENTS",
		"FLOWBUS_STREAM_STORAGE", "FLOWBUS_RINGBUF_BYTES", "FLOWBUS_EMBEDDED_LISTEN", "FLOWBUS_LOG_LEVEL"} {
		if !strings.Contains(msg, v) {
			t.Errorf("error does not name %s:\n%s", v, msg)
		}
	}
	if len(ce.Problems) != 8 {
		t.Errorf("got %d problems, want 8:\n%s", len(ce.Problems), msg)
	}
	// The host problem suggests the fix.
	if !strings.Contains(msg, `"web-01"`) {
		t.Errorf("host error does not suggest the sanitized token:\n%s", msg)
	}
}

func TestConfigRemoteURLs(t *testing.T) {
	if _, err := LoadConfig(map[string]string{"FLOWBUS_NATS_URL": "nats://a:4222, nats://b:4222"}); err != nil {
		t.Errorf("cluster URLs rejected: %v", err)
	}
	if _, err := LoadConfig(map[string]string{"FLOWBUS_NATS_URL": "http://a:4222"}); err == nil || !strings.Contains(err.Error(), "FLOWBUS_NATS_URL") {
		t.Errorf("http URL accepted: %v", err)
	}
}

func TestRedactURL(t *testing.T) {
	if got := redactURL("nats://user:secret@host:4222"); strings.Contains(got, "secret") {
		t.Errorf("secret in %q", got)
	}
}
