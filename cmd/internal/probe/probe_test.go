package probe

import (
	"bytes"
	"net"
	"net/http"
	"strings"
	"testing"
)

func serve(t *testing.T, status int, body string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/readyz" {
			http.NotFound(w, r)
			return
		}
		w.WriteHeader(status)
		_, _ = w.Write([]byte(body))
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return ln.Addr().String()
}

func TestProbe(t *testing.T) {
	ready := serve(t, http.StatusOK, "ready\n")
	sick := serve(t, http.StatusServiceUnavailable, "not ready: nats: not connected (check FLOWBUS_NATS_URL)\n")
	// A port nothing listens on: taken and released.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	gone := ln.Addr().String()
	ln.Close()
	for _, tc := range []struct {
		addr, stdout, stderr string
		code                 int
	}{
		{ready, "ready", "", 0},
		{sick, "", "503 Service Unavailable: not ready: nats: not connected (check FLOWBUS_NATS_URL)", 1},
		{gone, "", "does not answer", 1},
	} {
		u, err := URL(tc.addr)
		if err != nil {
			t.Fatal(err)
		}
		var out, errb bytes.Buffer
		if code := Run(u, &out, &errb); code != tc.code {
			t.Errorf("%s: exit %d, want %d (stderr %q)", tc.addr, code, tc.code, errb.String())
		}
		if !strings.Contains(out.String(), tc.stdout) || (tc.stdout == "" && out.Len() > 0) {
			t.Errorf("%s: stdout %q, want %q", tc.addr, out.String(), tc.stdout)
		}
		if !strings.Contains(errb.String(), tc.stderr) || (tc.stderr == "" && errb.Len() > 0) {
			t.Errorf("%s: stderr %q, want it to contain %q", tc.addr, errb.String(), tc.stderr)
		}
	}
}

func TestURL(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1:9464": "http://127.0.0.1:9464/readyz",
		":9465":          "http://127.0.0.1:9465/readyz",
		"0.0.0.0:9464":   "http://127.0.0.1:9464/readyz",
		"[::1]:9464":     "http://[::1]:9464/readyz",
		"10.0.0.5:9464":  "http://10.0.0.5:9464/readyz",
	} {
		if got, err := URL(in); err != nil || got != want {
			t.Errorf("URL(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := URL("9464"); err == nil || !strings.Contains(err.Error(), "host:port") {
		t.Errorf("URL(9464): %v, want an error naming host:port", err)
	}
}
