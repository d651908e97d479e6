package main

import (
	"bytes"
	"log/slog"
	"sync"

	"github.com/nats-io/nats.go"

	"github.com/flowbus/flowbus/agent"
	"github.com/flowbus/flowbus/agent/enrich"
)

// The agent moved to package agent; these keep the names the process tests
// of this directory use until they move to their own package.

// Config is the agent's configuration.
type Config = agent.Config

func natsOptions(cfg Config, self *enrich.SelfFilter, log *slog.Logger) ([]nats.Option, error) {
	return agent.NATSOptions(cfg, self, log)
}

func connectNATS(cfg Config, opts []nats.Option) (*nats.Conn, error) {
	return agent.ConnectNATS(cfg, opts)
}

func refusal(err error) string { return agent.Refusal(err) }

// syncBuffer is a bytes.Buffer safe for the NATS client's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
