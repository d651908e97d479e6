package flowstat

import (
	"testing"
	"time"
)

func TestBucketOf(t *testing.T) {
	a := newAggregator(time.Minute, "", 0)
	for _, c := range []struct{ ns, want int64 }{
		{0, 0}, {59_999_999_999, 0}, {60e9, 60}, {-1, -60}, {-60e9, -60}, {-60e9 - 1, -120}, {1_800_000_030e9, 1_800_000_000},
	} {
		if got := a.bucketOf(c.ns); got != c.want {
			t.Errorf("bucketOf(%d) = %d, want %d", c.ns, got, c.want)
		}
	}
}

func TestCleanText(t *testing.T) {
	for in, want := range map[string]string{"api.example.com": "api.example.com", "é.example": "é.example", "a\x00b": "a\uFFFDb", "\xff\xfe": "\uFFFD", "ok\xffé\x00": "ok\uFFFDé\uFFFD"} {
		if got := cleanText(in); got != want {
			t.Errorf("cleanText(%q) = %q, want %q", in, got, want)
		}
	}
}
