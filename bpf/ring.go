package bpf

import (
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Ring buffer record header (include/uapi/linux/bpf.h): the length, with
// two flag bits, then the record's page offset, which only the kernel uses.
const (
	ringHdrSize    = 8
	ringBusyBit    = 1 << 31
	ringDiscardBit = 1 << 30
	// ringPublishEvery is how much a drain reads before it hands the space
	// back to the kernel (an eighth of a smaller ring), so that a long drain
	// does not starve the producers of room.
	ringPublishEvery = 64 << 10
)

// ringMap reads the ring buffer map's memory directly: the producer
// position is read again only when a drain reaches it, and the consumer
// position written once per 64 KiB read (an eighth of a smaller ring),
// where the generic reader does both for every record. Each of those is a cache line the kernel's producers read
// or write for every record they reserve and submit, so touching it per
// record costs the agent a share of its CPU and the programs misses on
// both lines while a drain runs. Used from Run's goroutine only.
type ringMap struct {
	cons, prod []byte
	// The positions are the kernel's unsigned longs: uintptr's size.
	consPos *uintptr // the consumer page's first word
	prodPos *uintptr // the producer page's first word
	data    []byte   // the data pages, mapped twice in a row: a record that wraps is contiguous
	mask    uintptr
	publish uintptr // bytes read between two writes of the consumer position
}

// newRingMap maps the ring buffer map of fd, whose data area is size bytes
// (a power of two).
func newRingMap(fd, size int) (*ringMap, error) {
	page := os.Getpagesize()
	cons, err := unix.Mmap(fd, 0, page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mapping the ring buffer's consumer page: %w", err)
	}
	prod, err := unix.Mmap(fd, int64(page), page+2*size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		_ = unix.Munmap(cons)
		return nil, fmt.Errorf("mapping the ring buffer's data pages: %w", err)
	}
	return &ringMap{
		cons: cons, prod: prod,
		consPos: (*uintptr)(unsafe.Pointer(&cons[0])),
		prodPos: (*uintptr)(unsafe.Pointer(&prod[0])),
		data:    prod[page:],
		mask:    uintptr(size - 1),
		publish: uintptr(min(ringPublishEvery, size/8)),
	}, nil
}

// drain passes every committed record, in order, to f and returns how many
// it passed. It stops where the producers are (read again each time it gets
// there, so that a drain keeps up with records submitted meanwhile), or at a
// record still being written (the next drain starts there). The sample f
// gets aliases the ring: it is valid until f returns.
func (r *ringMap) drain(f func(sample []byte)) (n int) {
	cons := atomic.LoadUintptr(r.consPos)
	prod := atomic.LoadUintptr(r.prodPos)
	published, first := cons, cons
	for {
		if cons >= prod {
			// At most a ring's worth per drain: Run's own work between
			// drains (the clock, the half-open expiry) must not wait on
			// producers that never pause.
			if prod = atomic.LoadUintptr(r.prodPos); cons >= prod || cons-first > r.mask {
				break
			}
		}
		start := cons & r.mask
		// An atomic load of the length orders the reads of the record
		// after the kernel's xchg that committed it.
		hdr := atomic.LoadUint32((*uint32)(unsafe.Pointer(&r.data[start])))
		if hdr&ringBusyBit != 0 {
			break
		}
		size := uintptr(hdr &^ (ringBusyBit | ringDiscardBit))
		next := cons + ringHdrSize + (size+7)&^7
		if next > prod || size > r.mask+1 {
			break // not possible from the kernel; never read past what it produced
		}
		if hdr&ringDiscardBit == 0 {
			off := start + ringHdrSize
			f(r.data[off : off+size : off+size])
			n++
		}
		cons = next
		if cons-published >= r.publish {
			atomic.StoreUintptr(r.consPos, cons)
			published = cons
		}
	}
	if cons != published {
		atomic.StoreUintptr(r.consPos, cons)
	}
	return n
}

func (r *ringMap) close() {
	_ = unix.Munmap(r.prod)
	_ = unix.Munmap(r.cons)
}
