package main

// What the process tests (faults_test.go, startup_test.go) add to the
// process harness cmd/internal/proctest: its processes bound to a test, the
// agent's metric names and drain conditions, the expected and received flows
// (a reader that checks the stream batch by batch, the spool), TLS material
// and cluster helpers.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"hash/fnv"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/cmd/internal/proctest"
	"github.com/flowbus/flowbus/publisher"
	"github.com/flowbus/flowbus/publisher/spool"
	"github.com/flowbus/flowbus/schema"
)

func init() {
	cgrouptest.Register("storm", proctest.StormMain)
}

// ---------------------------------------------------------------------------
// Binaries: nats-server (cached by version) and flowagent (built per run).

var (
	binsOnce  sync.Once
	binsErr   error
	natsBin   string
	agentBin  string
	modRootFn = sync.OnceValues(proctest.ModRoot)
)

// testBinaries builds nats-server (at the version go.mod selects, cached in
// os.TempDir()/flowbus-test-bin) and flowagent (rebuilt on every run, renamed
// into place so a running copy is never overwritten).
func testBinaries(t *testing.T) (natsServer, flowagent string) {
	t.Helper()
	binsOnce.Do(func() {
		root, err := modRootFn()
		if err != nil {
			binsErr = err
			return
		}
		cache := filepath.Join(os.TempDir(), "flowbus-test-bin")
		if natsBin, _, binsErr = proctest.BuildNATSServer(context.Background(), root, cache); binsErr != nil {
			return
		}
		agentBin = filepath.Join(cache, fmt.Sprintf("flowagent-%d", os.Getuid()))
		binsErr = proctest.GoBuild(context.Background(), root, "./cmd/flowagent", agentBin)
	})
	if binsErr != nil {
		t.Fatal(binsErr)
	}
	return natsBin, agentBin
}

func freePort(t *testing.T) int {
	t.Helper()
	p, err := proctest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// ---------------------------------------------------------------------------
// nats-server processes.

// natsProc is a nats-server process of one test, killed when it ends.
type natsProc struct {
	*proctest.NATSServer
	t *testing.T
}

// newNATS configures a server (named n1 unless o names it); Start runs it.
func newNATS(t *testing.T, o proctest.NATSOptions) *natsProc {
	t.Helper()
	bin, _ := testBinaries(t)
	if o.Name == "" {
		o.Name = "n1"
	}
	srv, err := proctest.NewNATSServer(bin, t.TempDir(), o)
	if err != nil {
		t.Fatal(err)
	}
	s := &natsProc{NATSServer: srv, t: t}
	t.Cleanup(func() {
		s.Kill()
		if t.Failed() {
			t.Logf("nats-server %s log (tail):\n%s", s.Name, proctest.Tail(s.LogPath, 15))
		}
	})
	return s
}

// Start runs the server and waits until it accepts TCP connections.
func (s *natsProc) Start() {
	s.t.Helper()
	if err := s.NATSServer.Start(context.Background()); err != nil {
		s.t.Fatal(err)
	}
}

// Stop sends sig and waits for the process to end (SIGKILL after 15s).
func (s *natsProc) Stop(sig syscall.Signal) { s.NATSServer.Stop(sig, 15*time.Second) }

// connect is a plain client (retrying while the server comes up).
func natsConnect(t *testing.T, url string, opts ...nats.Option) *nats.Conn {
	t.Helper()
	opts = append([]nats.Option{nats.MaxReconnects(-1), nats.ReconnectWait(100 * time.Millisecond), nats.Timeout(2 * time.Second)}, opts...)
	var nc *nats.Conn
	var err error
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if nc, err = nats.Connect(url, opts...); err == nil {
			t.Cleanup(nc.Close)
			return nc
		}
	}
	t.Fatalf("connecting to %s: %v", url, err)
	return nil
}

// ---------------------------------------------------------------------------
// The agent as a process.

// agentProc is a flowagent process of one test, killed when it ends.
type agentProc struct {
	*proctest.Agent
	t           *testing.T
	name        string
	MetricsAddr string
}

// agentEnv is the base environment of a test agent: a remote server, the
// watched child cgroup, small batches and quick retries.
func agentEnv(cgroupPath, natsURL, host, spoolDir string) map[string]string {
	return map[string]string{
		"FLOWBUS_NATS_URL":         natsURL,
		"FLOWBUS_CGROUP_PATH":      cgroupPath,
		"FLOWBUS_HOST":             host,
		"FLOWBUS_SPOOL_DIR":        spoolDir,
		"FLOWBUS_BATCH_LINGER":     "20ms",
		"FLOWBUS_ACK_TIMEOUT":      "1s",
		"FLOWBUS_SHUTDOWN_TIMEOUT": "3s",
		"FLOWBUS_LOG_LEVEL":        "info",
		// Off unless a test turns them on (withEnds): the run-link
		// accounting of TestRestartChainsRuns counts begin seqs only, and
		// ends would double the work of the tests that do not check them.
		"FLOWBUS_END_EVENTS": "false",
		// Beside the spool, in the test's directory, never the host's.
		"FLOWBUS_RUN_STATE_FILE": filepath.Join(filepath.Dir(spoolDir), "run-"+host+".state"),
	}
}

// withEnds turns end events on in env and returns it.
func withEnds(env map[string]string) map[string]string {
	env["FLOWBUS_END_EVENTS"] = "true"
	return env
}

// startAgentProc runs the flowagent binary with env (plus a free metrics
// port), outside the watched cgroup. It is killed when the test ends.
func startAgentProc(t *testing.T, name string, env map[string]string) *agentProc {
	t.Helper()
	_, bin := testBinaries(t)
	a := &agentProc{t: t, name: name}
	if _, ok := env["FLOWBUS_METRICS_ADDR"]; !ok {
		a.MetricsAddr = fmt.Sprintf("127.0.0.1:%d", freePort(t))
		env["FLOWBUS_METRICS_ADDR"] = a.MetricsAddr
	}
	pa, err := proctest.StartAgent(bin, proctest.EnvList(env), filepath.Join(t.TempDir(), name+".log"))
	if err != nil {
		t.Fatal(err)
	}
	a.Agent = pa
	t.Cleanup(func() {
		a.Signal(syscall.SIGKILL)
		if t.Failed() {
			t.Logf("agent %s log (tail):\n%s", a.name, proctest.Tail(a.LogPath, 25))
		}
	})
	return a
}

// Stop ends the agent with SIGTERM and requires a clean exit.
func (a *agentProc) Stop() {
	a.t.Helper()
	a.Signal(syscall.SIGTERM)
	if code := a.Wait(30 * time.Second); code != 0 {
		a.t.Errorf("agent %s: exit status %d after SIGTERM, want 0", a.name, code)
	}
}

// Metrics scrapes /metrics: "name{labels}" -> value.
func (a *agentProc) Metrics() (map[string]float64, error) { return proctest.Scrape(a.MetricsAddr) }

// WaitMetrics polls the metrics until cond holds; it fails the test after d.
func (a *agentProc) WaitMetrics(d time.Duration, what string, cond func(m map[string]float64) bool) map[string]float64 {
	a.t.Helper()
	deadline := time.Now().Add(d)
	var last map[string]float64
	var lastErr error
	for time.Now().Before(deadline) {
		select {
		case <-a.Exited():
			a.t.Fatalf("agent %s exited (%v) while waiting for %s:\n%s", a.name, a.ExitErr(), what, proctest.Tail(a.LogPath, 20))
		default:
		}
		m, err := a.Metrics()
		if err == nil {
			last = m
			if cond(m) {
				return m
			}
		}
		lastErr = err
		time.Sleep(50 * time.Millisecond)
	}
	a.t.Fatalf("agent %s: %s not reached after %v (last metrics error %v): %s", a.name, what, d, lastErr, metricsSummary(last))
	return nil
}

const (
	mPublished    = `flowbus_agent_events_total{stage="published"}`
	mAcked        = `flowbus_agent_events_total{stage="acked"}`
	mCaptured     = `flowbus_agent_events_total{stage="captured"}`
	mPending      = `flowbus_agent_pending_batches`
	mPendingBytes = `flowbus_agent_pending_bytes`
	mSpoolBatches = `flowbus_agent_spool_batches`
	mSpoolBytes   = `flowbus_agent_spool_bytes`
	mSpooled      = `flowbus_agent_spooled_batches_total`
	mDropSpool    = `flowbus_agent_dropped_events_total{stage="spool"}`
	mDropQueue    = `flowbus_agent_dropped_events_total{stage="queue"}`
	mDropPublish  = `flowbus_agent_dropped_events_total{stage="publish"}`
	mDropKernel   = `flowbus_agent_dropped_events_total{stage="kernel_ringbuf"}`
	mBatchesAcked = `flowbus_agent_batches_acked_total`
	mDupAcks      = `flowbus_agent_duplicate_acks_total`
	mPubErrors    = `flowbus_agent_publish_errors_total`
	mReady        = `flowbus_agent_ready`
	mEndsCaptured = `flowbus_agent_ends_total{stage="captured"}`
	mEndsPub      = `flowbus_agent_ends_total{stage="published"}`
	mEndsAcked    = `flowbus_agent_ends_total{stage="acked"}`
	mEndDropsPub  = `flowbus_agent_dropped_ends_total{stage="publisher"}`
	mEndDropsRing = `flowbus_agent_dropped_ends_total{stage="kernel_ringbuf"}`
	mEndDropsStor = `flowbus_agent_dropped_ends_total{stage="kernel_storage"}`
)

func metricsSummary(m map[string]float64) string {
	var parts []string
	for _, k := range []string{mCaptured, mPublished, mAcked, mEndsCaptured, mEndsPub, mEndsAcked, mPending, mPendingBytes, mSpoolBatches, mSpoolBytes, mDropSpool, mDropQueue, mDropPublish, mDropKernel, mEndDropsPub, mEndDropsRing, mEndDropsStor, mReady} {
		if v, ok := m[k]; ok {
			parts = append(parts, fmt.Sprintf("%s=%g", strings.TrimPrefix(k, "flowbus_agent_"), v))
		}
	}
	return strings.Join(parts, " ")
}

// drained: every event handed to batching is acknowledged (or dropped and
// counted), nothing pending, the spool empty.
func drained(m map[string]float64) bool {
	dropped := m[mDropSpool] + m[mDropQueue] + m[mDropPublish]
	return m[mReady] == 1 && m[mPending] == 0 && m[mSpoolBatches] == 0 && m[mPublished] > 0 && m[mAcked]+dropped == m[mPublished]
}

// endsDrained is drained with end events on: every begin and end handed to
// batching is acknowledged (or dropped and counted). The drop counters count
// both kinds, so only the sums compare.
func endsDrained(m map[string]float64) bool {
	dropped := m[mDropSpool] + m[mDropQueue] + m[mDropPublish]
	return m[mReady] == 1 && m[mPending] == 0 && m[mSpoolBatches] == 0 && m[mPublished] > 0 && m[mEndsPub] > 0 &&
		m[mAcked]+m[mEndsAcked]+dropped == m[mPublished]+m[mEndsPub] && m[mEndsAcked]+m[mEndDropsPub] == m[mEndsPub]
}

// sampler records the maxima of the agent's pending bytes and RSS.
type sampler struct {
	stop            chan struct{}
	done            chan struct{}
	maxPendingBytes atomic.Int64
	maxSpoolBytes   atomic.Int64
	maxRSS          atomic.Int64
	samples         atomic.Int64
}

func (a *agentProc) sample(every time.Duration) *sampler {
	s := &sampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			if m, err := a.Metrics(); err == nil {
				s.samples.Add(1)
				setMax(&s.maxPendingBytes, int64(m[mPendingBytes]))
				setMax(&s.maxSpoolBytes, int64(m[mSpoolBytes]))
			}
			if rss, _, err := proctest.ProcMem(a.Pid()); err == nil {
				setMax(&s.maxRSS, rss)
			}
			select {
			case <-s.stop:
				return
			case <-a.Exited():
				return
			case <-t.C:
			}
		}
	}()
	return s
}

func (s *sampler) Stop() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.done
}

func setMax(v *atomic.Int64, x int64) {
	for {
		old := v.Load()
		if x <= old || v.CompareAndSwap(old, x) {
			return
		}
	}
}

// ---------------------------------------------------------------------------
// The connection storm, run inside the child cgroup.

// storm is a running storm helper.
type storm struct {
	t   *testing.T
	st  *proctest.Storm
	res *proctest.StormResult
}

func startStorm(t *testing.T, cg *cgrouptest.Cgroup, workers int, dur time.Duration, rate int, maxConns int) *storm {
	t.Helper()
	st, err := proctest.StartStorm(cg.Command("storm", proctest.StormArgs("127.0.0.1", workers, dur, rate, maxConns)...))
	if err != nil {
		t.Fatal(err)
	}
	s := &storm{t: t, st: st}
	t.Cleanup(func() {
		if s.res == nil {
			s.st.Kill()
		}
	})
	return s
}

// Wait returns the storm's result; it fails the test on dial errors, since a
// failed dial may or may not have produced events.
func (s *storm) Wait() *proctest.StormResult {
	s.t.Helper()
	if s.res != nil {
		return s.res
	}
	r, err := s.st.Wait(2 * time.Minute)
	if err != nil {
		s.t.Fatal(err)
	}
	if r.Errors > 0 {
		s.t.Errorf("storm: %d dials failed (last: %s); the expected set is not exact", r.Errors, r.LastEr)
	}
	s.res = r
	return r
}

// ---------------------------------------------------------------------------
// Expected and received flows.

// flowKey is (direction, src, sport, dst, dport).
func flowKey(dir schema.Direction, src netip.Addr, sport uint16, dst netip.Addr, dport uint16) string {
	return fmt.Sprintf("%s %s %d %s %d", dir, src.Unmap(), sport, dst.Unmap(), dport)
}

// multiset of flow keys with a checksum: count and sum of FNV-64a hashes
// (a sum, not a xor, so that a tuple seen twice does not cancel out).
type multiset struct {
	m     map[string]int
	n     int
	check uint64
}

func newMultiset() *multiset { return &multiset{m: map[string]int{}} }

func (s *multiset) add(k string) {
	s.m[k]++
	s.n++
	h := fnv.New64a()
	h.Write([]byte(k))
	s.check += h.Sum64()
}

// addStorm adds the 2 events (outgoing, incoming) of every storm connection.
func (s *multiset) addStorm(r *proctest.StormResult) {
	srv := netip.MustParseAddrPort(r.Server)
	for _, p := range r.Ports {
		for _, d := range []schema.Direction{schema.Outgoing, schema.Incoming} {
			s.add(flowKey(d, srv.Addr(), p, srv.Addr(), srv.Port()))
		}
	}
}

func (s *multiset) addConns(conns []cgrouptest.Conn) {
	for _, c := range conns {
		cl, sv := netip.MustParseAddrPort(c.Client), netip.MustParseAddrPort(c.Server)
		for _, d := range []schema.Direction{schema.Outgoing, schema.Incoming} {
			s.add(flowKey(d, cl.Addr(), cl.Port(), sv.Addr(), sv.Port()))
		}
	}
}

// diff returns how many of want are missing from s and how many in s are
// beyond want, with a few examples.
func (s *multiset) diff(want *multiset) (missing, extra int, examples []string) {
	for k, w := range want.m {
		if g := s.m[k]; g < w {
			missing += w - g
			if len(examples) < 5 {
				examples = append(examples, fmt.Sprintf("missing %dx %s", w-g, k))
			}
		}
	}
	for k, g := range s.m {
		if w := want.m[k]; g > w {
			extra += g - w
			if len(examples) < 10 {
				examples = append(examples, fmt.Sprintf("extra %dx %s", g-w, k))
			}
		}
	}
	sort.Strings(examples)
	return missing, extra, examples
}

// streamBatch is one message of the stream.
type streamBatch struct {
	Seq     uint64
	Subject string
	MsgID   string
	B       schema.Batch
}

// streamEndBatch is one end batch (net_flow_tcp_end) of the stream.
type streamEndBatch struct {
	Seq     uint64
	Subject string
	MsgID   string
	B       schema.EndBatch
}

// streamContent is what a consumer sees in the stream.
type streamContent struct {
	Batches   []streamBatch
	Flows     *multiset
	Drops     schema.Drops // summed over every begin batch
	DupMsgIDs []string     // message ids held more than once
	DupRunSeq int          // (run, seq) pairs held more than once
	BadIDs    []string     // message id not host.run.seq of its batch
	ChainGaps int          // batches whose prev_seq is not in the stream

	// End batches, accounted on their own. Their seqs come from the run's
	// one counter (shared with begins, so a run's message ids never
	// collide), but their prev_seq chain is their own per direction: it
	// names the previous end batch of the same run and direction.
	EndBatches    []streamEndBatch
	Ends          *multiset
	EndDrops      schema.Drops // summed over every end batch
	EndDupMsgIDs  []string     // end message ids held more than once
	EndDupRunSeq  int          // (run, seq) pairs held by more than one end batch
	EndBadIDs     []string     // message id not host.run.seq of its end batch
	EndChainGaps  int          // end batches whose prev_seq names no end batch of their run and direction
	EndChainHeads int          // (run, direction) end chains without exactly one first batch (prev_seq 0)
	EndBackwards  []string     // ends whose begin_ns is after their end_ns
	SharedSeqs    int          // (run, seq) held by both a begin and an end batch
	BadEndSubject []string     // end batches on another subject than EndSubject of their host and direction

	// Timestamps by flow key: of each begin, and the begin_ns of each end,
	// to pair every end with its own begin.
	BeginTs, EndBeginTs map[string][]int64
}

// eventually retries f every 200 ms until it succeeds, failing the test
// with what and the last error once ctx is done.
func eventually[T any](t *testing.T, ctx context.Context, what string, f func() (T, error)) T {
	t.Helper()
	for {
		v, err := f()
		if err == nil {
			return v
		}
		if ctx.Err() != nil {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// runSeq is a batch's (run, seq): unique per run across kinds and directions.
type runSeq struct {
	run string
	seq uint64
}

// readAll reads the whole stream with an ordered consumer up to its last
// sequence at the time of the call.
func readAll(t *testing.T, url, stream string, opts ...nats.Option) *streamContent {
	t.Helper()
	nc := natsConnect(t, url, opts...)
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// Right after a node's death the cluster may answer "no responders" or
	// time out for a moment: retry within the deadline.
	st := eventually(t, ctx, "stream "+stream, func() (jetstream.Stream, error) { return js.Stream(ctx, stream) })
	info := eventually(t, ctx, "stream "+stream+" info", func() (*jetstream.StreamInfo, error) { return st.Info(ctx) })
	c := &streamContent{Flows: newMultiset(), Ends: newMultiset(), BeginTs: map[string][]int64{}, EndBeginTs: map[string][]int64{}}
	last := info.State.LastSeq
	if info.State.Msgs == 0 {
		return c
	}
	cons := eventually(t, ctx, "stream "+stream+" consumer", func() (jetstream.Consumer, error) {
		return st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverAllPolicy})
	})
	ids := map[string]int{}
	runSeqs := map[runSeq]int{}
	endIDs := map[string]int{}
	endRunSeqs := map[runSeq]int{}
	var got uint64
	for got < last {
		if ctx.Err() != nil {
			t.Fatalf("reading stream %s: at seq %d of %d after 60s", stream, got, last)
		}
		msgs, err := cons.Fetch(1000, jetstream.FetchMaxWait(time.Second))
		if err != nil {
			time.Sleep(200 * time.Millisecond) // transient; the deadline above bounds it
			continue
		}
		for m := range msgs.Messages() {
			md, err := m.Metadata()
			if err != nil {
				t.Fatal(err)
			}
			got = md.Sequence.Stream
			if schema.SubjectKind(m.Subject(), "") == schema.KindEnd {
				eb := streamEndBatch{Seq: got, Subject: m.Subject(), MsgID: m.Headers().Get(schema.HeaderMsgID)}
				if err := schema.DecodeEndBatch(m.Data(), &eb.B); err != nil {
					t.Fatalf("stream seq %d on %s: %v", got, m.Subject(), err)
				}
				c.addEnd(&eb, endIDs, endRunSeqs)
				continue
			}
			sb := streamBatch{Seq: got, Subject: m.Subject(), MsgID: m.Headers().Get(schema.HeaderMsgID)}
			if err := schema.DecodeBatch(m.Data(), &sb.B); err != nil {
				t.Fatalf("stream seq %d on %s: %v", got, m.Subject(), err)
			}
			c.Batches = append(c.Batches, sb)
			ids[sb.MsgID]++
			runSeqs[runSeq{sb.B.RunID, sb.B.Seq}]++
			if want := schema.MsgID(sb.B.Host, sb.B.RunID, sb.B.Seq); sb.MsgID != want {
				c.BadIDs = append(c.BadIDs, sb.MsgID+" != "+want)
			}
			d := &c.Drops
			d.Kernel += sb.B.Drops.Kernel
			d.Reader += sb.B.Drops.Reader
			d.Queue += sb.B.Drops.Queue
			d.Spool += sb.B.Drops.Spool
			d.Publish += sb.B.Drops.Publish
			for _, ev := range sb.B.Events {
				k := flowKey(ev.Direction, ev.Src, ev.SrcPort, ev.Dst, ev.DstPort)
				c.Flows.add(k)
				c.BeginTs[k] = append(c.BeginTs[k], ev.Timestamp)
			}
		}
		// Right after a cluster node's death a fetch can also end with "no
		// responders" while the consumer's new leader is elected: the next
		// fetch resumes after the last message read (ordered consumer).
		if err := msgs.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) && !errors.Is(err, nats.ErrNoResponders) {
			t.Fatal(err)
		}
	}
	for id, n := range ids {
		if n > 1 {
			c.DupMsgIDs = append(c.DupMsgIDs, id)
		}
	}
	for _, n := range runSeqs {
		if n > 1 {
			c.DupRunSeq++
		}
	}
	// prev_seq chains batches of one direction within a run.
	for _, b := range c.Batches {
		if b.B.PrevSeq != 0 && runSeqs[runSeq{b.B.RunID, b.B.PrevSeq}] == 0 {
			c.ChainGaps++
		}
	}
	c.finishEnds(endIDs, endRunSeqs)
	for rs := range endRunSeqs {
		if runSeqs[rs] > 0 {
			c.SharedSeqs++
		}
	}
	return c
}

// addEnd accounts one end batch: its ids and its events.
func (c *streamContent) addEnd(eb *streamEndBatch, ids map[string]int, runSeqs map[runSeq]int) {
	b := &eb.B
	c.EndBatches = append(c.EndBatches, *eb)
	ids[eb.MsgID]++
	runSeqs[runSeq{b.RunID, b.Seq}]++
	if want := schema.MsgID(b.Host, b.RunID, b.Seq); eb.MsgID != want {
		c.EndBadIDs = append(c.EndBadIDs, eb.MsgID+" != "+want)
	}
	if err := schema.CheckEndSubject(eb.Subject, "", b.Host, b.Direction); err != nil {
		c.BadEndSubject = append(c.BadEndSubject, eb.Subject)
	}
	c.EndDrops.Add(b.Drops)
	for i := range b.Events {
		ev := &b.Events[i]
		k := flowKey(ev.Direction, ev.Src, ev.SrcPort, ev.Dst, ev.DstPort)
		c.Ends.add(k)
		c.EndBeginTs[k] = append(c.EndBeginTs[k], ev.BeginNs)
		if ev.BeginNs > ev.EndNs {
			c.EndBackwards = append(c.EndBackwards, fmt.Sprintf("%s begin_ns %d > end_ns %d", k, ev.BeginNs, ev.EndNs))
		}
	}
}

// finishEnds counts the duplicates and the chain breaks of the end batches.
func (c *streamContent) finishEnds(ids map[string]int, runSeqs map[runSeq]int) {
	for id, n := range ids {
		if n > 1 {
			c.EndDupMsgIDs = append(c.EndDupMsgIDs, id)
		}
	}
	for _, n := range runSeqs {
		if n > 1 {
			c.EndDupRunSeq++
		}
	}
	type chainSeq struct {
		run string
		dir schema.Direction
		seq uint64
	}
	type chain struct {
		run string
		dir schema.Direction
	}
	seqs := map[chainSeq]bool{}
	heads := map[chain]int{}
	for i := range c.EndBatches {
		b := &c.EndBatches[i].B
		seqs[chainSeq{b.RunID, b.Direction, b.Seq}] = true
		heads[chain{b.RunID, b.Direction}] += 0
	}
	for i := range c.EndBatches {
		b := &c.EndBatches[i].B
		if b.PrevSeq == 0 {
			heads[chain{b.RunID, b.Direction}]++
		} else if !seqs[chainSeq{b.RunID, b.Direction, b.PrevSeq}] {
			c.EndChainGaps++
		}
	}
	for _, n := range heads {
		if n != 1 {
			c.EndChainHeads++
		}
	}
}

// endBeginMismatch counts the ends whose begin_ns is not the timestamp of
// a begin of their flow key, pairing a key's begins and ends in time order
// (a storm reuses client ports); keys with as many ends as begins only. The
// two come from one kernel clock read, converted to wall time by an offset
// the agent refreshes, hence the tolerance.
func (c *streamContent) endBeginMismatch(tol time.Duration) (n int, examples []string) {
	for k, ends := range c.EndBeginTs {
		begins := c.BeginTs[k]
		if len(begins) != len(ends) {
			continue
		}
		b := append([]int64(nil), begins...)
		e := append([]int64(nil), ends...)
		sort.Slice(b, func(i, j int) bool { return b[i] < b[j] })
		sort.Slice(e, func(i, j int) bool { return e[i] < e[j] })
		for i := range b {
			if d := time.Duration(e[i] - b[i]); d > tol || d < -tol {
				n++
				if len(examples) < 3 {
					examples = append(examples, fmt.Sprintf("%s: begin at %d, its end says begin_ns %d", k, b[i], e[i]))
				}
			}
		}
	}
	return n, examples
}

// waitStream reads the stream until its batches hold at least want events,
// or d passes, and returns the last reading.
func waitStream(t *testing.T, url, stream string, want int, d time.Duration, opts ...nats.Option) *streamContent {
	t.Helper()
	return waitStreamEnds(t, url, stream, want, 0, d, opts...)
}

// waitStreamEnds is waitStream for begins and ends: it waits until the
// stream holds at least want begins and wantEnds ends. An end is published
// when its connection closes, after its begin, so the begins alone do not
// say the stream is complete.
func waitStreamEnds(t *testing.T, url, stream string, want, wantEnds int, d time.Duration, opts ...nats.Option) *streamContent {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		c := readAll(t, url, stream, opts...)
		if (c.Flows.n >= want && c.Ends.n >= wantEnds) || time.Now().After(deadline) {
			return c
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// checkExact compares the stream with the expected flows.
func checkExact(t *testing.T, what string, got *streamContent, want *multiset) {
	t.Helper()
	missing, extra, ex := got.Flows.diff(want)
	t.Logf("%s: expected %d events (checksum %016x), stream holds %d events (checksum %016x) in %d batches; missing %d, extra %d, duplicate msg ids %d",
		what, want.n, want.check, got.Flows.n, got.Flows.check, len(got.Batches), missing, extra, len(got.DupMsgIDs))
	if missing != 0 || extra != 0 || got.Flows.n != want.n || got.Flows.check != want.check {
		t.Errorf("%s: stream differs from the connections made: %d missing, %d extra:\n  %s", what, missing, extra, strings.Join(ex, "\n  "))
	}
	if len(got.DupMsgIDs) > 0 || got.DupRunSeq > 0 {
		t.Errorf("%s: batches stored twice: %d message ids (e.g. %v), %d (run, seq) pairs", what, len(got.DupMsgIDs), first(got.DupMsgIDs, 3), got.DupRunSeq)
	}
	if len(got.BadIDs) > 0 {
		t.Errorf("%s: message ids not host.run.seq of their batch: %v", what, first(got.BadIDs, 3))
	}
}

// checkEnds compares the stream's ends with the expected flows (every
// connection's two, one per endpoint, as for begins) and checks their
// accounting: no end batch twice, ids host.run.seq, subjects of their host
// and direction, no seq shared with a begin batch, each end after its begin
// and naming its begin's timestamp. With whole, the end chains must also be
// whole (no gap, one first batch per run and direction).
func checkEnds(t *testing.T, what string, got *streamContent, want *multiset, whole bool) {
	t.Helper()
	missing, extra, ex := got.Ends.diff(want)
	mism, mex := got.endBeginMismatch(time.Millisecond)
	t.Logf("%s: expected %d ends (checksum %016x), stream holds %d ends (checksum %016x) in %d end batches; missing %d, extra %d, duplicate msg ids %d, end chain gaps %d, ends not naming their begin %d",
		what, want.n, want.check, got.Ends.n, got.Ends.check, len(got.EndBatches), missing, extra, len(got.EndDupMsgIDs), got.EndChainGaps, mism)
	if missing != 0 || extra != 0 || got.Ends.n != want.n || got.Ends.check != want.check {
		t.Errorf("%s: ends differ from the connections made: %d missing, %d extra:\n  %s", what, missing, extra, strings.Join(ex, "\n  "))
	}
	if len(got.EndDupMsgIDs) > 0 || got.EndDupRunSeq > 0 {
		t.Errorf("%s: end batches stored twice: %d message ids (e.g. %v), %d (run, seq) pairs", what, len(got.EndDupMsgIDs), first(got.EndDupMsgIDs, 3), got.EndDupRunSeq)
	}
	if len(got.EndBadIDs) > 0 || len(got.BadEndSubject) > 0 {
		t.Errorf("%s: end batches with a message id not host.run.seq (%v) or on a subject not theirs (%v)", what, first(got.EndBadIDs, 3), first(got.BadEndSubject, 3))
	}
	if got.SharedSeqs > 0 {
		t.Errorf("%s: %d (run, seq) pairs held by both a begin and an end batch: the kinds must share the run's seq counter", what, got.SharedSeqs)
	}
	if len(got.EndBackwards) > 0 {
		t.Errorf("%s: %d ends with begin_ns after end_ns, e.g. %v", what, len(got.EndBackwards), first(got.EndBackwards, 3))
	}
	if mism > 0 {
		t.Errorf("%s: %d ends whose begin_ns is not their begin's timestamp (within 1 ms), e.g. %v", what, mism, mex)
	}
	if whole && (got.EndChainGaps != 0 || got.EndChainHeads != 0) {
		t.Errorf("%s: end chains broken: %d end batches with a prev_seq the stream does not hold, %d (run, direction) chains without exactly one first batch", what, got.EndChainGaps, got.EndChainHeads)
	}
}

func first(s []string, n int) []string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// ---------------------------------------------------------------------------
// TLS material.

type pki struct {
	dir  string
	n    int
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	// CAFile is the CA certificate in PEM.
	CAFile string
}

func newCA(t *testing.T, dir, name string) *pki {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	p := &pki{dir: dir, n: 1, cert: cert, key: key, CAFile: filepath.Join(dir, name+"-ca.pem")}
	writePEM(t, p.CAFile, "CERTIFICATE", der)
	return p
}

// issue makes a leaf certificate (server: IP SAN 127.0.0.1) and returns the
// certificate and key files.
func (p *pki) issue(t *testing.T, name string, server bool) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p.n++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(int64(p.n)),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		tmpl.DNSNames = []string{"localhost"}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.cert, &key.PublicKey, p.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile = filepath.Join(p.dir, name+".pem")
	keyFile = filepath.Join(p.dir, name+"-key.pem")
	writePEM(t, certFile, "CERTIFICATE", der)
	writePEM(t, keyFile, "EC PRIVATE KEY", kder)
	return certFile, keyFile
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// pollMetrics is WaitMetrics that reports instead of failing: it returns the
// last metrics and whether cond held within d.
func (a *agentProc) pollMetrics(d time.Duration, every time.Duration, cond func(m map[string]float64) bool) (map[string]float64, bool) {
	deadline := time.Now().Add(d)
	var last map[string]float64
	for time.Now().Before(deadline) {
		select {
		case <-a.Exited():
			return last, false
		default:
		}
		if m, err := a.Metrics(); err == nil {
			last = m
			if cond(m) {
				return m, true
			}
		}
		time.Sleep(every)
	}
	return last, false
}

// spoolDrained: connected, the spool empty and nothing pending (for a run
// that only replays an earlier run's spool and captures nothing itself).
func spoolDrained(m map[string]float64) bool {
	return m[mReady] == 1 && m[mPending] == 0 && m[mSpoolBatches] == 0
}

// spoolContent is what a dead agent left in its spool directory.
type spoolContent struct {
	Entries    []*spool.Entry
	Batches    []schema.Batch
	Flows      *multiset
	EndBatches []schema.EndBatch
	Ends       *multiset
	Bytes      int64
	Corrupt    int
}

// readSpool opens the spool directory as the next run would and decodes
// every batch in it. The agent owning it must be dead.
func readSpool(t *testing.T, dir string) *spoolContent {
	t.Helper()
	sp, err := spool.Open(dir, 1<<40)
	if err != nil {
		t.Fatal(err)
	}
	es, err := sp.Peek(sp.Len(), func(string) bool { return false })
	if err != nil {
		t.Fatalf("reading the spool: %v", err)
	}
	c := &spoolContent{Entries: es, Flows: newMultiset(), Ends: newMultiset(), Bytes: sp.Bytes(), Corrupt: sp.Corrupt()}
	for _, e := range es {
		if schema.SubjectKind(e.Subject, "") == schema.KindEnd {
			var b schema.EndBatch
			if err := schema.DecodeEndBatch(e.Data, &b); err != nil {
				t.Fatalf("spool file %s (end batch): %v", e.Name, err)
			}
			if want := schema.MsgID(b.Host, b.RunID, b.Seq); e.MsgID != want {
				t.Errorf("spool file %s: message id %s, want %s", e.Name, e.MsgID, want)
			}
			for _, ev := range b.Events {
				c.Ends.add(flowKey(ev.Direction, ev.Src, ev.SrcPort, ev.Dst, ev.DstPort))
			}
			c.EndBatches = append(c.EndBatches, b)
			continue
		}
		var b schema.Batch
		if err := schema.DecodeBatch(e.Data, &b); err != nil {
			t.Fatalf("spool file %s: %v", e.Name, err)
		}
		if want := schema.MsgID(b.Host, b.RunID, b.Seq); e.MsgID != want {
			t.Errorf("spool file %s: message id %s, want %s", e.Name, e.MsgID, want)
		}
		for _, ev := range b.Events {
			c.Flows.add(flowKey(ev.Direction, ev.Src, ev.SrcPort, ev.Dst, ev.DstPort))
		}
		c.Batches = append(c.Batches, b)
	}
	return c
}

// defaultStream is the stream the agent creates with its default settings,
// for tests that need it before the agent runs.
func defaultStream(t *testing.T, nc *nats.Conn, replicas int) jetstream.JetStream {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		_, err = publisher.EnsureStream(ctx, js, publisher.StreamSettings{
			Name: "FLOWS", Prefix: "flows", MaxAge: 24 * time.Hour, MaxBytes: 1 << 30,
			Replicas: replicas, Storage: jetstream.FileStorage, Duplicates: 2 * time.Minute,
		})
		if err == nil {
			return js
		}
		if ctx.Err() != nil {
			t.Fatalf("creating stream FLOWS: %v", err)
		}
		time.Sleep(250 * time.Millisecond) // JetStream may still be electing its leaders
	}
}

// endsOutOfOrder is outOfOrder for end batches.
func endsOutOfOrder(bs []streamEndBatch, skip map[string]bool) int {
	return seqInversions(bs, skip, func(b *streamEndBatch) (string, string, schema.Direction, uint64) {
		return b.MsgID, b.B.RunID, b.B.Direction, b.B.Seq
	})
}

// outOfOrder counts, per run and direction, the batches stored after a
// batch of the same run and direction with a higher sequence number.
func outOfOrder(bs []streamBatch, skip map[string]bool) int {
	return seqInversions(bs, skip, func(b *streamBatch) (string, string, schema.Direction, uint64) {
		return b.MsgID, b.B.RunID, b.B.Direction, b.B.Seq
	})
}

// seqInversions is outOfOrder for either kind of batch: ref gives a batch's
// message id, run, direction and seq; batches whose id is in skip are left out.
func seqInversions[B any](bs []B, skip map[string]bool, ref func(*B) (string, string, schema.Direction, uint64)) int {
	type key struct {
		run string
		dir schema.Direction
	}
	last := map[key]uint64{}
	n := 0
	for i := range bs {
		id, run, dir, seq := ref(&bs[i])
		if skip[id] {
			continue
		}
		k := key{run, dir}
		if seq < last[k] {
			n++
		}
		last[k] = max(last[k], seq)
	}
	return n
}

// newCluster starts n nats-server processes routed into one JetStream
// cluster and waits until JetStream answers.
func newCluster(t *testing.T, n int) []*natsProc {
	t.Helper()
	ports := make([]int, n)
	for i := range ports {
		ports[i] = freePort(t)
	}
	nodes := make([]*natsProc, n)
	for i := range nodes {
		nodes[i] = newNATS(t, proctest.NATSOptions{Name: fmt.Sprintf("n%d", i+1), ClusterPort: ports[i], Routes: ports, Monitor: true})
	}
	for _, s := range nodes {
		s.Start()
	}
	nc := natsConnect(t, clusterURL(nodes))
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := js.AccountInfo(ctx)
		cancel()
		if err == nil {
			return nodes
		}
		if time.Now().After(deadline) {
			t.Fatalf("JetStream cluster of %d nodes not ready after 60s: %v", n, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// clusterURL is the comma-separated URLs of nodes.
func clusterURL(nodes []*natsProc) string {
	var u []string
	for _, s := range nodes {
		u = append(u, s.URL())
	}
	return strings.Join(u, ",")
}

// streamCluster returns the stream's leader and replicas as one client sees
// them ("" while there is no leader).
func streamCluster(js jetstream.JetStream, name string) (leader string, replicas int, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st, err := js.Stream(ctx, name)
	if err != nil {
		return "", 0, err
	}
	info := st.CachedInfo()
	if info.Cluster == nil {
		return "", info.Config.Replicas, nil
	}
	return info.Cluster.Leader, info.Config.Replicas, nil
}

// moveStreamLeader makes server name the stream's leader (a step-down with a
// preferred successor) and waits until the cluster agrees.
func moveStreamLeader(t *testing.T, nc *nats.Conn, js jetstream.JetStream, stream, name string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		leader, _, err := streamCluster(js, stream)
		if err == nil && leader == name {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("stream %s: leader %q, could not move it to %s: %v", stream, leader, name, err)
		}
		if err == nil && leader != "" {
			req := fmt.Sprintf(`{"placement":{"preferred":%q}}`, name)
			if _, err := nc.Request("$JS.API.STREAM.LEADER.STEPDOWN."+stream, []byte(req), 5*time.Second); err != nil {
				t.Logf("stream leader step-down: %v", err)
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// exitLine waits for an agent that must refuse to run and returns the one
// line it printed; it fails the test unless the agent exited non-zero with
// exactly one line.
func exitLine(t *testing.T, a *agentProc) string {
	t.Helper()
	code := a.Wait(30 * time.Second)
	out := strings.TrimSpace(a.Log())
	if code <= 0 {
		t.Fatalf("agent %s: exit status %d, want non-zero; output:\n%s", a.name, code, out)
	}
	if lines := strings.Split(out, "\n"); len(lines) != 1 {
		t.Errorf("agent %s: %d lines of output, want one naming the problem and the fix:\n%s", a.name, len(lines), out)
	}
	return out
}

// waitFileContains waits up to d for the file to contain s.
func waitFileContains(path string, d time.Duration, s string) bool {
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if b, _ := os.ReadFile(path); bytes.Contains(b, []byte(s)) {
			return true
		}
	}
	return false
}

// nkeyOption authenticates a test client with an NKey seed file.
func nkeyOption(t *testing.T, seedFile string) nats.Option {
	t.Helper()
	o, err := nats.NkeyOptionFromSeed(seedFile)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// countSpoolFiles counts the batches in a spool directory (cheaply, while
// an agent uses it).
func countSpoolFiles(t *testing.T, dir string) int {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, de := range des {
		if strings.HasSuffix(de.Name(), ".batch") {
			n++
		}
	}
	return n
}
