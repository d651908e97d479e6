package stream_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/nats-io/nats.go/jetstream"
)

// A failed dial names the servers with the password hidden; an interrupt ends a dial at once.
func TestConnectErrors(t *testing.T) {
	_, err := stream.Connect(context.Background(), stream.Dial{URLs: []string{"nats://u:secret@127.0.0.1:1"}, Timeout: time.Second})
	var ce *stream.ConnectError
	if !errors.As(err, &ce) || strings.Contains(err.Error(), "secret") || !strings.Contains(ce.URL, "127.0.0.1:1") {
		t.Errorf("unreachable server: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := stream.Connect(ctx, stream.Dial{URLs: []string{"nats://127.0.0.1:1"}}); !errors.Is(err, context.Canceled) {
		t.Errorf("canceled dial: %v", err)
	}
}

// A missing stream is a StreamError at once without a wait, and is waited for with one.
func TestOpenWaitsForTheStream(t *testing.T) {
	srv := tailtest.Start(t)
	nc, err := stream.Connect(context.Background(), stream.Dial{URLs: []string{srv.URL}, Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	_, err = stream.Open(context.Background(), js, stream.Lookup{Stream: "LATER", URL: srv.URL})
	var se *stream.StreamError
	if !errors.As(err, &se) || !errors.Is(err, jetstream.ErrStreamNotFound) || !strings.Contains(err.Error(), `stream "LATER" does not exist`) {
		t.Fatalf("missing stream without a wait: %v", err)
	}

	var mu sync.Mutex
	var notices []string
	waiting := 0
	go func() {
		time.Sleep(1500 * time.Millisecond)
		srv.CreateStream(t, "LATER", "later.>")
	}()
	s, err := stream.Open(context.Background(), js, stream.Lookup{Stream: "LATER", URL: srv.URL, Wait: 20 * time.Second,
		Notify:  func(m string) { mu.Lock(); notices = append(notices, m); mu.Unlock() },
		Waiting: func() { waiting++ }})
	if err != nil || s.CachedInfo().Config.Name != "LATER" {
		t.Fatalf("waited for stream: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if waiting != 1 || len(notices) != 2 || !strings.Contains(notices[0], "does not exist") || !strings.Contains(notices[1], "is there now") {
		t.Errorf("waiting called %d times, notices %q", waiting, notices)
	}
}
