package main

// Run chaining through a kill and a clean stop (issue 15, finding 8): a real
// nats-server process, the real agent binary restarted on the same host token
// and state, a connection storm that does not stop meanwhile. Every
// connection the storm made and the stream lacks is explained by the link the
// next run carries: it began while no agent captured (T1 to T2), or it is in a
// batch the link counts as never arrived.

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/cmd/internal/proctest"
	"github.com/flowbus/flowbus/schema"
)

// startTimedStorm starts a storm (proctest.StormMain, which records each
// connection's dial time) in cg that runs until the returned func stops it
// with SIGTERM (at most a minute) and returns what it made.
func startTimedStorm(t *testing.T, cg *cgrouptest.Cgroup, workers, rate int) func() *proctest.StormResult {
	t.Helper()
	cmd := cg.Command("storm", proctest.StormArgs("127.0.0.1", workers, time.Minute, rate, 1_000_000_000)...)
	st, err := proctest.StartStorm(cmd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Kill)
	return func() *proctest.StormResult {
		t.Helper()
		_ = cmd.Process.Signal(syscall.SIGTERM)
		r, err := st.Wait(30 * time.Second)
		if err != nil {
			t.Fatalf("storm: %v", err)
		}
		if r.Errors > 0 {
			t.Errorf("storm: %d dials failed (last: %s); the expected set is not exact", r.Errors, r.LastEr)
		}
		if len(r.At) != len(r.Ports) {
			t.Fatalf("storm: %d dial times for %d connections", len(r.At), len(r.Ports))
		}
		return r
	}
}

// runOf is what the stream holds of one run, per direction.
type runOf struct {
	seqs   [3]map[uint64]bool // by direction: seqs seen
	events [3]uint64
	first  [3]*schema.Batch // the batch with prev_seq 0
}

func runsOf(c *streamContent) map[string]*runOf {
	runs := map[string]*runOf{}
	for i := range c.Batches {
		b := &c.Batches[i].B
		r := runs[b.RunID]
		if r == nil {
			r = &runOf{}
			for d := range r.seqs {
				r.seqs[d] = map[uint64]bool{}
			}
			runs[b.RunID] = r
		}
		r.seqs[b.Direction][b.Seq] = true
		r.events[b.Direction] += uint64(len(b.Events))
		if b.PrevSeq == 0 {
			r.first[b.Direction] = b
		}
	}
	return runs
}

var bothDirs = []schema.Direction{schema.Outgoing, schema.Incoming}

// checkLink checks the links of run next to run prev against the stream,
// direction by direction, and returns the events of prev in batches that
// never arrived (link events minus events seen).
func checkLink(t *testing.T, what string, c *streamContent, runs map[string]*runOf, prev, next, wantEnd string) (links [3]*schema.RunLink, lostEvents uint64) {
	t.Helper()
	p, n := runs[prev], runs[next]
	if p == nil || n == nil {
		t.Fatalf("%s: the stream lacks run %s or %s", what, prev, next)
	}
	var maxSeq, sealed, seen uint64
	known := map[uint64]bool{} // missing seqs the prev_seq chain shows
	for _, d := range bothDirs {
		f := n.first[d]
		if f == nil || f.PrevRun == nil {
			t.Fatalf("%s: the first %s batch of run %s carries no prev_run (%+v)", what, d, next, f)
		}
		l := f.PrevRun
		links[d] = l
		if l.RunID != prev || l.End != wantEnd {
			t.Errorf("%s, %s: prev_run names run %s ended %q, want %s ended %q", what, d, l.RunID, l.End, prev, wantEnd)
		}
		got := uint64(len(p.seqs[d]))
		if got > l.Batches || p.events[d] > l.Events {
			t.Errorf("%s, %s: the stream holds %d batches (%d events) of run %s, the link says it sealed %d (%d)", what, d, got, p.events[d], prev, l.Batches, l.Events)
		}
		// The chain of this direction ends at last_seq: a batch past it, or
		// a prev_seq naming a seq the stream lacks, is a hole.
		if !p.seqs[d][l.LastSeq] && l.LastSeq != 0 {
			known[l.LastSeq] = true
		}
		for _, sb := range streamBatchesOf(c, prev, d) {
			if sb.Seq > l.LastSeq {
				t.Errorf("%s, %s: run %s batch seq %d is past the link's last_seq %d", what, d, prev, sb.Seq, l.LastSeq)
			}
			if sb.PrevSeq != 0 && !p.seqs[d][sb.PrevSeq] {
				known[sb.PrevSeq] = true
			}
		}
		maxSeq = max(maxSeq, l.LastSeq)
		sealed += l.Batches
		seen += got
		lostEvents += l.Events - min(l.Events, p.events[d])
		t.Logf("%s, %s: run %s ended (%s) with last seq %d, %d batches (%d events) sealed; the stream holds %d (%d events): K = %d",
			what, d, prev, l.End, l.LastSeq, l.Batches, l.Events, got, p.events[d], l.Batches-min(l.Batches, got))
	}
	// Seqs are shared by both directions and given to sealed batches only:
	// the two counts together are exactly 1..max(last_seq), and every seq
	// the stream lacks is a batch counted never arrived.
	if sealed != maxSeq {
		t.Errorf("%s: run %s sealed %d batches in both directions by the links, but its last seq is %d", what, prev, sealed, maxSeq)
	}
	var missing []uint64
	for s := uint64(1); s <= maxSeq; s++ {
		if !p.seqs[schema.Outgoing][s] && !p.seqs[schema.Incoming][s] {
			missing = append(missing, s)
		}
	}
	if uint64(len(missing)) != sealed-seen {
		t.Errorf("%s: the stream lacks %d seqs of run %s (%v), the links count K = %d", what, len(missing), prev, first(fmtSeqs(missing), 8), sealed-seen)
	}
	for s := range known {
		if !slicesContains(missing, s) {
			t.Errorf("%s: the prev_seq chain names seq %d as missing, but it is in the stream", what, s)
		}
	}
	if len(known) == 0 && len(missing) > 0 {
		t.Errorf("%s: %d batches missing, but no prev_seq chain shows a hole", what, len(missing))
	}
	t.Logf("%s: K = %d batches of run %s never arrived (seqs %v), %d of them seen as holes of the prev_seq chains; %d events in them",
		what, len(missing), prev, first(fmtSeqs(missing), 8), len(known), lostEvents)
	return links, lostEvents
}

func streamBatchesOf(c *streamContent, run string, d schema.Direction) []*schema.Batch {
	var out []*schema.Batch
	for i := range c.Batches {
		if b := &c.Batches[i].B; b.RunID == run && b.Direction == d {
			out = append(out, b)
		}
	}
	return out
}

func slicesContains(s []uint64, v uint64) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func fmtSeqs(s []uint64) []string {
	out := make([]string, len(s))
	for i, v := range s {
		out[i] = strconv.FormatUint(v, 10)
	}
	return out
}

// A run killed (SIGKILL) while NATS was down, so that its last sealed batches
// died with its memory, then a run stopped cleanly (SIGTERM): the runs after
// them name them, and the stream, the storm and the links agree exactly.
func TestRestartChainsRuns(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	const (
		workers = 4
		rate    = 400 // per worker: 1,600 connections/s
		linger  = 100 * time.Millisecond
		poll    = 20 * time.Millisecond
		host    = "host-restart"
	)
	srv := newNATS(t, proctest.NATSOptions{})
	srv.Start()
	cg := cgrouptest.NewChild(t)
	dir := t.TempDir()
	stateFile := filepath.Join(dir, "run-"+host+".state")
	readyFile := filepath.Join(dir, "ready")
	env := func() map[string]string {
		e := agentEnv(cg.Path, srv.URL(), host, filepath.Join(dir, "spool"))
		e["FLOWBUS_RUN_STATE_FILE"] = stateFile
		e["FLOWBUS_BATCH_LINGER"] = linger.String()
		e["FLOWBUS_POLL_INTERVAL"] = poll.String()
		e["FLOWBUS_READY_FILE"] = readyFile
		return e
	}
	start := func(name string) (*agentProc, string, time.Time) {
		t.Helper()
		at := time.Now()
		a := startAgentProc(t, name, env())
		rf, err := a.WaitReadyFile(readyFile, 30*time.Second)
		if err != nil {
			t.Fatalf("%s: %v\n%s", name, err, proctest.Tail(a.LogPath, 20))
		}
		return a, rf["run_id"], at
	}

	a1, run1, _ := start("run1")
	stopStorm := startTimedStorm(t, cg, workers, rate)
	time.Sleep(3 * time.Second)
	// NATS goes away for the last second of run 1: what it seals meanwhile
	// stays in its memory, unacknowledged, and dies with it.
	srv.Stop(syscall.SIGTERM)
	time.Sleep(time.Second)
	killAt := time.Now()
	a1.Signal(syscall.SIGKILL)
	a1.Wait(10 * time.Second)
	srv.Start()
	time.Sleep(2*time.Second - time.Since(killAt))

	a2, run2, restart2 := start("run2")
	line := fmt.Sprintf("previous run %s of host %s ended (unknown) after seq", run1, host)
	if !a2.WaitLog(5*time.Second, line) {
		t.Errorf("run 2 did not log %q:\n%s", line, proctest.Tail(a2.LogPath, 10))
	}
	time.Sleep(3 * time.Second)
	stopAt := time.Now()
	a2.Stop() // SIGTERM: a clean stop
	stopped := time.Now()
	time.Sleep(time.Second)
	a3, run3, restart3 := start("run3")
	time.Sleep(2 * time.Second)
	res := stopStorm()
	a3.WaitMetrics(30*time.Second, "run 3 drained", drained)
	a3.Stop()

	got := readAll(t, srv.URL(), "FLOWS")
	runs := runsOf(got)
	if len(runs) != 3 {
		t.Fatalf("the stream holds %d runs, want 3 (%s, %s, %s)", len(runs), run1, run2, run3)
	}
	if got.Drops.Total() != 0 || len(got.DupMsgIDs) != 0 || got.DupRunSeq != 0 {
		t.Errorf("drops %+v, duplicate ids %d, duplicate (run, seq) %d: want none", got.Drops, len(got.DupMsgIDs), got.DupRunSeq)
	}
	l12, lost1 := checkLink(t, "kill", got, runs, run1, run2, schema.RunEndUnknown)
	l23, lost2 := checkLink(t, "clean stop", got, runs, run2, run3, schema.RunEndStopped)
	if lost1 == 0 {
		t.Errorf("no batch of the killed run is missing: NATS was down for its last second, its batches should have died with it")
	}
	if lost2 != 0 {
		t.Errorf("%d events of the cleanly stopped run never arrived", lost2)
	}
	for _, d := range bothDirs {
		if l12[d].Batches == uint64(len(runs[run1].seqs[d])) {
			t.Errorf("kill, %s: K = 0", d)
		}
		if l23[d].Batches != uint64(len(runs[run2].seqs[d])) {
			t.Errorf("clean stop, %s: K = %d, want 0", d, l23[d].Batches-uint64(len(runs[run2].seqs[d])))
		}
	}

	// The downtimes, against what the test did.
	t1, t2 := time.Unix(0, l12[schema.Outgoing].LastNs), time.Unix(0, l12[schema.Outgoing].StartNs)
	t3, t4 := time.Unix(0, l23[schema.Outgoing].LastNs), time.Unix(0, l23[schema.Outgoing].StartNs)
	t.Logf("kill: capture down from T1 %s to T2 %s (%v); the test killed at %s and restarted at %s (%v before attach)",
		t1.Format("15:04:05.000"), t2.Format("15:04:05.000"), t2.Sub(t1).Round(time.Millisecond),
		killAt.Format("15:04:05.000"), restart2.Format("15:04:05.000"), t2.Sub(restart2).Round(time.Millisecond))
	t.Logf("clean stop: capture down from T1 %s to T2 %s (%v); SIGTERM at %s, exited at %s, restarted at %s",
		t3.Format("15:04:05.000"), t4.Format("15:04:05.000"), t4.Sub(t3).Round(time.Millisecond),
		stopAt.Format("15:04:05.000"), stopped.Format("15:04:05.000"), restart3.Format("15:04:05.000"))
	for _, d := range bothDirs {
		if l12[d].LastNs != l12[schema.Outgoing].LastNs || l12[d].StartNs != l12[schema.Outgoing].StartNs ||
			l23[d].LastNs != l23[schema.Outgoing].LastNs || l23[d].StartNs != l23[schema.Outgoing].StartNs {
			t.Errorf("%s: the links of one run disagree on T1/T2 between directions", d)
		}
	}
	// T1 of a kill is the last heartbeat or seal: before the kill, by at most
	// a heartbeat (200 ms) and some scheduling.
	if t1.After(killAt) || killAt.Sub(t1) > 400*time.Millisecond {
		t.Errorf("kill: T1 %s is not within 400 ms before the kill at %s", t1.Format("15:04:05.000"), killAt.Format("15:04:05.000"))
	}
	if t2.Before(restart2) || t2.Sub(restart2) > 10*time.Second {
		t.Errorf("kill: T2 %s is not after the restart at %s", t2.Format("15:04:05.000"), restart2.Format("15:04:05.000"))
	}
	if t3.Before(stopAt) || t3.After(stopped) || t4.Before(restart3) {
		t.Errorf("clean stop: T1 %s not between SIGTERM %s and exit %s, or T2 %s before the restart %s",
			t3.Format("15:04:05.000"), stopAt.Format("15:04:05.000"), stopped.Format("15:04:05.000"), t4.Format("15:04:05.000"), restart3.Format("15:04:05.000"))
	}

	// Every connection the stream lacks began while no agent captured, or is
	// one of the events of batches counted never arrived. The window of a
	// kill opens a linger (the open batch), half a linger (its start is
	// clamped) and a poll interval (the ring) before T1; a clean stop's a
	// poll interval before T1 (the capture detaches within one, T1 is taken
	// after the drain).
	slack := func(d time.Duration) time.Duration { return d + 50*time.Millisecond }
	windows := [][2]int64{
		{t1.Add(-slack(linger + linger/2 + poll)).UnixNano(), t2.UnixNano()},
		{t3.Add(-slack(poll)).UnixNano(), t4.UnixNano()},
	}
	// A port comes back many times in a storm: match each event of the
	// stream to the connection of its key made just before it (the storm
	// takes the time before its dial, the kernel stamps the handshake).
	srvAP := netip.MustParseAddrPort(res.Server)
	made := map[string][]int64{}
	for i, port := range res.Ports {
		for _, d := range bothDirs {
			k := flowKey(d, srvAP.Addr(), port, srvAP.Addr(), srvAP.Port())
			made[k] = append(made[k], res.At[i])
		}
	}
	seenAt := map[string][]int64{}
	for i := range got.Batches {
		for _, ev := range got.Batches[i].B.Events {
			k := flowKey(ev.Direction, ev.Src, ev.SrcPort, ev.Dst, ev.DstPort)
			seenAt[k] = append(seenAt[k], ev.Timestamp)
		}
	}
	var inWindow, outside, unmatched int
	var outsideAt []int64
	for k, ats := range made {
		sort.Slice(ats, func(i, j int) bool { return ats[i] < ats[j] })
		evs := seenAt[k]
		sort.Slice(evs, func(i, j int) bool { return evs[i] < evs[j] })
		matched := make([]bool, len(ats))
		for _, ts := range evs {
			// The latest connection of this key made before the event.
			j := sort.Search(len(ats), func(i int) bool { return ats[i] > ts+int64(5*time.Millisecond) }) - 1
			for j >= 0 && matched[j] {
				j--
			}
			if j < 0 || ts-ats[j] > int64(time.Second) {
				unmatched++
				continue
			}
			matched[j] = true
		}
		for i, at := range ats {
			if matched[i] {
				continue
			}
			in := false
			for _, w := range windows {
				in = in || (at >= w[0] && at <= w[1])
			}
			if in {
				inWindow++
			} else {
				outside++
				outsideAt = append(outsideAt, at)
			}
		}
	}
	for k, evs := range seenAt {
		if _, ok := made[k]; !ok {
			unmatched += len(evs)
		}
	}
	if unmatched != 0 {
		t.Errorf("the stream holds %d events that match no connection of the storm", unmatched)
	}
	extra := got.Flows.n - (2*len(res.Ports) - inWindow - outside)
	sort.Slice(outsideAt, func(i, j int) bool { return outsideAt[i] < outsideAt[j] })
	t.Logf("storm: %d connections (%d events); the stream holds %d events in %d batches; missing: %d began while no agent captured, %d while one did (%d events are in batches counted never arrived)",
		len(res.Ports), 2*len(res.Ports), got.Flows.n, len(got.Batches), inWindow, outside, lost1)
	if extra != 0 {
		t.Errorf("the stream holds %d events the storm did not make", extra)
	}
	if uint64(outside) > lost1 {
		at := ""
		if len(outsideAt) > 0 {
			at = fmt.Sprintf(" (first at %s, last at %s)", time.Unix(0, outsideAt[0]).Format("15:04:05.000"), time.Unix(0, outsideAt[len(outsideAt)-1]).Format("15:04:05.000"))
		}
		t.Errorf("%d missing connections began while an agent captured%s, more than the %d events of the batches counted never arrived: a hole no link explains",
			outside, at, lost1)
	}
	if outside == 0 {
		t.Error("no missing connection began before T1 of the kill: the lost batches were not exercised")
	}
	if inWindow == 0 {
		t.Error("no connection began while no agent captured: the storm did not run through the restarts")
	}
}
