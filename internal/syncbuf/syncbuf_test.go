package syncbuf

import (
	"fmt"
	"strings"
	"sync"
	"testing"
)

func TestConcurrentWritesAndTake(t *testing.T) {
	var b Buffer
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for j := 0; j < 100; j++ {
				fmt.Fprintf(&b, "w%d\n", i)
				_ = b.String()
			}
		}(i)
	}
	wg.Wait()
	if n := strings.Count(b.String(), "\n"); n != 800 {
		t.Fatalf("%d lines, want 800", n)
	}
	if n := strings.Count(b.Take(), "\n"); n != 800 {
		t.Fatalf("Take gave %d lines, want 800", n)
	}
	if s := b.Take(); s != "" {
		t.Fatalf("second Take = %q, want empty", s)
	}
}
