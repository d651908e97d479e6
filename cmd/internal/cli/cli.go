// Package cli holds what the flowbus commands (flowagent, flowtail, flowstat) share on their command
// line: the flag loop that reports every problem at once, NATS URL lists, the fixes appended to the
// errors a user can act on, and the default state directory. Their settings are thus checked and their
// errors explained the same way, and a URL's password never reaches a message.
package cli

import (
	"errors"
	"flag"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/internal/redact"
	"github.com/nats-io/nats.go/jetstream"
)

// ParseURLs splits a comma-separated NATS server list (as in FLOWBUS_NATS_URL or --nats) and checks each
// entry enough to catch typos early: the NATS client accepts nats://, tls://, ws://, wss:// URLs and bare
// host:port. Errors show the URLs with passwords and tokens redacted.
func ParseURLs(s string) ([]string, error) {
	var urls []string
	for _, u := range strings.Split(s, ",") {
		u = strings.TrimSpace(u)
		if u == "" {
			return nil, fmt.Errorf("%q has an empty server URL (remove the extra comma)", redactList(s))
		}
		if strings.Contains(u, "://") {
			p, err := url.Parse(u)
			if err != nil {
				// url.Error repeats the URL, password included: report only what is wrong with it.
				var ue *url.Error
				if errors.As(err, &ue) {
					err = ue.Err
				}
				return nil, fmt.Errorf("invalid URL %q: %v", redact.URLs([]string{u}), err)
			}
			switch p.Scheme {
			case "nats", "tls", "ws", "wss":
			default:
				return nil, fmt.Errorf("URL %q: unsupported scheme %q (want nats://, tls://, ws:// or wss://)", redact.URLs([]string{u}), p.Scheme)
			}
			if p.Host == "" {
				return nil, fmt.Errorf("URL %q has no host (want e.g. nats://127.0.0.1:4222)", redact.URLs([]string{u}))
			}
		}
		urls = append(urls, u)
	}
	return urls, nil
}

// redactList redacts every entry of a comma-separated list, keeping the empty ones visible.
func redactList(s string) string {
	parts := strings.Split(s, ",")
	for i, p := range parts {
		if t := strings.TrimSpace(p); t != "" {
			parts[i] = redact.URLs([]string{t})
		}
	}
	return strings.Join(parts, ",")
}

// Explain returns err's text with the likely fix appended for the errors a user can act on: no server,
// no stream, no JetStream, a subject prefix outside the stream.
func Explain(err error) string {
	var ce *stream.ConnectError
	var se *stream.StreamError
	switch {
	case errors.As(err, &ce):
		return err.Error() + "\n  is flowagent running and reachable? set --nats or FLOWBUS_NATS_URL to the NATS server's URL (flowagent's embedded server listens on FLOWBUS_EMBEDDED_LISTEN, 127.0.0.1:4222 by default)"
	case errors.As(err, &se) && errors.Is(err, jetstream.ErrStreamNotFound):
		return err.Error() + "\n  flowagent creates it when it starts; or set --stream or FLOWBUS_STREAM to the stream it uses"
	case errors.As(err, &se) && errors.Is(err, stream.ErrFilterOutsideStream):
		return err.Error() + "\n  set --prefix or FLOWBUS_SUBJECT_PREFIX to the prefix flowagent publishes with"
	case errors.As(err, &se) && (errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount)):
		return err.Error() + "\n  this server has no JetStream; point --nats or FLOWBUS_NATS_URL at the server flowagent publishes to"
	}
	return err.Error()
}

// Indent indents every line of err's text by two spaces, for listing several problems under a heading.
func Indent(err error) string {
	return "  " + strings.ReplaceAll(err.Error(), "\n", "\n  ")
}

// ParseFlags parses args into fs and collects every problem instead of
// stopping at the first, as the flag package does, so that a user fixes them
// all in one go. program names the command in messages ("flowtail",
// "flowstat top"); unknownSuffix follows an unknown flag's name. It returns
// flag.ErrHelp alone when help was asked for.
func ParseFlags(fs *flag.FlagSet, args []string, program, unknownSuffix string) ([]error, error) {
	var errs []error
	rest := args
	for {
		err := fs.Parse(rest)
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		if err != nil {
			if name, ok := strings.CutPrefix(err.Error(), "flag provided but not defined: -"); ok {
				err = fmt.Errorf("unknown flag --%s%s", name, unknownSuffix)
			}
			errs = append(errs, err)
			rest = fs.Args()
			continue
		}
		if fs.NArg() == 0 {
			return errs, nil
		}
		errs = append(errs, fmt.Errorf("unexpected argument %q (%s takes flags only)", fs.Arg(0), program))
		rest = fs.Args()[1:]
	}
}

// Values are the settings of a parsed command line, each from its flag, else its environment variable,
// else its default, and where each came from, so an error names what to fix.
type Values struct {
	fs     *flag.FlagSet
	set    map[string]bool
	getenv func(string) string
}

// NewValues reads the flags fs was given (call it after parsing) with getenv behind them.
func NewValues(fs *flag.FlagSet, getenv func(string) string) *Values {
	v := &Values{fs: fs, set: map[string]bool{}, getenv: getenv}
	fs.Visit(func(f *flag.Flag) { v.set[f.Name] = true })
	return v
}

// Set reports whether flag name was given.
func (v *Values) Set(name string) bool { return v.set[name] }

// Flag is the value of flag name as given ("" when it was not).
func (v *Values) Flag(name string) string {
	if !v.set[name] {
		return ""
	}
	return v.fs.Lookup(name).Value.String()
}

// Get returns the value of flag name if it was given, else of the environment variable env (none when
// "") if it is not empty, else def; and its source: "--name", env or "default".
func (v *Values) Get(name, env, def string) (value, source string) {
	if v.set[name] {
		return v.Flag(name), "--" + name
	}
	if env != "" {
		if e := v.getenv(env); e != "" {
			return e, env
		}
	}
	return def, "default"
}

// ParseWhen parses a point in time given as a positive duration back from now (30m, 2h) or as an
// RFC3339 time.
func ParseWhen(s string, now time.Time) (time.Time, error) {
	if d, err := time.ParseDuration(s); err == nil {
		if d <= 0 {
			return time.Time{}, fmt.Errorf("%q: the duration must be positive (how far back)", s)
		}
		return now.Add(-d), nil
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("%q is neither a duration back from now (30m, 2h) nor an RFC3339 time (2026-11-24T10:00:00Z)", s)
	}
	return t, nil
}
