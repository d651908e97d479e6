// Package embedded runs a NATS server with JetStream inside the agent, so
// that a single host needs nothing else to start.
package embedded

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// SystemUser is the user of the embedded server's system account ($SYS),
// for `nats server info` and the other server-level requests. Its password
// is in SystemPasswordFile(StoreDir).
const SystemUser = "sys"

// Options for the embedded server.
type Options struct {
	Listen   string // host:port for other processes (consumers); port 0 picks a free one
	StoreDir string // JetStream storage
	// Monitor is host:port of the HTTP monitoring endpoints (/varz, /jsz,
	// ...); empty leaves them off. Port 0 picks a free one.
	Monitor string
	// MaxMemory and MaxStore bound JetStream; 0 leaves the server's defaults.
	MaxMemory int64
	MaxStore  int64
	// User and Password, when User is set, are required of every client
	// but the system user: without them any process that reaches Listen
	// could read, forge, purge or delete the stream.
	User     string
	Password string
	// Log receives the server's errors and warnings; nil drops them.
	Log *slog.Logger
}

// SystemPasswordFile is where the system user's password is kept: created
// on first start (mode 0600, so only the agent's user can read it) and
// reused afterwards, so scripts keep working across restarts.
func SystemPasswordFile(storeDir string) string {
	return filepath.Join(storeDir, "system-account.password")
}

// parseAddr splits host:port for the variable named v; port 0 becomes the
// server's "pick a free port".
func parseAddr(v, addr string) (string, int, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, fmt.Errorf("%s %q is not host:port (e.g. 127.0.0.1:4222): %w", v, addr, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("%s %q has an invalid port: use 0 to 65535", v, addr)
	}
	if port == 0 {
		port = server.RANDOM_PORT // ":0" means any free port, as with net.Listen
	}
	return host, port, nil
}

// systemPassword reads the system user's password, creating it if needed.
func systemPassword(storeDir string) (string, error) {
	f := SystemPasswordFile(storeDir)
	if b, err := os.ReadFile(f); err == nil {
		if pw := strings.TrimSpace(string(b)); len(pw) >= 16 {
			return pw, nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("reading the embedded server's system account password %s: %w", f, err)
	}
	var b [18]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	pw := hex.EncodeToString(b[:])
	if err := os.WriteFile(f, []byte(pw+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("writing the embedded server's system account password %s (set FLOWBUS_EMBEDDED_STORE_DIR): %w", f, err)
	}
	return pw, nil
}

// Start runs the server and waits until it accepts connections. A listen
// address that cannot be bound fails at once, naming its variable.
func Start(o Options) (*server.Server, error) {
	host, port, err := parseAddr("FLOWBUS_EMBEDDED_LISTEN", o.Listen)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.StoreDir, 0o750); err != nil {
		return nil, fmt.Errorf("creating the JetStream store directory %s (set FLOWBUS_EMBEDDED_STORE_DIR): %w", o.StoreDir, err)
	}
	pw, err := systemPassword(o.StoreDir)
	if err != nil {
		return nil, err
	}
	// A system account with one user and no other authentication: the
	// server then maps every client without credentials to the global
	// account, as before, and the system user gets the server-level
	// requests ($SYS.REQ.SERVER.PING, JSZ, ...) that `nats server` uses.
	sys := server.NewAccount(server.DEFAULT_SYSTEM_ACCOUNT)
	opts := &server.Options{
		ServerName:         "flowbus-embedded",
		Host:               host,
		Port:               port,
		JetStream:          true,
		StoreDir:           o.StoreDir,
		JetStreamMaxMemory: o.MaxMemory,
		JetStreamMaxStore:  o.MaxStore,
		Accounts:           []*server.Account{sys},
		SystemAccount:      server.DEFAULT_SYSTEM_ACCOUNT,
		Users:              []*server.User{{Username: SystemUser, Password: pw, Account: sys}},
		NoSigs:             true,
		NoLog:              true,
	}
	if o.User != "" {
		// A user of the global account, so the stream stays where it was
		// without authentication. The server adds its no-credentials user
		// only when $SYS and $G are the sole accounts; a third, empty
		// account (no users, nothing can enter it) keeps it from doing so,
		// and then every client must log in, the agent's own included.
		opts.Accounts = append(opts.Accounts, server.NewAccount("no-anonymous-login"))
		opts.Users = append(opts.Users, &server.User{Username: o.User, Password: o.Password})
	}
	if o.Monitor != "" {
		if opts.HTTPHost, opts.HTTPPort, err = parseAddr("FLOWBUS_EMBEDDED_MONITOR", o.Monitor); err != nil {
			return nil, err
		}
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded NATS server: %w", err)
	}
	lg := &logger{log: o.Log}
	srv.SetLoggerV2(lg, false, false, false)
	// Start returns once the listeners are up, or after a fatal error that
	// the server only logs (nothing listens then): take it from the log
	// rather than wait for a readiness that will never come.
	srv.Start()
	if msg := lg.fatal(); msg != "" {
		srv.Shutdown()
		return nil, startError(o, msg)
	}
	if !srv.ReadyForConnections(10 * time.Second) {
		srv.Shutdown()
		if msg := lg.fatal(); msg != "" {
			return nil, startError(o, msg)
		}
		return nil, fmt.Errorf("embedded NATS server did not start listening on %s within 10s (set FLOWBUS_EMBEDDED_LISTEN)", o.Listen)
	}
	if o.User != "" {
		// With a third account the server enables JetStream only where
		// asked: ask for it in the global account, without limits of its
		// own (MaxMemory and MaxStore still bound the server).
		unlimited := map[string]server.JetStreamAccountLimits{"": {MaxMemory: -1, MaxStore: -1, MaxStreams: -1, MaxConsumers: -1}}
		if err := srv.GlobalAccount().EnableJetStream(unlimited, nil); err != nil {
			srv.Shutdown()
			return nil, fmt.Errorf("embedded NATS server: enabling JetStream for FLOWBUS_EMBEDDED_USER: %w", err)
		}
	}
	return srv, nil
}

// startError names the variable behind a fatal start error and its fix.
func startError(o Options, msg string) error {
	lower := strings.ToLower(msg)
	v, addr := "FLOWBUS_EMBEDDED_LISTEN", o.Listen
	if strings.Contains(lower, "monitor") {
		v, addr = "FLOWBUS_EMBEDDED_MONITOR", o.Monitor
	}
	if strings.Contains(lower, "address already in use") {
		return fmt.Errorf("%s=%s: address already in use: another process listens there (another flowagent or nats-server?): stop it, or set %s to a free address", v, addr, v)
	}
	if strings.Contains(lower, "listen") || strings.Contains(lower, "monitor") {
		return fmt.Errorf("%s=%s: embedded NATS server cannot listen: %s", v, addr, msg)
	}
	return fmt.Errorf("embedded NATS server: %s (check FLOWBUS_EMBEDDED_STORE_DIR)", msg)
}

// logger takes the server's log: fatal errors are kept for Start, errors
// and warnings go to the agent's log.
type logger struct {
	log *slog.Logger
	mu  sync.Mutex
	msg string
}

func (l *logger) fatal() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.msg
}

func (l *logger) Fatalf(format string, v ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.msg == "" {
		l.msg = fmt.Sprintf(format, v...)
	}
}

func (l *logger) Errorf(format string, v ...any) {
	if l.log != nil {
		l.log.Error("embedded NATS server: " + fmt.Sprintf(format, v...))
	}
}

func (l *logger) Warnf(format string, v ...any) {
	msg := fmt.Sprintf(format, v...)
	// The system user's password is generated, never in a config file: the
	// server's advice to hash config file passwords does not apply.
	if l.log != nil && !strings.HasPrefix(msg, "Plaintext passwords detected") {
		l.log.Warn("embedded NATS server: " + msg)
	}
}

func (l *logger) Noticef(string, ...any) {}
func (l *logger) Debugf(string, ...any)  {}
func (l *logger) Tracef(string, ...any)  {}
