// Package probe is the health check the flowbus images run on themselves. They are FROM scratch, with no
// shell, wget or curl, so docker-compose's healthcheck runs the binary: `flowagent probe`, `flowstat probe`.
package probe

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// Timeout bounds one probe: below compose's healthcheck timeout, so a hung endpoint fails the probe
// instead of the check timing out without a word.
const Timeout = 2 * time.Second

// URL is the readiness endpoint of a server listening on addr (host:port, as FLOWBUS_METRICS_ADDR or
// --metrics-addr give it): an unspecified host (":9464", "0.0.0.0:9464") is probed on loopback.
func URL(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("metrics address %q is not host:port: %v", addr, err)
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, port) + "/readyz", nil
}

// Run GETs url and returns the exit status: 0 when it answers 200 (ready), 1 otherwise, with what it
// answered (the failing checks and their fixes) or why it could not be reached on stderr.
func Run(url string, stdout, stderr io.Writer) int {
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		fmt.Fprintf(stderr, "probe: %v\n", err)
		return 1
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintf(stderr, "probe: %s does not answer: %v (is the process running, with its metrics address there?)\n", url, err)
		return 1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	text := strings.TrimSpace(string(body))
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "probe: %s: %s: %s\n", url, resp.Status, text)
		return 1
	}
	fmt.Fprintln(stdout, text)
	return 0
}
