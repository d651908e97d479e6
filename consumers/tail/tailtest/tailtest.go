// Package tailtest runs a real in-process NATS server with JetStream for tests of flowbus consumers and
// publishes real batches to it. Tests use it instead of mocks so they exercise the actual JetStream
// consumer semantics (deliver policies, filters, sequences).
package tailtest

import (
	"context"
	"testing"
	"time"

	"github.com/flowbus/flowbus/schema"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Server is a running test server and a client connection to it.
type Server struct {
	URL string
	NC  *nats.Conn
	JS  jetstream.JetStream
	srv *server.Server
}

// Start runs a JetStream-enabled server on a random loopback port with a temporary store; it is shut
// down when the test ends.
func Start(t testing.TB) *Server {
	t.Helper()
	opts := &server.Options{
		Host:      "127.0.0.1",
		Port:      -1,
		JetStream: true,
		StoreDir:  t.TempDir(),
		NoLog:     true,
		NoSigs:    true,
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatalf("nats server: %v", err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		srv.Shutdown()
		t.Fatal("nats server not ready")
	}
	s := &Server{URL: srv.ClientURL(), srv: srv}
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	s.NC, err = nats.Connect(s.URL)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(s.NC.Close)
	s.JS, err = jetstream.New(s.NC)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// CreateStream creates stream name with the given subjects, as flowagent would.
func (s *Server) CreateStream(t testing.TB, name string, subjects ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := s.JS.CreateStream(ctx, jetstream.StreamConfig{Name: name, Subjects: subjects, Storage: jetstream.FileStorage}); err != nil {
		t.Fatalf("create stream %s: %v", name, err)
	}
}

// Publish stores data on subject and returns its stream sequence.
func (s *Server) Publish(t testing.TB, subject string, data []byte) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ack, err := s.JS.Publish(ctx, subject, data)
	if err != nil {
		t.Fatalf("publish %s: %v", subject, err)
	}
	return ack.Sequence
}

// Batch encodes events as one real batch of host and direction, the way the agent does.
func Batch(host, runID string, dir schema.Direction, seq uint64, drops schema.Drops, evs ...schema.Event) []byte {
	enc := schema.NewBatchEncoder(host, runID, dir)
	for i := range evs {
		enc.Add(&evs[i])
	}
	return enc.Finish(nil, seq, drops)
}

// PublishBatch encodes and publishes a batch on its canonical subject under prefix.
func (s *Server) PublishBatch(t testing.TB, prefix, host, runID string, dir schema.Direction, seq uint64, drops schema.Drops, evs ...schema.Event) uint64 {
	t.Helper()
	return s.Publish(t, schema.Subject(prefix, host, dir), Batch(host, runID, dir, seq, drops, evs...))
}
