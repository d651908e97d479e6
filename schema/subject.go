package schema

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// DefaultPrefix is the default subject prefix: subjects are flows.<host>.<direction>.
const DefaultPrefix = "flows"

// MaxHostTokenLen bounds the host token so subjects and message ids stay short; SanitizeHost truncates to
// it so that the default token always validates.
const MaxHostTokenLen = 64

// NATS headers set on every batch message.
const (
	// HeaderMsgID carries MsgID: JetStream dedupes retries on it.
	HeaderMsgID = "Nats-Msg-Id"
	// HeaderContentType carries ContentType.
	HeaderContentType = "Content-Type"
	// ContentType is the body's media type.
	ContentType = "application/msgpack"
	// HeaderSchema carries SchemaHeaderValue, so a consumer can route or reject without decoding.
	HeaderSchema = "Flowbus-Schema"
)

// SchemaHeaderValue is the value of HeaderSchema: "<Major>.<Minor>", e.g. "1.1".
func SchemaHeaderValue() string { return strconv.Itoa(Major) + "." + strconv.Itoa(Minor) }

func hostTokenByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_' || c == '-'
}

// SanitizeHost turns a host name into a subject token: ASCII lowercased, every other character outside
// [a-z0-9_-] (dots included, one per character, not per byte) becomes '-', truncated to MaxHostTokenLen,
// and "unknown" when empty. The result always passes ValidateHostToken.
func SanitizeHost(name string) string {
	out := make([]byte, 0, min(len(name), MaxHostTokenLen))
	for i := 0; i < len(name) && len(out) < MaxHostTokenLen; {
		c := name[i]
		if c < utf8.RuneSelf {
			i++
			if c >= 'A' && c <= 'Z' {
				c += 'a' - 'A'
			}
			if !hostTokenByte(c) {
				c = '-'
			}
			out = append(out, c)
			continue
		}
		_, n := utf8.DecodeRuneInString(name[i:])
		i += n
		out = append(out, '-')
	}
	if len(out) == 0 {
		return "unknown"
	}
	return string(out)
}

// ValidateHostToken checks an explicitly configured host token: non-empty, only [a-z0-9_-], at most
// MaxHostTokenLen characters. The error names the value and suggests SanitizeHost of it; callers prefix
// the setting's name.
func ValidateHostToken(tok string) error {
	if tok == "" {
		return errors.New("is empty: set a host token of lowercase a-z, 0-9, _ and -")
	}
	if len(tok) > MaxHostTokenLen {
		return fmt.Errorf("%q is %d characters long, more than %d: use %q", tok, len(tok), MaxHostTokenLen, SanitizeHost(tok))
	}
	for i := 0; i < len(tok); i++ {
		if !hostTokenByte(tok[i]) {
			return fmt.Errorf("%q is not a valid subject token (allowed: lowercase a-z, 0-9, _ and -): use %q", tok, SanitizeHost(tok))
		}
	}
	return nil
}

// CheckReserved refuses a subject prefix or stream name that NATS keeps for itself: anything starting
// with '$' ($JS, $SYS, $KV, $O, $MQTT, $NRG, $G, ...) or with _INBOX (request replies and consumer
// deliveries). Batches published there would be taken by the server's own APIs, or, under _INBOX,
// stored again from every delivery in a loop.
func CheckReserved(s string) error {
	if strings.HasPrefix(s, "$") || strings.HasPrefix(s, "_INBOX") {
		return fmt.Errorf("%q starts with a name NATS reserves for itself ('$' or _INBOX, as in $JS, $SYS, $KV, _INBOX): use another name", s)
	}
	return nil
}

// ValidatePrefix checks a subject prefix: it must not be reserved (see CheckReserved), and be one or
// more dot-separated non-empty tokens of [A-Za-z0-9_-]
// (so no wildcards '*' '>', no spaces, no leading, trailing or doubled dots).
func ValidatePrefix(p string) error {
	if p == "" {
		return fmt.Errorf("is empty: use %q or dot-separated tokens of A-Z a-z 0-9 _ -", DefaultPrefix)
	}
	if err := CheckReserved(p); err != nil {
		return err
	}
	start := 0
	for i := 0; i <= len(p); i++ {
		if i == len(p) || p[i] == '.' {
			if i == start {
				return fmt.Errorf("%q has an empty token (leading, trailing or doubled '.')", p)
			}
			start = i + 1
			continue
		}
		c := p[i]
		if !(hostTokenByte(c) || c >= 'A' && c <= 'Z') {
			what := fmt.Sprintf("character %q", c)
			if c == '*' || c == '>' {
				what = fmt.Sprintf("wildcard %q", c)
			}
			return fmt.Errorf("%q contains %s at offset %d (allowed: dot-separated tokens of A-Z a-z 0-9 _ -)", p, what, i)
		}
	}
	return nil
}

// Subject is the subject a batch is published on: <prefix>.<host>.<direction>, e.g. flows.web-01.outgoing.
func Subject(prefix, host string, d Direction) string {
	return prefix + "." + host + "." + d.String()
}

// MsgID is the JetStream message id of a batch, <host>.<runID>.<seq>, so a retried publish is deduped.
func MsgID(host, runID string, seq uint64) string {
	return host + "." + runID + "." + strconv.FormatUint(seq, 10)
}

// FilterSubject is the subscription subject for prefix, host and direction: prefix.host.direction,
// prefix.*.direction, prefix.host.> or prefix.>. An empty prefix is DefaultPrefix, an empty host all
// hosts, a zero direction both.
func FilterSubject(prefix, host string, d Direction) string {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	switch {
	case host != "" && d != 0:
		return Subject(prefix, host, d)
	case d != 0:
		return prefix + ".*." + d.String()
	case host != "":
		return prefix + "." + host + ".>"
	}
	return prefix + ".>"
}

// ErrSubjectMismatch means a batch was published on a subject other than the one its own host and
// direction name. Consumers trust the subject, which the server's per-host publish permissions control,
// not the payload: otherwise a host allowed to publish only on <prefix>.web-01.> could report flows as
// web-02.
var ErrSubjectMismatch = errors.New("subject does not match the batch")

// CheckSubject returns an error wrapping ErrSubjectMismatch unless subject is exactly
// <prefix>.<host>.<direction> for the batch's host and direction (an empty prefix is DefaultPrefix). The
// whole subject is compared, not its last two tokens: a host allowed to publish on flows.web-01.> could
// otherwise publish a batch of web-02 on flows.web-01.web-02.outgoing.
func CheckSubject(subject, prefix, host string, d Direction) error {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	want := Subject(prefix, host, d)
	if subject == want {
		return nil
	}
	return fmt.Errorf("%w: the batch says host %q direction %s, which belongs on %s (a publisher claiming another host or direction: check its publish permissions; or agents using another subject prefix than %q: set the prefix)",
		ErrSubjectMismatch, host, d, want, prefix)
}
