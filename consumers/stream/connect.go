package stream

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/flowbus/flowbus/internal/redact"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Dial says how to connect.
type Dial struct {
	// URLs are the NATS servers to try; empty means DefaultURL.
	URLs []string
	// Name is the connection name, shown in server monitoring.
	Name string
	// Timeout bounds connecting, shared by the URLs (at least 1s each); 0 means 5s. A consumer must not
	// hang silently when the server is down or black-holed.
	Timeout time.Duration
	// Notify, if set, receives the connection's notices (disconnected, reconnected), one line each
	// without a newline. It is called from the client's goroutines.
	Notify func(msg string)
	// AsyncErrors also hands the server's asynchronous errors (a refused publish, a slow consumer) to
	// Notify instead of the client's default handling.
	AsyncErrors bool
}

// Connect dials the servers within about d.Timeout in total and gives up early when ctx ends (returning
// ctx.Err()), so an interrupt during a hanging dial stops at once. Once connected, the connection
// reconnects forever: a consumer survives server restarts rather than exit. A failed dial is a
// *ConnectError.
func Connect(ctx context.Context, d Dial) (*nats.Conn, error) {
	urls := d.URLs
	if len(urls) == 0 {
		urls = []string{DefaultURL}
	}
	timeout, notify := orDefaults(d.Timeout, d.Notify)
	opts := []nats.Option{
		nats.Name(d.Name),
		// The client dials the servers one after another, each with its own timeout: share the budget.
		nats.Timeout(max(timeout/time.Duration(len(urls)), time.Second)),
		nats.MaxReconnects(-1),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				notify(fmt.Sprintf("disconnected from NATS: %v; reconnecting", err))
			}
		}),
		nats.ReconnectHandler(func(c *nats.Conn) {
			notify("reconnected to NATS at " + redact.URLs([]string{c.ConnectedUrl()}))
		}),
	}
	if d.AsyncErrors {
		opts = append(opts, nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			notify(fmt.Sprintf("NATS: %v", err))
		}))
	}
	type result struct {
		nc  *nats.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		nc, err := nats.Connect(strings.Join(urls, ","), opts...)
		done <- result{nc, err}
	}()
	select {
	case r := <-done:
		// A dial that fails at once races an interrupt that came first: the interrupt wins.
		if r.err != nil && ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if r.err != nil {
			return nil, &ConnectError{URL: redact.URLs(urls), Err: r.err}
		}
		return r.nc, nil
	case <-ctx.Done():
		// Close the connection if the dial still succeeds, so nothing leaks.
		go func() {
			if r := <-done; r.nc != nil {
				r.nc.Close()
			}
		}()
		return nil, ctx.Err()
	}
}

// Lookup says which stream to open and how long to wait for it.
type Lookup struct {
	Stream string
	// URL is the redacted server list, for messages.
	URL string
	// Timeout bounds each lookup; 0 means 5s.
	Timeout time.Duration
	// Wait is how long a missing stream is waited for (flowagent creates it when it starts); 0 means
	// fail at once.
	Wait time.Duration
	// Notify, if set, receives what the wait is about, one line each without a newline.
	Notify func(msg string)
	// Waiting, if set, is called once when the wait begins, e.g. to mark the consumer not ready.
	Waiting func()
}

// Open looks the stream up, waiting up to l.Wait for it to appear. It returns a *StreamError, or
// ctx.Err() when ctx ends first.
func Open(ctx context.Context, js jetstream.JetStream, l Lookup) (jetstream.Stream, error) {
	timeout, notify := orDefaults(l.Timeout, l.Notify)
	deadline := time.Now().Add(l.Wait)
	for waited := false; ; waited = true {
		lctx, cancel := context.WithTimeout(ctx, timeout)
		s, err := js.Stream(lctx, l.Stream)
		cancel()
		if err == nil {
			if waited {
				notify(fmt.Sprintf("stream %q is there now", l.Stream))
			}
			return s, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if !errors.Is(err, jetstream.ErrStreamNotFound) || time.Now().After(deadline) {
			return nil, &StreamError{Stream: l.Stream, URL: l.URL, Err: err}
		}
		if !waited {
			if l.Waiting != nil {
				l.Waiting()
			}
			notify(fmt.Sprintf("stream %q does not exist on %s yet; waiting up to %v for flowagent to create it (or set --stream / FLOWBUS_STREAM)", l.Stream, l.URL, l.Wait.Round(time.Second)))
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// orDefaults is timeout, 5s when zero, and notify, a no-op when nil.
func orDefaults(timeout time.Duration, notify func(string)) (time.Duration, func(string)) {
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	if notify == nil {
		notify = func(string) {}
	}
	return timeout, notify
}
