package flowstat

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Dead-letter headers. The original message's headers are kept, except Nats-Msg-Id which is replaced by
// "<stream>.<seq>" so a stream capturing dead letters dedupes a copy sent again after a crash.
const (
	HeaderDLReason  = "Flowbus-Deadletter-Reason"   // reason token: malformed, truncated, unsupported_major, subject_mismatch
	HeaderDLError   = "Flowbus-Deadletter-Error"    // the decoder's message
	HeaderDLSubject = "Flowbus-Deadletter-Subject"  // the original subject
	HeaderDLStream  = "Flowbus-Deadletter-Stream"   // the stream it was read from
	HeaderDLSeq     = "Flowbus-Deadletter-Sequence" // its stream sequence
)

// deadLetterer copies bad messages to the dead-letter subject. When a stream captures that subject it
// publishes through JetStream (stored and acknowledged); otherwise it is a core publish, flushed, which
// only subscribers connected at that moment see (the database keeps the record either way).
type deadLetterer struct {
	nc      *nats.Conn
	js      jetstream.JetStream
	subject string
	stream  string
	timeout time.Duration
	useJS   bool
}

func newDeadLetterer(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, subject, stream string, timeout time.Duration) *deadLetterer {
	d := &deadLetterer{nc: nc, js: js, subject: subject, stream: stream, timeout: timeout}
	lctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if name, err := js.StreamNameBySubject(lctx, subject); err == nil && name != "" {
		d.useJS = true
	}
	return d
}

// send publishes the copy, retrying briefly: a dead letter is rare, and a short stall is better than a
// missing copy.
func (d *deadLetterer) send(ctx context.Context, msg jetstream.Msg, seq uint64, reason string, cause error) error {
	out := nats.NewMsg(d.subject)
	out.Data = msg.Data()
	for k, v := range msg.Headers() {
		// Nats-* headers steer JetStream (expected stream, sequence, TTL...): copied, they could make
		// the server refuse the copy or treat it as something else.
		if !strings.HasPrefix(strings.ToLower(k), "nats-") {
			out.Header[k] = v
		}
	}
	out.Header.Set(HeaderDLReason, reason)
	out.Header.Set(HeaderDLError, headerSafe(cause.Error()))
	out.Header.Set(HeaderDLSubject, msg.Subject())
	out.Header.Set(HeaderDLStream, d.stream)
	out.Header.Set(HeaderDLSeq, strconv.FormatUint(seq, 10))
	out.Header.Set(nats.MsgIdHdr, d.stream+"."+strconv.FormatUint(seq, 10))
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Duration(attempt) * 200 * time.Millisecond):
			}
		}
		if d.useJS {
			pctx, cancel := context.WithTimeout(ctx, d.timeout)
			_, err = d.js.PublishMsg(pctx, out)
			cancel()
		} else {
			err = d.corePublish(out)
		}
		if err == nil || errors.Is(err, nats.ErrPermissionViolation) { // a refusal is not transient
			return err
		}
	}
	return err
}

// corePublish publishes and flushes. The server refuses a publish it does not permit with an
// asynchronous error that arrives before the flush's answer; the client keeps it as its last error, so a
// new one naming our subject means the copy was dropped.
func (d *deadLetterer) corePublish(m *nats.Msg) error {
	before := d.nc.LastError()
	if err := d.nc.PublishMsg(m); err != nil {
		return err
	}
	if err := d.nc.FlushTimeout(d.timeout); err != nil {
		return err
	}
	if after := d.nc.LastError(); after != nil && after != before && errors.Is(after, nats.ErrPermissionViolation) && strings.Contains(after.Error(), d.subject) {
		return fmt.Errorf("%w (allow this user to publish to %s)", after, d.subject)
	}
	return nil
}

// headerSafe keeps a header value on one line and short.
func headerSafe(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > 1024 {
		s = s[:1024]
	}
	return s
}
