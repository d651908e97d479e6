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

// Shutdown stops the server before the test ends, to see how clients cope with losing it.
func (s *Server) Shutdown() {
	s.srv.Shutdown()
	s.srv.WaitForShutdown()
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

// Agent produces batches as one run of flowagent does: one encoder per direction and kind (each
// remembers the seq it last finished, written as prev_seq) and one batch seq counter shared by both
// directions and both kinds.
type Agent struct {
	Host, RunID string
	seq         uint64
	enc         map[schema.Direction]*schema.BatchEncoder
	endEnc      map[schema.Direction]*schema.EndBatchEncoder
}

// NewAgent returns an agent run of host with run id runID; its first batch has seq 1.
func NewAgent(host, runID string) *Agent {
	return &Agent{Host: host, RunID: runID, enc: make(map[schema.Direction]*schema.BatchEncoder),
		endEnc: make(map[schema.Direction]*schema.EndBatchEncoder)}
}

func (a *Agent) endEncoder(dir schema.Direction) *schema.EndBatchEncoder {
	enc := a.endEnc[dir]
	if enc == nil {
		enc = schema.NewEndBatchEncoder(a.Host, a.RunID, dir)
		a.endEnc[dir] = enc
	}
	return enc
}

// SetEndPrevRun makes the first end batch of direction dir carry l as prev_run. It panics on a link
// the encoder refuses.
func (a *Agent) SetEndPrevRun(dir schema.Direction, l *schema.RunLink) {
	if err := a.endEncoder(dir).SetPrevRun(l); err != nil {
		panic(err)
	}
}

// EndBatch encodes the next end batch of direction dir, its seq from the run's one counter; discard
// the result to simulate a lost batch.
func (a *Agent) EndBatch(dir schema.Direction, drops schema.Drops, evs ...schema.EndEvent) (seq uint64, data []byte) {
	enc := a.endEncoder(dir)
	for i := range evs {
		enc.AddEnd(&evs[i])
	}
	a.seq++
	return a.seq, enc.Finish(nil, a.seq, drops)
}

// PublishEnd encodes the next end batch of dir and publishes it on its end subject under prefix,
// returning its stream sequence.
func (a *Agent) PublishEnd(t testing.TB, s *Server, prefix string, dir schema.Direction, drops schema.Drops, evs ...schema.EndEvent) uint64 {
	t.Helper()
	_, data := a.EndBatch(dir, drops, evs...)
	return s.Publish(t, schema.EndSubject(prefix, a.Host, dir), data)
}

func (a *Agent) encoder(dir schema.Direction) *schema.BatchEncoder {
	enc := a.enc[dir]
	if enc == nil {
		enc = schema.NewBatchEncoder(a.Host, a.RunID, dir)
		a.enc[dir] = enc
	}
	return enc
}

// SetPrevRun makes the first batch of direction dir carry l as prev_run (the previous run of the host),
// as the agent writes it after a restart. It panics on a link the encoder refuses.
func (a *Agent) SetPrevRun(dir schema.Direction, l *schema.RunLink) {
	if err := a.encoder(dir).SetPrevRun(l); err != nil {
		panic(err)
	}
}

// Batch encodes the next batch of direction dir; discard the result to simulate a lost batch.
func (a *Agent) Batch(dir schema.Direction, drops schema.Drops, evs ...schema.Event) (seq uint64, data []byte) {
	enc := a.encoder(dir)
	for i := range evs {
		enc.Add(&evs[i])
	}
	a.seq++
	return a.seq, enc.Finish(nil, a.seq, drops)
}

// Publish encodes the next batch of dir and publishes it on its canonical subject under prefix,
// returning its stream sequence.
func (a *Agent) Publish(t testing.TB, s *Server, prefix string, dir schema.Direction, drops schema.Drops, evs ...schema.Event) uint64 {
	t.Helper()
	_, data := a.Batch(dir, drops, evs...)
	return s.Publish(t, schema.Subject(prefix, a.Host, dir), data)
}
