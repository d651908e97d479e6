package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/webview"
	"github.com/flowbus/flowbus/internal/redact"
)

// defaultServeListen is where `flowstat serve` listens: beside the agent's 9464 and flowstat run's 9465.
const defaultServeListen = "127.0.0.1:9466"

// serveConfig is the validated command line of `flowstat serve`.
type serveConfig struct {
	urls        []string
	stream      string
	prefix      string
	listen      string
	allowRemote bool
	since       time.Duration
}

func init() {
	commands = append(commands, command{"serve", "serve the read-only web view: live flows, top talkers, connections over time", []flagDoc{
		dbFlag, natsFlag, streamFlag,
		{"prefix", "PREFIX", `subject prefix the agents publish under
(default $FLOWBUS_SUBJECT_PREFIX, else flows)`},
		{"listen", "HOST:PORT", `where to serve the page (default 127.0.0.1:9466);
an address that is not loopback needs --allow-remote`},
		{"allow-remote", "", `allow a --listen that is not loopback: the view has no
authentication, anyone who reaches it sees every flow`},
		{"since", "DURATION", "how far back the live table starts (default 5m)"},
	}})
}

// serve checks the settings of `flowstat serve` beyond the database and the connection.
func (p *parser) serve(cfg *config, urls []string, streamName, prefix string) {
	s := &cfg.serve
	s.urls, s.stream, s.prefix = urls, streamName, prefix
	var src string
	s.listen, src = p.Get("listen", "", defaultServeListen)
	s.allowRemote = p.bool("allow-remote")
	if err := checkListenAddr(s.listen); err != nil || s.listen == "" {
		p.bad(src, fmt.Errorf("%q is not host:port (e.g. 127.0.0.1:9466)", s.listen))
	} else if !s.allowRemote && !loopbackListen(s.listen) {
		p.bad(src, fmt.Errorf("%s is not a loopback address, and the web view has no authentication: anyone who reaches it sees every flow; listen on 127.0.0.1, or add --allow-remote behind your own access control", s.listen))
	}
	s.since = 5 * time.Minute
	if p.Set("since") {
		s.since = p.duration("since", s.since)
	}
}

// loopbackListen reports whether addr listens on loopback only: localhost or a loopback IP (an empty
// host is every interface).
func loopbackListen(addr string) bool {
	h, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(h, "localhost") {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}

// serveView runs `flowstat serve` until ctx ends: the web view on cfg.serve.listen, its live feed from
// the stream, its charts from the database opened read-only.
func serveView(ctx context.Context, cfg *config, stderr io.Writer) error {
	s := cfg.serve
	db := &lazyDB{dsn: cfg.dsn, log: stderr}
	if _, err := db.get(ctx); err != nil {
		// Not fatal: `flowstat run` may be creating it right now (the demo starts both); the charts say
		// why they are empty until it can be read.
		fmt.Fprintf(stderr, "flowstat serve: charts unavailable for now: %v\n", err)
	}
	defer db.close()
	ln, err := net.Listen("tcp", s.listen)
	if err != nil {
		return fmt.Errorf("cannot serve the web view on %s: %v (set --listen to a free address)", s.listen, errors.Unwrap(err))
	}
	if s.allowRemote && !loopbackListen(s.listen) {
		fmt.Fprintf(stderr, "flowstat serve: warning: listening on %s with no authentication: anyone who reaches it sees every flow\n", ln.Addr())
	}
	view := webview.New(webview.Options{
		Feed:      webview.FeedOptions{URLs: s.urls, Stream: s.stream, Prefix: s.prefix, Since: s.since, Log: stderr},
		DB:        db,
		LocalOnly: !s.allowRemote,
		Log:       stderr,
	})
	srv := &http.Server{Handler: view.Handler(), ReadHeaderTimeout: 5 * time.Second}
	fctx, stopFeed := context.WithCancel(ctx)
	defer stopFeed()
	go view.Run(fctx)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	fmt.Fprintf(stderr, "flowstat serve: web view on http://%s/ (read-only; live flows from stream %s at %s, charts from %s)\n",
		ln.Addr(), s.stream, redact.URLs(s.urls), store.Redact(cfg.dsn))
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	stopFeed()
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	fmt.Fprintln(stderr, "flowstat serve: stopped")
	return nil
}

// lazyDB opens the database read-only at first use, and again after a failure (at most every 5 s), so
// a view started before `flowstat run` created the database shows charts once it exists.
type lazyDB struct {
	dsn string
	log io.Writer

	mu      sync.Mutex
	st      *store.Store
	lastErr error
	tried   time.Time
}

func (l *lazyDB) get(ctx context.Context) (*store.Store, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.st != nil {
		return l.st, nil
	}
	if l.lastErr != nil && time.Since(l.tried) < 5*time.Second {
		return nil, l.lastErr
	}
	l.tried = time.Now()
	l.st, l.lastErr = store.OpenReadOnly(ctx, l.dsn)
	return l.st, l.lastErr
}

func (l *lazyDB) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.st != nil {
		l.st.Close()
	}
}

// Top is store.Store.Top on the database once it can be opened.
func (l *lazyDB) Top(ctx context.Context, by string, f store.Filter, limit int) ([]store.TopRow, error) {
	st, err := l.get(ctx)
	if err != nil {
		return nil, err
	}
	return st.Top(ctx, by, f, limit)
}

// PerHost is store.Store.PerHost on the database once it can be opened.
func (l *lazyDB) PerHost(ctx context.Context, f store.Filter, step time.Duration) ([]store.HostPoint, error) {
	st, err := l.get(ctx)
	if err != nil {
		return nil, err
	}
	return st.PerHost(ctx, f, step)
}
