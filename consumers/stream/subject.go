package stream

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Overlap reports whether some subject matches both subject patterns a and b. Overlap, not containment:
// reading flows.> from a stream that stores only flows.web-01.> is fine.
func Overlap(a, b string) bool {
	at, bt := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; ; i++ {
		switch {
		case i < len(at) && at[i] == ">", i < len(bt) && bt[i] == ">":
			return true
		case i == len(at) || i == len(bt):
			return len(at) == len(bt)
		case at[i] != bt[i] && at[i] != "*" && bt[i] != "*":
			return false
		}
	}
}

// ErrFilterOutsideStream means a subject filter selects nothing the stream stores.
var ErrFilterOutsideStream = errors.New("subject filter outside the stream")

// CheckFilter returns an error wrapping ErrFilterOutsideStream when filter overlaps none of subjects,
// the subjects of stream. The server accepts such a filter and then delivers nothing, which would look
// like a quiet stream. A stream without subjects (a mirror or sourced stream) cannot be checked: nil.
func CheckFilter(stream, filter string, subjects []string) error {
	if len(subjects) == 0 || slices.ContainsFunc(subjects, func(s string) bool { return Overlap(filter, s) }) {
		return nil
	}
	return fmt.Errorf("%w: filter %q matches none of stream %s's subjects %q", ErrFilterOutsideStream, filter, stream, subjects)
}

// ValidateFilter checks a consumer subject filter: dot-separated non-empty tokens, '*' only as a whole
// token, '>' only as the last token (e.g. flows.>, flows.*.incoming, flows.web-01.outgoing).
func ValidateFilter(f string) error {
	if f == "" {
		return errors.New("subject filter is empty: use e.g. flows.> or flows.*.incoming")
	}
	toks := strings.Split(f, ".")
	for i, t := range toks {
		switch {
		case t == "":
			return fmt.Errorf("subject filter %q has an empty token (leading, trailing or doubled '.')", f)
		case t == ">" && i != len(toks)-1:
			return fmt.Errorf("subject filter %q: '>' must be the last token", f)
		case t != "*" && t != ">" && strings.ContainsAny(t, "*> \t\r\n"):
			return fmt.Errorf("subject filter %q: token %q mixes a wildcard or space with other characters", f, t)
		}
	}
	return nil
}

// CheckFilterPrefix refuses a subject filter that selects no subject <prefix>.<host>.<direction>:
// every batch it selects would be refused as on the wrong subject. filter and prefix must be valid
// (ValidateFilter, schema.ValidatePrefix).
func CheckFilterPrefix(filter, prefix string) error {
	if Overlap(filter, prefix+".*.*") {
		return nil
	}
	return fmt.Errorf("subject filter %q selects no subject %s.<host>.<direction>: give a filter under %s. (e.g. %s.>, %s.*.incoming), or set the prefix (--prefix, FLOWBUS_SUBJECT_PREFIX) to the one the agents publish under",
		filter, prefix, prefix, prefix, prefix)
}
