package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/flowbus/flowbus/publisher"
	"github.com/flowbus/flowbus/schema"
)

// latSample is one event as a subscriber saw it.
type latSample struct {
	dstPort uint16
	lat     time.Duration // receive time - event timestamp (the SYN-ACK's wall clock)
}

// latRecorder decodes batches as they arrive and keeps each loopback event's
// latency.
type latRecorder struct {
	mu      sync.Mutex
	samples []latSample
	msgs    int
	bad     int
	batch   schema.Batch
}

var loopback4 = netip.AddrFrom4([4]byte{127, 0, 0, 1})

func (r *latRecorder) add(recv time.Time, data []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs++
	r.batch.Events = r.batch.Events[:0]
	if err := schema.DecodeBatch(data, &r.batch); err != nil {
		r.bad++
		return
	}
	now := recv.UnixNano()
	for i := range r.batch.Events {
		ev := &r.batch.Events[i]
		if ev.Src != loopback4 || ev.Dst != loopback4 {
			continue
		}
		r.samples = append(r.samples, latSample{dstPort: ev.DstPort, lat: time.Duration(now - ev.Timestamp)})
	}
}

// latStats are the quantiles of one view of the latency, in ms.
type latStats struct {
	N    int     `json:"n"`
	Min  float64 `json:"min_ms"`
	P50  float64 `json:"p50_ms"`
	P90  float64 `json:"p90_ms"`
	P99  float64 `json:"p99_ms"`
	Max  float64 `json:"max_ms"`
	Mean float64 `json:"mean_ms"`
}

func (r *latRecorder) stats(port uint16) latStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	var xs []float64
	for _, s := range r.samples {
		if s.dstPort == port {
			xs = append(xs, float64(s.lat)/float64(time.Millisecond))
		}
	}
	var st latStats
	if len(xs) == 0 {
		return st
	}
	sort.Float64s(xs)
	q := func(f float64) float64 { return xs[min(len(xs)-1, int(math.Ceil(f*float64(len(xs))))-1)] }
	var sum float64
	for _, x := range xs {
		sum += x
	}
	st = latStats{N: len(xs), Min: xs[0], P50: q(0.5), P90: q(0.9), P99: q(0.99), Max: xs[len(xs)-1], Mean: sum / float64(len(xs))}
	return st
}

func (s latStats) String() string {
	return fmt.Sprintf("p50 %.1f ms, p99 %.1f ms, max %.1f ms", s.P50, s.P99, s.Max)
}

// histQuantiles estimates quantiles of a Prometheus histogram from its
// cumulative buckets (linear inside a bucket, as histogram_quantile does).
func histQuantiles(m map[string]float64, name string, qs ...float64) (count, mean float64, out []float64) {
	type bucket struct{ le, n float64 }
	var bs []bucket
	prefix := name + `_bucket{le="`
	for k, v := range m {
		if !strings.HasPrefix(k, prefix) {
			continue
		}
		s := strings.TrimSuffix(strings.TrimPrefix(k, prefix), `"}`)
		le, err := strconv.ParseFloat(s, 64)
		if err != nil {
			continue
		}
		bs = append(bs, bucket{le, v})
	}
	sort.Slice(bs, func(i, j int) bool { return bs[i].le < bs[j].le })
	count = m[name+"_count"]
	if count > 0 {
		mean = m[name+"_sum"] / count
	}
	for _, q := range qs {
		rank := q * count
		v := 0.0 // no batches: JSON has no NaN
		lo, nlo := 0.0, 0.0
		for _, b := range bs {
			if b.n >= rank {
				if math.IsInf(b.le, 1) {
					v = lo // beyond the last finite bound: report that bound
				} else if b.n > nlo {
					v = lo + (b.le-lo)*(rank-nlo)/(b.n-nlo)
				} else {
					v = b.le
				}
				break
			}
			lo, nlo = b.le, b.n
		}
		out = append(out, v)
	}
	return count, mean, out
}

// runB7 measures the time from a connection's SYN-ACK to the stream holding
// the batch with its event, at a low steady rate with the default linger.
func runB7(ctx context.Context, tmp string, p Params, progress func(string, ...any)) []Row {
	linger := publisher.DefaultLinger
	targetMs := float64(linger/time.Millisecond) + 20
	target := fmt.Sprintf("p99 <= linger + 20 ms = %.0f ms", targetMs)
	row := Row{ID: "B7", What: "latency SYN-ACK -> stored and delivered (JetStream)", Figures: "n/a", Target: target, Met: "n/a"}
	info := Row{ID: "B7", What: "latency SYN-ACK -> published (core sub); seal -> ack (agent histogram)", Figures: "n/a", Target: "- (info)", Met: "n/a"}
	fail := func(err error) []Row {
		row.Note = err.Error()
		return []Row{row, info}
	}
	cg, err := newCgroup("b7")
	if err != nil {
		return fail(err)
	}
	defer cg.Remove()
	a, err := startAgent(ctx, p.Agent, cg.Path, tmp)
	if err != nil {
		return fail(err)
	}
	defer a.Stop() // after the explicit Stop below, which reports its error, a no-op
	nc, err := nats.Connect("nats://"+a.NATS, nats.Name("flowbench-b7"))
	if err != nil {
		return fail(err)
	}
	defer nc.Close()
	// Two views of each batch: a core subscription sees the message as the
	// server receives the publish (before it is stored and acked); an
	// ordered consumer sees it once stored, which is when the ack leaves too.
	var core, jsr latRecorder
	sub, err := nc.Subscribe("flows.>", func(m *nats.Msg) { core.add(time.Now(), m.Data) })
	if err != nil {
		return fail(err)
	}
	defer sub.Unsubscribe() //nolint:errcheck
	js, err := jetstream.New(nc)
	if err != nil {
		return fail(err)
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	stream, err := js.Stream(sctx, "FLOWS")
	if err != nil {
		return fail(fmt.Errorf("stream FLOWS: %w", err))
	}
	oc, err := stream.OrderedConsumer(sctx, jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverNewPolicy})
	if err != nil {
		return fail(err)
	}
	cc, err := oc.Consume(func(m jetstream.Msg) { jsr.add(time.Now(), m.Data()) })
	if err != nil {
		return fail(err)
	}
	defer cc.Stop()
	time.Sleep(300 * time.Millisecond)

	workers := 2
	progress("B7: paced storm %.0f conn/s x %g s, %d workers, in %s; linger %v (default)", p.B7Rate, p.B7Seconds, workers, cg.Path, linger)
	st, err := cg.paced(ctx, workers, p.B7Seconds, p.B7Rate)
	if err != nil {
		return fail(err)
	}
	m, _, err := waitFlushed(ctx, a)
	if err != nil {
		return fail(err)
	}
	time.Sleep(300 * time.Millisecond) // the last deliveries
	cc.Stop()
	_ = sub.Unsubscribe()
	if err := a.Stop(); err != nil {
		row.Note = err.Error()
	}
	port := uint16(st.ListenPort)
	js7, core7 := jsr.stats(port), core.stats(port)
	// Every attempt here that failed was reset by the listener after the
	// handshake (ECONNRESET once an interrupted connect is awaited): its
	// SYN-ACK passed, so it has its two events too.
	want := 2 * int(st.Conns+st.Failed)
	hn, hmean, hq := histQuantiles(m, "flowbus_agent_publish_latency_seconds", 0.5, 0.99)
	rate := float64(st.Conns) / st.Seconds
	if js7.N == 0 {
		return fail(errors.New("no event of the storm reached the subscriber"))
	}
	row.Figures = fmt.Sprintf("%s (%d events of %d expected, %.0f conn/s = %.0f events/s, %d s)", js7, js7.N, want, rate, 2*rate, int(st.Seconds+0.5))
	row.Met = metStr(js7.P99 <= targetMs)
	if js7.N < want {
		row.Note = strings.TrimPrefix(row.Note+fmt.Sprintf("; %d events not seen", want-js7.N), "; ")
	}
	info.Figures = fmt.Sprintf("published: %s; seal->ack: %.0f batches, mean %.2f ms, p50 ≈ %.2f ms, p99 ≈ %.2f ms (bucket-interpolated)",
		core7, hn, hmean*1000, hq[0]*1000, hq[1]*1000)
	info.Note = "stored+delivered is at or just after the ack (both follow the store); published is before it; the gap is the seal->ack time"
	row.Data = map[string]any{
		"linger_ms": float64(linger / time.Millisecond), "target_ms": targetMs, "conns": st.Conns, "conns_per_s": rate,
		"expected_events": want, "failed_connects": st.Failed, "connect_errors": st.Errors, "stored_delivered": js7, "published": core7,
		"seal_to_ack": map[string]any{"batches": hn, "mean_ms": hmean * 1000, "p50_ms": hq[0] * 1000, "p99_ms": hq[1] * 1000},
		"messages_js": jsr.msgs, "messages_core": core.msgs, "undecodable": jsr.bad + core.bad,
	}
	progress("B7: stored+delivered %s; published %s; seal->ack mean %.2f ms", js7, core7, hmean*1000)
	return []Row{row, info}
}
