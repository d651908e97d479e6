package bpf

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"

	"github.com/flowbus/flowbus/bpf/cgroupv2"
	"golang.org/x/sys/unix"

	"github.com/flowbus/flowbus/schema"
)

// Options tune the kernel side. Zero values take the defaults.
type Options struct {
	// CgroupPath is the cgroup v2 directory to watch; empty means the detected root.
	CgroupPath string
	// RingBytes is the ring buffer size, a power of two and a multiple of the page size.
	RingBytes int
	// WakeupBytes forces a reader wakeup once this much data waits in the ring;
	// below it the reader polls every PollInterval, which is what keeps the
	// per-connection cost low.
	WakeupBytes int
	// SeenEntries bounds the cold table that suppresses retransmitted
	// SYN-ACKs: a power of two from seenMin to seenWays<<20.
	SeenEntries int
	// PollInterval is how often the reader drains the ring without a wakeup.
	PollInterval time.Duration
	// QueryEntries bounds the kernel's table of outstanding DNS queries (and
	// TCP connections to port 53); the least recently asked goes first.
	QueryEntries int
	// QueryTimeout is how long a DNS query waits for its answer: a later
	// answer is unsolicited.
	QueryTimeout time.Duration
	// HalfOpenTimeout is how long an incoming begin taken at its SYN-ACK
	// waits for its handshake to complete before it gets an end with reason
	// never_established; 0: DefaultHalfOpenTimeout, from this namespace's
	// net.ipv4.tcp_synack_retries.
	HalfOpenTimeout time.Duration
	// HalfOpenEntries bounds the handshakes waiting so; past it a begin is
	// not tracked (counted in HalfOpenOverflow) and gets no end.
	HalfOpenEntries int
	// NoEnds turns end events off: begins only, at the kernel cost of
	// begins only.
	NoEnds bool
	// NoAttribution leaves the attribution programs (sock_create,
	// post_bind4/6, connect4/6) detached: pid, comm and uid stay unknown,
	// at the kernel cost of the skb and sock_ops programs alone. For
	// measuring what attribution costs.
	NoAttribution bool
	// Filter drops begins in the kernel (and their ends with them); the
	// zero value keeps all, at no cost.
	Filter Filter

	// seenHot shrinks the hot seen table to this many buckets (tests).
	seenHot int
	// slots shrinks the array of socket slots (tests).
	slots int
}

// Defaults for Options.
const (
	DefaultRingBytes    = 4 << 20
	DefaultSeenEntries  = 65536
	DefaultPollInterval = 20 * time.Millisecond
	DefaultQueryEntries = 16384
	DefaultQueryTimeout = 30 * time.Second
	// DefaultHalfOpenEntries is the seen map's size: no more handshakes can
	// be under way with their begin emitted at the SYN-ACK.
	DefaultHalfOpenEntries = DefaultSeenEntries
)

func (o *Options) fill() {
	if o.RingBytes == 0 {
		o.RingBytes = DefaultRingBytes
	}
	if o.WakeupBytes == 0 {
		o.WakeupBytes = o.RingBytes / 4
	}
	if o.SeenEntries == 0 {
		o.SeenEntries = DefaultSeenEntries
	}
	if o.PollInterval == 0 {
		o.PollInterval = DefaultPollInterval
	}
	if o.QueryEntries == 0 {
		o.QueryEntries = DefaultQueryEntries
	}
	if o.QueryTimeout == 0 {
		o.QueryTimeout = DefaultQueryTimeout
	}
	if o.HalfOpenTimeout == 0 {
		o.HalfOpenTimeout = DefaultHalfOpenTimeout()
	}
	if o.HalfOpenEntries == 0 {
		o.HalfOpenEntries = o.SeenEntries
	}
}

// Counters are the kernel's own tallies, summed over CPUs since load.
type Counters struct {
	RingbufFull uint64 // events lost because the ring buffer was full
	Truncated   uint64 // SYN-ACKs whose headers were not readable
	Duplicates  uint64 // retransmitted SYN-ACKs suppressed
	DNSFull     uint64 // DNS answers lost because the ring buffer was full
	DNSCut      uint64 // DNS answers longer than the kernel copies, passed on in part
	// DNSUnsolicited counts packets from port 53 that answer no query a
	// watched socket sent (or came after its timeout): dropped in the kernel.
	DNSUnsolicited uint64
	DNSQueryFull   uint64 // DNS queries lost because the ring buffer was full
	// BeginsAtEstablished counts incoming begins emitted when the handshake
	// completed instead of at the SYN-ACK, which the egress program never
	// saw: SYN cookies, and handshakes under way when the programs attached.
	BeginsAtEstablished uint64
	// EndsLost counts end records lost because the ring buffer was full.
	EndsLost uint64
	// ConfirmsLost counts completed handshakes whose confirmation the ring
	// buffer had no room for: each becomes a never_established end.
	ConfirmsLost uint64
	// NoStorage counts begins whose socket storage the kernel refused
	// (out of memory): they get no end.
	NoStorage uint64
	// Begins Options.Filter dropped (their connections get no end), by the
	// first test that failed: see FilterReasons.
	FilteredDirection, FilteredPort, FilteredCIDR, FilteredComm, FilteredSelf uint64
	// SeenEvicted counts handshakes under way whose entry in the table that
	// suppresses retransmitted SYN-ACKs went to a newer one: each may get
	// a second begin (a SYN flood past the table's size).
	SeenEvicted uint64
}

// Filtered returns the begins dropped by the filters for one of
// FilterReasons (0 for another name).
func (k Counters) Filtered(reason string) uint64 {
	switch reason {
	case "direction":
		return k.FilteredDirection
	case "port":
		return k.FilteredPort
	case "cidr":
		return k.FilteredCIDR
	case "comm":
		return k.FilteredComm
	case "self":
		return k.FilteredSelf
	}
	return 0
}

// Capture is a loaded and attached pair of cgroup skb programs.
type Capture struct {
	CgroupPath string

	opts Options
	objs flowbusObjects
	// anySocket lets answers reach other sockets than the asking one: for
	// tests that run packets without sockets.
	anySocket bool
	reader    *ringbuf.Reader

	// linksMu guards the attachment, which Reattach changes while Run
	// reads.
	linksMu    sync.Mutex
	links      []link.Link
	attachedID uint64 // inode (cgroup id) of the directory attached to
	draining   bool   // Run is draining: no attaching any more

	zones zoneNames // interface names for link-local zones
	procs procNames // comm strings of the records' processes

	// Attribution programs the kernel refused to load or to attach (by
	// ELF name, with why): their fields stay unknown.
	procRefused, procUnattached map[string]string

	// closed is set by Close: Run returns at its next wake.
	closed atomic.Bool
	// ring is the ring buffer's own mapping (reader, the generic reader,
	// where it could not be made); ringMu is held while Run drains it.
	ringMu sync.Mutex
	ring   *ringMap

	// Records that could not be decoded (never expected; counted, not fatal).
	badRecords atomic.Uint64
	events     atomic.Uint64
	dnsRecords atomic.Uint64
	ends       atomic.Uint64
	// Copies of the half-open table's counters, for other goroutines.
	hoPending, hoOverflow, hoExpired atomic.Uint64
}

// ErrPrivileges is returned when the kernel refuses to load or attach for lack
// of privileges.
var ErrPrivileges = errors.New("loading eBPF programs needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (and CAP_SYS_RESOURCE on kernels before 5.11): run flowagent as root or grant those capabilities")

// Open loads the programs and attaches them to the cgroup.
func Open(opts Options) (*Capture, error) {
	c, err := Load(opts)
	if err != nil {
		return nil, err
	}
	if err := c.Attach(); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Load checks the cgroup and loads the programs without attaching them, so
// that missing privileges or a wrong cgroup are reported before anything
// else starts.
func Load(opts Options) (*Capture, error) {
	opts.fill()
	if opts.CgroupPath == "" {
		root, err := cgroupv2.DetectRoot()
		if err != nil {
			return nil, err
		}
		opts.CgroupPath = root
	}
	if err := cgroupv2.CheckDir(opts.CgroupPath); err != nil {
		return nil, err
	}
	if opts.RingBytes < os.Getpagesize() || opts.RingBytes&(opts.RingBytes-1) != 0 {
		return nil, fmt.Errorf("ring buffer size %d must be a power of two of at least %d bytes", opts.RingBytes, os.Getpagesize())
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, privErr(fmt.Errorf("raising the memlock limit: %w", err))
	}

	c := &Capture{CgroupPath: opts.CgroupPath, opts: opts}
	if err := c.load(); err != nil {
		return nil, err
	}
	return c, nil
}

// Attach attaches the loaded programs to the cgroup: events start here.
func (c *Capture) Attach() error {
	c.linksMu.Lock()
	defer c.linksMu.Unlock()
	links, id, err := c.attach()
	if err != nil {
		return err
	}
	closeLinks(c.links)
	c.links, c.attachedID = links, id
	return nil
}

// attach attaches the programs to the directory at c.CgroupPath now, and
// returns the links and that directory's inode.
func (c *Capture) attach() ([]link.Link, uint64, error) {
	// The directory is opened once: the id and the attachment are of the
	// same cgroup even if the path is replaced meanwhile.
	dir, err := os.Open(c.CgroupPath)
	if err != nil {
		return nil, 0, fmt.Errorf("attaching to cgroup %s: %w", c.CgroupPath, err)
	}
	defer dir.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(dir.Fd()), &st); err != nil {
		return nil, 0, fmt.Errorf("attaching to cgroup %s: %w", c.CgroupPath, err)
	}
	fdPath := fmt.Sprintf("/proc/self/fd/%d", dir.Fd())
	var links []link.Link
	for _, a := range []struct {
		prog *ebpf.Program
		typ  ebpf.AttachType
	}{
		// sock_ops first: every handshake whose SYN-ACK egress sees then
		// completes where sock_ops runs, so none falls between the two.
		{c.objs.FlowbusSockops, ebpf.AttachCGroupSockOps},
		{c.objs.FlowbusIngress, ebpf.AttachCGroupInetIngress},
		{c.objs.FlowbusEgress, ebpf.AttachCGroupInetEgress},
	} {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: fdPath, Attach: a.typ, Program: a.prog})
		if err != nil {
			closeLinks(links)
			return nil, 0, privErr(fmt.Errorf("attaching to cgroup %s: %w", c.CgroupPath, err))
		}
		links = append(links, l)
	}
	links = append(links, c.attachProcHooks(fdPath)...)
	return links, st.Ino, nil
}

func closeLinks(ls []link.Link) error {
	var errs []error
	for _, l := range ls {
		errs = append(errs, l.Close())
	}
	return errors.Join(errs...)
}

// AttachedID is the id (directory inode) of the cgroup the programs are
// attached to, 0 when detached. A different inode at CgroupPath means the
// cgroup was removed and another one made under the same path.
func (c *Capture) AttachedID() uint64 {
	c.linksMu.Lock()
	defer c.linksMu.Unlock()
	return c.attachedID
}

// Reattach attaches the programs to the cgroup now at CgroupPath and
// detaches them from the one before (removed, or replaced under the same
// path). The maps and the ring buffer stay: nothing read or counted is
// lost, and Run goes on reading. It fails once Run is draining.
func (c *Capture) Reattach() error {
	c.linksMu.Lock()
	defer c.linksMu.Unlock()
	if c.draining {
		return errors.New("capture is stopping")
	}
	links, id, err := c.attach()
	if err != nil {
		return err
	}
	_ = closeLinks(c.links) // the old cgroup is gone: nothing to drain there
	c.links, c.attachedID = links, id
	return nil
}

// load loads the kernel objects and opens the ring buffer, without attaching.
func (c *Capture) load() error {
	spec, err := loadFlowbus()
	if err != nil {
		return err
	}
	spec.Maps[flowbusMapEvents].MaxEntries = uint32(c.opts.RingBytes)
	if err := setSeen(spec, c.opts.SeenEntries, c.opts.seenHot); err != nil {
		return err
	}
	if err := setSlots(spec, c.opts.slots); err != nil {
		return err
	}
	spec.Maps[flowbusMapDnsq].MaxEntries = uint32(c.opts.QueryEntries)
	if err := spec.Variables[flowbusVarQueryTtlNs].Set(uint64(c.opts.QueryTimeout)); err != nil {
		return fmt.Errorf("setting query_ttl_ns: %w", err)
	}
	if err := spec.Variables[flowbusVarWakeupBytes].Set(uint64(c.opts.WakeupBytes)); err != nil {
		return fmt.Errorf("setting wakeup_bytes: %w", err)
	}
	// DNS records may fill half the ring; connections always have the rest.
	if err := spec.Variables[flowbusVarDnsRingBytes].Set(uint64(c.opts.RingBytes / 2)); err != nil {
		return fmt.Errorf("setting dns_ring_bytes: %w", err)
	}
	if err := setNetnsCookieFlags(spec); err != nil {
		return err
	}
	if err := spec.Variables[flowbusVarAgentTgid].Set(uint32(os.Getpid())); err != nil {
		return fmt.Errorf("setting agent_tgid: %w", err)
	}
	if c.opts.NoAttribution {
		if err := spec.Variables[flowbusVarSlotsOn].Set(uint8(0)); err != nil {
			return fmt.Errorf("setting slots_on: %w", err)
		}
	}
	if c.opts.NoEnds {
		if err := spec.Variables[flowbusVarEndEvents].Set(uint8(0)); err != nil {
			return fmt.Errorf("setting end_events: %w", err)
		}
	}
	if err := c.opts.Filter.Validate(); err != nil {
		return fmt.Errorf("filter: %w", err)
	}
	if err := setFilterVars(spec, &c.opts.Filter); err != nil {
		return err
	}
	if c.anySocket {
		if err := spec.Variables[flowbusVarMatchSocket].Set(uint8(0)); err != nil {
			return fmt.Errorf("setting match_socket: %w", err)
		}
	}
	if err := c.loadObjects(spec); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return fmt.Errorf("the kernel's verifier rejected the flowbus programs (kernel too old or unsupported?): %+v", ve)
		}
		return privErr(fmt.Errorf("loading eBPF objects: %w", err))
	}
	if err := c.fillFilterMaps(); err != nil {
		c.objs.Close()
		return err
	}
	// The ring is read through its own mapping; the generic reader, which
	// maps it once more (every page resident: 2 x RingBytes of RSS), only
	// where that mapping fails.
	if c.ring, err = newRingMap(c.objs.Events.FD(), c.opts.RingBytes); err == nil {
		return nil
	}
	c.reader, err = ringbuf.NewReader(c.objs.Events)
	if err != nil {
		c.objs.Close()
		return fmt.Errorf("opening the ring buffer: %w", err)
	}
	return nil
}

func privErr(err error) error {
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return fmt.Errorf("%w (%v)", ErrPrivileges, err)
	}
	return err
}

// Close detaches the programs and frees the kernel objects. It interrupts Run.
func (c *Capture) Close() error {
	c.linksMu.Lock()
	errs := []error{closeLinks(c.links)}
	c.links, c.attachedID, c.draining = nil, 0, true
	c.linksMu.Unlock()
	c.closed.Store(true)
	if c.reader != nil {
		errs = append(errs, c.reader.Close())
	}
	// Not while Run drains it: the samples it hands out alias the mapping.
	c.ringMu.Lock()
	if c.ring != nil {
		c.ring.close()
		c.ring = nil
	}
	c.ringMu.Unlock()
	errs = append(errs, c.objs.Close())
	return errors.Join(errs...)
}

// Detach stops new events at the kernel while the reader can still drain
// what is already in the ring.
func (c *Capture) Detach() error {
	c.linksMu.Lock()
	defer c.linksMu.Unlock()
	err := closeLinks(c.links)
	c.links, c.attachedID = nil, 0
	return err
}

// Counters reads the kernel counters.
func (c *Capture) Counters() (Counters, error) {
	var out Counters
	for idx, dst := range []*uint64{&out.RingbufFull, &out.Truncated, &out.Duplicates, &out.DNSFull, &out.DNSCut, &out.DNSUnsolicited, &out.DNSQueryFull, &out.BeginsAtEstablished,
		&out.EndsLost, &out.ConfirmsLost, &out.NoStorage,
		&out.FilteredDirection, &out.FilteredPort, &out.FilteredCIDR, &out.FilteredComm, &out.FilteredSelf,
		&out.SeenEvicted} {
		var per []uint64
		if err := c.objs.Counters.Lookup(uint32(idx), &per); err != nil {
			return out, fmt.Errorf("reading kernel counters: %w", err)
		}
		for _, v := range per {
			*dst += v
		}
	}
	return out, nil
}

// BadRecords counts ring buffer records that could not be decoded.
func (c *Capture) BadRecords() uint64 { return c.badRecords.Load() }

// DNSRecords counts DNS answers handed to the handler (queries not included).
func (c *Capture) DNSRecords() uint64 { return c.dnsRecords.Load() }

// Events counts events handed to the handler.
func (c *Capture) Events() uint64 { return c.events.Load() }

// Ends counts end events handed to the handler, never_established included.
func (c *Capture) Ends() uint64 { return c.ends.Load() }

// HalfOpenStats is the state of the table of incoming handshakes waiting
// to complete.
type HalfOpenStats struct {
	Pending          uint64 // waiting now
	Overflow         uint64 // begins not tracked, the table being full: they get no end
	NeverEstablished uint64 // ends with reason never_established made
}

// HalfOpen reads the half-open table's counters.
func (c *Capture) HalfOpen() HalfOpenStats {
	return HalfOpenStats{Pending: c.hoPending.Load(), Overflow: c.hoOverflow.Load(), NeverEstablished: c.hoExpired.Load()}
}

// HalfOpenTimeout is how long an incoming handshake may take before its
// begin gets a never_established end.
func (c *Capture) HalfOpenTimeout() time.Duration { return c.opts.HalfOpenTimeout }

// Handler receives what the kernel hands over, in the order the kernel
// produced it (one ring buffer for all CPUs), so a DNS answer always reaches
// DNS before the SYN-ACK of a connection it named reaches Flow. Both run on
// the reader goroutine and must not block; their arguments are reused after
// they return.
type Handler interface {
	Flow(ev *schema.Event)
	// DNSQuery gets the start of a query a watched socket (cookie) sent from
	// client to server port 53: proto is 17 (UDP) or 6 (a TCP segment).
	DNSQuery(ts int64, proto uint8, cookie uint64, client, server netip.AddrPort, payload []byte)
	// DNSAnswer gets the payload of an answer from server port 53 to the
	// watched socket, which the kernel let through because it found the
	// query (for TCP: a connection the socket opened to port 53); whether
	// it answers that query's question is for the handler to check.
	// origLen > len(payload) means the kernel cut it.
	DNSAnswer(ts int64, proto uint8, cookie uint64, client, server netip.AddrPort, payload []byte, origLen int)
	// End gets a connection's end: once per begin that the programs
	// emitted, when the socket closes, or with reason never_established
	// when an incoming handshake did not complete within the half-open
	// timeout. Begins of sockets older than the programs have none.
	End(ev *schema.EndEvent)
}

// Run reads records until ctx is done or the capture is closed, passing each
// to h. When ctx ends, Run detaches the programs and
// drains what is already in the ring before it returns.
func (c *Capture) Run(ctx context.Context, h Handler) error {
	var ev schema.Event
	var end schema.EndEvent
	clock := newWallClock()
	pending := newHalfOpen(c.opts.HalfOpenTimeout, c.opts.HalfOpenEntries)
	emitEnd := func(e *schema.EndEvent) {
		c.ends.Add(1)
		h.End(e)
	}
	// When this drain saw its records, for the half-open table: one
	// reading per poll instead of one per begin.
	var seen time.Time
	handle := func(b []byte) {
		switch len(b) {
		case endRecSize:
			if !decodeEnd(b, &end, clock) {
				c.badRecords.Add(1)
				return
			}
			c.zones.applyEnd(&end, b)
			c.procs.applyEnd(&end, b)
			emitEnd(&end)
		case confirmRecSize:
			a, ok := recAddr(b[offConfirmFamily], b[offConfirmSrc:])
			if b[offConfirmKind] != recKindConfirm || !ok {
				c.badRecords.Add(1)
				return
			}
			pending.confirm(netip.AddrPortFrom(a, binary.NativeEndian.Uint16(b[offConfirmSrcPort:])), binary.NativeEndian.Uint32(b[offConfirmSeq:]))
		case recSize, rec4Size, rec4ProcSize:
			var r beginRec
			if !decodeBegin(b, &ev, clock, &r) {
				c.badRecords.Add(1)
				return
			}
			c.zones.apply(&ev, b)
			c.procs.apply(&ev, r.proc)
			c.events.Add(1)
			h.Flow(&ev)
			if ev.Direction == schema.Incoming && r.origin == originSynAck && !c.opts.NoEnds {
				pending.add(&ev, r.seq, seen)
			}
		default:
			var d dnsRec
			if !decodeDNS(b, &d) {
				c.badRecords.Add(1)
				return
			}
			ts := clock.wall(binary.NativeEndian.Uint64(b[offTs:]))
			if d.query {
				h.DNSQuery(ts, d.proto, d.cookie, d.client, d.server, d.data)
				return
			}
			c.dnsRecords.Add(1)
			h.DNSAnswer(ts, d.proto, d.cookie, d.client, d.server, d.data, d.origLen)
		}
	}
	waiter := newRingWaiter(c.objs.Events.FD())
	if waiter != nil {
		defer waiter.close()
	}
	var rec ringbuf.Record
	for {
		draining := ctx.Err() != nil
		switch {
		case draining:
			// No new events from here on; read what the ring holds, then stop.
			c.linksMu.Lock()
			c.draining = true
			c.linksMu.Unlock()
			_ = c.Detach()
		case waiter != nil:
			// Parked on the runtime's poller until a forced wakeup or the
			// poll interval, then drained without blocking.
			waiter.wait(c.opts.PollInterval)
		case c.reader == nil:
			time.Sleep(c.opts.PollInterval)
		}
		if c.closed.Load() {
			return nil
		}
		clock.refresh()
		seen = time.Now()
		if c.reader == nil {
			c.ringMu.Lock()
			if c.ring == nil {
				c.ringMu.Unlock()
				return nil // closed
			}
			c.ring.drain(handle)
			c.ringMu.Unlock()
		} else {
			if draining || waiter != nil {
				c.reader.SetDeadline(time.Now())
			} else {
				c.reader.SetDeadline(time.Now().Add(c.opts.PollInterval))
			}
			for {
				err := c.reader.ReadInto(&rec)
				if err != nil {
					if errors.Is(err, os.ErrDeadlineExceeded) {
						break
					}
					if errors.Is(err, ringbuf.ErrClosed) {
						return nil
					}
					return fmt.Errorf("reading the ring buffer: %w", err)
				}
				handle(rec.RawSample)
			}
		}
		// Handshakes still waiting when the capture stops get no end:
		// there is no telling how they would have gone.
		pending.expire(time.Now(), emitEnd)
		c.hoPending.Store(uint64(pending.len()))
		c.hoOverflow.Store(pending.overflow)
		c.hoExpired.Store(pending.expired)
		if draining {
			return nil
		}
	}
}

// ringWaiter waits for the ring buffer's wakeups on the Go runtime's network
// poller, through a duplicate of the map's descriptor. Waiting inside the
// ring buffer reader's own epoll_wait instead holds a thread in a blocking
// system call for most of every poll interval: the runtime then takes its P
// away after 10 ms, and each time that happens its monitor thread goes back
// to waking every 20 µs (measured: a fifth of the agent's CPU at 50,000
// connections/s).
type ringWaiter struct {
	f  *os.File
	rc syscall.RawConn
}

// newRingWaiter returns nil when the descriptor cannot be polled so; Run
// then waits in the reader.
func newRingWaiter(mapFD int) *ringWaiter {
	fd, err := unix.FcntlInt(uintptr(mapFD), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil
	}
	f := os.NewFile(uintptr(fd), "ringbuf")
	rc, err := f.SyscallConn()
	// A descriptor the poller did not take has no deadlines.
	if err != nil || f.SetReadDeadline(time.Time{}) != nil {
		f.Close()
		return nil
	}
	return &ringWaiter{f: f, rc: rc}
}

// wait returns after the kernel wakes the ring's readers (it holds more
// than Options.WakeupBytes) or after d. A wakeup that came while nobody
// waited is not kept: the kernel forces one with every record it submits
// past the threshold.
func (w *ringWaiter) wait(d time.Duration) {
	if w.f.SetReadDeadline(time.Now().Add(d)) != nil {
		return
	}
	woken := false
	_ = w.rc.Read(func(uintptr) bool {
		done := woken
		woken = true
		return done
	})
}

func (w *ringWaiter) close() { w.f.Close() }

// recDirection maps a record's direction byte (DIR_OUTGOING, DIR_INCOMING).
func recDirection(d byte) (schema.Direction, bool) {
	switch d {
	case 1:
		return schema.Outgoing, true
	case 2:
		return schema.Incoming, true
	}
	return 0, false
}

// recAddr reads an address of family 4 or 6 from the start of b.
func recAddr(family byte, b []byte) (netip.Addr, bool) {
	switch family {
	case 4:
		return netip.AddrFrom4([4]byte(b[:4])), true
	case 6:
		return netip.AddrFrom16([16]byte(b[:16])).Unmap(), true
	}
	return netip.Addr{}, false
}

// Record layout of struct flow_event (bpf/flowbus.c), native byte order.
const (
	recSize      = 104
	offTs        = 0
	offCgroup    = 8
	offSrc       = 16
	offDst       = 32
	offSrcPort   = 48
	offDstPort   = 50
	offKind      = 52
	offFamily    = 53
	offDirection = 54
	offOrigin    = 55
	offIfindex   = 56
	offSeq       = 60
	offNetns     = 64
	recKindFlow  = 1

	// struct flow4_event: an IPv4 begin, rec4Size bytes, rec4ProcSize with
	// the process at off4Proc.
	rec4Size      = 40
	rec4ProcSize  = 72
	off4Src       = 16
	off4Dst       = 20
	off4SrcPort   = 24
	off4DstPort   = 26
	off4Kind      = 28
	off4Family    = 29
	off4Direction = 30
	off4Origin    = 31
	off4Seq       = 32
	off4Proc      = 40
	recKindFlow4  = 6

	// struct confirm_event
	confirmRecSize    = 24
	offConfirmSrc     = 0
	offConfirmSrcPort = 16
	offConfirmKind    = 18
	offConfirmFamily  = 19
	offConfirmSeq     = 20

	// struct dns_event and struct dnsq_event: struct dns_hdr, then data
	offDNSKind    = 8
	offDNSProto   = 9
	offDNSLen     = 10
	offDNSOrig    = 12
	offDNSCookie  = 16
	offDNSClient  = 24
	offDNSServer  = 40
	offDNSCPort   = 56
	offDNSFamily  = 58
	offDNSData    = 64
	dnsRecSize    = offDNSData + 2048
	dnsqRecSize   = offDNSData + 512
	recKindDNS    = 2
	recKindDNSQry = 3
	dnsServerPort = 53
)

// dnsRec is a decoded DNS record; data aliases the ring buffer sample.
type dnsRec struct {
	query          bool
	proto          uint8
	cookie         uint64
	client, server netip.AddrPort
	data           []byte
	origLen        int
}

// decodeDNS fills d from a DNS answer or query record without allocating.
func decodeDNS(b []byte, d *dnsRec) bool {
	switch {
	case len(b) == dnsRecSize && b[offDNSKind] == recKindDNS:
		d.query = false
	case len(b) == dnsqRecSize && b[offDNSKind] == recKindDNSQry:
		d.query = true
	default:
		return false
	}
	ne := binary.NativeEndian
	n := int(ne.Uint16(b[offDNSLen:]))
	if n > len(b)-offDNSData {
		return false
	}
	var client, server netip.Addr
	switch b[offDNSFamily] {
	case 4:
		client = netip.AddrFrom4([4]byte(b[offDNSClient : offDNSClient+4]))
		server = netip.AddrFrom4([4]byte(b[offDNSServer : offDNSServer+4]))
	case 6:
		client = netip.AddrFrom16([16]byte(b[offDNSClient : offDNSClient+16])).Unmap()
		server = netip.AddrFrom16([16]byte(b[offDNSServer : offDNSServer+16])).Unmap()
	default:
		return false
	}
	d.proto = b[offDNSProto]
	if d.proto != 6 && d.proto != 17 {
		return false
	}
	d.cookie = ne.Uint64(b[offDNSCookie:])
	d.client = netip.AddrPortFrom(client, ne.Uint16(b[offDNSCPort:]))
	d.server = netip.AddrPortFrom(server, dnsServerPort)
	d.data = b[offDNSData : offDNSData+n]
	d.origLen = int(ne.Uint32(b[offDNSOrig:]))
	return true
}

// beginRec is what a begin record says besides its event: where the begin
// was taken, the SYN-ACK's sequence number, and the process bytes (nil when
// the record has none).
type beginRec struct {
	origin uint8
	seq    uint32
	proc   []byte
}

// decodeBegin fills ev and r from a begin record of either form (struct
// flow_event, or struct flow4_event with or without its process) without
// allocating.
func decodeBegin(b []byte, ev *schema.Event, clock *wallClock, r *beginRec) bool {
	ne := binary.NativeEndian
	switch len(b) {
	case recSize:
		if !decodeFlow(b, ev, clock) {
			return false
		}
		*r = beginRec{origin: b[offOrigin], seq: ne.Uint32(b[offSeq:]), proc: b[offProc : offProc+procSize]}
		return true
	case rec4Size, rec4ProcSize:
	default:
		return false
	}
	if b[off4Kind] != recKindFlow4 || b[off4Family] != 4 {
		return false
	}
	*ev = schema.Event{}
	var ok bool
	if ev.Direction, ok = recDirection(b[off4Direction]); !ok {
		return false
	}
	ev.Timestamp = clock.wall(ne.Uint64(b[offTs:]))
	ev.CgroupID = ne.Uint64(b[offCgroup:])
	ev.Src = netip.AddrFrom4([4]byte(b[off4Src : off4Src+4]))
	ev.Dst = netip.AddrFrom4([4]byte(b[off4Dst : off4Dst+4]))
	ev.SrcPort = ne.Uint16(b[off4SrcPort:])
	ev.DstPort = ne.Uint16(b[off4DstPort:])
	*r = beginRec{origin: b[off4Origin], seq: ne.Uint32(b[off4Seq:])}
	if len(b) == rec4ProcSize {
		r.proc = b[off4Proc:]
	}
	return true
}

// decodeFlow fills ev from a ring buffer record without allocating.
func decodeFlow(b []byte, ev *schema.Event, clock *wallClock) bool {
	if len(b) < recSize || b[offKind] != recKindFlow {
		return false
	}
	ne := binary.NativeEndian
	*ev = schema.Event{}
	ev.Timestamp = clock.wall(ne.Uint64(b[offTs:]))
	ev.CgroupID = ne.Uint64(b[offCgroup:])
	switch b[offFamily] {
	case 4:
		ev.Src = netip.AddrFrom4([4]byte(b[offSrc : offSrc+4]))
		ev.Dst = netip.AddrFrom4([4]byte(b[offDst : offDst+4]))
	case 6:
		ev.Src = netip.AddrFrom16([16]byte(b[offSrc : offSrc+16])).Unmap()
		ev.Dst = netip.AddrFrom16([16]byte(b[offDst : offDst+16])).Unmap()
	default:
		return false
	}
	ev.SrcPort = ne.Uint16(b[offSrcPort:])
	ev.DstPort = ne.Uint16(b[offDstPort:])
	var ok bool
	if ev.Direction, ok = recDirection(b[offDirection]); !ok {
		return false
	}
	return true
}
