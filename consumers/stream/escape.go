package stream

import (
	"strconv"
	"unicode"
	"unicode/utf8"
)

// Bounds for Escape, in characters shown: a cell of a table, and anything else of one log line (a
// subject, an error that quotes what a publisher wrote).
const (
	MaxCell = 256
	MaxLog  = 1024
)

// Escape makes s safe to print on a terminal or in a log line: a control byte, an invalid UTF-8 byte
// and a backslash become \xNN, any other non-printable rune (C1 controls, bidi overrides, zero-width
// characters) becomes \u{XXXX}, so no escape sequence from the stream reaches the terminal and no two
// different strings look the same. Past max characters of output the rest is cut and "…" appended;
// max <= 0 means no cut. Printable text without a backslash comes back unchanged, without allocation.
func Escape(s string, max int) string {
	i := 0
	for i < len(s) {
		c := s[i]
		if c >= 0x20 && c < 0x7f && c != '\\' {
			i++
			continue
		}
		if c >= utf8.RuneSelf {
			r, n := utf8.DecodeRuneInString(s[i:])
			if r != utf8.RuneError && unicode.IsPrint(r) {
				i += n
				continue
			}
		}
		break
	}
	if i == len(s) && (max <= 0 || utf8.RuneCountInString(s) <= max) {
		return s
	}
	out := make([]byte, 0, min(len(s), 4*max+8)+8)
	shown := 0
	for j := 0; j < len(s); {
		var piece []byte
		r, n := utf8.DecodeRuneInString(s[j:])
		switch {
		case r == utf8.RuneError && n <= 1, r < 0x20, r == 0x7f, r == '\\':
			piece = []byte{'\\', 'x', hex[s[j]>>4], hex[s[j]&15]}
			n = 1
		case unicode.IsPrint(r) || r == ' ':
			piece = []byte(s[j : j+n])
		default:
			piece = append(strconv.AppendUint([]byte(`\u{`), uint64(r), 16), '}')
		}
		w := utf8.RuneCount(piece)
		if max > 0 && shown+w > max {
			return string(out) + "…"
		}
		out = append(out, piece...)
		shown += w
		j += n
	}
	return string(out)
}

const hex = "0123456789abcdef"
