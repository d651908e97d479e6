package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/flowbus/flowbus/cmd/internal/proctest"
	"github.com/flowbus/flowbus/schema"
)

// streamCount is what B2 found in the stream.
type streamCount struct {
	Messages   int    `json:"messages"`
	Events     int    `json:"events"`
	Matched    int    `json:"matched"`     // events of the storm's listener
	Other      int    `json:"other"`       // events of any other connection
	DupBatches int    `json:"dup_batches"` // the same (direction, run, seq) stored twice
	BadBatches int    `json:"bad_batches"` // messages that did not decode
	FirstError string `json:"first_error,omitempty"`
	Drops      uint64 `json:"batch_drops"` // drops the batches themselves announce
	// EndMessages and EndEvents count the end batches (subjects <prefix>.<host>.<direction>.end) and their
	// events; EndMatched those of the storm's listener, EndBadOrder ends whose begin_ns is after end_ns.
	EndMessages int `json:"end_messages"`
	EndEvents   int `json:"end_events"`
	EndMatched  int `json:"end_matched"`
	EndBadOrder int `json:"end_bad_order"`
	// obs counts storm begins by direction and client port, obsEnd the ends.
	obs, obsEnd map[schema.Direction][]uint32
}

// runB2 runs a long storm with the agent attached and checks that every
// connection reached the stream exactly twice (outgoing and incoming) as a
// begin and, with end events on (the agent's default), twice as an end.
func runB2(ctx context.Context, tmp string, p Params, progress func(string, ...any)) []Row {
	row := Row{ID: "B2", What: fmt.Sprintf("completeness, %g s storm x %d workers", p.B2Seconds, p.Workers),
		Target: "0 lost, 0 dup, 0 kernel drops (begins and ends)", Met: "n/a", Figures: "n/a"}
	fail := func(err error) []Row {
		row.Note = err.Error()
		return []Row{row}
	}
	cg, err := newCgroup("b2")
	if err != nil {
		return fail(err)
	}
	defer cg.Remove()
	a, err := startAgent(ctx, p.Agent, cg.Path, tmp)
	if err != nil {
		return fail(err)
	}
	defer a.Stop() // after the explicit Stop below, which reports its error, a no-op
	time.Sleep(300 * time.Millisecond)
	progress("B2: storm %g s in %s with the agent attached", p.B2Seconds, cg.Path)
	st, err := cg.storm(ctx, p.Workers, p.B2Seconds, true)
	if err != nil {
		return fail(err)
	}
	progress("B2: %d connections (%.0f/s, %d failed); waiting for the agent to flush", st.Conns, float64(st.Conns)/st.Seconds, st.Failed)
	m, settle, err := waitFlushed(ctx, a)
	if err != nil {
		return fail(err)
	}
	sc, err := readStream(ctx, a.NATS, "FLOWS", uint16(st.ListenPort))
	if err != nil {
		return fail(fmt.Errorf("reading the stream: %w", err))
	}
	if err := a.Stop(); err != nil {
		row.Note = err.Error()
	}

	lost, dup, expected, fromFailed := compareStorm(&st, sc.obs)
	endLost, endDup, _, endFromFailed := compareStorm(&st, sc.obsEnd)
	kd := kernelDrops(m)
	allDrops := proctest.SumPrefix(m, "flowbus_agent_dropped_events_total")
	row.Figures = fmt.Sprintf("%d conns (%.0f/s); %d events of %d expected: lost %d, dup %d; kernel drops %.0f (all drops %.0f)",
		st.Conns, float64(st.Conns)/st.Seconds, sc.Matched, expected, lost, dup, kd, allDrops)
	if fromFailed > 0 {
		row.Figures += fmt.Sprintf("; +%d events of %d failed connects", fromFailed, st.Failed)
	}
	endsOK := true
	if sc.EndMessages > 0 {
		row.Figures += fmt.Sprintf("; ends: %d of %d expected, lost %d, dup %d", sc.EndMatched, expected, endLost, endDup)
		if endFromFailed > 0 {
			row.Figures += fmt.Sprintf(", +%d of failed connects", endFromFailed)
		}
		if sc.EndBadOrder > 0 {
			row.Figures += fmt.Sprintf(", %d ending before they began", sc.EndBadOrder)
		}
		endsOK = endLost == 0 && endDup == 0 && sc.EndBadOrder == 0
	} else {
		row.Figures += "; no end events (FLOWBUS_END_EVENTS=false?)"
	}
	row.Met = metStr(lost == 0 && dup == 0 && kd == 0 && endsOK)
	row.Data = map[string]any{
		"conns": st.Conns, "failed": st.Failed, "seconds": st.Seconds, "rate": float64(st.Conns) / st.Seconds,
		"expected_events": expected, "lost": lost, "duplicated": dup, "from_failed_connects": fromFailed, "connect_errors": st.Errors, "kernel_drops": kd, "all_drops": allDrops,
		"ends_lost": endLost, "ends_duplicated": endDup, "ends_from_failed_connects": endFromFailed,
		"agent_ends_captured": m[`flowbus_agent_ends_total{stage="captured"}`],
		"agent_ends_acked":    m[`flowbus_agent_ends_total{stage="acked"}`],
		"stream":              sc, "flush_seconds": settle.Seconds(),
		"agent_captured": m[`flowbus_agent_events_total{stage="captured"}`],
		"agent_acked":    m[`flowbus_agent_events_total{stage="acked"}`],
	}
	if sc.Other > 0 || sc.DupBatches > 0 || sc.BadBatches > 0 {
		extra := fmt.Sprintf("%d other events, %d duplicate batches, %d undecodable", sc.Other, sc.DupBatches, sc.BadBatches)
		if sc.FirstError != "" {
			extra += " (first: " + sc.FirstError + ")"
		}
		if row.Note != "" {
			extra = row.Note + "; " + extra
		}
		row.Note = extra
	}
	progress("B2: %s", row.Figures)
	return []Row{row}
}

// compareStorm compares what the stream holds per (direction, client port)
// with the storm's connections. Ports are reused during a storm, so it
// compares multisets; events beyond the successful connections are first
// explained by failed attempts on that port (connect can fail after the
// SYN-ACK passed, which is a begun connection); the rest are duplicates.
func compareStorm(st *proctest.LoadStormResult, obs map[schema.Direction][]uint32) (lost, dup, expected, fromFailed uint64) {
	for _, dir := range []schema.Direction{schema.Outgoing, schema.Incoming} {
		o := obs[dir]
		for port := 0; port < 65536; port++ {
			want := uint64(st.PortCounts[uint16(port)])
			maybe := uint64(st.FailedPortCounts[uint16(port)])
			got := uint64(o[port])
			expected += want
			switch {
			case got < want:
				lost += want - got
			case got-want <= maybe:
				fromFailed += got - want
			default:
				fromFailed += maybe
				dup += got - want - maybe
			}
		}
	}
	return lost, dup, expected, fromFailed
}

// waitFlushed polls the agent's metrics until nothing is pending and the
// captured and acked counters have not moved for a second (bounded at 60 s),
// and returns the last scrape.
func waitFlushed(ctx context.Context, a *agentProc) (map[string]float64, time.Duration, error) {
	start := time.Now()
	var last map[string]float64
	stable := 0
	for time.Since(start) < 60*time.Second {
		select {
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
		m, err := a.Scrape()
		if err != nil {
			return nil, 0, fmt.Errorf("scraping the agent: %w", err)
		}
		same := last != nil &&
			m[`flowbus_agent_events_total{stage="captured"}`] == last[`flowbus_agent_events_total{stage="captured"}`] &&
			m[`flowbus_agent_events_total{stage="acked"}`] == last[`flowbus_agent_events_total{stage="acked"}`] &&
			m["flowbus_agent_pending_batches"] == 0
		if same {
			stable++
		} else {
			stable = 0
		}
		last = m
		if stable >= 4 {
			return m, time.Since(start), nil
		}
	}
	return last, time.Since(start), errors.New("agent still busy 60 s after the storm")
}

// readStream reads every message of the stream with an ordered consumer and
// counts the storm's begins and ends by direction and client port.
func readStream(ctx context.Context, addr, stream string, listenPort uint16) (streamCount, error) {
	sc := streamCount{obs: map[schema.Direction][]uint32{
		schema.Outgoing: make([]uint32, 65536),
		schema.Incoming: make([]uint32, 65536),
	}, obsEnd: map[schema.Direction][]uint32{
		schema.Outgoing: make([]uint32, 65536),
		schema.Incoming: make([]uint32, 65536),
	}}
	nc, err := nats.Connect("nats://"+addr, nats.Name("flowbench"))
	if err != nil {
		return sc, err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return sc, err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return sc, err
	}
	info, err := s.Info(ctx)
	if err != nil {
		return sc, err
	}
	total := int(info.State.Msgs)
	cons, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		return sc, err
	}
	loop := netip.AddrFrom4([4]byte{127, 0, 0, 1})
	type batchID struct {
		kind schema.Kind
		dir  schema.Direction
		run  string
		seq  uint64
	}
	seen := map[batchID]bool{}
	var b schema.Batch
	var eb schema.EndBatch
	idle := 0
	for sc.Messages < total && idle < 3 {
		mb, err := cons.Fetch(1000, jetstream.FetchMaxWait(2*time.Second))
		if err != nil {
			return sc, err
		}
		n := 0
		for msg := range mb.Messages() {
			n++
			sc.Messages++
			if schema.SubjectKind(msg.Subject(), "") == schema.KindEnd {
				eb.Events = eb.Events[:0]
				if err := schema.DecodeEndBatch(msg.Data(), &eb); err != nil {
					if sc.BadBatches == 0 {
						sc.FirstError = err.Error()
					}
					sc.BadBatches++
					continue
				}
				sc.EndMessages++
				id := batchID{schema.KindEnd, eb.Direction, eb.RunID, eb.Seq}
				if seen[id] {
					sc.DupBatches++
				}
				seen[id] = true
				sc.Drops += eb.Drops.Total()
				for i := range eb.Events {
					ev := &eb.Events[i]
					sc.EndEvents++
					if ev.DstPort != listenPort || ev.Src != loop || ev.Dst != loop || sc.obsEnd[ev.Direction] == nil {
						continue
					}
					sc.EndMatched++
					sc.obsEnd[ev.Direction][ev.SrcPort]++
					if ev.BeginNs > ev.EndNs {
						sc.EndBadOrder++
					}
				}
				continue
			}
			b.Events = b.Events[:0]
			if err := schema.DecodeBatch(msg.Data(), &b); err != nil {
				if sc.BadBatches == 0 {
					sc.FirstError = err.Error()
				}
				sc.BadBatches++
				continue
			}
			id := batchID{schema.KindBegin, b.Direction, b.RunID, b.Seq}
			if seen[id] {
				sc.DupBatches++
			}
			seen[id] = true
			sc.Drops += b.Drops.Total()
			for i := range b.Events {
				ev := &b.Events[i]
				sc.Events++
				if ev.DstPort != listenPort || ev.Src != loop || ev.Dst != loop || sc.obs[ev.Direction] == nil {
					sc.Other++
					continue
				}
				sc.Matched++
				sc.obs[ev.Direction][ev.SrcPort]++
			}
		}
		if err := mb.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) && !errors.Is(err, context.DeadlineExceeded) {
			return sc, err
		}
		if n == 0 {
			idle++
		} else {
			idle = 0
		}
	}
	if sc.Messages < total {
		return sc, fmt.Errorf("read %d of %d messages", sc.Messages, total)
	}
	return sc, nil
}
