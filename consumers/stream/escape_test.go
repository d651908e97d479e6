package stream

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestEscape(t *testing.T) {
	cases := []struct {
		in   string
		max  int
		want string
	}{
		{"bank.example", 0, "bank.example"},
		{"api.example.com é 名前", 0, "api.example.com é 名前"},
		{"\x1b[2J\x1b[31mbank.example", 0, `\x1b[2J\x1b[31mbank.example`},
		{"run\x1b[31mRED", 0, `run\x1b[31mRED`},
		{"a\tb\nc\rd\x00e\x7f", 0, `a\x09b\x0ac\x0dd\x00e\x7f`},
		{`back\slash`, 0, `back\x5cslash`},          // so "\x1b" in the stream differs from ESC
		{"bad\xff\xfeutf8", 0, `bad\xff\xfeutf8`},   // invalid UTF-8, byte by byte
		{"c1\u009b31m", 0, `c1\u{9b}31m`},           // CSI as one C1 rune
		{"bidi\u202eevil", 0, `bidi\u{202e}evil`},   // right-to-left override
		{"zero\u200bwidth", 0, `zero\u{200b}width`}, // zero-width space
		{"abcdef", 4, "abcd…"},
		{"abcd", 4, "abcd"},
		{"\x1b\x1b", 5, `\x1b…`}, // an escape is never cut in half
		{"éééé", 3, "ééé…"},      // the bound counts characters, not bytes
	}
	for _, tc := range cases {
		if got := Escape(tc.in, tc.max); got != tc.want {
			t.Errorf("Escape(%q, %d) = %q, want %q", tc.in, tc.max, got, tc.want)
		}
	}
	// A 1 MB hostile string comes out within the bound, and without a control byte.
	huge := strings.Repeat("\x1b[31mX", 200_000)
	got := Escape(huge, MaxLog)
	if n := utf8.RuneCountInString(got); n > MaxLog+1 || !strings.HasSuffix(got, "…") || strings.ContainsRune(got, 0x1b) {
		t.Fatalf("%d characters, ends %q", n, got[len(got)-10:])
	}
}

func TestEscapeNoAllocWhenClean(t *testing.T) {
	s := strings.Repeat("web-01.example ", 10)
	if n := testing.AllocsPerRun(100, func() { _ = Escape(s, MaxCell) }); n != 0 {
		t.Fatalf("%v allocations", n)
	}
}
