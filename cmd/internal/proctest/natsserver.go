package proctest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// NATSOptions shape a nats-server's configuration file.
type NATSOptions struct {
	Name        string // server_name; empty: the server picks one
	ClusterPort int    // 0: no cluster
	Routes      []int  // cluster ports of every node
	Monitor     bool   // serve the monitoring endpoints on a free port
	Extra       string // appended to the configuration as is
}

// NATSServer is a nats-server process with JetStream on file storage under
// its own directory, listening on a free loopback port. It can be stopped
// and started again on the same port and store.
type NATSServer struct {
	Name string
	Port int
	// HTTPPort serves the monitoring endpoints (/connz), 0 when off.
	HTTPPort int
	// LogPath is where the server's output goes, across restarts.
	LogPath string
	bin     string
	dir     string
	conf    string

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

// NewNATSServer writes the configuration of a server run by bin, with its
// store, configuration and log under dir; it does not start it.
func NewNATSServer(bin, dir string, o NATSOptions) (*NATSServer, error) {
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	s := &NATSServer{Name: o.Name, Port: port, bin: bin, dir: dir,
		conf: filepath.Join(dir, "server.conf"), LogPath: filepath.Join(dir, "server.log")}
	var c strings.Builder
	if o.Name != "" {
		fmt.Fprintf(&c, "server_name: %q\n", o.Name)
	}
	fmt.Fprintf(&c, "listen: \"127.0.0.1:%d\"\nmax_payload: 1048576\n", s.Port)
	fmt.Fprintf(&c, "jetstream {\n  store_dir: %q\n}\n", filepath.Join(dir, "store"))
	if o.Monitor {
		if s.HTTPPort, err = FreePort(); err != nil {
			return nil, err
		}
		fmt.Fprintf(&c, "http: \"127.0.0.1:%d\"\n", s.HTTPPort)
	}
	if o.ClusterPort != 0 {
		var routes []string
		for _, p := range o.Routes {
			routes = append(routes, fmt.Sprintf("\"nats-route://127.0.0.1:%d\"", p))
		}
		fmt.Fprintf(&c, "cluster {\n  name: \"flowbus-test\"\n  listen: \"127.0.0.1:%d\"\n  routes: [%s]\n}\n", o.ClusterPort, strings.Join(routes, ", "))
	}
	c.WriteString(o.Extra)
	if err := os.WriteFile(s.conf, []byte(c.String()), 0o600); err != nil {
		return nil, err
	}
	return s, nil
}

// Addr is the server's client address, host:port.
func (s *NATSServer) Addr() string { return fmt.Sprintf("127.0.0.1:%d", s.Port) }

// URL is the server's client URL.
func (s *NATSServer) URL() string { return "nats://" + s.Addr() }

// Pid is the process id of the running server, 0 when it is not running.
func (s *NATSServer) Pid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// Start runs the server and waits (at most 20 s) until it accepts TCP
// connections.
func (s *NATSServer) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		return fmt.Errorf("nats-server %s already running", s.Name)
	}
	logf, err := os.OpenFile(s.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(s.bin, "-c", s.conf)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", s.bin, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	s.cmd, s.exited = cmd, exited
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.DialTimeout("tcp", s.Addr(), 200*time.Millisecond); err == nil {
			c.Close()
			return nil
		}
		select {
		case <-exited:
			s.cmd = nil
			return fmt.Errorf("nats-server %s exited at start:\n%s", s.Name, Tail(s.LogPath, 20))
		case <-ctx.Done():
			s.stopLocked(syscall.SIGKILL, 0)
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.stopLocked(syscall.SIGKILL, 0)
			return fmt.Errorf("nats-server %s does not listen on %d after 20s:\n%s", s.Name, s.Port, Tail(s.LogPath, 20))
		}
	}
}

// Stop sends sig and waits for the process to end, killing it after grace.
// A server that is not running is left alone.
func (s *NATSServer) Stop(sig syscall.Signal, grace time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopLocked(sig, grace)
}

func (s *NATSServer) stopLocked(sig syscall.Signal, grace time.Duration) {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Signal(sig)
	select {
	case <-s.exited:
	case <-time.After(grace):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
	s.cmd = nil
}

// Kill ends the server with SIGKILL.
func (s *NATSServer) Kill() { s.Stop(syscall.SIGKILL, 15*time.Second) }

// HasClient tells whether a client named name is connected to the server,
// from its monitoring endpoint (NATSOptions.Monitor).
func (s *NATSServer) HasClient(name string) (bool, error) {
	if s.HTTPPort == 0 {
		return false, errors.New("nats-server without monitoring endpoint")
	}
	cl := http.Client{Timeout: 2 * time.Second}
	resp, err := cl.Get(fmt.Sprintf("http://127.0.0.1:%d/connz?limit=1024", s.HTTPPort))
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	var cz struct {
		Connections []struct {
			Name string `json:"name"`
		} `json:"connections"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&cz); err != nil {
		return false, err
	}
	for _, c := range cz.Connections {
		if c.Name == name {
			return true, nil
		}
	}
	return false, nil
}
