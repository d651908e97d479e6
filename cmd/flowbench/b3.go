package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/flowbus/flowbus/cmd/internal/proctest"
	"github.com/flowbus/flowbus/publisher"
	"github.com/flowbus/flowbus/schema"
)

const (
	b3Stream      = "FLOWS"
	b3BenchStream = "benchstream"
	b3BenchSubj   = "flowbench.b3"
	b3StreamBytes = 4 << 30 // per leg, purged between legs
)

// b3Leg is one side of a B3 pair.
type b3Leg struct {
	Seconds       float64 `json:"seconds"`
	Events        uint64  `json:"events_acked,omitempty"`
	Batches       uint64  `json:"batches_acked,omitempty"`
	Bytes         float64 `json:"bytes"`
	EventsPerSec  float64 `json:"events_per_s,omitempty"`
	BytesPerSec   float64 `json:"bytes_per_s"`
	MsgsPerSec    float64 `json:"msgs_per_s"`
	MsgSize       int     `json:"msg_size"`
	Drops         uint64  `json:"drops,omitempty"`
	PublishErrors uint64  `json:"publish_errors,omitempty"`
	Stalls        int     `json:"stalls,omitempty"` // times Add waited for the queue to drain
	ServerCPU     float64 `json:"server_cores"`     // nats-server user+sys / wall
	ClientCPU     float64 `json:"client_cores"`     // publishing process user+sys / wall
	// OtherCPU is the rest of the machine's busy CPU during the leg: other
	// work on a shared host competing with the two above.
	OtherCPU float64   `json:"other_cores"`
	Info     string    `json:"info,omitempty"`
	Start    time.Time `json:"start"`
}

// b3Pair is one A (ours) B (nats bench) pair.
type b3Pair struct {
	Ours   b3Leg   `json:"ours"`
	Theirs b3Leg   `json:"theirs"`
	Ratio  float64 `json:"bytes_ratio"`
}

// runB3 pushes synthetic events through the publisher into a file-backed R1
// stream of a standalone nats-server and compares its bytes/s with `nats
// bench js pub async` at the same message size, alternating the two.
func runB3(ctx context.Context, modRoot, tmp string, p Params, progress func(string, ...any)) []Row {
	evRow := Row{ID: "B3", What: "publish pipeline events/s (acked)", Figures: "n/a", Target: ">= 2,000,000 events/s", Met: "n/a"}
	byRow := Row{ID: "B3", What: "publish bytes/s ÷ nats bench js pub async", Figures: "n/a", Target: ">= 0.8", Met: "n/a"}
	fail := func(err error) []Row {
		evRow.Note, byRow.Note = err.Error(), err.Error()
		return []Row{evRow, byRow}
	}
	srvBin, srvVer, err := ensureNATSServer(ctx, modRoot)
	if err != nil {
		return fail(err)
	}
	// The reference: the real nats CLI if it builds, else the same loop in
	// process, clearly labelled.
	refName := "nats bench js pub async (natscli " + natscliVersion + ")"
	natsCLI, cliErr := ensureNATSCLI(ctx, tmp)
	if cliErr != nil {
		refName = "equivalent of nats bench js pub async (in-process jetstream PublishAsync, batch 500; natscli unavailable)"
		progress("B3: natscli did not build (%v): using %s", cliErr, refName)
	}
	srv, err := startNATSServer(ctx, srvBin, tmp)
	if err != nil {
		return fail(err)
	}
	defer srv.Stop()
	nc, err := nats.Connect(srv.URL(), nats.Name("flowbench-b3-admin"))
	if err != nil {
		return fail(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return fail(err)
	}
	// The stream as the agent manages it (README defaults), with a larger
	// byte bound so that no leg discards: legs are purged in between.
	if _, err := publisher.EnsureStream(ctx, js, publisher.StreamSettings{
		Name: b3Stream, Prefix: "flows", MaxAge: 24 * time.Hour, MaxBytes: b3StreamBytes,
		Replicas: 1, Storage: jetstream.FileStorage, Duplicates: 2 * time.Minute,
	}); err != nil {
		return fail(err)
	}
	evs := syntheticEvents(8192)
	progress("B3: nats-server %s (pid %d, file storage, R1) at %s; %d pairs of %g s legs; events: %s; reference: %s",
		srvVer, srv.Pid(), srv.Addr(), p.B3Pairs, p.B3Seconds, describeEvents(evs), refName)

	purge := func(name string) {
		pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if s, err := js.Stream(pctx, name); err == nil {
			_ = s.Purge(pctx)
		}
	}
	var pairs []b3Pair
	var refBps float64
	for i := 0; i < p.B3Pairs && ctx.Err() == nil; i++ {
		var pr b3Pair
		sys0, _ := proctest.SysBusy()
		pr.Ours, err = b3Ours(ctx, srv, evs, p.B3Seconds, i)
		pr.Ours.OtherCPU = otherCores(sys0, pr.Ours)
		purge(b3Stream)
		if err != nil {
			return fail(fmt.Errorf("pair %d ours: %w", i+1, err))
		}
		size := pr.Ours.MsgSize
		if refBps == 0 {
			refBps = pr.Ours.BytesPerSec * 1.5
		}
		msgs := int(refBps * p.B3Seconds / float64(size))
		msgs = max(1000, min(msgs, int(0.75*float64(b3StreamBytes)/float64(size))))
		sys0, _ = proctest.SysBusy()
		if cliErr == nil {
			pr.Theirs, err = b3NatsBench(ctx, natsCLI, srv, size, msgs, p.B3Seconds)
		} else {
			pr.Theirs, err = b3Equivalent(ctx, srv, size, p.B3Seconds)
		}
		pr.Theirs.OtherCPU = otherCores(sys0, pr.Theirs)
		purge(b3BenchStream)
		if err != nil {
			return fail(fmt.Errorf("pair %d reference: %w", i+1, err))
		}
		refBps = pr.Theirs.BytesPerSec
		if pr.Theirs.BytesPerSec > 0 {
			pr.Ratio = pr.Ours.BytesPerSec / pr.Theirs.BytesPerSec
		}
		pairs = append(pairs, pr)
		progress("B3 pair %d/%d: ours %.0f events/s, %.1f MiB/s (%d B batches, %.0f batches/s, drops %d, stalls %d; cores: server %.2f, us %.2f, other %.2f) vs reference %.1f MiB/s (%.0f msgs/s of %d B; cores: server %.2f, nats %.2f, other %.2f) = %.3f",
			i+1, p.B3Pairs, pr.Ours.EventsPerSec, pr.Ours.BytesPerSec/(1<<20), size, pr.Ours.MsgsPerSec, pr.Ours.Drops, pr.Ours.Stalls, pr.Ours.ServerCPU, pr.Ours.ClientCPU, pr.Ours.OtherCPU,
			pr.Theirs.BytesPerSec/(1<<20), pr.Theirs.MsgsPerSec, pr.Theirs.MsgSize, pr.Theirs.ServerCPU, pr.Theirs.ClientCPU, pr.Theirs.OtherCPU, pr.Ratio)
	}
	if len(pairs) == 0 {
		return fail(errors.New("no pairs"))
	}
	var eps, bps, rbps, ratio, sizes, drops, other []float64
	for _, pr := range pairs {
		other = append(other, pr.Ours.OtherCPU, pr.Theirs.OtherCPU)
		eps, bps, rbps = append(eps, pr.Ours.EventsPerSec), append(bps, pr.Ours.BytesPerSec), append(rbps, pr.Theirs.BytesPerSec)
		ratio, sizes, drops = append(ratio, pr.Ratio), append(sizes, float64(pr.Ours.MsgSize)), append(drops, float64(pr.Ours.Drops))
	}
	me, mr := median(eps), median(ratio)
	evRow.Figures = fmt.Sprintf("%.0f events/s (median of %d legs of %g s, min %.0f max %.0f; %.1f MiB/s, %.0f B/batch ≈ %.1f B/event, 1 goroutine)",
		me, len(pairs), p.B3Seconds, minOf(eps), maxOf(eps), median(bps)/(1<<20), median(sizes), median(bps)/me)
	evRow.Met = metStr(me >= 2_000_000)
	byRow.Figures = fmt.Sprintf("%.3f (%d pairs, min %.3f max %.3f; %.1f vs %.1f MiB/s at %.0f B messages)",
		mr, len(pairs), minOf(ratio), maxOf(ratio), median(bps)/(1<<20), median(rbps)/(1<<20), median(sizes))
	byRow.Met = metStr(mr >= 0.8)
	if cliErr != nil {
		byRow.What = "publish bytes/s ÷ equivalent of nats bench js pub async"
		byRow.Note = "natscli unavailable: " + cliErr.Error()
	}
	if maxOf(drops) > 0 {
		evRow.Note = fmt.Sprintf("publisher dropped up to %.0f events in a leg", maxOf(drops))
	}
	if mo := median(other); mo > 0.25 {
		// Say so when the shared host was busy with other work: both sides
		// then ran on less than 2 cores.
		note := fmt.Sprintf("host busy: median %.2f cores used outside the server and client (other jobs, kernel writeback)", mo)
		byRow.Note = strings.TrimPrefix(byRow.Note+"; "+note, "; ")
		evRow.Note = strings.TrimPrefix(evRow.Note+"; "+note, "; ")
	}
	data := map[string]any{
		"nats_server": srvVer, "storage": "file", "replicas": 1, "reference": refName,
		"median_events_per_s": me, "median_bytes_per_s": median(bps), "median_ref_bytes_per_s": median(rbps),
		"median_ratio": mr, "median_batch_bytes": median(sizes), "median_other_cores": median(other), "events": describeEvents(evs), "pairs": pairs,
	}
	evRow.Data, byRow.Data = data, map[string]any{"median_ratio": mr}
	return []Row{evRow, byRow}
}

// b3Ours pushes events through publisher.Add from one goroutine for the
// given time and waits for the acks. Add never blocks and drops whole batches
// past its queue bound, so the loop pauses while the queue is 3/4 full: the
// figure is then what is acked, not what is dropped.
func b3Ours(ctx context.Context, srv *natsServerProc, evs []schema.Event, seconds float64, leg int) (b3Leg, error) {
	var l b3Leg
	nc, err := nats.Connect(srv.URL(), nats.Name("flowbench-b3-ours"))
	if err != nil {
		return l, err
	}
	defer nc.Close()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	cfg := publisher.Config{Prefix: "flows", Host: "bench", RunID: fmt.Sprintf("b3-%d-%d", time.Now().Unix(), leg)}
	pub, err := publisher.New(nc, cfg, log)
	if err != nil {
		return l, err
	}
	queueBytes := publisher.DefaultQueueBytes
	srvW, err := proctest.WatchProc(srv.Pid())
	if err != nil {
		return l, err
	}
	selfW, err := proctest.WatchProc(os.Getpid())
	if err != nil {
		return l, err
	}
	l.Start = time.Now()
	deadline := l.Start.Add(time.Duration(seconds * float64(time.Second)))
	mask := len(evs) - 1 // a power of two
	n := 0
	ts := time.Now().UnixNano()
	for ctx.Err() == nil {
		for k := 0; k < 1024; k++ {
			ev := &evs[n&mask]
			ev.Timestamp = ts + int64(n)*100
			ev.SrcPort = uint16(32768 + n%28232)
			pub.Add(ev)
			n++
		}
		now := time.Now()
		if now.After(deadline) {
			break
		}
		if pub.Stats().PendingBytes > queueBytes*3/4 {
			l.Stalls++
			for pub.Stats().PendingBytes > queueBytes/2 && time.Now().Before(deadline) {
				time.Sleep(100 * time.Microsecond)
			}
		}
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cerr := pub.Close(cctx)
	l.Seconds = time.Since(l.Start).Seconds()
	su, _ := srvW.End()
	cu, _ := selfW.End()
	l.ServerCPU, l.ClientCPU = su.Cores, cu.Cores
	st := pub.Stats()
	l.Events, l.Batches, l.Bytes = st.EventsAcked, st.BatchesAcked, float64(st.BytesAcked)
	l.Drops, l.PublishErrors = st.Drops.Total(), st.PublishErrors
	l.EventsPerSec = float64(st.EventsAcked) / l.Seconds
	l.BytesPerSec = l.Bytes / l.Seconds
	l.MsgsPerSec = float64(st.BatchesAcked) / l.Seconds
	if st.BatchesAcked > 0 {
		l.MsgSize = int(st.BytesAcked / st.BatchesAcked)
	}
	l.Info = fmt.Sprintf("%d events added", st.EventsIn)
	if cerr != nil {
		return l, cerr
	}
	if st.BatchesAcked == 0 {
		return l, errors.New("nothing acked")
	}
	return l, nil
}

var natsBenchRe = regexp.MustCompile(`stats: ([\d,.]+) msgs/sec ~ ([\d,.]+) ([KMG]i?B)/sec`)

// b3NatsBench runs `nats bench js pub async` against the server with msgs
// messages of size bytes (a count, not a time: sized to last about seconds).
func b3NatsBench(ctx context.Context, bin string, srv *natsServerProc, size, msgs int, seconds float64) (b3Leg, error) {
	l := b3Leg{MsgSize: size}
	ctx, cancel := context.WithTimeout(ctx, time.Duration(6*seconds*float64(time.Second))+30*time.Second)
	defer cancel()
	args := []string{"-s", srv.URL(), "bench", "js", "pub", "async", b3BenchSubj,
		"--stream", b3BenchStream, "--create", "--purge", "--storage", "file", "--replicas", "1",
		"--maxbytes", strconv.Itoa(b3StreamBytes), "--size", strconv.Itoa(size), "--msgs", strconv.Itoa(msgs), "--no-progress"}
	cmd := exec.CommandContext(ctx, bin, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	srvW, err := proctest.WatchProc(srv.Pid())
	if err != nil {
		return l, err
	}
	l.Start = time.Now()
	err = cmd.Run()
	l.Seconds = time.Since(l.Start).Seconds()
	su, _ := srvW.End()
	l.ServerCPU = su.Cores
	if cmd.ProcessState != nil {
		l.ClientCPU = (cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()).Seconds() / l.Seconds
	}
	if err != nil {
		return l, fmt.Errorf("nats %s: %w: %s", strings.Join(args[2:], " "), err, lastLine(out.String()))
	}
	m := natsBenchRe.FindStringSubmatch(out.String())
	if m == nil {
		return l, fmt.Errorf("no stats in nats bench output: %s", lastLine(out.String()))
	}
	rate, err := strconv.ParseFloat(strings.ReplaceAll(m[1], ",", ""), 64)
	if err != nil {
		return l, err
	}
	l.MsgsPerSec = rate
	l.BytesPerSec = rate * float64(size)
	l.Bytes = float64(msgs) * float64(size)
	l.Info = fmt.Sprintf("nats %s => %s msgs/s ~ %s %s/s", strings.Join(args[2:], " "), m[1], m[2], m[3])
	return l, nil
}

// b3Equivalent does what `nats bench js pub async` does, in process: fixed
// size messages published with PublishAsync in batches of 500, each batch's
// acks awaited before the next, for the given time.
func b3Equivalent(ctx context.Context, srv *natsServerProc, size int, seconds float64) (b3Leg, error) {
	l := b3Leg{MsgSize: size, Info: "equivalent of nats bench js pub async (in process)"}
	nc, err := nats.Connect(srv.URL(), nats.Name("flowbench-b3-reference"))
	if err != nil {
		return l, err
	}
	defer nc.Close()
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(500))
	if err != nil {
		return l, err
	}
	if _, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{Name: b3BenchStream, Subjects: []string{b3BenchSubj},
		Storage: jetstream.FileStorage, Replicas: 1, MaxBytes: b3StreamBytes}); err != nil {
		return l, err
	}
	payload := make([]byte, size)
	srvW, err := proctest.WatchProc(srv.Pid())
	if err != nil {
		return l, err
	}
	l.Start = time.Now()
	deadline := l.Start.Add(time.Duration(seconds * float64(time.Second)))
	var msgs int
	for time.Now().Before(deadline) && ctx.Err() == nil {
		for k := 0; k < 500; k++ {
			if _, err := js.PublishAsync(b3BenchSubj, payload); err != nil {
				return l, err
			}
		}
		select {
		case <-js.PublishAsyncComplete():
		case <-time.After(30 * time.Second):
			return l, errors.New("acks not received within 30 s")
		}
		msgs += 500
	}
	l.Seconds = time.Since(l.Start).Seconds()
	su, _ := srvW.End()
	l.ServerCPU = su.Cores
	l.Bytes = float64(msgs) * float64(size)
	l.MsgsPerSec = float64(msgs) / l.Seconds
	l.BytesPerSec = l.Bytes / l.Seconds
	return l, nil
}

// otherCores is the machine's busy CPU since sys0, per second of the leg,
// minus the leg's own server and client.
func otherCores(sys0 time.Duration, l b3Leg) float64 {
	sys1, err := proctest.SysBusy()
	if err != nil || sys0 == 0 || l.Seconds <= 0 {
		return 0
	}
	return max(0, (sys1-sys0).Seconds()/l.Seconds-l.ServerCPU-l.ClientCPU)
}
