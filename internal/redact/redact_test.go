package redact

import "testing"

func TestURL(t *testing.T) {
	for in, want := range map[string]string{
		"nats://u:pw@h:1":          "nats://u:xxxxx@h:1",
		"nats://tok@h:2":           "nats://xxxxx@h:2",
		"h:3":                      "h:3",
		"nats://h:4222":            "nats://h:4222",
		"tls://b:p@ss@h2:4222":     "tls://b:xxxxx@h2:4222",
		"nats://u:p%zz@h:1/x":      "nats://xxxxx@h:1/x", // does not parse
		"nats://user:secret@host:": "nats://user:xxxxx@host:",
		"nats://u:pa/ss@h:1":       "nats://xxxxx@h:1",
		"nats://u:p#x@h:1":         "nats://xxxxx@h:1",
	} {
		if got := URL(in); got != want {
			t.Errorf("URL(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestList(t *testing.T) {
	got := List("nats://a:s3cret@h1:4222, tls://b:p@ss@h2:4222,nats://h3:4222")
	if want := "nats://a:xxxxx@h1:4222, tls://b:xxxxx@h2:4222,nats://h3:4222"; got != want {
		t.Errorf("List = %q, want %q", got, want)
	}
	if got := URLs([]string{"nats://u:pw@h:1", "nats://tok@h:2"}); got != "nats://u:xxxxx@h:1,nats://xxxxx@h:2" {
		t.Errorf("URLs = %q", got)
	}
}
