package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sys/unix"

	"github.com/flowbus/flowbus/publisher"
)

// The readiness checks, in the order /readyz lists them. Each one fails for
// one cause at a time; each change of state is logged once, with the cause
// and the fix, never once per failed publish.
const (
	checkNATS   = "nats"   // connected to a server
	checkStream = "stream" // the stream exists and takes the agent's subjects
	checkAcks   = "acks"   // the stream answered within FLOWBUS_ACK_TIMEOUT
	checkCgroup = "cgroup" // the watched cgroup exists and the programs are on it
)

var checkNames = []string{checkNATS, checkStream, checkAcks, checkCgroup}

// Check is the state of one readiness check.
type Check struct {
	Name  string
	OK    bool
	Cause string // why it fails, and what to do; empty when OK
}

// Timings of the watcher: every check runs every second, but the stream is
// asked about only when the publishes give no proof of it (no ack for
// streamIdleProbe), at once on a sign that it is gone (a publish no stream
// answered, a reconnect), and every second while it fails.
const (
	healthTick      = time.Second
	streamIdleProbe = 5 * time.Second
	// streamMinProbeGap bounds the requests a flood of failed publishes
	// can cause.
	streamMinProbeGap = 250 * time.Millisecond
)

// health watches what readiness depends on. The cheap checks and the
// stream run on two goroutines, so that a server that does not answer a
// stream request cannot delay the acks check that names it.
type health struct {
	a *Agent

	mu      sync.Mutex
	failing map[string]string // check -> cause
	// okSince is when the connection and the stream were last found fine
	// after not being so: the ack clock starts there, so that batches
	// waiting through an outage already named do not also fail the acks
	// check at the moment it ends.
	okSince time.Time

	lastAck atomic.Int64 // unix ns of the last ack
	// unanswered is when a request about the stream was sent that got no
	// answer within FLOWBUS_ACK_TIMEOUT (unix ns, 0: none): an idle agent
	// has no publish waiting to tell a hung server.
	unanswered   atomic.Int64
	lastNoStream atomic.Int64 // unix ns of the last publish no stream answered
	lastProbe    time.Time    // last request about the stream; stream goroutine only
	lastKnown    time.Time    // last time the stream was known to exist (probe or ack)
	probeAck     int64        // lastAck when lastKnown was set; stream goroutine only

	kickStream chan struct{}
	stop       chan struct{}
	done       sync.WaitGroup
}

func newHealth(a *Agent) *health {
	return &health{a: a, failing: map[string]string{}, kickStream: make(chan struct{}, 1), stop: make(chan struct{})}
}

// start runs the watcher until ctx ends or close is called.
func (h *health) start(ctx context.Context) {
	h.checkNATS()
	h.tick()
	h.done.Add(2)
	go h.loop(ctx, func(bool) { h.tick() }, nil)
	go h.loop(ctx, func(kicked bool) {
		h.checkNATS()
		h.checkStream(ctx, kicked)
	}, h.kickStream)
}

func (h *health) loop(ctx context.Context, f func(kicked bool), kick <-chan struct{}) {
	defer h.done.Done()
	t := time.NewTicker(healthTick)
	defer t.Stop()
	for {
		kicked := false
		select {
		case <-ctx.Done():
			return
		case <-h.stop:
			return
		case <-t.C:
		case <-kick:
			kicked = true
		}
		f(kicked)
	}
}

// close stops the watcher and waits for it: after close it touches
// neither the capture nor the locks.
func (h *health) close() {
	select {
	case <-h.stop:
	default:
		close(h.stop)
	}
	h.done.Wait()
}

// kick makes the stream be looked at now.
func (h *health) kick() {
	select {
	case h.kickStream <- struct{}{}:
	default:
	}
}

// acked is called for every acknowledged batch.
func (h *health) acked() { h.lastAck.Store(time.Now().UnixNano()) }

// publishFailed sees each retryable publish failure; true means a check
// names its cause, so the publisher need not warn about it per batch.
func (h *health) publishFailed(err error) bool {
	if publisher.NoStream(err) {
		h.lastNoStream.Store(time.Now().UnixNano())
		h.kick()
		return true
	}
	if errors.Is(err, jetstream.ErrAsyncPublishTimeout) || errors.Is(err, nats.ErrTimeout) || errors.Is(err, context.DeadlineExceeded) {
		h.mu.Lock()
		defer h.mu.Unlock()
		_, named := h.failing[checkAcks]
		return named
	}
	return false
}

// set records the state of a check and logs a change: the failure with
// its cause (a new cause is a new state), or the recovery with what it was
// (recovered: the words to say it).
func (h *health) set(check string, cause string, recovered string, attrs ...any) {
	h.mu.Lock()
	old, was := h.failing[check]
	if cause == "" {
		delete(h.failing, check)
	} else {
		h.failing[check] = cause
	}
	h.mu.Unlock()
	log := h.a.log
	switch {
	case cause != "" && (!was || cause != old):
		// A new state: failing, or failing for another cause.
		log.Warn("not ready: "+cause, append([]any{"check", check}, attrs...)...)
	case cause == "" && was:
		msg := "ready again: check " + check + " passes"
		if recovered != "" {
			msg = "ready again: " + recovered
		}
		log.Info(msg, append([]any{"check", check, "was", old}, attrs...)...)
	}
}

// setQuiet records a state without logging it: for causes something else
// logs already (the NATS client's disconnect and reconnect lines), or a
// cause whose wording changes while the state does not.
func (h *health) setQuiet(check, cause string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if cause == "" {
		delete(h.failing, check)
	} else {
		h.failing[check] = cause
	}
}

func (h *health) isFailing(check string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, f := h.failing[check]
	return f
}

// checks returns every check's state, in checkNames order.
func (h *health) checks() []Check {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]Check, 0, len(checkNames))
	for _, n := range checkNames {
		c, f := h.failing[n]
		out = append(out, Check{Name: n, OK: !f, Cause: c})
	}
	return out
}

// tick runs the checks that never wait for NATS: the client holds its
// lock for as long as a write to a hung server blocks (up to a minute), and
// the acks check must name that server meanwhile.
func (h *health) tick() {
	h.checkAcks()
	h.checkCgroup()
}

// checkNATS runs on the stream's goroutine, which may wait for the client.
func (h *health) checkNATS() {
	a := h.a
	if a.nc.IsConnected() {
		h.setQuiet(checkNATS, "")
		return
	}
	// The client logs the disconnect and the reconnect itself.
	h.setQuiet(checkNATS, fmt.Sprintf("not connected to NATS at %s (%s): batches are kept (memory, then spool) until it is back; check that the server runs and is reachable", a.natsURL(), a.nc.Status()))
}

// checkAcks fails when batches have waited longer than FLOWBUS_ACK_TIMEOUT
// for an answer while connected: a server that hangs keeps the TCP
// connection up for minutes (until the client's pings go unanswered), and
// this is the only sign of it meanwhile.
func (h *health) checkAcks() {
	h.mu.Lock()
	_, natsDown := h.failing[checkNATS]
	_, noStream := h.failing[checkStream]
	if natsDown || noStream {
		// That is the cause, and named; the acks clock restarts once it is
		// fixed.
		h.okSince = time.Time{}
		delete(h.failing, checkAcks)
		h.mu.Unlock()
		return
	}
	if h.okSince.IsZero() {
		h.okSince = time.Now()
	}
	stall := h.a.pub.AckStall()
	if u := h.unanswered.Load(); u != 0 {
		if h.lastAck.Load() > u {
			h.unanswered.CompareAndSwap(u, 0) // answered since, by an ack
		} else {
			stall = max(stall, time.Since(time.Unix(0, u)))
		}
	}
	stall = min(stall, time.Since(h.okSince))
	_, was := h.failing[checkAcks]
	h.mu.Unlock()
	limit := h.a.cfg.AckTimeout
	if stall <= limit {
		if was {
			h.set(checkAcks, "", "the stream acknowledges batches again")
		}
		return
	}
	st := h.a.pub.Stats()
	cause := fmt.Sprintf("no answer from the stream for %v (FLOWBUS_ACK_TIMEOUT=%v) with %d batches waiting: the NATS server %s does not answer (stopped, overloaded, or a network path dropping packets); batches are kept (memory, then spool) and retried with the same message id; check the server's health and load",
		stall.Round(100*time.Millisecond), limit, st.PendingBatches, h.a.natsURL())
	if was {
		h.setQuiet(checkAcks, cause) // the wait grows; it was logged once
		return
	}
	h.set(checkAcks, cause, "")
}

// checkCgroup fails while the watched cgroup is gone. When a cgroup is made
// again at its path (a restarted service or container, whose cgroup is new
// each time), the programs are attached to it and the capture lock follows
// it.
func (h *health) checkCgroup() {
	a := h.a
	path := a.capture.CgroupPath
	var st unix.Stat_t
	err := unix.Stat(path, &st)
	attached := a.capture.AttachedID()
	switch {
	case err != nil:
		h.set(checkCgroup, fmt.Sprintf("the watched cgroup %s is gone (%v): nothing is captured until a cgroup exists at that path again, and the agent attaches to it then; recreate it, or set FLOWBUS_CGROUP_PATH to a live cgroup and restart", path, err),
			"", "cgroup", path)
	case st.Ino == attached:
		h.set(checkCgroup, "", "")
	default:
		was := h.isFailing(checkCgroup)
		if err := h.reattach(st.Ino); err != nil {
			h.set(checkCgroup, fmt.Sprintf("a new cgroup was made at the watched path %s but the agent cannot attach to it: %v", path, err), "", "cgroup", path)
			return
		}
		if was {
			h.set(checkCgroup, "", fmt.Sprintf("a cgroup exists again at the watched path %s: programs attached to it", path), "cgroup", path, "cgroup_id", st.Ino)
			return
		}
		// Removed and made again between two looks: never reported gone.
		a.log.Warn("the watched cgroup was replaced by a new one at the same path: programs attached to the new one; connections in between were not seen",
			"cgroup", path, "old_cgroup_id", attached, "cgroup_id", st.Ino)
	}
}

// reattach moves the capture and its lock to the cgroup with inode id now
// at the watched path. The lock is taken first: another agent may already
// capture the new cgroup, and two would publish every connection twice.
func (h *health) reattach(id uint64) error {
	a := h.a
	lockPath, lockID, err := captureLockPath(a.capture.CgroupPath, a.cfg.Host)
	if err != nil {
		return err
	}
	if lockID != id {
		return fmt.Errorf("the cgroup at %s changed again while attaching; retrying", a.capture.CgroupPath)
	}
	l, err := acquireLock(lockPath, a.runID, fmt.Sprintf("the capture of cgroup %s (id %d) as host %q", a.capture.CgroupPath, id, a.cfg.Host),
		func(pid string) string {
			return "another agent already captures the new cgroup; this one stays unattached and not ready: stop " + pid + " or this agent"
		})
	if err != nil {
		return err
	}
	if err := a.capture.Reattach(); err != nil {
		l.release()
		return err
	}
	if a.capture.AttachedID() != id {
		// Replaced once more in between: the next look follows it.
		l.release()
		return fmt.Errorf("the cgroup at %s changed again while attaching; retrying", a.capture.CgroupPath)
	}
	a.attribute()
	a.swapCaptureLock(l)
	return nil
}

// checkStream looks at the stream when needed: when a publish found no
// stream, after a reconnect, while the check fails, or when no ack has
// proved it exists for streamIdleProbe.
func (h *health) checkStream(ctx context.Context, kicked bool) {
	a := h.a
	if !a.nc.IsConnected() {
		return // nothing to ask; the nats check names it
	}
	lastAck, lastNoStream := h.lastAck.Load(), h.lastNoStream.Load()
	noStream := lastNoStream > lastAck // the latest publish answer: no stream
	if !a.cfg.ManageStream {
		// Hosts without $JS.API permissions (deploy/nats/accounts.conf)
		// cannot ask; what the publishes meet is the answer.
		switch {
		case noStream:
			h.set(checkStream, fmt.Sprintf("no stream takes the subjects %s.%s.* (stream %s missing, or without that subject): batches are kept (memory, then spool) and retried; create it (nats stream add %s --subjects '%s.>') or set FLOWBUS_MANAGE_STREAM=true to let the agent manage it",
				a.cfg.SubjectPrefix, a.cfg.Host, a.cfg.Stream, a.cfg.Stream, a.cfg.SubjectPrefix), "", "stream", a.cfg.Stream)
		case lastAck > lastNoStream && lastAck != 0:
			h.set(checkStream, "", fmt.Sprintf("stream %s takes the agent's batches again", a.cfg.Stream), "stream", a.cfg.Stream)
		}
		return
	}
	failing := h.isFailing(checkStream)
	if time.Since(h.lastProbe) < streamMinProbeGap {
		// Failed publishes kick at their own pace; one look per gap is
		// enough, and the next tick comes anyway.
		return
	}
	if proved := lastAck > h.probeAck && !noStream; proved {
		h.lastKnown, h.probeAck = time.Now(), lastAck
	}
	if !failing && !noStream && !kicked && time.Since(h.lastKnown) < streamIdleProbe {
		return
	}
	sent := time.Now()
	h.lastProbe, h.probeAck = sent, lastAck
	pctx, cancel := context.WithTimeout(ctx, max(a.cfg.AckTimeout, time.Second))
	defer cancel()
	js, err := jetstream.New(a.nc)
	if err != nil {
		return
	}
	_, err = js.Stream(pctx, a.cfg.Stream)
	missing := errors.Is(err, jetstream.ErrStreamNotFound)
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) {
		// No answer: the acks check names it (once), as for a publish.
		h.unanswered.CompareAndSwap(0, sent.UnixNano())
		return
	}
	if err != nil && !missing {
		return // a transient error
	}
	h.unanswered.Store(0)
	if !missing {
		h.lastKnown = time.Now()
	}
	if !missing && !noStream {
		if failing {
			h.set(checkStream, "", fmt.Sprintf("stream %s exists", a.cfg.Stream), "stream", a.cfg.Stream)
		}
		return
	}
	// Missing, or it no longer takes the agent's subjects: make it so.
	created := a.streamCreated.Load() // before this run's first creation?
	if err := a.ensureStream(ctx); err != nil {
		h.set(checkStream, fmt.Sprintf("stream %s is missing and could not be created: %v; batches are kept (memory, then spool); check the account's JetStream limits and this agent's permissions, or create it (nats stream add %s --subjects '%s.>')",
			a.cfg.Stream, err, a.cfg.Stream, a.cfg.SubjectPrefix), "", "stream", a.cfg.Stream)
		return
	}
	h.lastNoStream.Store(0)
	switch {
	case failing && !created:
		h.set(checkStream, "", fmt.Sprintf("stream %s ready", a.cfg.Stream), "stream", a.cfg.Stream)
	case failing && missing:
		h.set(checkStream, "", fmt.Sprintf("stream %s recreated", a.cfg.Stream), "stream", a.cfg.Stream)
	case failing:
		h.set(checkStream, "", fmt.Sprintf("stream %s takes the agent's subjects again", a.cfg.Stream), "stream", a.cfg.Stream)
	case missing:
		// The one line of this state: found and fixed in one look.
		a.log.Warn(fmt.Sprintf("stream %s was deleted (or lost with the server's storage): recreated it (FLOWBUS_MANAGE_STREAM); batches kept meanwhile are published now", a.cfg.Stream),
			"stream", a.cfg.Stream, "subjects", a.cfg.SubjectPrefix+".>")
	}
	a.pub.RetryNow()
}

// swapCaptureLock replaces the capture lock (the first lock) with l.
func (a *Agent) swapCaptureLock(l *fileLock) {
	if len(a.locks) == 0 {
		a.locks = agentLocks{l}
		return
	}
	old := a.locks[0]
	a.locks[0] = l
	old.release()
}
