package stream

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

func TestValidateName(t *testing.T) {
	if err := ValidateName("stream name", "FLOWS_2-a"); err != nil {
		t.Error(err)
	}
	for _, s := range []string{"", "a.b", "a b", "a*", "a>", "a/b"} {
		if err := ValidateName("stream name", s); err == nil || !strings.Contains(err.Error(), "stream name") {
			t.Errorf("%q: %v", s, err)
		}
	}
	for _, s := range []string{"$JS", "$SYS", "$KV", "$G", "_INBOX", "_INBOX_FLOWS"} {
		if err := ValidateName("stream name", s); err == nil || !strings.Contains(err.Error(), "stream name") || !strings.Contains(err.Error(), "reserves") {
			t.Errorf("%q: %v, want a refusal as reserved", s, err)
		}
	}
}

func TestOverlap(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want bool
	}{
		{"flows.>", "flows.>", true},
		{"flows.*.incoming", "flows.>", true},
		{"flows.web-01.outgoing", "flows.*.outgoing", true},
		{"flows.*.incoming", "flows.*.outgoing", false},
		{"acme.>", "flows.>", false},
		{"flows.a", "flows.a.b", false},
		{"flows.*", "flows.a.b", false},
		{">", "flows.a", true},
	} {
		if got := Overlap(c.a, c.b); got != c.want {
			t.Errorf("Overlap(%q, %q) = %v, want %v", c.a, c.b, got, c.want)
		}
	}
}

func TestCheckFilter(t *testing.T) {
	if err := CheckFilter("S", "flows.>", []string{"acme.>", "flows.web-01.>"}); err != nil {
		t.Errorf("overlapping filter: %v", err)
	}
	if err := CheckFilter("S", "flows.>", nil); err != nil {
		t.Errorf("stream without subjects: %v", err)
	}
	if err := CheckFilter("S", "flows.db-02.>", []string{"flows.web-01.>"}); !errors.Is(err, ErrFilterOutsideStream) || !strings.Contains(err.Error(), "flows.db-02.>") {
		t.Errorf("filter outside: %v", err)
	}
}

func TestStart(t *testing.T) {
	for _, s := range []Start{StartAll, StartNew, StartTime, StartSeq} {
		if got, err := ParseStart(s.String()); err != nil || got != s {
			t.Errorf("ParseStart(%q) = %v, %v", s, got, err)
		}
	}
	if _, err := ParseStart("later"); err == nil {
		t.Error("ParseStart accepts later")
	}
	if StartDefault.Or(StartNew) != StartNew || StartAll.Or(StartNew) != StartAll {
		t.Error("Or does not keep a chosen policy or fill in the default")
	}
	if err := StartTime.Check(time.Time{}, 0); err == nil || !strings.Contains(err.Error(), "start time") {
		t.Errorf("StartTime without a time: %v", err)
	}
	if err := StartSeq.Check(time.Time{}, 0); err == nil || !strings.Contains(err.Error(), ">= 1") {
		t.Errorf("StartSeq without a sequence: %v", err)
	}
	if err := Start(9).Check(time.Time{}, 0); err == nil {
		t.Error("Check accepts an unknown policy")
	}
	at := time.Unix(1700000000, 0)
	if p, tm, seq := StartTime.Deliver(at, 0); p != jetstream.DeliverByStartTimePolicy || tm == nil || !tm.Equal(at) || seq != 0 {
		t.Errorf("StartTime delivers %v %v %d", p, tm, seq)
	}
	if p, tm, seq := StartSeq.Deliver(at, 7); p != jetstream.DeliverByStartSequencePolicy || tm != nil || seq != 7 {
		t.Errorf("StartSeq delivers %v %v %d", p, tm, seq)
	}
	if p, _, _ := StartNew.Deliver(at, 7); p != jetstream.DeliverNewPolicy {
		t.Errorf("StartNew delivers %v", p)
	}
	if p, _, _ := StartAll.Deliver(at, 7); p != jetstream.DeliverAllPolicy {
		t.Errorf("StartAll delivers %v", p)
	}
}

func TestFollow(t *testing.T) {
	for _, c := range []struct {
		seen            bool
		last, seq, prev uint64
		want            Link
	}{
		{false, 0, 5, 3, LinkFirst},
		{true, 4, 6, 4, LinkNext},
		{true, 4, 4, 2, LinkBehind},
		{true, 4, 3, 1, LinkBehind},
		{true, 4, 9, 7, LinkGap},
		{true, 4, 9, 2, LinkBroken},
	} {
		if got := Follow(c.seen, c.last, c.seq, c.prev); got != c.want {
			t.Errorf("Follow(%v, last %d, seq %d, prev %d) = %v, want %v", c.seen, c.last, c.seq, c.prev, got, c.want)
		}
	}
}
