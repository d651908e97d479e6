package webview

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/agent"
	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/consumers/flowstat"
	"github.com/flowbus/flowbus/consumers/flowstat/store"
)

func TestMain(m *testing.M) {
	cgrouptest.MaybeRunHelper()
	// The agent keeps its run records in a directory of this test run, never the host's state directory.
	dir, err := os.MkdirTemp("", "flowbus-test-state-")
	if err != nil {
		panic(err)
	}
	os.Setenv("STATE_DIRECTORY", dir)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// startAgent runs an in-process agent with an embedded JetStream, watching cgroup path, until the test
// ends.
func startAgent(t *testing.T, path string) *agent.Agent {
	t.Helper()
	cfg, err := agent.LoadConfig(map[string]string{
		"FLOWBUS_EMBEDDED_LISTEN":    "127.0.0.1:0",
		"FLOWBUS_EMBEDDED_STORE_DIR": t.TempDir(),
		"FLOWBUS_SPOOL_DIR":          t.TempDir(),
		"FLOWBUS_RUN_STATE_FILE":     t.TempDir() + "/run.state",
		"FLOWBUS_CGROUP_PATH":        path,
		"FLOWBUS_HOST":               "view-host",
		"FLOWBUS_BATCH_LINGER":       "20ms",
		"FLOWBUS_METRICS_ADDR":       "off",
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a, err := agent.Start(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent Run: %v", err)
		}
	})
	return a
}

// aggregate runs flowstat's consumer into the SQLite file dsn until the database counts want
// connections (at most 15 s).
func aggregate(t *testing.T, url, dsn string, want int64) {
	t.Helper()
	st, err := store.Open(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	deadline := time.Now().Add(15 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := flowstat.Run(ctx, st, flowstat.Options{URLs: []string{url}, ExitWhenCaughtUp: true, Log: io.Discard})
		cancel()
		if err != nil {
			t.Fatalf("flowstat run: %v", err)
		}
		sum, err := st.Summary(context.Background(), 0)
		if err != nil {
			t.Fatal(err)
		}
		var n int64
		for _, h := range sum.Hosts {
			n += h.Conns
		}
		if n >= want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the database counts %d connections after 15 s, want %d", n, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// endpoint is how the page writes an address and port.
func endpoint(s string) string { return netip.MustParseAddrPort(s).String() }

// The page, in a real headless Chromium, against a real agent on a child cgroup, its embedded stream and
// a database flowstat filled from it: the connections the test made appear in the live table, from the
// history and live; the filters narrow the table on the server, the process filter by comm and by pid;
// both charts have data. The page is opened about ten times in one browser, more than the browser's 6
// connections per server: a page left behind must give its live stream back (before it did, the
// seventh navigation hung).
func TestBrowserShowsFlows(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	chromiumPath(t)
	cg := cgrouptest.NewChild(t)
	a := startAgent(t, cg.Path)

	v4 := cg.Traffic(t, "127.0.0.1", 5, false)
	v6 := cg.Traffic(t, "::1", 3, false)
	made := append(append([]cgrouptest.Conn{}, v4.Conns...), v6.Conns...)
	if len(made) != 8 {
		t.Fatalf("the traffic helper made %d connections, want 8", len(made))
	}
	dsn := t.TempDir() + "/flowstat.db"
	aggregate(t, a.ClientURL(), dsn, 16) // each loopback connection is two begins

	st, err := store.OpenReadOnly(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	view := New(Options{Feed: FeedOptions{URLs: []string{a.ClientURL()}, Since: time.Minute}, DB: st, LocalOnly: true})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go view.Run(ctx)
	srv := httptest.NewServer(view.Handler())
	// A cleanup, not a defer: it must run after the browser's (cleanups run last first), which closes
	// the page's open event stream that Close waits for.
	t.Cleanup(srv.Close)
	for deadline := time.Now().Add(10 * time.Second); ; {
		if _, n, _ := view.feed.state(); n >= 16 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the live feed did not read the 16 begins within 10 s")
		}
		time.Sleep(20 * time.Millisecond)
	}

	b := startBrowser(t)
	start := time.Now()
	b.open(srv.URL+"/", "document.body.dataset.readyMs && document.querySelectorAll('#flows tbody tr').length >= 16")
	wall := time.Since(start)
	var timing struct{ DCL, Load float64 }
	navTiming := func() {
		b.eval(`(e => ({DCL: e.domContentLoadedEventEnd, Load: e.loadEventEnd}))(performance.getEntriesByType('navigation')[0])`, &timing)
	}
	navTiming()
	t.Logf("page load: the live stream's hello at %s ms, first flows at %s ms, charts at %s ms, both at %s ms after navigation start (DOMContentLoaded %.1f ms, load %.1f ms); %v from navigate to seen by the test",
		b.attr("body", "helloMs"), b.attr("body", "firstFlowMs"), b.attr("body", "chartsMs"), b.attr("body", "readyMs"), timing.DCL, timing.Load, wall.Round(time.Millisecond))

	// Again in the same browser: what a later visit costs, without the browser's own first start.
	b.open(srv.URL+"/?since=1h", "document.body.dataset.readyMs && document.querySelectorAll('#flows tbody tr').length >= 16")
	navTiming()
	t.Logf("page load again: the live stream's hello at %s ms, first flows at %s ms, charts at %s ms after navigation start (DOMContentLoaded %.1f ms)",
		b.attr("body", "helloMs"), b.attr("body", "firstFlowMs"), b.attr("body", "chartsMs"), timing.DCL)

	text := func(rows [][]string) string {
		var sb strings.Builder
		for _, r := range rows {
			sb.WriteString(strings.Join(r, " | ") + "\n")
		}
		return sb.String()
	}
	rows := b.rows()
	all := text(rows)
	for _, c := range made {
		for _, dir := range []string{"outgoing", "incoming"} {
			want := "view-host | " + dir + " | " + endpoint(c.Client) + " | " + endpoint(c.Server) + " |"
			if !strings.Contains(all, want) {
				t.Errorf("live table lacks %q; it shows:\n%s", want, all)
			}
		}
	}
	var html string
	b.eval("document.documentElement.outerHTML", &html)
	for _, c := range made {
		if !strings.Contains(html, endpoint(c.Client)) {
			t.Errorf("the DOM does not hold %s", endpoint(c.Client))
		}
	}
	for _, id := range []string{"chart-hosts", "chart-top"} {
		if n := b.attr("#"+id, "points"); n == "" || n == "0" {
			t.Errorf("chart %s has data-points=%q, want > 0 (error %q)", id, n, b.attr("#"+id, "error"))
		}
	}
	var canvases int
	b.eval(`document.querySelectorAll('.chart canvas').length`, &canvases)
	if canvases != 2 {
		t.Errorf("%d chart canvases drawn, want 2", canvases)
	}
	if path := os.Getenv("WEBVIEW_SCREENSHOT"); path != "" {
		b.screenshot(path)
	} else {
		b.screenshot(t.TempDir() + "/view.png")
	}

	// Live: connections made while the page is open appear without a reload.
	live := cg.Traffic(t, "127.0.0.1", 2, false)
	b.waitFor(fmt.Sprintf("document.querySelectorAll('#flows tbody tr').length >= %d", len(rows)+4), 10*time.Second)
	all = text(b.rows())
	for _, c := range live.Conns {
		if !strings.Contains(all, endpoint(c.Client)+" | "+endpoint(c.Server)) {
			t.Errorf("the live connection %s -> %s did not appear; table:\n%s", c.Client, c.Server, all)
		}
	}
	if d := b.attr("body", "dropped"); d != "0" {
		t.Errorf("the page shows %q dropped, want 0", d)
	}

	// Filters apply on the server: only matching rows arrive.
	port := netip.MustParseAddrPort(v4.Conns[0].Server).Port()
	b.open(fmt.Sprintf("%s/?port=%d", srv.URL, port), "document.body.dataset.readyMs && document.querySelectorAll('#flows tbody tr').length >= 10")
	time.Sleep(300 * time.Millisecond) // rows that should not be there would have arrived with the others
	rows = b.rows()
	if len(rows) != 10 {
		t.Errorf("?port=%d shows %d rows, want the 10 begins of its 5 connections:\n%s", port, len(rows), text(rows))
	}
	for _, r := range rows {
		if !strings.HasSuffix(r[4], fmt.Sprintf(":%d", port)) {
			t.Errorf("?port=%d shows a row to %s", port, r[4])
		}
	}
	b.open(fmt.Sprintf("%s/?port=%d&direction=incoming&host=view-host", srv.URL, port), "document.body.dataset.readyMs && document.querySelectorAll('#flows tbody tr').length >= 5")
	time.Sleep(300 * time.Millisecond)
	if rows = b.rows(); len(rows) != 5 {
		t.Errorf("?port=%d&direction=incoming shows %d rows, want 5:\n%s", port, len(rows), text(rows))
	}
	for _, r := range rows {
		if r[2] != "incoming" {
			t.Errorf("direction=incoming shows a %s row", r[2])
		}
	}
	b.open(srv.URL+"/?addr=::1", "document.body.dataset.readyMs && document.querySelectorAll('#flows tbody tr').length >= 6")
	time.Sleep(300 * time.Millisecond)
	if rows = b.rows(); len(rows) != 6 {
		t.Errorf("?addr=::1 shows %d rows, want the 6 begins of the IPv6 connections:\n%s", len(rows), text(rows))
	}
	// Every begin carries its process (each traffic helper run is this test binary, client and listener
	// in one process): by comm, by pid, and a comm nobody has matches none, with the note on what
	// carries one.
	comm := filepath.Base(os.Args[0])
	if len(comm) > 15 {
		comm = comm[:15] // the kernel's TASK_COMM_LEN
	}
	b.open(srv.URL+"/?process="+url.QueryEscape(comm), "document.body.dataset.readyMs && document.querySelectorAll('#flows tbody tr').length >= 16")
	time.Sleep(300 * time.Millisecond)
	rows = b.rows()
	perPid := map[string]int{}
	for _, r := range rows {
		ctx := r[len(r)-1]
		_, rest, ok := strings.Cut(ctx, " "+comm+"[")
		pid, _, ok2 := strings.Cut(rest, "]")
		if !ok || !ok2 {
			t.Errorf("?process=%s: a row whose process is %q, want %s[pid]", comm, ctx, comm)
			continue
		}
		perPid[pid]++
	}
	if len(rows) < 16 || len(perPid) < 2 {
		t.Errorf("?process=%s shows %d rows of %d processes, want every begin (16 at least, of 2 helper runs at least):\n%s", comm, len(rows), len(perPid), text(rows))
	}
	for pid, n := range perPid {
		b.open(srv.URL+"/?process="+pid, fmt.Sprintf("document.body.dataset.readyMs && document.querySelectorAll('#flows tbody tr').length >= %d", n))
		time.Sleep(300 * time.Millisecond)
		if rows = b.rows(); len(rows) != n {
			t.Errorf("?process=%s (a pid) shows %d rows, want its %d begins:\n%s", pid, len(rows), n, text(rows))
		}
	}
	b.open(srv.URL+"/?process=nosuchcomm", "document.body.dataset.readyMs")
	time.Sleep(300 * time.Millisecond)
	var hidden bool
	b.eval(`document.getElementById('process-note').hidden`, &hidden)
	if rows = b.rows(); len(rows) != 0 || hidden {
		t.Errorf("?process=nosuchcomm shows %d rows (want 0) and the note hidden=%v (want shown)", len(rows), hidden)
	}
}
