package webview

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"golang.org/x/net/websocket"
)

// browser is a headless Chromium driven over the DevTools protocol (one page target), so a test can
// wait for what the page renders instead of guessing a time budget: --dump-dom with
// --virtual-time-budget never returns while a Server-Sent Events stream is open.
type browser struct {
	t   *testing.T
	ws  *websocket.Conn
	id  int
	err bytes.Buffer
}

// chromiumPath finds Debian's chromium. Missing, it skips the test, or fails it under
// FLOWBUS_REQUIRE_PRIVILEGED=1 (CI installs it with deploy/install-deps.sh).
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	msg := "no chromium on PATH: install it (apt-get install chromium, or ./deploy/install-deps.sh)"
	if os.Getenv(cgrouptest.EnvRequire) == "1" {
		t.Fatal(msg + " (" + cgrouptest.EnvRequire + "=1 makes this a failure)")
	}
	t.Skip(msg)
	return ""
}

// startBrowser runs chromium headless with a 1280x800 window until the test ends.
func startBrowser(t *testing.T) *browser {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command(chromiumPath(t), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
		"--remote-debugging-port=0", "--remote-allow-origins=http://127.0.0.1", "--window-size=1280,800",
		"--user-data-dir="+dir, "about:blank")
	b := &browser{t: t}
	cmd.Stderr = &b.err
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting chromium: %v", err)
	}
	t.Cleanup(func() {
		if b.ws != nil {
			b.ws.Close()
		}
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	// Chromium writes the port it chose into DevToolsActivePort.
	var port string
	deadline := time.Now().Add(20 * time.Second)
	for port == "" {
		if data, err := os.ReadFile(filepath.Join(dir, "DevToolsActivePort")); err == nil {
			port, _, _ = strings.Cut(string(data), "\n")
		}
		if time.Now().After(deadline) {
			t.Fatalf("chromium did not open its DevTools port within 20 s; its stderr:\n%s", b.err.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	resp, err := http.Get("http://127.0.0.1:" + port + "/json/list")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var targets []struct{ Type, WebSocketDebuggerURL string }
	if err := json.NewDecoder(resp.Body).Decode(&targets); err != nil {
		t.Fatal(err)
	}
	for _, tg := range targets {
		if tg.Type == "page" {
			if b.ws, err = websocket.Dial(tg.WebSocketDebuggerURL, "", "http://127.0.0.1"); err != nil {
				t.Fatalf("DevTools connection: %v", err)
			}
			return b
		}
	}
	t.Fatalf("chromium has no page target: %+v", targets)
	return nil
}

// call sends one DevTools command and returns its result, skipping the events in between.
func (b *browser) call(method string, params any) json.RawMessage {
	b.t.Helper()
	b.id++
	if err := websocket.JSON.Send(b.ws, map[string]any{"id": b.id, "method": method, "params": params}); err != nil {
		b.t.Fatalf("%s: %v", method, err)
	}
	_ = b.ws.SetReadDeadline(time.Now().Add(30 * time.Second))
	for {
		var m struct {
			ID     int             `json:"id"`
			Result json.RawMessage `json:"result"`
			Error  *struct{ Message string }
		}
		if err := websocket.JSON.Receive(b.ws, &m); err != nil {
			b.t.Fatalf("%s: %v", method, err)
		}
		if m.ID != b.id {
			continue
		}
		if m.Error != nil {
			b.t.Fatalf("%s: %s", method, m.Error.Message)
		}
		return m.Result
	}
}

// eval evaluates a JavaScript expression in the page and decodes its JSON-able value into out.
func (b *browser) eval(expr string, out any) {
	b.t.Helper()
	if err := b.tryEval(expr, out); err != nil {
		b.t.Fatal(err)
	}
}

// tryEval is eval returning the page's exception instead of failing the test.
func (b *browser) tryEval(expr string, out any) error {
	b.t.Helper()
	res := b.call("Runtime.evaluate", map[string]any{"expression": expr, "returnByValue": true})
	var r struct {
		Result struct {
			Value json.RawMessage `json:"value"`
		} `json:"result"`
		ExceptionDetails *struct {
			Text string `json:"text"`
		} `json:"exceptionDetails"`
	}
	if err := json.Unmarshal(res, &r); err != nil {
		return err
	}
	if r.ExceptionDetails != nil {
		return fmt.Errorf("evaluating %q: %s", expr, r.ExceptionDetails.Text)
	}
	if err := json.Unmarshal(r.Result.Value, out); err != nil {
		return fmt.Errorf("evaluating %q: %v (value %s)", expr, err, r.Result.Value)
	}
	return nil
}

// open navigates to url and waits (up to 20 s) until expr is true in the page.
func (b *browser) open(url, until string) {
	b.t.Helper()
	b.call("Page.navigate", map[string]any{"url": url})
	b.waitFor(until, 20*time.Second)
}

// waitFor polls expr until it is true.
func (b *browser) waitFor(expr string, d time.Duration) {
	b.t.Helper()
	deadline := time.Now().Add(d)
	for {
		var ok bool
		// While the page loads, its document may not be there yet: that is not-yet, not a failure.
		err := b.tryEval("!!("+expr+")", &ok)
		if err == nil && ok {
			return
		}
		if time.Now().After(deadline) {
			var html string
			b.eval("document.documentElement.outerHTML", &html)
			b.t.Fatalf("page never got %s within %v (%v); its DOM:\n%s", expr, d, err, html)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// screenshot saves the page as PNG.
func (b *browser) screenshot(path string) {
	b.t.Helper()
	res := b.call("Page.captureScreenshot", map[string]any{"format": "png"})
	var r struct{ Data string }
	if err := json.Unmarshal(res, &r); err != nil {
		b.t.Fatal(err)
	}
	png, err := base64.StdEncoding.DecodeString(r.Data)
	if err != nil {
		b.t.Fatal(err)
	}
	if err := os.WriteFile(path, png, 0o644); err != nil {
		b.t.Fatal(err)
	}
	b.t.Logf("screenshot: %s (%d bytes)", path, len(png))
}

// rows are the cells of the live-flow table, newest first.
func (b *browser) rows() [][]string {
	b.t.Helper()
	var rows [][]string
	b.eval(`[...document.querySelectorAll('#flows tbody tr')].map(tr => [...tr.cells].map(c => c.textContent))`, &rows)
	return rows
}

func (b *browser) attr(sel, name string) string {
	b.t.Helper()
	var v string
	b.eval(fmt.Sprintf(`(document.querySelector(%q) || {dataset: {}}).dataset[%q] || ''`, sel, name), &v)
	return v
}
