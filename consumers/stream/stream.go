// Package stream is what every flowbus consumer needs before it reads a batch: connecting to NATS with
// errors that name the servers (passwords redacted), opening (or waiting for) the stream, the start
// policy of a new consumer, subject filter checks, the rule that follows a run's batch chain, and the
// accounting of run links (prev_run: how many batches of a host's previous run never arrived, how long
// capture was down). It is shared by package tail (flowtail) and package flowstat, so that both
// connect, refuse a filter and report a gap or a restart the same way. Of flowbus it imports only internal/redact and schema (the one rule on reserved names).
package stream

import (
	"errors"
	"fmt"
	"strings"

	"github.com/flowbus/flowbus/schema"
	"github.com/nats-io/nats.go/jetstream"
)

// DefaultStream is the stream name the agent creates by default.
const DefaultStream = "FLOWS"

// DefaultURL is where a local flowagent's embedded server listens by default.
const DefaultURL = "nats://127.0.0.1:4222"

// ConnectError means no NATS server could be reached; URL is the redacted server list.
type ConnectError struct {
	URL string
	Err error
}

// Error names the servers and the cause.
func (e *ConnectError) Error() string {
	return fmt.Sprintf("cannot connect to NATS at %s: %v", e.URL, e.Err)
}

// Unwrap returns the client's error.
func (e *ConnectError) Unwrap() error { return e.Err }

// StreamError means the stream could not be opened: it does not exist (errors.Is jetstream.ErrStreamNotFound),
// JetStream is not enabled, or the lookup failed.
type StreamError struct {
	Stream string
	URL    string
	Err    error
}

// Error names the stream and the servers, and the cause unless the stream simply does not exist.
func (e *StreamError) Error() string {
	if errors.Is(e.Err, jetstream.ErrStreamNotFound) {
		return fmt.Sprintf("stream %q does not exist on %s", e.Stream, e.URL)
	}
	return fmt.Sprintf("cannot open stream %q on %s: %v", e.Stream, e.URL, e.Err)
}

// Unwrap returns the underlying error.
func (e *StreamError) Unwrap() error { return e.Err }

// ValidateName applies JetStream's naming rules to a stream or consumer name, so a typo fails before
// connecting and not as an odd server error. what names the setting, e.g. "stream name".
func ValidateName(what, s string) error {
	if s == "" {
		return fmt.Errorf("%s is empty", what)
	}
	if err := schema.CheckReserved(s); err != nil {
		return fmt.Errorf("%s %w", what, err)
	}
	if i := strings.IndexAny(s, ".*> \t\r\n/\\"); i >= 0 {
		return fmt.Errorf("%s %q contains %q, which JetStream does not allow (use letters, digits, - and _)", what, s, s[i])
	}
	return nil
}
