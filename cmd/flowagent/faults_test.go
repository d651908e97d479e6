package main

// Fault-injection tests: real nats-server processes on loopback, the real
// flowagent binary, real TCP traffic from a child cgroup. Each one is bounded
// in time (see the durations below) and cleans up its processes, cgroup and
// directories even when it fails. The harness is in faults_helpers_test.go.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/flowbus/flowbus/agent"
	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/cmd/internal/proctest"
	"github.com/flowbus/flowbus/schema"
)

// 1. The server is stopped for 20 s and restarted while a connection storm
// runs: every connection reaches the stream exactly once, its two begins and
// its two ends (end events on), and memory stays within FLOWBUS_QUEUE_BYTES
// (the rest goes to the spool).
func TestFaultServerOutageStorm(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	const (
		queueBytes = 256 << 10
		before     = 4 * time.Second
		outage     = 20 * time.Second
		after      = 4 * time.Second
		workers    = 4
		rate       = 250 // per worker: 1000 connections/s in all
		// Peak RSS allowed for the agent process: its baseline plus the queue
		// bound, the NATS client's reconnect buffer (8 MiB) and slack for the
		// Go heap's growth target.
		rssSlack = 64 << 20
	)
	srv := newNATS(t, proctest.NATSOptions{})
	srv.Start()
	cg := cgrouptest.NewChild(t)
	env := withEnds(agentEnv(cg.Path, srv.URL(), "host-outage", t.TempDir()))
	env["FLOWBUS_QUEUE_BYTES"] = strconv.Itoa(queueBytes)
	env["FLOWBUS_BATCH_MAX_BYTES"] = "16384"
	a := startAgentProc(t, "agent", env)
	a.WaitMetrics(20*time.Second, "ready", func(m map[string]float64) bool { return m[mReady] == 1 })
	baseRSS, _, err := proctest.ProcMem(a.Pid())
	if err != nil {
		t.Fatal(err)
	}
	smp := a.sample(100 * time.Millisecond)
	defer smp.Stop()

	st := startStorm(t, cg, workers, before+outage+after, rate, 1_000_000)
	time.Sleep(before)
	srv.Stop(syscall.SIGTERM)
	down := time.Now()
	time.Sleep(outage / 2)
	mid, _ := a.Metrics()
	time.Sleep(outage - time.Since(down))
	srv.Start()
	outageLen := time.Since(down)
	back := time.Now()
	res := st.Wait()
	want := newMultiset()
	want.addStorm(res)
	// Every end captured (they follow their connections' closes), then
	// every begin and end acknowledged.
	a.WaitMetrics(30*time.Second, "every end of the storm captured", func(m map[string]float64) bool { return m[mEndsPub] >= float64(want.n) })
	m := a.WaitMetrics(90*time.Second, "all acknowledged after the outage", endsDrained)
	drainTime := time.Since(back)
	smp.Stop()
	_, hwm, _ := proctest.ProcMem(a.Pid())

	got := waitStreamEnds(t, srv.URL(), "FLOWS", want.n, want.n, 30*time.Second)
	t.Logf("storm: %d connections (%d/s over %v), outage %v, drained %v after the restart; agent: %s",
		len(res.Ports), workers*rate, before+outage+after, outageLen.Round(time.Millisecond), drainTime.Round(time.Millisecond), metricsSummary(m))
	t.Logf("mid-outage: %s", metricsSummary(mid))
	checkExact(t, "outage", got, want)
	checkEnds(t, "outage", got, want, true)
	if got.ChainGaps != 0 {
		t.Errorf("%d batches have a prev_seq the stream does not hold: a batch is missing", got.ChainGaps)
	}
	if got.Drops.Total()+got.EndDrops.Total() != 0 || m[mDropSpool]+m[mDropQueue]+m[mDropPublish]+m[mDropKernel]+m[mEndDropsPub]+m[mEndDropsRing]+m[mEndDropsStor] != 0 {
		t.Errorf("drops in a lossless outage: stream %+v (end batches %+v), agent %s", got.Drops, got.EndDrops, metricsSummary(m))
	}
	if mid[mSpoolBatches] == 0 && m[mSpooled] == 0 {
		t.Errorf("the outage never filled FLOWBUS_QUEUE_BYTES=%d (nothing spooled): the test does not exercise the bound", queueBytes)
	}
	maxPend := smp.maxPendingBytes.Load()
	t.Logf("memory: max pending_bytes %d (bound %d) over %d samples; spooled %g batches, max spool bytes %d; RSS baseline %d MiB, sampled max %d MiB, VmHWM %d MiB",
		maxPend, queueBytes, smp.samples.Load(), m[mSpooled], smp.maxSpoolBytes.Load(), baseRSS>>20, smp.maxRSS.Load()>>20, hwm>>20)
	if maxPend > queueBytes {
		t.Errorf("pending_bytes reached %d, above FLOWBUS_QUEUE_BYTES=%d", maxPend, queueBytes)
	}
	if limit := baseRSS + queueBytes + 8<<20 + rssSlack; hwm > limit {
		t.Errorf("agent peak RSS %d MiB above %d MiB (baseline %d MiB + queue + reconnect buffer + slack)", hwm>>20, limit>>20, baseRSS>>20)
	}
	a.Stop()
}

// 2. The agent starts while NATS is down, spools a storm, and is killed
// (SIGKILL). The next run publishes every spooled batch; killed again in the
// middle of that replay, the run after it finishes it, and the stream holds
// each batch once: a batch sent again keeps its message id and the stream
// drops the copy (one copy is put in the stream by the test beforehand, as if
// an ack had been lost). Only the batches still in memory at the first kill
// are lost, and a consumer sees that gap in the prev_seq chain. End events
// are on: end batches take the same path (spool, replay, dedupe), each end
// of the spool reaches the stream once, and a lost end batch breaks the end
// chain of its direction.
func TestFaultAgentKilledSpoolReplayed(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	const (
		workers = 3
		rate    = 250 // per worker
		conns   = 3000
	)
	srv := newNATS(t, proctest.NATSOptions{}) // not started yet: NATS is down at the agent's start
	cg := cgrouptest.NewChild(t)
	spoolDir := t.TempDir()
	env := func() map[string]string {
		e := withEnds(agentEnv(cg.Path, srv.URL(), "host-kill", spoolDir))
		// A small memory bound, so that nearly everything goes to the spool,
		// and small batches, so that the replay takes long enough to be
		// interrupted.
		e["FLOWBUS_QUEUE_BYTES"] = "16384"
		e["FLOWBUS_BATCH_MAX_BYTES"] = "4096"
		e["FLOWBUS_BATCH_MAX_EVENTS"] = "8"
		// No retry for a slow ack: the order of the stream is checked.
		e["FLOWBUS_ACK_TIMEOUT"] = "5s"
		return e
	}

	started := time.Now()
	a1 := startAgentProc(t, "run1", env())
	// The metrics endpoint comes up once the programs are attached.
	a1.WaitMetrics(30*time.Second, "attached with NATS down", func(map[string]float64) bool { return true })
	attach := time.Since(started)
	st := startStorm(t, cg, workers, time.Minute, rate, conns)
	res := st.Wait()
	made := newMultiset()
	made.addStorm(res)
	a1.WaitMetrics(30*time.Second, "every begin and end of the storm captured", func(m map[string]float64) bool {
		return m[mPublished] == float64(made.n) && m[mEndsPub] == float64(made.n)
	})
	// Open batches are sealed (and spooled) after FLOWBUS_BATCH_LINGER.
	m1, ok := a1.pollMetrics(10*time.Second, 100*time.Millisecond, func(m map[string]float64) bool {
		return m[mSpoolBatches] > 0 && m[mPendingBytes] > 0
	})
	if !ok {
		t.Fatalf("run 1: nothing spooled with NATS down: %s", metricsSummary(m1))
	}
	time.Sleep(time.Second)
	a1.Signal(syscall.SIGKILL)

	sp := readSpool(t, spoolDir)
	inMemory := made.n - sp.Flows.n
	endsInMemory := made.n - sp.Ends.n
	t.Logf("run 1: attached %v after its start with NATS down; storm of %d connections; killed with %d batches (%d begins in %d, %d ends in %d; %d bytes) spooled and %d begins, %d ends in memory only",
		attach.Round(time.Millisecond), len(res.Ports), len(sp.Entries), sp.Flows.n, len(sp.Batches), sp.Ends.n, len(sp.EndBatches), sp.Bytes, inMemory, endsInMemory)
	if attach > 5*time.Second {
		t.Errorf("the agent took %v to attach with NATS down: connections made meanwhile are not seen", attach)
	}
	if sp.Corrupt != 0 {
		t.Errorf("SIGKILL left %d unreadable spool files", sp.Corrupt)
	}
	// made.diff(spool): "missing" are spooled events the storm did not make.
	if notMade, _, ex := made.diff(sp.Flows); notMade != 0 || len(sp.Batches) < 50 {
		t.Fatalf("spool holds %d begin batches, %d events the storm did not make: %v", len(sp.Batches), notMade, ex)
	}
	if notMade, _, ex := made.diff(sp.Ends); notMade != 0 || len(sp.EndBatches) < 50 {
		t.Fatalf("spool holds %d end batches, %d ends the storm did not make: %v", len(sp.EndBatches), notMade, ex)
	}
	if inMemory+endsInMemory > 16384/4 {
		t.Errorf("%d begins and %d ends were in memory only: more than FLOWBUS_QUEUE_BYTES can hold", inMemory, endsInMemory)
	}

	// NATS is back. One spooled batch is already in the stream, as if the
	// previous run had published it and died before the ack.
	srv.Start()
	nc := natsConnect(t, srv.URL())
	js := defaultStream(t, nc, 1)
	injected := sp.Entries[len(sp.Entries)/2]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := js.PublishMsg(ctx, &nats.Msg{Subject: injected.Subject, Data: injected.Data,
		Header: nats.Header{schema.HeaderMsgID: []string{injected.MsgID}}}); err != nil {
		t.Fatal(err)
	}

	// Run 2 is killed in the middle of the replay: as soon as a spool file is
	// gone (acknowledged). Fewer batches in flight make the replay slow
	// enough to interrupt.
	back := time.Now()
	e2 := env()
	e2["FLOWBUS_MAX_INFLIGHT"] = "4"
	a2 := startAgentProc(t, "run2", e2)
	for n := len(sp.Entries); n == len(sp.Entries); n = countSpoolFiles(t, spoolDir) {
		if time.Since(back) > 60*time.Second {
			t.Fatalf("run 2: %d of %d spooled batches left after 60s", n, len(sp.Entries))
		}
		time.Sleep(time.Millisecond)
	}
	a2.Signal(syscall.SIGKILL)
	left := readSpool(t, spoolDir)
	t.Logf("run 2: killed %v after its start with %d of %d batches still spooled",
		time.Since(back).Round(time.Millisecond), len(left.Entries), len(sp.Entries))
	if left.Corrupt != 0 {
		t.Errorf("SIGKILL left %d unreadable spool files", left.Corrupt)
	}
	if len(left.Entries) == 0 {
		t.Errorf("run 2 replayed the whole spool before the kill: the test did not interrupt a replay")
	}

	// Run 3 finishes the replay.
	a3 := startAgentProc(t, "run3", env())
	m3 := a3.WaitMetrics(60*time.Second, "spool replayed", spoolDrained)
	drain := time.Since(back)
	got := waitStreamEnds(t, srv.URL(), "FLOWS", sp.Flows.n, sp.Ends.n, 30*time.Second)
	t.Logf("run 3: spool empty %v after run 2 started; %g batches already in the stream (duplicate acks); agent: %s",
		drain.Round(time.Millisecond), m3[mDupAcks], metricsSummary(m3))
	checkExact(t, "spool replay", got, sp.Flows)
	// The ends of the spool, each once; the chains are not whole, since the
	// first batches died in run 1's memory (see below).
	checkEnds(t, "spool replay", got, sp.Ends, false)
	injectedLeft := false
	for _, e := range left.Entries {
		injectedLeft = injectedLeft || e.MsgID == injected.MsgID
	}
	switch {
	case !injectedLeft:
		t.Errorf("run 2 replayed %s (the batch already in the stream) before it was killed: run 3 did not exercise the duplicate", injected.MsgID)
	case m3[mDupAcks] == 0:
		t.Errorf("run 3 sent %s, which the stream already held, and counted no duplicate ack", injected.MsgID)
	}
	if len(got.Batches) != len(sp.Batches) || len(got.EndBatches) != len(sp.EndBatches) {
		t.Errorf("stream holds %d begin and %d end batches, the spool held %d and %d", len(got.Batches), len(got.EndBatches), len(sp.Batches), len(sp.EndBatches))
	}
	if m3[mPublished] != 0 || m3[mEndsPub] != 0 {
		t.Errorf("run 3 captured %g begins and %g ends: the test cgroup should be quiet", m3[mPublished], m3[mEndsPub])
	}
	skip := map[string]bool{injected.MsgID: true}
	if inv, endInv := outOfOrder(got.Batches, skip), endsOutOfOrder(got.EndBatches, skip); inv != 0 || endInv != 0 {
		t.Errorf("%d begin and %d end batches stored out of order (spooled batches must be published oldest first)", inv, endInv)
	}
	// The batches lost with run 1's memory show as a break in its prev_seq
	// chain, so a consumer can tell.
	if inMemory > 0 && got.ChainGaps == 0 {
		t.Errorf("%d events lost with run 1's memory, but no prev_seq gap in the stream shows it", inMemory)
	}
	if endsInMemory > 0 && got.EndChainGaps == 0 {
		t.Errorf("%d ends lost with run 1's memory, but no prev_seq gap in the end chains shows it", endsInMemory)
	}
	t.Logf("prev_seq gaps seen by a consumer: %d in the begin chains, %d in the end chains", got.ChainGaps, got.EndChainGaps)
	a3.Stop()
}

// 3. A storm during an outage overflows memory and then the spool: past
// FLOWBUS_SPOOL_BYTES batches are dropped, and the loss is exact. What the
// storm made is what reached the stream plus the drop counters the stream's
// batches carry; the agent's metrics say the same, and its log says it, rate
// limited. End events are on: a batch's drop counters count the events lost
// since the previous batch of either kind, so begins and ends together are
// exact against all batches' counters, and the ends lost are exactly the
// agent's dropped_ends_total.
func TestFaultSpoolFullDropExact(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	const (
		workers    = 4
		rate       = 250 // per worker
		conns      = 5000
		spoolBytes = 1 << 20 // the smallest allowed
	)
	srv := newNATS(t, proctest.NATSOptions{})
	srv.Start()
	cg := cgrouptest.NewChild(t)
	env := withEnds(agentEnv(cg.Path, srv.URL(), "host-full", t.TempDir()))
	env["FLOWBUS_SPOOL_BYTES"] = strconv.Itoa(spoolBytes)
	env["FLOWBUS_QUEUE_BYTES"] = "16384"
	env["FLOWBUS_BATCH_MAX_BYTES"] = "4096"
	// One event per batch: the spool's bound is reached with few connections.
	env["FLOWBUS_BATCH_MAX_EVENTS"] = "1"
	a := startAgentProc(t, "agent", env)
	a.WaitMetrics(20*time.Second, "ready", func(m map[string]float64) bool { return m[mReady] == 1 })

	smp := a.sample(100 * time.Millisecond)
	defer smp.Stop()
	srv.Stop(syscall.SIGTERM)
	down := time.Now()
	res := startStorm(t, cg, workers, time.Minute, rate, conns).Wait()
	made := newMultiset()
	made.addStorm(res)
	a.WaitMetrics(30*time.Second, "every begin and end of the storm captured and the spool overflowing", func(m map[string]float64) bool {
		return m[mPublished] == float64(made.n) && m[mEndsPub] == float64(made.n) && m[mDropSpool] > 0
	})
	time.Sleep(500 * time.Millisecond) // the last batches are sealed after the linger
	srv.Start()
	outage := time.Since(down)
	back := time.Now()
	a.WaitMetrics(90*time.Second, "the spool drained", func(m map[string]float64) bool {
		return m[mReady] == 1 && m[mPending] == 0 && m[mSpoolBatches] == 0
	})
	// The losses since the last batch travel in the next one: a few more
	// connections make it.
	tail := cg.Traffic(t, "127.0.0.1", 3, false)
	made.addConns(tail.Conns)
	m := a.WaitMetrics(60*time.Second, "all acknowledged after the outage", func(m map[string]float64) bool {
		return endsDrained(m) && m[mPublished] == float64(made.n) && m[mEndsPub] == float64(made.n)
	})
	drain := time.Since(back)
	smp.Stop()
	got := waitStreamEnds(t, srv.URL(), "FLOWS", int(m[mAcked]), int(m[mEndsAcked]), 30*time.Second)

	agentDrops := m[mDropSpool] + m[mDropQueue] + m[mDropPublish] + m[mDropKernel]
	t.Logf("storm: %d connections (%d events) during an outage of %v; spool bound %d bytes, peak %d bytes; drained %v after NATS came back",
		len(res.Ports), 2*len(res.Ports), outage.Round(time.Millisecond), spoolBytes, smp.maxSpoolBytes.Load(), drain.Round(time.Millisecond))
	var drops schema.Drops
	drops.Add(got.Drops)
	drops.Add(got.EndDrops)
	t.Logf("made %d begins and %d ends, stream holds %d in %d batches and %d in %d end batches, drops carried in the stream %+v (total %d), agent counted %g (%g ends); prev_seq gaps %d, end chain gaps %d",
		made.n, made.n, got.Flows.n, len(got.Batches), got.Ends.n, len(got.EndBatches), drops, drops.Total(), agentDrops, m[mEndDropsPub], got.ChainGaps, got.EndChainGaps)

	// Nothing arrived that was not made, nor twice.
	if notMade, _, ex := made.diff(got.Flows); notMade != 0 {
		t.Errorf("%d events in the stream that were not made: %v", notMade, ex)
	}
	if notMade, _, ex := made.diff(got.Ends); notMade != 0 {
		t.Errorf("%d ends in the stream that were not made: %v", notMade, ex)
	}
	if len(got.DupMsgIDs) > 0 || got.DupRunSeq > 0 || len(got.EndDupMsgIDs) > 0 || got.EndDupRunSeq > 0 || got.SharedSeqs > 0 {
		t.Errorf("batches stored twice: %v, end batches %v, (run, seq) held by both kinds %d", first(got.DupMsgIDs, 3), first(got.EndDupMsgIDs, 3), got.SharedSeqs)
	}
	if len(got.EndBackwards) > 0 {
		t.Errorf("%d ends with begin_ns after end_ns, e.g. %v", len(got.EndBackwards), first(got.EndBackwards, 3))
	}
	if n, ex := got.endBeginMismatch(time.Millisecond); n > 0 {
		t.Errorf("%d ends whose begin_ns is not their begin's timestamp, e.g. %v", n, ex)
	}
	// The drop is exact and visible to a consumer.
	if lost := uint64(2*made.n - got.Flows.n - got.Ends.n); drops.Total() != lost {
		t.Errorf("made %d begins and %d ends, %d and %d arrived: %d lost, but the stream's batches carry drop counters summing to %d", made.n, made.n, got.Flows.n, got.Ends.n, lost, drops.Total())
	}
	if endsLost := made.n - got.Ends.n; endsLost == 0 || float64(endsLost) != m[mEndDropsPub] {
		t.Errorf("%d ends lost, the agent's %s says %g; want equal and non-zero", endsLost, mEndDropsPub, m[mEndDropsPub])
	}
	if drops.Spool == 0 || drops.Spool != uint64(m[mDropSpool]) {
		t.Errorf("spool drops: stream says %d, agent metrics %g; want equal and non-zero", drops.Spool, m[mDropSpool])
	}
	if float64(drops.Total()) != agentDrops {
		t.Errorf("drops in the stream %d, in the agent's metrics %g", drops.Total(), agentDrops)
	}
	if got.ChainGaps == 0 || got.EndChainGaps == 0 {
		t.Errorf("batches were dropped but no prev_seq gap shows it: %d in the begin chains, %d in the end chains", got.ChainGaps, got.EndChainGaps)
	}
	if peak := smp.maxSpoolBytes.Load(); peak > spoolBytes {
		t.Errorf("spool reached %d bytes, above its bound %d", peak, spoolBytes)
	}
	// The tail traffic must arrive whole: the agent recovers from a full spool.
	tailSet := newMultiset()
	tailSet.addConns(tail.Conns)
	if _, notArrived, _ := tailSet.diff(got.Flows); notArrived != 0 {
		t.Errorf("%d events of the connections made after the outage are missing", notArrived)
	}
	if _, notArrived, _ := tailSet.diff(got.Ends); notArrived != 0 {
		t.Errorf("%d ends of the connections made after the outage are missing", notArrived)
	}
	logged := strings.Count(a.Log(), "spool cannot take the batch")
	t.Logf("log: %d lines about spool drops over an outage of %v", logged, outage.Round(time.Millisecond))
	if logged == 0 {
		t.Errorf("the agent dropped %d events without saying so in its log", drops.Spool)
	}
	if limit := int(outage/time.Second) + 2; logged > limit {
		t.Errorf("%d log lines about drops in %v: not rate limited (at most one a second)", logged, outage)
	}
	a.Stop()
}

// 4. Three-node cluster, stream with 3 replicas: in the middle of a
// connection storm the node that both leads the stream and serves the
// agent's connection is killed (SIGKILL), the worst single node to lose.
// Every connection reaches the stream exactly once, its two begins and its
// two ends (end events on).
func TestFaultClusterNodeKilled(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	const (
		workers = 4
		rate    = 200 // per worker: 800 connections/s in all
		dur     = 14 * time.Second
		killAt  = 4 * time.Second
	)
	nodes := newCluster(t, 3)
	cg := cgrouptest.NewChild(t)
	env := withEnds(agentEnv(cg.Path, clusterURL(nodes), "host-cluster", t.TempDir()))
	env["FLOWBUS_STREAM_REPLICAS"] = "3"
	a := startAgentProc(t, "agent", env)
	a.WaitMetrics(60*time.Second, "ready", func(m map[string]float64) bool { return m[mReady] == 1 })

	nc := natsConnect(t, clusterURL(nodes))
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, replicas, err := streamCluster(js, "FLOWS"); err != nil || replicas != 3 {
		t.Fatalf("stream FLOWS: %d replicas (want 3, set by FLOWBUS_STREAM_REPLICAS), err %v", replicas, err)
	}
	// The victim: the agent's server, made the stream's leader too.
	var victim *natsProc
	var survivors []*natsProc
	for _, s := range nodes {
		if ok, err := s.HasClient("flowagent host-cluster"); err != nil {
			t.Fatal(err)
		} else if ok && victim == nil {
			victim = s
		} else {
			survivors = append(survivors, s)
		}
	}
	if victim == nil {
		t.Fatal("the agent's connection is on none of the nodes")
	}
	moveStreamLeader(t, nc, js, "FLOWS", victim.Name)

	st := startStorm(t, cg, workers, dur, rate, 1_000_000)
	time.Sleep(killAt)
	before, _ := a.Metrics()
	victim.Kill()
	killed := time.Now()
	// A new leader among the survivors, as their clients see it.
	obs := natsConnect(t, clusterURL(survivors))
	ojs, err := jetstream.New(obs)
	if err != nil {
		t.Fatal(err)
	}
	var newLeader string
	for newLeader == "" || newLeader == victim.Name {
		if time.Since(killed) > 60*time.Second {
			t.Fatalf("no new stream leader 60s after killing %s", victim.Name)
		}
		time.Sleep(50 * time.Millisecond)
		newLeader, _, _ = streamCluster(ojs, "FLOWS")
	}
	election := time.Since(killed)

	res := st.Wait()
	want := newMultiset()
	want.addStorm(res)
	a.WaitMetrics(30*time.Second, "every end of the storm captured", func(m map[string]float64) bool { return m[mEndsPub] >= float64(want.n) })
	m := a.WaitMetrics(90*time.Second, "all acknowledged after the node's death", endsDrained)
	drain := time.Since(killed)
	got := waitStreamEnds(t, clusterURL(survivors), "FLOWS", want.n, want.n, 30*time.Second)
	reconnected := strings.Count(a.Log(), "reconnected to NATS")
	t.Logf("storm: %d connections (%d/s over %v); node %s (stream leader and the agent's server) killed at %v with %g events acked, new leader %s seen after %v; agent reconnected %d times; all acknowledged %v after the kill; duplicate acks %g, publish errors %g",
		len(res.Ports), workers*rate, dur, victim.Name, killAt, before[mAcked], newLeader, election.Round(time.Millisecond),
		reconnected, drain.Round(time.Millisecond), m[mDupAcks], m[mPubErrors])
	t.Logf("agent: %s", metricsSummary(m))
	checkExact(t, "cluster", got, want)
	checkEnds(t, "cluster", got, want, true)
	if got.ChainGaps != 0 || got.Drops.Total() != 0 || got.EndDrops.Total() != 0 {
		t.Errorf("losses: %d prev_seq gaps, drops %+v (end batches %+v)", got.ChainGaps, got.Drops, got.EndDrops)
	}
	if reconnected == 0 {
		t.Errorf("the agent never reconnected after its server died")
	}
	a.Stop()
}

// 5. Security: TLS with a wrong CA or without the client certificate the
// server requires, and credentials the server refuses, make the agent exit at
// once with one line naming the problem and its fix, and no secret in it. A
// host whose credentials allow only its own subjects (the permission shape of
// deploy/nats/accounts.conf) cannot publish as another host: the server
// refuses, the agent says why, and nothing reaches the stream.
func TestFaultSecurityRefusals(t *testing.T) {
	cgrouptest.RequirePrivileged(t)

	t.Run("tls", func(t *testing.T) {
		dir := t.TempDir()
		ca := newCA(t, dir, "flowbus-test")
		other := newCA(t, dir, "someone-else")
		srvCert, srvKey := ca.issue(t, "nats-server", true)
		cliCert, cliKey := ca.issue(t, "host-tls", false)
		srv := newNATS(t, proctest.NATSOptions{Extra: fmt.Sprintf("tls {\n  cert_file: %q\n  key_file: %q\n  ca_file: %q\n  verify: true\n  timeout: 5\n}\n", srvCert, srvKey, ca.CAFile)})
		srv.Start()
		url := fmt.Sprintf("tls://127.0.0.1:%d", srv.Port)
		cg := cgrouptest.NewChild(t)
		base := func() map[string]string {
			e := agentEnv(cg.Path, url, "host-tls", t.TempDir())
			e["FLOWBUS_NATS_CA"], e["FLOWBUS_NATS_CERT"], e["FLOWBUS_NATS_KEY"] = ca.CAFile, cliCert, cliKey
			return e
		}

		// The right CA and a client certificate: the agent works, so the
		// refusals below come from what each one changes.
		good := startAgentProc(t, "tls-good", base())
		good.WaitMetrics(30*time.Second, "ready over TLS", func(m map[string]float64) bool { return m[mReady] == 1 })
		want := newMultiset()
		want.addConns(cg.Traffic(t, "127.0.0.1", 3, false).Conns)
		got := waitStream(t, url, "FLOWS", want.n, 30*time.Second, nats.RootCAs(ca.CAFile), nats.ClientCert(cliCert, cliKey))
		checkExact(t, "tls", got, want)
		good.Stop()

		cases := []struct {
			name     string
			set      map[string]string
			problems []string // what the line must say (one of)
			variable string   // the setting it must name as the fix
		}{
			{"wrong CA", map[string]string{"FLOWBUS_NATS_CA": other.CAFile}, []string{"certificate signed by unknown authority"}, "FLOWBUS_NATS_CA"},
			// The server rejects the handshake ("certificate required") or,
			// depending on timing, closes the connection right after it: a
			// few tries meet both.
			{"no client certificate", map[string]string{"FLOWBUS_NATS_CERT": "", "FLOWBUS_NATS_KEY": ""}, []string{"certificate required", "closed by remote after TLS handshake"}, "FLOWBUS_NATS_CERT"},
			{"no client certificate", map[string]string{"FLOWBUS_NATS_CERT": "", "FLOWBUS_NATS_KEY": ""}, []string{"certificate required", "closed by remote after TLS handshake"}, "FLOWBUS_NATS_CERT"},
			{"no client certificate", map[string]string{"FLOWBUS_NATS_CERT": "", "FLOWBUS_NATS_KEY": ""}, []string{"certificate required", "closed by remote after TLS handshake"}, "FLOWBUS_NATS_CERT"},
		}
		for _, c := range cases {
			env := base()
			for k, v := range c.set {
				if v == "" {
					delete(env, k)
				} else {
					env[k] = v
				}
			}
			start := time.Now()
			line := exitLine(t, startAgentProc(t, "tls-bad", env))
			t.Logf("%s: exit after %v: %s", c.name, time.Since(start).Round(time.Millisecond), line)
			said := false
			for _, p := range c.problems {
				said = said || strings.Contains(line, p)
			}
			if !said || !strings.Contains(line, c.variable) {
				t.Errorf("%s: the line should name the problem (%q) and the setting to fix (%s): %s", c.name, c.problems, c.variable, line)
			}
		}
		// The second form above, made deterministic: the error the NATS
		// client returns when the server hangs up after the handshake.
		closed := fmt.Errorf("%w: connection closed by remote after TLS handshake: %w", nats.ErrTLS, syscall.EPIPE)
		if !strings.Contains(agent.Refusal(closed), "FLOWBUS_NATS_CERT") {
			t.Errorf("%v is taken for an unreachable server: the agent would retry forever without saying why", closed)
		}
	})

	// One server for the credential and permission cases: a host user per
	// deploy/nats/accounts.conf (NKey, publish only flows.<host>.>, subscribe
	// only _INBOX.>), and an admin user who manages the stream.
	web01, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	web01Pub, _ := web01.PublicKey()
	web01Seed, _ := web01.Seed()
	const adminPassword = "admin-secret-0451"
	srv := newNATS(t, proctest.NATSOptions{Extra: fmt.Sprintf(`accounts {
  FLOWBUS {
    jetstream: enabled
    users: [
      {
        nkey: %s
        permissions: {
          publish: { allow: ["flows.web-01.>"] }
          subscribe: { allow: ["_INBOX.>"] }
        }
      }
      {
        user: flowbus-admin
        password: %q
        permissions: {
          publish: { allow: ["$JS.API.>", "$JS.ACK.>"] }
          subscribe: { allow: ["_INBOX.>", "flows.>"] }
        }
      }
    ]
  }
}
`, web01Pub, adminPassword)})
	srv.Start()
	admin := []nats.Option{nats.UserInfo("flowbus-admin", adminPassword)}
	defaultStream(t, natsConnect(t, srv.URL(), admin...), 1)
	keyDir := t.TempDir()
	writeSeed := func(name string, seed []byte) string {
		p := filepath.Join(keyDir, name)
		if err := os.WriteFile(p, seed, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	web01File := writeSeed("web-01.nk", web01Seed)

	t.Run("credentials", func(t *testing.T) {
		cg := cgrouptest.NewChild(t)
		stranger, _ := nkeys.CreateUser()
		strangerSeed, _ := stranger.Seed()
		cases := []struct {
			name   string
			set    map[string]string
			secret string
		}{
			{"unknown nkey", map[string]string{"FLOWBUS_NATS_NKEY": writeSeed("stranger.nk", strangerSeed)}, string(strangerSeed)},
			{"wrong password", map[string]string{"FLOWBUS_NATS_USER": "flowbus-admin", "FLOWBUS_NATS_PASSWORD": "not-the-password-7781"}, "not-the-password-7781"},
			{"wrong password in the URL", map[string]string{"FLOWBUS_NATS_URL": fmt.Sprintf("nats://flowbus-admin:url-secret-9913@127.0.0.1:%d", srv.Port)}, "url-secret-9913"},
		}
		for _, c := range cases {
			env := agentEnv(cg.Path, srv.URL(), "web-01", t.TempDir())
			env["FLOWBUS_MANAGE_STREAM"] = "false"
			for k, v := range c.set {
				env[k] = v
			}
			start := time.Now()
			line := exitLine(t, startAgentProc(t, "cred-bad", env))
			t.Logf("%s: exit after %v: %s", c.name, time.Since(start).Round(time.Millisecond), line)
			if !strings.Contains(strings.ToLower(line), "authorization violation") || !strings.Contains(line, "refused the credentials") {
				t.Errorf("%s: the line should say the server refused the credentials and which settings to check: %s", c.name, line)
			}
			if strings.Contains(line, c.secret) {
				t.Errorf("%s: the secret is in the output: %s", c.name, line)
			}
		}
	})

	t.Run("permissions", func(t *testing.T) {
		cg := cgrouptest.NewChild(t)
		// The server itself refuses: a plain client with web-01's key.
		refused := make(chan error, 8)
		nc := natsConnect(t, srv.URL(), nats.UserInfo("", ""), nkeyOption(t, web01File),
			nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { refused <- err }))
		if err := nc.Publish("flows.web-02.outgoing", []byte("x")); err != nil {
			t.Fatal(err)
		}
		_ = nc.Flush()
		select {
		case err := <-refused:
			if !errors.Is(err, nats.ErrPermissionViolation) {
				t.Errorf("publishing to another host's subject: %v, want a permissions violation", err)
			}
			t.Logf("plain client as web-01 publishing to flows.web-02.outgoing: %v", err)
		case <-time.After(10 * time.Second):
			t.Error("the server did not refuse web-01 publishing to flows.web-02.outgoing")
		}

		// Two agents with web-01's key watch the same cgroup: one as web-01,
		// one claiming to be web-02.
		env := func(host string) map[string]string {
			e := agentEnv(cg.Path, srv.URL(), host, t.TempDir())
			e["FLOWBUS_NATS_NKEY"] = web01File
			e["FLOWBUS_MANAGE_STREAM"] = "false" // hosts have no $JS.API permission
			return e
		}
		own := startAgentProc(t, "web-01", env("web-01"))
		impEnv := env("web-02")
		impEnv["FLOWBUS_SHUTDOWN_TIMEOUT"] = "1s" // its batches can never be acknowledged
		impostor := startAgentProc(t, "web-02", impEnv)
		own.WaitMetrics(30*time.Second, "ready", func(m map[string]float64) bool { return m[mReady] == 1 })
		impostor.WaitMetrics(30*time.Second, "connected", func(m map[string]float64) bool { return m[mReady] == 1 })
		conns := cg.Traffic(t, "127.0.0.1", 3, false).Conns
		want := newMultiset()
		want.addConns(conns)
		own.WaitMetrics(30*time.Second, "web-01's events acknowledged", func(m map[string]float64) bool { return m[mAcked] == float64(want.n) })

		const agentSays = "NATS refused an operation: this host's credentials do not allow it"
		if !impostor.WaitLog(20*time.Second, agentSays) {
			t.Errorf("the agent publishing as web-02 with web-01's credentials did not say why its batches are refused:\n%s", proctest.Tail(impostor.LogPath, 10))
		}
		if !waitFileContains(srv.LogPath, 10*time.Second, `Publish Violation - Subject "flows.web-02.`) {
			t.Errorf("the server did not log a publish violation for flows.web-02.>:\n%s", proctest.Tail(srv.LogPath, 10))
		}
		m := impostor.WaitMetrics(10*time.Second, "publish attempts refused", func(m map[string]float64) bool { return m[mPubErrors] > 0 })
		got := readAll(t, srv.URL(), "FLOWS", admin...)
		byHost := map[string]int{}
		for _, b := range got.Batches {
			byHost[b.B.Host]++
		}
		for _, l := range strings.Split(impostor.Log(), "\n") {
			if strings.Contains(l, agentSays) {
				t.Logf("agent as web-02: %s", l)
				break
			}
		}
		t.Logf("stream batches by host: %v; web-02 agent: %g events captured, %g acked, %g failed publish attempts", byHost, m[mPublished], m[mAcked], m[mPubErrors])
		if byHost["web-02"] != 0 || m[mAcked] != 0 {
			t.Errorf("web-02's batches reached the stream with web-01's credentials: %d batches, %g events acked", byHost["web-02"], m[mAcked])
		}
		checkExact(t, "web-01", got, want)
		if strings.Contains(own.Log()+impostor.Log(), string(web01Seed)) {
			t.Error("the NKey seed is in the agent's log")
		}
		own.Stop()
		impostor.Stop()
	})
}
