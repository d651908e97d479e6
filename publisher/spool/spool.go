// Package spool keeps encoded batches on disk while NATS is unreachable and
// memory is full, so that they survive an agent restart. One file per batch,
// named by the time the batch was sealed, so the directory's order is the
// publishing order across runs. A file is removed only once the stream has
// acknowledged its batch; a batch sent again after a crash is deduplicated
// by the stream through its message id.
//
// Files are written to a temporary name and renamed, so a crash never leaves
// a half-written batch under a real name. They are not fsynced: the spool
// survives the agent's death, not the machine's.
package spool

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
)

// Entry is one spooled batch.
type Entry struct {
	Name     string // file name, the entry's identity
	SealedAt int64  // unix ns
	MsgID    string
	Subject  string
	Events   int
	Data     []byte // the encoded batch (nil until Load)
	size     int64
}

// ErrFull means the spool has no room for another batch.
var ErrFull = errors.New("spool full")

const (
	magic   = "FBSP1\n"
	suffix  = ".batch"
	tmpPref = ".tmp-"
)

// Spool is a bounded directory of batches. It is safe for concurrent use.
type Spool struct {
	dir      string
	maxBytes int64

	mu      sync.Mutex
	entries []*Entry // oldest first
	bytes   int64
	corrupt int // files found unreadable at open, moved aside
}

// Open opens (creating it if needed) a spool directory bounded to maxBytes,
// and indexes the batches a previous run left there.
func Open(dir string, maxBytes int64) (*Spool, error) {
	if err := CheckWritable(dir); err != nil {
		return nil, err
	}
	s := &Spool{dir: dir, maxBytes: maxBytes}
	des, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("reading spool directory %s: %w", dir, err)
	}
	for _, de := range des {
		name := de.Name()
		if strings.HasPrefix(name, tmpPref) {
			_ = os.Remove(filepath.Join(dir, name)) // a write the last run did not finish
			continue
		}
		if !strings.HasSuffix(name, suffix) {
			continue
		}
		e, err := s.readHeader(name)
		if err != nil {
			s.corrupt++
			_ = os.Rename(filepath.Join(dir, name), filepath.Join(dir, name+".corrupt"))
			continue
		}
		s.entries = append(s.entries, e)
		s.bytes += e.size
	}
	slices.SortFunc(s.entries, func(a, b *Entry) int { return strings.Compare(a.Name, b.Name) })
	return s, nil
}

// CheckWritable creates dir if needed and writes and removes a probe file
// in it: a spool that cannot be written would otherwise be found out only
// at the first outage, by dropping the batches it was meant to keep.
func CheckWritable(dir string) error {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("FLOWBUS_SPOOL_DIR %s: cannot create the spool directory: %w: create it writable by the agent's user, or set FLOWBUS_SPOOL_DIR=off to drop batches NATS has not taken instead of spooling them", dir, err)
	}
	f, err := os.CreateTemp(dir, tmpPref+"probe-")
	if err == nil {
		name := f.Name()
		_, err = f.Write([]byte(magic))
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if rerr := os.Remove(name); err == nil {
			err = rerr
		}
	}
	if err != nil {
		return fmt.Errorf("FLOWBUS_SPOOL_DIR %s is not writable: %w: make it writable by the agent's user, or set FLOWBUS_SPOOL_DIR=off to drop batches NATS has not taken instead of spooling them", dir, err)
	}
	return nil
}

// Corrupt is the number of unreadable files found at Open (renamed *.corrupt).
func (s *Spool) Corrupt() int { return s.corrupt }

// Len is the number of batches held.
func (s *Spool) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.entries)
}

// Bytes is the disk space the batches use.
func (s *Spool) Bytes() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bytes
}

// Events is the number of events held.
func (s *Spool) Events() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, e := range s.entries {
		n += e.Events
	}
	return n
}

// Put writes a batch. It returns ErrFull when the bound would be exceeded.
func (s *Spool) Put(sealedAt int64, msgID, subject string, events int, data []byte) error {
	rec := encode(msgID, subject, events, data)
	s.mu.Lock()
	if s.bytes+int64(len(rec)) > s.maxBytes {
		s.mu.Unlock()
		return ErrFull
	}
	s.bytes += int64(len(rec)) // reserve before the write, so concurrent Puts respect the bound
	s.mu.Unlock()

	name := fmt.Sprintf("%020d-%s%s", sealedAt, sanitize(msgID), suffix)
	tmp := filepath.Join(s.dir, tmpPref+name)
	err := os.WriteFile(tmp, rec, 0o640)
	if err == nil {
		err = os.Rename(tmp, filepath.Join(s.dir, name))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		_ = os.Remove(tmp)
		s.bytes -= int64(len(rec))
		return fmt.Errorf("writing spool file: %w", err)
	}
	e := &Entry{Name: name, SealedAt: sealedAt, MsgID: msgID, Subject: subject, Events: events, size: int64(len(rec))}
	i, _ := slices.BinarySearchFunc(s.entries, name, func(a *Entry, n string) int { return strings.Compare(a.Name, n) })
	s.entries = slices.Insert(s.entries, i, e)
	return nil
}

// Peek returns the oldest entries not in skip, up to n, with their data
// loaded. Entries stay in the spool until Remove.
func (s *Spool) Peek(n int, skip func(name string) bool) ([]*Entry, error) {
	s.mu.Lock()
	var pick []*Entry
	for _, e := range s.entries {
		if len(pick) >= n {
			break
		}
		if !skip(e.Name) {
			pick = append(pick, e)
		}
	}
	s.mu.Unlock()
	out := make([]*Entry, 0, len(pick))
	for _, e := range pick {
		full, err := s.load(e.Name)
		if err != nil {
			// Unreadable now (disk trouble, or removed under us): drop it
			// rather than block everything behind it.
			s.Remove(e.Name)
			return out, &LoadError{Name: e.Name, Events: e.Events, Err: err}
		}
		out = append(out, full)
	}
	return out, nil
}

// LoadError is a spool file that could not be read back: its batch is lost,
// and Events (known from the header read at Open or Put) says how many
// events went with it, so the loss can be counted exactly.
type LoadError struct {
	Name   string
	Events int
	Err    error
}

func (e *LoadError) Error() string {
	return fmt.Sprintf("spool file %s (%d events): %v", e.Name, e.Events, e.Err)
}

func (e *LoadError) Unwrap() error { return e.Err }

// Remove deletes an entry (its batch was acknowledged, or given up).
func (s *Spool) Remove(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, e := range s.entries {
		if e.Name == name {
			s.bytes -= e.size
			s.entries = slices.Delete(s.entries, i, i+1)
			break
		}
	}
	_ = os.Remove(filepath.Join(s.dir, name))
}

// Record layout: magic, u32 crc of the rest, u16 len + msgID, u16 len +
// subject, u32 events, u32 len + data.
func encode(msgID, subject string, events int, data []byte) []byte {
	b := make([]byte, 0, len(magic)+4+2+len(msgID)+2+len(subject)+8+len(data))
	b = append(b, magic...)
	b = append(b, 0, 0, 0, 0)
	b = binary.BigEndian.AppendUint16(b, uint16(len(msgID)))
	b = append(b, msgID...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(subject)))
	b = append(b, subject...)
	b = binary.BigEndian.AppendUint32(b, uint32(events))
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	b = append(b, data...)
	binary.BigEndian.PutUint32(b[len(magic):], crc32.ChecksumIEEE(b[len(magic)+4:]))
	return b
}

// decode parses a record; withData=false stops after the header but still
// checks the checksum, so a torn file is found at Open.
func decode(b []byte) (*Entry, error) {
	if len(b) < len(magic)+4 || string(b[:len(magic)]) != magic {
		return nil, errors.New("not a spool file")
	}
	body := b[len(magic)+4:]
	if crc32.ChecksumIEEE(body) != binary.BigEndian.Uint32(b[len(magic):]) {
		return nil, errors.New("checksum mismatch")
	}
	e := &Entry{size: int64(len(b))}
	str := func() (string, bool) {
		if len(body) < 2 {
			return "", false
		}
		n := int(binary.BigEndian.Uint16(body))
		if len(body) < 2+n {
			return "", false
		}
		v := string(body[2 : 2+n])
		body = body[2+n:]
		return v, true
	}
	var ok bool
	if e.MsgID, ok = str(); !ok {
		return nil, errors.New("truncated message id")
	}
	if e.Subject, ok = str(); !ok {
		return nil, errors.New("truncated subject")
	}
	if len(body) < 8 {
		return nil, errors.New("truncated header")
	}
	e.Events = int(binary.BigEndian.Uint32(body))
	n := int(binary.BigEndian.Uint32(body[4:]))
	if len(body[8:]) != n {
		return nil, errors.New("data length mismatch")
	}
	e.Data = body[8:]
	return e, nil
}

func (s *Spool) readHeader(name string) (*Entry, error) {
	e, err := s.load(name)
	if err != nil {
		return nil, err
	}
	e.Data = nil // indexed only; loaded again when it is its turn
	return e, nil
}

func (s *Spool) load(name string) (*Entry, error) {
	b, err := os.ReadFile(filepath.Join(s.dir, name))
	if err != nil {
		return nil, err
	}
	e, err := decode(b)
	if err != nil {
		return nil, err
	}
	e.Name = name
	var ts int64
	if _, err := fmt.Sscanf(name, "%020d-", &ts); err == nil {
		e.SealedAt = ts
	}
	return e, nil
}

// sanitize keeps file names to a safe alphabet.
func sanitize(id string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_', r == '.':
			return r
		}
		return '_'
	}, id)
}
