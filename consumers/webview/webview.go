// Package webview is the read-only live web view of flowstat (`flowstat serve`): a page with the live
// flows of the stream, pushed by Server-Sent Events and filtered on the server, and charts of the
// database's aggregates (top talkers, connections per host over time).
//
// Read-only throughout: the live feed is one ordered ephemeral consumer (no durable state on the
// server), the charts only query the database (which the caller opens read-only), and the handlers
// answer GET and HEAD only. Everything that comes from the stream reaches the page as JSON, escaped and
// bounded on the server, and the page puts it in text nodes only. The page, its script and the charting
// library are embedded in the binary; nothing is loaded from elsewhere.
package webview

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/schema"
)

//go:embed assets
var assets embed.FS

// Queries are the database queries the charts use (store.Store has them).
type Queries interface {
	Top(ctx context.Context, by string, f store.Filter, limit int) ([]store.TopRow, error)
	PerHost(ctx context.Context, f store.Filter, step time.Duration) ([]store.HostPoint, error)
}

// Options configures a Server.
type Options struct {
	Feed FeedOptions
	// DB answers the chart queries; nil serves the page without charts.
	DB Queries
	// MaxClients bounds the open live views (0: 32); one more is refused with 503.
	MaxClients int
	// LocalOnly refuses requests whose Host header is not a loopback address or localhost, so a web
	// page elsewhere cannot read the view through DNS rebinding. Set it when listening on loopback.
	LocalOnly bool
	// Log receives one line per problem; nil discards.
	Log io.Writer
}

// Server serves the view. Run reads the stream; Handler answers the browsers.
type Server struct {
	o     Options
	feed  *Feed
	mux   *http.ServeMux
	slots chan struct{}
}

// New returns a server; call Run to start the live feed.
func New(o Options) *Server {
	if o.MaxClients <= 0 {
		o.MaxClients = 32
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	if o.Feed.Log == nil {
		o.Feed.Log = o.Log
	}
	s := &Server{o: o, feed: NewFeed(o.Feed), mux: http.NewServeMux(), slots: make(chan struct{}, o.MaxClients)}
	sub, err := fs.Sub(assets, "assets")
	if err != nil {
		panic(err) // the embedded tree is fixed at build time
	}
	s.mux.Handle("GET /assets/", http.StripPrefix("/assets/", http.FileServerFS(sub)))
	s.mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-cache")
		http.ServeFileFS(w, r, sub, "index.html")
	})
	s.mux.HandleFunc("GET /api/live", s.live)
	s.mux.HandleFunc("GET /api/top", s.top)
	s.mux.HandleFunc("GET /api/hosts", s.hosts)
	return s
}

// Run reads the stream for the live feed until ctx ends.
func (s *Server) Run(ctx context.Context) { s.feed.Run(ctx) }

// Handler answers GET and HEAD requests; anything else is 405.
func (s *Server) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			h.Set("Allow", "GET, HEAD")
			http.Error(w, "flowstat serve is read-only: only GET and HEAD", http.StatusMethodNotAllowed)
			return
		}
		if s.o.LocalOnly && !localHost(r.Host) {
			http.Error(w, fmt.Sprintf("host %q is not a loopback address: open the view as http://127.0.0.1:PORT/ or http://localhost:PORT/ (serve --allow-remote answers any host)", r.Host), http.StatusMisdirectedRequest)
			return
		}
		s.mux.ServeHTTP(w, r)
	})
}

// localHost reports whether a Host header names this machine by loopback: localhost or a loopback IP.
func localHost(hostport string) bool {
	h := hostport
	if hh, _, err := net.SplitHostPort(hostport); err == nil {
		h = hh
	}
	h = strings.TrimSuffix(strings.Trim(h, "[]"), ".")
	if strings.EqualFold(h, "localhost") {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}

// live streams the flows that pass the request's filter as Server-Sent Events: "hello" once (the
// filter and how many recent flows follow), "flow" per flow (SPEC section 1 JSON), "stats" every second
// (sent, dropped and rate-limited counts of this view, the feed's status).
func (s *Server) live(w http.ResponseWriter, r *http.Request) {
	flt, err := ParseFilter(r.URL.Query())
	if err != nil {
		http.Error(w, "bad filter: "+err.Error(), http.StatusBadRequest)
		return
	}
	select {
	case s.slots <- struct{}{}:
		defer func() { <-s.slots }()
	default:
		http.Error(w, fmt.Sprintf("already %d live views open: close one", s.o.MaxClients), http.StatusServiceUnavailable)
		return
	}
	rc := http.NewResponseController(w)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	c, hist := s.feed.subscribe(flt)
	defer s.feed.unsubscribe(c)
	var sent uint64
	buf := make([]byte, 0, 4096)
	event := func(name string, data []byte) {
		buf = append(buf, "event: "...)
		buf = append(buf, name...)
		buf = append(buf, "\ndata: "...)
		buf = append(buf, data...)
		buf = append(buf, "\n\n"...)
	}
	flush := func() error {
		if len(buf) == 0 {
			return nil
		}
		// A browser that stops reading must not hold the handler forever.
		_ = rc.SetWriteDeadline(time.Now().Add(10 * time.Second))
		_, err := w.Write(buf)
		buf = buf[:0]
		if err == nil {
			err = rc.Flush()
		}
		return err
	}
	stats := func() {
		status, events, clients := s.feed.state()
		b, _ := json.Marshal(map[string]any{"sent": sent, "dropped": c.dropped.Load(), "rate_limited": c.limited.Load(),
			"feed_events": events, "views": clients, "status": status})
		event("stats", b)
	}
	hello, _ := json.Marshal(map[string]any{"filter": flt.Values().Encode(), "history": len(hist)})
	event("hello", hello)
	for _, it := range hist {
		event("flow", it.json)
		sent++
		if len(buf) > 64<<10 {
			if flush() != nil {
				return
			}
		}
	}
	stats()
	if flush() != nil {
		return
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case it := <-c.ch:
			event("flow", it.json)
			sent++
			// Take what else is queued, so a burst is one write.
			for more := true; more && len(buf) < 64<<10; {
				select {
				case it := <-c.ch:
					event("flow", it.json)
					sent++
				default:
					more = false
				}
			}
		case <-tick.C:
			stats()
		}
		if flush() != nil {
			return
		}
	}
}

// chartFilter reads since (a duration back from now, at most 31 days), host and direction.
func chartFilter(r *http.Request) (store.Filter, error) {
	q := r.URL.Query()
	var f store.Filter
	since := time.Hour
	if v := q.Get("since"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 || d > 31*24*time.Hour {
			return f, fmt.Errorf("since %q: want a duration back from now, at most 744h (e.g. 15m, 1h, 24h)", v)
		}
		since = d
	}
	f.Since = time.Now().Add(-since)
	if h := q.Get("host"); h != "" {
		if err := schema.ValidateHostToken(h); err != nil {
			return f, fmt.Errorf("host: %w", err)
		}
		f.Host = h
	}
	switch d := q.Get("direction"); d {
	case "", "all", "both":
	case "incoming", "outgoing":
		f.Direction = d
	default:
		return f, fmt.Errorf("direction %q: want incoming, outgoing or all", d)
	}
	return f, nil
}

// top answers the top talkers: by (peer, name, port or host; default peer), limit (1-50, default 10).
func (s *Server) top(w http.ResponseWriter, r *http.Request) {
	f, err := chartFilter(r)
	by := r.URL.Query().Get("by")
	if by == "" {
		by = "peer"
	}
	limit := 10
	if v := r.URL.Query().Get("limit"); v != "" {
		n, perr := strconv.Atoi(v)
		if perr != nil || n < 1 || n > 50 {
			err = errors.Join(err, fmt.Errorf("limit %q: want 1 to 50", v))
		}
		limit = n
	}
	if by != "peer" && by != "name" && by != "port" && by != "host" {
		err = errors.Join(err, fmt.Errorf("by %q: want peer, name, port or host", by))
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if s.o.DB == nil {
		http.Error(w, "no database: start flowstat serve with --db", http.StatusServiceUnavailable)
		return
	}
	rows, err := s.o.DB.Top(r.Context(), by, f, limit)
	s.answer(w, "top", map[string]any{"by": by, "since": f.Since.UTC(), "rows": rows}, err)
}

// hosts answers connections per host over time; step defaults to what gives about 60 points.
func (s *Server) hosts(w http.ResponseWriter, r *http.Request) {
	f, err := chartFilter(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if s.o.DB == nil {
		http.Error(w, "no database: start flowstat serve with --db", http.StatusServiceUnavailable)
		return
	}
	step := time.Since(f.Since) / 60
	points, err := s.o.DB.PerHost(r.Context(), f, step)
	s.answer(w, "hosts", map[string]any{"since": f.Since.UTC(), "step_seconds": int64(step / time.Second), "points": points}, err)
}

func (s *Server) answer(w http.ResponseWriter, what string, v any, err error) {
	if err != nil {
		fmt.Fprintf(s.o.Log, "flowstat serve: %s query: %v\n", what, err)
		http.Error(w, what+" query failed: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_ = json.NewEncoder(w).Encode(v)
}
