package spool

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestPutPeekRemoveAndReopen(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	// Out of order on purpose: the spool orders by seal time.
	for _, ts := range []int64{300, 100, 200} {
		if err := s.Put(ts, "h.r."+string(rune('0'+ts/100)), "flows.h.outgoing", int(ts), bytes.Repeat([]byte{byte(ts)}, 1000)); err != nil {
			t.Fatal(err)
		}
	}
	if s.Len() != 3 || s.Events() != 600 {
		t.Fatalf("len %d events %d", s.Len(), s.Events())
	}
	none := func(string) bool { return false }
	es, err := s.Peek(2, none)
	if err != nil || len(es) != 2 || es[0].SealedAt != 100 || es[1].SealedAt != 200 || es[0].MsgID != "h.r.1" || len(es[0].Data) != 1000 || es[0].Data[0] != 100 {
		t.Fatalf("peek: %v %+v", err, es)
	}
	s.Remove(es[0].Name)

	// A restart finds what is left, in order; a torn temp file is cleaned up
	// and a corrupt file is set aside.
	if err := os.WriteFile(filepath.Join(dir, tmpPref+"x.batch"), []byte("half"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "00000000000000000050-bad.batch"), []byte(magic+"garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if s2.Len() != 2 || s2.Corrupt() != 1 || s2.Bytes() != s.Bytes() {
		t.Fatalf("reopen: len %d corrupt %d bytes %d vs %d", s2.Len(), s2.Corrupt(), s2.Bytes(), s.Bytes())
	}
	es, _ = s2.Peek(5, none)
	if len(es) != 2 || es[0].SealedAt != 200 || es[1].SealedAt != 300 || es[1].Subject != "flows.h.outgoing" {
		t.Fatalf("reopen order: %+v", es)
	}
	if _, err := os.Stat(filepath.Join(dir, tmpPref+"x.batch")); !os.IsNotExist(err) {
		t.Errorf("temp file left behind")
	}
	skipFirst := func(n string) bool { return n == es[0].Name }
	if es2, _ := s2.Peek(1, skipFirst); len(es2) != 1 || es2[0].Name != es[1].Name {
		t.Errorf("skip did not skip")
	}
}

func TestBound(t *testing.T) {
	s, err := Open(t.TempDir(), 3000)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 1000)
	n := 0
	for ; n < 10; n++ {
		if err := s.Put(int64(n), "id", "subj", 1, data); err != nil {
			if !errors.Is(err, ErrFull) {
				t.Fatal(err)
			}
			break
		}
	}
	if n != 2 || s.Bytes() > 3000 {
		t.Fatalf("took %d batches, %d bytes, bound 3000", n, s.Bytes())
	}
}

func FuzzDecode(f *testing.F) {
	f.Add(encode("h.r.1", "flows.h.incoming", 3, []byte("data")))
	f.Add([]byte(magic))
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := decode(b)
		if err != nil {
			return
		}
		again := encode(e.MsgID, e.Subject, e.Events, e.Data)
		if !bytes.Equal(again, b) {
			t.Fatalf("decode/encode mismatch")
		}
	})
}

// A directory the agent cannot write is refused at Open, naming the
// variable and both fixes, instead of being found out at the first outage.
func TestUnwritableDirRefused(t *testing.T) {
	dir := t.TempDir()
	if os.Geteuid() == 0 {
		// Root writes through mode bits: a read-only mount is what stops it.
		if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_RDONLY, "size=64k"); err != nil {
			t.Skipf("mounting a read-only tmpfs: %v", err)
		}
		t.Cleanup(func() { _ = unix.Unmount(dir, 0) })
	} else {
		if err := os.Chmod(dir, 0o555); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.Chmod(dir, 0o755) })
	}
	_, err := Open(dir, 1<<20)
	if err == nil {
		t.Fatal("Open of a read-only directory succeeded")
	}
	for _, want := range []string{"FLOWBUS_SPOOL_DIR " + dir + " is not writable", "make it writable", "FLOWBUS_SPOOL_DIR=off"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	t.Logf("read-only spool directory: %v", err)
	// A writable one leaves no probe behind.
	ok := t.TempDir()
	if _, err := Open(ok, 1<<20); err != nil {
		t.Fatal(err)
	}
	if des, _ := os.ReadDir(ok); len(des) != 0 {
		t.Errorf("Open left %d files in an empty spool directory", len(des))
	}
}
