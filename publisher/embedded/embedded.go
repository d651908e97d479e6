// Package embedded runs a NATS server with JetStream inside the agent, so
// that a single host needs nothing else to start.
package embedded

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Options for the embedded server.
type Options struct {
	Listen   string // host:port for other processes (consumers); port 0 picks a free one
	StoreDir string // JetStream storage
	// MaxMemory and MaxStore bound JetStream; 0 leaves the server's defaults.
	MaxMemory int64
	MaxStore  int64
}

// Start runs the server and waits until it accepts connections.
func Start(o Options) (*server.Server, error) {
	host, portStr, err := net.SplitHostPort(o.Listen)
	if err != nil {
		return nil, fmt.Errorf("FLOWBUS_EMBEDDED_LISTEN %q is not host:port: %w", o.Listen, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 0 || port > 65535 {
		return nil, fmt.Errorf("FLOWBUS_EMBEDDED_LISTEN %q has an invalid port", o.Listen)
	}
	if port == 0 {
		port = server.RANDOM_PORT // ":0" means any free port, as with net.Listen
	}
	if err := os.MkdirAll(o.StoreDir, 0o750); err != nil {
		return nil, fmt.Errorf("creating the JetStream store directory %s (set FLOWBUS_EMBEDDED_STORE_DIR): %w", o.StoreDir, err)
	}
	opts := &server.Options{
		ServerName:         "flowbus-embedded",
		Host:               host,
		Port:               port,
		JetStream:          true,
		StoreDir:           o.StoreDir,
		JetStreamMaxMemory: o.MaxMemory,
		JetStreamMaxStore:  o.MaxStore,
		NoSigs:             true,
		NoLog:              true,
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded NATS server: %w", err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		srv.Shutdown()
		return nil, fmt.Errorf("embedded NATS server did not start listening on %s within 10s (is the port in use? set FLOWBUS_EMBEDDED_LISTEN)", o.Listen)
	}
	return srv, nil
}
