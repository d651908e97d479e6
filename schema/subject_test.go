package schema

import (
	"errors"
	"strings"
	"testing"
)

func TestSanitizeHost(t *testing.T) {
	for in, want := range map[string]string{
		"web-01":                 "web-01",
		"Web.01":                 "web-01",
		"WEB_01.example.com":     "web_01-example-com",
		"":                       "unknown",
		"héllo wörld":            "h-llo-w-rld",
		"a*b>c":                  "a-b-c",
		"\xff\xfe":               "--",
		strings.Repeat("A", 100): strings.Repeat("a", 64),
		"日本":                     "--",
	} {
		got := SanitizeHost(in)
		if got != want {
			t.Errorf("SanitizeHost(%q) = %q, want %q", in, got, want)
		}
		if err := ValidateHostToken(got); err != nil {
			t.Errorf("SanitizeHost(%q) = %q does not validate: %v", in, got, err)
		}
	}
}

func TestValidateHostToken(t *testing.T) {
	for _, ok := range []string{"web-01", "a", "x_y-z", "0", strings.Repeat("a", 64)} {
		if err := ValidateHostToken(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for tok, want := range map[string]string{
		"Web.01":                `"Web.01" is not a valid subject token (allowed: lowercase a-z, 0-9, _ and -): use "web-01"`,
		"":                      "is empty",
		"a b":                   `use "a-b"`,
		"flows.*":               `use "flows--"`,
		"a>":                    `use "a-"`,
		strings.Repeat("a", 65): "more than 64",
		"é":                     `use "-"`,
	} {
		err := ValidateHostToken(tok)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ValidateHostToken(%q) = %v, want mention of %q", tok, err, want)
		}
	}
}

func TestValidatePrefix(t *testing.T) {
	for _, ok := range []string{"flows", "Flows", "a.b.c", "x_y-z.Q1"} {
		if err := ValidatePrefix(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for p, want := range map[string]string{
		"":         "empty",
		".flows":   "empty token",
		"flows.":   "empty token",
		"a..b":     "empty token",
		"flows.*":  "wildcard '*'",
		"flows>":   "wildcard '>'",
		"a b":      "character ' '",
		"é":        "character",
		"_INBOX":   "reserves",
		"_INBOX.x": "reserves",
		"_INBOXES": "reserves",
		"$JS":      "reserves",
		"$SYS.a":   "reserves",
		"$KV":      "reserves",
		"$O":       "reserves",
		"$MQTT":    "reserves",
		"$NRG":     "reserves",
		"$G":       "reserves",
		"$x":       "reserves",
	} {
		err := ValidatePrefix(p)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ValidatePrefix(%q) = %v, want mention of %q", p, err, want)
		}
	}
}

func TestCheckReserved(t *testing.T) {
	for _, ok := range []string{"flows", "FLOWS", "inbox", "x_INBOX", "a$"} {
		if err := CheckReserved(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, r := range []string{"$JS", "$SYS", "$KV", "$O", "$MQTT", "$NRG", "$G", "$", "_INBOX", "_INBOX_x"} {
		if err := CheckReserved(r); err == nil || !strings.Contains(err.Error(), r) {
			t.Errorf("CheckReserved(%q) = %v, want a refusal naming it", r, err)
		}
	}
}

func TestSubjectsAndIDs(t *testing.T) {
	if s := Subject(DefaultPrefix, "web-01", Outgoing); s != "flows.web-01.outgoing" {
		t.Error(s)
	}
	if s := Subject("a.b", "h", Incoming); s != "a.b.h.incoming" {
		t.Error(s)
	}
	if s := MsgID("web-01", "01J9ZX", 18446744073709551615); s != "web-01.01J9ZX.18446744073709551615" {
		t.Error(s)
	}
	if v := SchemaHeaderValue(); v != "1.2" {
		t.Error(v)
	}
	if HeaderMsgID != "Nats-Msg-Id" || HeaderContentType != "Content-Type" || ContentType != "application/msgpack" || HeaderSchema != "Flowbus-Schema" {
		t.Error("header constants changed")
	}
}

func TestFilterSubject(t *testing.T) {
	for _, c := range []struct {
		prefix, host string
		dir          Direction
		want         string
	}{
		{"flows", "", 0, "flows.>"},
		{"", "", 0, "flows.>"},
		{"flows", "web-01", 0, "flows.web-01.>"},
		{"flows", "", Incoming, "flows.*.incoming"},
		{"a.b", "web-01", Outgoing, "a.b.web-01.outgoing"},
	} {
		if got := FilterSubject(c.prefix, c.host, c.dir); got != c.want {
			t.Errorf("FilterSubject(%q, %q, %v) = %q, want %q", c.prefix, c.host, c.dir, got, c.want)
		}
	}
}

func TestCheckSubject(t *testing.T) {
	if err := CheckSubject("flows.web-01.outgoing", "", "web-01", Outgoing); err != nil {
		t.Errorf("own subject: %v", err)
	}
	for _, s := range []string{"flows.web-02.outgoing", "flows.web-01.incoming", "flows.web-01.web-01.outgoing", "acme.web-01.outgoing"} {
		if err := CheckSubject(s, "flows", "web-01", Outgoing); !errors.Is(err, ErrSubjectMismatch) || !strings.Contains(err.Error(), "flows.web-01.outgoing") {
			t.Errorf("CheckSubject(%q) = %v, want a mismatch naming flows.web-01.outgoing", s, err)
		}
	}
}
