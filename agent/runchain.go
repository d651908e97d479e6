package agent

// Run chaining: each run records in its state file what it sealed (per
// direction: last seq, batches, events) and until when it was alive, so that
// the next run of the host can name it in its first batches (schema
// prev_run). A consumer then tells "run X ended after seq N, K batches never
// arrived, capture was down from T1 to T2" instead of a silent hole.
//
// The record must survive SIGKILL exactly, at the cost of a syscall per
// batch: it is rewritten in place at every seal, before the batch is queued
// (write-ahead), and every heartbeatEvery for the last-alive time, with one
// fixed-size pwrite into a file kept open. No fsync and no rename: the page
// cache outlives the process (not the host). Two slots, written in turn, each
// with a generation and a CRC, so that a torn write leaves the other intact.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flowbus/flowbus/schema"
)

// heartbeatEvery is how often the last-alive time is written: the most a
// killed run's reported downtime exceeds the real one.
const heartbeatEvery = 200 * time.Millisecond

// Record layout, little endian, in each of two slots of slotSize bytes.
const (
	slotSize   = 256
	stateMagic = "FBRUNST1"

	offGen     = 8
	offStartNs = 16
	offLastNs  = 24
	offEnd     = 32
	offDirs    = 40 // outgoing then incoming: last seq, batches, events
	offHostLen = 88
	offRunLen  = 89
	offHost    = 90
	offRun     = offHost + schema.MaxHostLen
	offCRC     = slotSize - 4
)

const (
	endRunning byte = 0 // running, or killed while running
	endStopped byte = 1 // shut down cleanly
)

// dirTally is what one run sealed in one direction.
type dirTally struct{ lastSeq, batches, events uint64 }

// runRecord is the content of a run state file.
type runRecord struct {
	gen             uint64
	startNs, lastNs int64
	end             byte
	dirs            [2]dirTally // outgoing, incoming
	host, runID     string
}

func dirIndex(d schema.Direction) int {
	if d == schema.Incoming {
		return 1
	}
	return 0
}

func (r *runRecord) encode(b *[slotSize]byte) {
	*b = [slotSize]byte{}
	copy(b[:], stateMagic)
	le := binary.LittleEndian
	le.PutUint64(b[offGen:], r.gen)
	le.PutUint64(b[offStartNs:], uint64(r.startNs))
	le.PutUint64(b[offLastNs:], uint64(r.lastNs))
	b[offEnd] = r.end
	for i, d := range r.dirs {
		o := offDirs + 24*i
		le.PutUint64(b[o:], d.lastSeq)
		le.PutUint64(b[o+8:], d.batches)
		le.PutUint64(b[o+16:], d.events)
	}
	b[offHostLen] = byte(copy(b[offHost:offHost+schema.MaxHostLen], r.host))
	b[offRunLen] = byte(copy(b[offRun:offRun+schema.MaxRunIDLen], r.runID))
	le.PutUint32(b[offCRC:], crc32.ChecksumIEEE(b[:offCRC]))
}

func decodeSlot(b []byte) (runRecord, bool) {
	var r runRecord
	le := binary.LittleEndian
	if len(b) < slotSize || string(b[:len(stateMagic)]) != stateMagic || le.Uint32(b[offCRC:]) != crc32.ChecksumIEEE(b[:offCRC]) ||
		b[offHostLen] > schema.MaxHostLen || b[offRunLen] > schema.MaxRunIDLen || b[offRunLen] == 0 {
		return r, false
	}
	r.gen = le.Uint64(b[offGen:])
	r.startNs = int64(le.Uint64(b[offStartNs:]))
	r.lastNs = int64(le.Uint64(b[offLastNs:]))
	r.end = b[offEnd]
	for i := range r.dirs {
		o := offDirs + 24*i
		r.dirs[i] = dirTally{le.Uint64(b[o:]), le.Uint64(b[o+8:]), le.Uint64(b[o+16:])}
	}
	r.host = string(b[offHost : offHost+int(b[offHostLen])])
	r.runID = string(b[offRun : offRun+int(b[offRunLen])])
	return r, true
}

// parseRunState picks the newest valid slot of a state file's content. ok is
// false when the content holds no valid record.
func parseRunState(data []byte) (runRecord, bool) {
	var best runRecord
	found := false
	for s := 0; s+slotSize <= len(data) && s < 2*slotSize; s += slotSize {
		if r, ok := decodeSlot(data[s : s+slotSize]); ok && (!found || r.gen > best.gen) {
			best, found = r, true
		}
	}
	return best, found
}

// runChain keeps this run's record and the link to the previous run. A nil
// *runChain (FLOWBUS_RUN_STATE_FILE=off, or the file unusable) does nothing.
type runChain struct {
	path string
	log  *slog.Logger

	mu   sync.Mutex
	f    *os.File
	rec  runRecord
	buf  [slotSize]byte
	prev *runRecord // the previous run of this host, nil when unknown
	// firstRun: the file was empty (no run recorded yet), said at attach
	firstRun bool
	// link per direction, set once capture attached
	links    [2]*schema.RunLink
	writeErr bool // a write failed: warned once
	// capturing: between attached and detached; only then does a seal
	// prove that the capture was alive.
	capturing bool

	stopBeat chan struct{}
	beatDone chan struct{}
}

// openRunChain locks the run state file and reads the previous run's record,
// without writing: a run that fails before its capture attaches leaves the
// record of the one before intact. Problems are one warning each, and the
// run goes on without a link (nil when the file cannot be used at all).
func openRunChain(path, host, runID string, log *slog.Logger) *runChain {
	if path == "off" || path == "" {
		return nil
	}
	warn := func(msg string, args ...any) *runChain {
		log.Warn(msg, append(args, "file", path)...)
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return warn("run state file unusable: this run's first batches name no previous run, and the next run will not name this one; make its directory writable or set FLOWBUS_RUN_STATE_FILE", "err", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return warn("run state file unusable: this run's first batches name no previous run, and the next run will not name this one; make it writable or set FLOWBUS_RUN_STATE_FILE", "err", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return warn("run state file in use by another agent with the same FLOWBUS_HOST: no run chaining for this run; give each agent its own FLOWBUS_HOST or FLOWBUS_RUN_STATE_FILE", "err", err)
	}
	c := &runChain{path: path, log: log, f: f, rec: runRecord{host: host, runID: runID}}
	data := make([]byte, 2*slotSize)
	n, err := f.ReadAt(data, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		log.Warn("run state file unreadable: this run's first batches name no previous run (it is rewritten for the next run)", "file", path, "err", err)
		return c
	}
	data = data[:n]
	prev, ok := parseRunState(data)
	switch {
	case n == 0:
		c.firstRun = true // said at attach: a start that fails says only why
	case !ok:
		log.Warn("run state file corrupt: this run's first batches name no previous run (it is rewritten for the next run); nothing to fix unless it recurs, then check the disk",
			"file", path, "bytes", n)
	case prev.host != host:
		log.Warn("run state file belongs to another host: this run's first batches name no previous run (it is rewritten for this host); give each host its own FLOWBUS_RUN_STATE_FILE",
			"file", path, "file_host", prev.host, "host", host)
	case prev.runID == runID:
		log.Warn("run state file already names this run id: no link", "file", path, "run_id", runID)
	default:
		c.prev = &prev
	}
	return c
}

// attached starts this run's record at capture attach (startNs, T2 of the
// link), logs how the previous run ended and starts the heartbeat.
func (c *runChain) attached(start time.Time) {
	if c == nil {
		return
	}
	c.mu.Lock()
	c.rec.startNs = start.UnixNano()
	c.capturing = true
	c.rec.lastNs = c.rec.startNs
	if p := c.prev; p != nil {
		end := schema.RunEndUnknown
		if p.end == endStopped {
			end = schema.RunEndStopped
		}
		for i := range c.links {
			d := p.dirs[i]
			c.links[i] = &schema.RunLink{RunID: p.runID, LastSeq: d.lastSeq, Batches: d.batches, Events: d.events,
				LastNs: p.lastNs, StartNs: c.rec.startNs, End: end}
		}
		t1, t2 := time.Unix(0, p.lastNs), time.Unix(0, c.rec.startNs)
		o, in := p.dirs[0], p.dirs[1]
		c.log.Info(fmt.Sprintf("previous run %s of host %s ended (%s) after seq %d (outgoing: last seq %d, %d batches, %d events; incoming: last seq %d, %d batches, %d events); capture was down from %s to %s (%v); this run's first batches name it",
			p.runID, p.host, end, max(o.lastSeq, in.lastSeq), o.lastSeq, o.batches, o.events, in.lastSeq, in.batches, in.events,
			t1.UTC().Format(time.RFC3339Nano), t2.UTC().Format(time.RFC3339Nano), t2.Sub(t1).Round(time.Millisecond)),
			"prev_run_id", p.runID, "end", end, "down_ms", t2.Sub(t1).Milliseconds())
	} else if c.firstRun {
		c.log.Info("no previous run of this host recorded: this is its first run with run chaining", "file", c.path, "host", c.rec.host)
	}
	c.writeLocked()
	c.mu.Unlock()
	c.stopBeat, c.beatDone = make(chan struct{}), make(chan struct{})
	go c.heartbeat()
}

func (c *runChain) heartbeat() {
	defer close(c.beatDone)
	t := time.NewTicker(heartbeatEvery)
	defer t.Stop()
	for {
		select {
		case <-c.stopBeat:
			return
		case now := <-t.C:
			c.mu.Lock()
			c.rec.lastNs = max(c.rec.lastNs, now.UnixNano())
			c.writeLocked()
			c.mu.Unlock()
		}
	}
}

// prevRun is publisher.Config.PrevRun: the link for dir's first batch.
func (c *runChain) prevRun(dir schema.Direction) *schema.RunLink {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.links[dirIndex(dir)]
}

// sealed is publisher.Config.OnSeal: the write-ahead record of a batch.
func (c *runChain) sealed(dir schema.Direction, seq uint64, events int) {
	if c == nil {
		return
	}
	c.mu.Lock()
	d := &c.rec.dirs[dirIndex(dir)]
	d.lastSeq = seq
	d.batches++
	d.events += uint64(events)
	if c.capturing {
		c.rec.lastNs = max(c.rec.lastNs, time.Now().UnixNano())
	}
	c.writeLocked()
	c.mu.Unlock()
}

// detached records when capture ended (the last-alive time of a clean
// stop) and stops the heartbeat.
func (c *runChain) detached() {
	if c == nil || c.stopBeat == nil {
		return
	}
	close(c.stopBeat)
	<-c.beatDone
	c.stopBeat = nil
	c.mu.Lock()
	c.capturing = false
	c.rec.lastNs = max(c.rec.lastNs, time.Now().UnixNano())
	c.writeLocked()
	c.mu.Unlock()
}

// stopped marks the run as cleanly shut down (after the publisher closed:
// no batch is sealed after it) and lets go of the file.
func (c *runChain) stopped() {
	if c == nil {
		return
	}
	c.detached()
	c.mu.Lock()
	c.rec.end = endStopped
	c.writeLocked()
	c.mu.Unlock()
	c.close()
}

// close lets go of the file without writing (a run that never attached).
func (c *runChain) close() {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.f != nil {
		c.f.Close() // releases the lock
		c.f = nil
	}
}

// writeLocked writes the record into the slot after the one written last.
func (c *runChain) writeLocked() {
	if c.f == nil {
		return
	}
	c.rec.gen++
	c.rec.encode(&c.buf)
	off := int64(c.rec.gen%2) * slotSize
	if _, err := c.f.WriteAt(c.buf[:], off); err != nil && !c.writeErr {
		c.writeErr = true
		c.log.Warn("run state file cannot be written: the next run's link to this one may be stale or missing; check the disk", "file", c.path, "err", err)
	}
}
