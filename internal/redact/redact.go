// Package redact hides the secrets in NATS URLs before they reach a log, an
// error or a terminal. Every flowbus program (the agent and the consumers)
// uses it, so a URL reads the same everywhere: user:xxxxx@host, as Go's
// url.URL.Redacted writes it, and xxxxx@host for a token or a URL that does
// not parse.
package redact

import (
	"net/url"
	"strings"
)

// URL returns u with its password or token replaced by xxxxx.
func URL(u string) string {
	p, err := url.Parse(u)
	if err != nil {
		// Unparseable, often because the password holds '/', '#' or '%':
		// hide everything up to the last '@', wherever it is.
		if s, rest, ok := strings.Cut(u, "://"); ok {
			if at := strings.LastIndexByte(rest, '@'); at >= 0 {
				return s + "://xxxxx" + rest[at:]
			}
		}
		return u
	}
	if p.User == nil {
		return u
	}
	if _, has := p.User.Password(); has {
		return p.Redacted()
	}
	p.User = url.User("xxxxx")
	return p.String()
}

// URLs joins urls with commas, each redacted.
func URLs(urls []string) string {
	out := make([]string, len(urls))
	for i, u := range urls {
		out[i] = URL(u)
	}
	return strings.Join(out, ",")
}

// List redacts a comma-separated URL list as FLOWBUS_NATS_URL holds it,
// keeping the spaces around each entry.
func List(list string) string {
	parts := strings.Split(list, ",")
	for i, p := range parts {
		t := strings.TrimSpace(p)
		if t == "" {
			continue
		}
		k := strings.Index(p, t)
		parts[i] = p[:k] + URL(t) + p[k+len(t):]
	}
	return strings.Join(parts, ",")
}
