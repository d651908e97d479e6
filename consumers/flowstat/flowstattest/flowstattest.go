// Package flowstattest helps test flowstat end to end: it generates realistic events, publishes them as
// agent runs do (tailtest), remembers what was published, computes the aggregates flowstat must end up
// with directly from those events (the reference), and reads what a database actually holds, so a test
// can compare the two.
package flowstattest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/flowbus/flowbus/schema"
	"github.com/nats-io/nats.go/jetstream"
)

// Published is one valid batch as it was stored in the stream: a begin batch (Events), or with Kind
// schema.KindEnd an end batch (Ends).
type Published struct {
	Host, RunID string
	Dir         schema.Direction
	Kind        schema.Kind
	Seq         uint64
	PrevSeq     uint64
	Drops       schema.Drops
	Events      []schema.Event
	Ends        []schema.EndEvent
	StreamSeq   uint64
	Stored      time.Time
}

// Peer is a remote endpoint with the DNS names the agent would attach to it.
type Peer struct {
	Addr  netip.Addr
	Names []string
}

// Gen produces deterministic, realistic events: IPv4 and IPv6 peers (one with a zone), 0 to 3 DNS names
// (sometimes missing, as after a cache miss), a few service ports, timestamps spread over a time span and
// slightly out of order.
type Gen struct {
	r     *rand.Rand
	Peers []Peer
	Ports []uint16
}

// NewGen returns a generator with npeers peers, seeded by seed.
func NewGen(seed uint64, npeers int) *Gen {
	g := &Gen{r: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), Ports: []uint16{443, 80, 22, 5432, 8443, 53, 6379, 9092}}
	for i := 0; i < npeers; i++ {
		var a netip.Addr
		switch {
		case i%7 == 3:
			a = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, byte(i >> 8), byte(i)})
		case i == 5:
			a = netip.MustParseAddr("fe80::5%eth0")
		default:
			a = netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		}
		var names []string
		for j := 0; j < i%4; j++ {
			names = append(names, fmt.Sprintf("n%d-%d.example.com", j, i))
		}
		g.Peers = append(g.Peers, Peer{Addr: a, Names: names})
	}
	return g
}

// Events returns n events of host hostIP in direction dir with timestamps in [t0, t0+span).
func (g *Gen) Events(n int, dir schema.Direction, hostIP netip.Addr, t0 time.Time, span time.Duration) []schema.Event {
	evs := make([]schema.Event, n)
	for i := range evs {
		// Skewed: a few peers get most connections, as in real traffic.
		p := g.Peers[min(int(g.r.ExpFloat64()*float64(len(g.Peers))/4), len(g.Peers)-1)]
		names := p.Names
		if len(names) > 0 && g.r.IntN(10) == 0 {
			names = nil // DNS cache miss
		}
		port := g.Ports[min(int(g.r.ExpFloat64()*2), len(g.Ports)-1)]
		ts := t0.Add(time.Duration(g.r.Int64N(int64(span)))).UnixNano()
		e := schema.Event{Timestamp: ts, Direction: dir, SrcPort: uint16(32768 + g.r.IntN(28000)), DstPort: port}
		if dir == schema.Outgoing {
			e.Src, e.Dst, e.DstDNS = hostIP, p.Addr, names
		} else {
			e.Src, e.Dst, e.SrcDNS = p.Addr, hostIP, names
		}
		if g.r.IntN(3) == 0 {
			e.PID, e.Comm = uint32(1000+g.r.IntN(50)), "proc"
		}
		evs[i] = e
	}
	return evs
}

// Recorder publishes batches and remembers the valid ones with their stream sequence and stored time.
type Recorder struct {
	S       *tailtest.Server
	Stream  string
	Prefix  string
	Batches []Published
	last    map[chainKey]uint64 // last seq encoded per (agent, direction), published or not
}

type chainKey struct {
	a    *tailtest.Agent
	dir  schema.Direction
	kind schema.Kind
}

// NewRecorder starts recording publications to s, whose stream is named stream and captures prefix.>.
func NewRecorder(s *tailtest.Server, stream, prefix string) *Recorder {
	return &Recorder{S: s, Stream: stream, Prefix: prefix, last: map[chainKey]uint64{}}
}

// Publish encodes the next batch of agent a in direction dir and publishes it; with lose set the batch is
// encoded (its seq is used) but not published, as if the agent lost it.
func (r *Recorder) Publish(t testing.TB, a *tailtest.Agent, dir schema.Direction, drops schema.Drops, lose bool, evs []schema.Event) {
	t.Helper()
	p, data := r.Encode(a, dir, drops, evs)
	if !lose {
		r.PublishEncoded(t, p, data)
	}
}

// Encode encodes the next batch of agent a in direction dir without publishing it.
func (r *Recorder) Encode(a *tailtest.Agent, dir schema.Direction, drops schema.Drops, evs []schema.Event) (Published, []byte) {
	k := chainKey{a, dir, schema.KindBegin}
	prev := r.last[k]
	seq, data := a.Batch(dir, drops, evs...)
	r.last[k] = seq
	return Published{Host: a.Host, RunID: a.RunID, Dir: dir, Seq: seq, PrevSeq: prev, Drops: drops, Events: evs}, data
}

// EncodeEnd encodes the next end batch of agent a in direction dir without publishing it.
func (r *Recorder) EncodeEnd(a *tailtest.Agent, dir schema.Direction, drops schema.Drops, evs []schema.EndEvent) (Published, []byte) {
	k := chainKey{a, dir, schema.KindEnd}
	prev := r.last[k]
	seq, data := a.EndBatch(dir, drops, evs...)
	r.last[k] = seq
	return Published{Host: a.Host, RunID: a.RunID, Dir: dir, Kind: schema.KindEnd, Seq: seq, PrevSeq: prev, Drops: drops, Ends: evs}, data
}

// PublishEnd encodes the next end batch of agent a in direction dir and publishes it on its end
// subject; with lose set it is encoded (its seq is used) but not published.
func (r *Recorder) PublishEnd(t testing.TB, a *tailtest.Agent, dir schema.Direction, drops schema.Drops, lose bool, evs []schema.EndEvent) {
	t.Helper()
	p, data := r.EncodeEnd(a, dir, drops, evs)
	if !lose {
		r.PublishEncoded(t, p, data)
	}
}

// PublishEncoded publishes a batch made by Encode or EncodeEnd (in any order) on its subject and
// records it.
func (r *Recorder) PublishEncoded(t testing.TB, p Published, data []byte) {
	t.Helper()
	subject := schema.Subject(r.Prefix, p.Host, p.Dir)
	if p.Kind == schema.KindEnd {
		subject = schema.EndSubject(r.Prefix, p.Host, p.Dir)
	}
	p.StreamSeq = r.S.Publish(t, subject, data)
	p.Stored = r.stored(t, p.StreamSeq)
	r.Batches = append(r.Batches, p)
}

// PublishRaw publishes bytes that are not a valid batch (they are not part of the reference).
func (r *Recorder) PublishRaw(t testing.TB, subject string, data []byte) uint64 {
	t.Helper()
	return r.S.Publish(t, subject, data)
}

func (r *Recorder) stored(t testing.TB, seq uint64) time.Time {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := r.S.JS.Stream(ctx, r.Stream)
	if err != nil {
		t.Fatalf("stream %s: %v", r.Stream, err)
	}
	m, err := s.GetMsg(ctx, seq)
	if err != nil {
		t.Fatalf("get stream message %d: %v", seq, err)
	}
	return m.Time
}

// Events is the number of begin events recorded.
func (r *Recorder) Events() int {
	n := 0
	for _, b := range r.Batches {
		n += len(b.Events)
	}
	return n
}

// EndEvents is the number of end events recorded.
func (r *Recorder) EndEvents() int {
	n := 0
	for _, b := range r.Batches {
		n += len(b.Ends)
	}
	return n
}

// CreateStream creates a file-backed stream like the agent's.
func CreateStream(t testing.TB, s *tailtest.Server, name string, subjects ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := s.JS.CreateStream(ctx, jetstream.StreamConfig{Name: name, Subjects: subjects, Storage: jetstream.FileStorage, Duplicates: 2 * time.Minute}); err != nil {
		t.Fatalf("create stream %s: %v", name, err)
	}
}

// Snapshot is the content of the aggregate tables in a canonical, comparable form: each map holds one
// entry per row, keyed by the row's primary key, with the other columns as text.
type Snapshot struct {
	Conns    map[string]string
	Seen     map[string]string
	Batches  map[string]string
	Gaps     map[string]string
	Ends     map[string]string // end_agg
	Procs    map[string]string // proc_agg
	Names    map[string]string // conn_names
	EndNames map[string]string // end_names
	Locals   map[string]string // conn_local
}

func newSnapshot() *Snapshot {
	return &Snapshot{Conns: map[string]string{}, Seen: map[string]string{}, Batches: map[string]string{}, Gaps: map[string]string{},
		Ends: map[string]string{}, Procs: map[string]string{}, Names: map[string]string{}, EndNames: map[string]string{},
		Locals: map[string]string{}}
}

func bucketOf(ns int64, width time.Duration) int64 {
	w := int64(width / time.Second)
	s := ns / 1e9
	if ns < 0 && ns%1e9 != 0 {
		s--
	}
	b := s / w * w
	if s < 0 && s%w != 0 {
		b -= w
	}
	return b
}

func addrText(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// Reference computes, directly from the published batches (in stream order) and the bucket width,
// what the aggregate tables must hold: connections per bucket of event time by host, direction, peer
// (the responder of outgoing and the initiator of incoming connections), first DNS name and service
// port; the same by each distinct DNS name of the peer (the view conn_names) and by local address (conn_local); first and last seen per (host,
// direction, peer, port) with the earliest name; batches, events
// and drops per bucket of stored time; and a gap wherever a batch's prev_seq is not the last seq seen of
// its chain.
func Reference(batches []Published, width time.Duration) *Snapshot {
	bs := append([]Published(nil), batches...)
	sort.Slice(bs, func(i, j int) bool { return bs[i].StreamSeq < bs[j].StreamSeq })
	type seen struct {
		first, last, nameNS int64
		name                string
	}
	conns := map[string]int64{}
	nameConns := map[string]int64{}
	locals := map[string]int64{}
	procs := map[string]int64{}
	ends := map[string]*endRef{}
	endNames := map[string][3]int64{} // ends, src and dst bytes per (bucket, host, dir, peer, port, name)
	seens := map[string]*seen{}
	type bagg struct{ n, ev, k, r, q, s, p, en, eev, ed uint64 }
	baggs := map[string]*bagg{}
	snap := newSnapshot()
	last := map[string]uint64{}
	for _, b := range bs {
		dir := b.Dir.String()
		bk := fmt.Sprintf("%d|%s|%s", bucketOf(b.Stored.UnixNano(), width), b.Host, dir)
		if baggs[bk] == nil {
			baggs[bk] = &bagg{}
		}
		ba := baggs[bk]
		if b.Kind == schema.KindEnd {
			ba.en++
			ba.eev += uint64(len(b.Ends))
			ba.ed += b.Drops.Total()
		} else {
			ba.n++
			ba.ev += uint64(len(b.Events))
			ba.k, ba.r, ba.q, ba.s, ba.p = ba.k+b.Drops.Kernel, ba.r+b.Drops.Reader, ba.q+b.Drops.Queue, ba.s+b.Drops.Spool, ba.p+b.Drops.Publish
		}

		ck := b.Host + "|" + b.RunID + "|" + dir + "|" + b.Kind.String()
		l, ok := last[ck]
		if !ok || b.Seq > l {
			if (ok && b.PrevSeq != l) || (!ok && b.PrevSeq != 0) {
				snap.Gaps[fmt.Sprintf("%s|%s|%s|%d", b.Host, b.RunID, dir, b.Seq)] = fmt.Sprintf("kind=%s after=%d prev=%d stream=%d", b.Kind, l, b.PrevSeq, b.StreamSeq)
			}
			last[ck] = b.Seq
		}
		for i := range b.Ends {
			e := &b.Ends[i]
			peer, names := e.Dst, e.DstDNS
			if b.Dir == schema.Incoming {
				peer, names = e.Src, e.SrcDNS
			}
			name := ""
			if len(names) > 0 {
				name = names[0]
			}
			k := fmt.Sprintf("%d|%s|%s|%s|%s|%d", bucketOf(e.EndNs, width), b.Host, dir, addrText(peer), name, e.DstPort)
			ea := ends[k]
			if ea == nil {
				ea = &endRef{}
				ends[k] = ea
			}
			ea.add(e)
			distinct := map[string]bool{}
			for _, n := range names {
				if n != "" && !distinct[n] {
					distinct[n] = true
					nk := fmt.Sprintf("%d|%s|%s|%s|%d|%s", bucketOf(e.EndNs, width), b.Host, dir, addrText(peer), e.DstPort, n)
					r := endNames[nk]
					r[0]++
					r[1] += int64(e.SrcBytes)
					r[2] += int64(e.DstBytes)
					endNames[nk] = r
				}
			}
		}
		for _, e := range b.Events {
			peer, names, local := e.Dst, e.DstDNS, e.Src
			if b.Dir == schema.Incoming {
				peer, names, local = e.Src, e.SrcDNS, e.Dst
			}
			name := ""
			if len(names) > 0 {
				name = names[0]
			}
			locals[fmt.Sprintf("%d|%s|%s|%s|%s|%d", bucketOf(e.Timestamp, width), b.Host, dir, addrText(local), addrText(peer), e.DstPort)]++
			conns[fmt.Sprintf("%d|%s|%s|%s|%s|%d", bucketOf(e.Timestamp, width), b.Host, dir, addrText(peer), name, e.DstPort)]++
			distinct := map[string]bool{}
			for _, n := range names {
				if n != "" && !distinct[n] {
					distinct[n] = true
					nameConns[fmt.Sprintf("%d|%s|%s|%s|%d|%s", bucketOf(e.Timestamp, width), b.Host, dir, addrText(peer), e.DstPort, n)]++
				}
			}
			procs[fmt.Sprintf("%d|%s|%s|%s|%d", bucketOf(e.Timestamp, width), b.Host, dir, e.Comm, e.PID)]++
			sk := fmt.Sprintf("%s|%s|%s|%d", b.Host, dir, addrText(peer), e.DstPort)
			s := seens[sk]
			if s == nil {
				s = &seen{first: e.Timestamp, last: e.Timestamp}
				seens[sk] = s
			}
			s.first, s.last = min(s.first, e.Timestamp), max(s.last, e.Timestamp)
			if name != "" && (s.name == "" || e.Timestamp < s.nameNS || e.Timestamp == s.nameNS && name < s.name) {
				s.name, s.nameNS = name, e.Timestamp
			}
		}
	}
	for k, n := range conns {
		snap.Conns[k] = fmt.Sprint(n)
	}
	for k, n := range procs {
		snap.Procs[k] = fmt.Sprint(n)
	}
	for k, n := range nameConns {
		snap.Names[k] = fmt.Sprint(n)
	}
	for k, n := range locals {
		snap.Locals[k] = fmt.Sprint(n)
	}
	for k, e := range ends {
		snap.Ends[k] = e.String()
	}
	for k, r := range endNames {
		snap.EndNames[k] = fmt.Sprintf("ends=%d bytes=%d/%d", r[0], r[1], r[2])
	}
	for k, s := range seens {
		snap.Seen[k] = fmt.Sprintf("first=%d last=%d name=%q name_ns=%d", s.first, s.last, s.name, s.nameNS)
	}
	for k, b := range baggs {
		snap.Batches[k] = fmt.Sprintf("batches=%d events=%d drops=%d/%d/%d/%d/%d end_batches=%d end_events=%d end_drops=%d", b.n, b.ev, b.k, b.r, b.q, b.s, b.p, b.en, b.eev, b.ed)
	}
	return snap
}

// Load reads the aggregate tables of st.
func Load(ctx context.Context, st *store.Store) (*Snapshot, error) {
	snap := newSnapshot()
	db := st.DB()
	q := func(query string, f func(scan func(...any) error) error) error {
		rows, err := db.QueryContext(ctx, query)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			if err := f(rows.Scan); err != nil {
				return err
			}
		}
		return rows.Err()
	}
	err := q(`SELECT bucket, host, direction, peer, peer_name, port, conns FROM conn_agg`, func(scan func(...any) error) error {
		var b, port, n int64
		var h, d, p, name string
		if err := scan(&b, &h, &d, &p, &name, &port, &n); err != nil {
			return err
		}
		snap.Conns[fmt.Sprintf("%d|%s|%s|%s|%s|%d", b, h, d, p, name, port)] = fmt.Sprint(n)
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = q(`SELECT bucket, host, direction, local, peer, port, conns FROM conn_local`, func(scan func(...any) error) error {
		var b, port, n int64
		var h, d, l, p string
		if err := scan(&b, &h, &d, &l, &p, &port, &n); err != nil {
			return err
		}
		snap.Locals[fmt.Sprintf("%d|%s|%s|%s|%s|%d", b, h, d, l, p, port)] = fmt.Sprint(n)
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = q(`SELECT bucket, host, direction, peer, port, name, CAST(SUM(conns) AS BIGINT) FROM conn_names GROUP BY bucket, host, direction, peer, port, name`, func(scan func(...any) error) error {
		var b, port, n int64
		var h, d, p, name string
		if err := scan(&b, &h, &d, &p, &port, &name, &n); err != nil {
			return err
		}
		snap.Names[fmt.Sprintf("%d|%s|%s|%s|%d|%s", b, h, d, p, port, name)] = fmt.Sprint(n)
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = q(`SELECT bucket, host, direction, peer, port, name, CAST(SUM(ends) AS BIGINT), CAST(SUM(src_bytes) AS BIGINT), CAST(SUM(dst_bytes) AS BIGINT)
		FROM end_names GROUP BY bucket, host, direction, peer, port, name`, func(scan func(...any) error) error {
		var b, port, n, sb, db int64
		var h, d, p, name string
		if err := scan(&b, &h, &d, &p, &port, &name, &n, &sb, &db); err != nil {
			return err
		}
		snap.EndNames[fmt.Sprintf("%d|%s|%s|%s|%d|%s", b, h, d, p, port, name)] = fmt.Sprintf("ends=%d bytes=%d/%d", n, sb, db)
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = q(`SELECT host, direction, peer, port, first_ns, last_ns, peer_name, name_ns FROM peer_seen`, func(scan func(...any) error) error {
		var port, f, l, nns int64
		var h, d, p, name string
		if err := scan(&h, &d, &p, &port, &f, &l, &name, &nns); err != nil {
			return err
		}
		snap.Seen[fmt.Sprintf("%s|%s|%s|%d", h, d, p, port)] = fmt.Sprintf("first=%d last=%d name=%q name_ns=%d", f, l, name, nns)
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = q(`SELECT bucket, host, direction, batches, events, drops_kernel, drops_reader, drops_queue, drops_spool, drops_publish,
		end_batches, end_events, end_drops_kernel + end_drops_reader + end_drops_queue + end_drops_spool + end_drops_publish FROM batch_agg`, func(scan func(...any) error) error {
		var b, n, ev, k, r, qq, s, p, en, eev, ed int64
		var h, d string
		if err := scan(&b, &h, &d, &n, &ev, &k, &r, &qq, &s, &p, &en, &eev, &ed); err != nil {
			return err
		}
		snap.Batches[fmt.Sprintf("%d|%s|%s", b, h, d)] = fmt.Sprintf("batches=%d events=%d drops=%d/%d/%d/%d/%d end_batches=%d end_events=%d end_drops=%d", n, ev, k, r, qq, s, p, en, eev, ed)
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = q(`SELECT host, run_id, direction, kind, seq, after_seq, prev_seq, stream_seq FROM gaps`, func(scan func(...any) error) error {
		var seq, after, prev, sseq int64
		var h, r, d, kind string
		if err := scan(&h, &r, &d, &kind, &seq, &after, &prev, &sseq); err != nil {
			return err
		}
		snap.Gaps[fmt.Sprintf("%s|%s|%s|%d", h, r, d, seq)] = fmt.Sprintf("kind=%s after=%d prev=%d stream=%d", kind, after, prev, sseq)
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = q(`SELECT bucket, host, direction, comm, pid, conns FROM proc_agg`, func(scan func(...any) error) error {
		var b, pid, n int64
		var h, d, comm string
		if err := scan(&b, &h, &d, &comm, &pid, &n); err != nil {
			return err
		}
		snap.Procs[fmt.Sprintf("%d|%s|%s|%s|%d", b, h, d, comm, pid)] = fmt.Sprint(n)
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = q(`SELECT bucket, host, direction, peer, peer_name, port, ends, src_bytes, dst_bytes, src_segs, dst_segs, retrans,
		duration_sum_ns, duration_max_ns, srtt_sum_us, srtt_count, reason_fin, reason_rst_sent, reason_rst_received, reason_timeout,
		reason_never_established, reason_other FROM end_agg`, func(scan func(...any) error) error {
		var b, port int64
		var h, d, p, name string
		var e endRef
		if err := scan(&b, &h, &d, &p, &name, &port, &e.ends, &e.srcBytes, &e.dstBytes, &e.srcSegs, &e.dstSegs, &e.retrans,
			&e.durSum, &e.durMax, &e.srttSum, &e.srttN, &e.reasons[0], &e.reasons[1], &e.reasons[2], &e.reasons[3], &e.reasons[4], &e.reasons[5]); err != nil {
			return err
		}
		snap.Ends[fmt.Sprintf("%d|%s|%s|%s|%s|%d", b, h, d, p, name, port)] = e.String()
		return nil
	})
	if err != nil {
		return nil, err
	}
	return snap, nil
}

// Diff describes how got differs from want, at most max lines per table; nil when equal.
func Diff(want, got *Snapshot, max int) []string {
	var out []string
	cmp := func(table string, w, g map[string]string) {
		var lines []string
		for k, wv := range w {
			if gv, ok := g[k]; !ok {
				lines = append(lines, fmt.Sprintf("%s: missing row %s (want %s)", table, k, wv))
			} else if gv != wv {
				lines = append(lines, fmt.Sprintf("%s: row %s = %s, want %s", table, k, gv, wv))
			}
		}
		for k, gv := range g {
			if _, ok := w[k]; !ok {
				lines = append(lines, fmt.Sprintf("%s: unexpected row %s = %s", table, k, gv))
			}
		}
		sort.Strings(lines)
		if len(lines) > max {
			lines = append(lines[:max], fmt.Sprintf("%s: ... and %d more differences", table, len(lines)-max))
		}
		out = append(out, lines...)
	}
	cmp("conn_agg", want.Conns, got.Conns)
	cmp("peer_seen", want.Seen, got.Seen)
	cmp("batch_agg", want.Batches, got.Batches)
	cmp("gaps", want.Gaps, got.Gaps)
	cmp("end_agg", want.Ends, got.Ends)
	cmp("proc_agg", want.Procs, got.Procs)
	cmp("conn_names", want.Names, got.Names)
	cmp("end_names", want.EndNames, got.EndNames)
	cmp("conn_local", want.Locals, got.Locals)
	return out
}

// Check fails t when st does not hold want.
func Check(t testing.TB, st *store.Store, want *Snapshot) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	got, err := Load(ctx, st)
	if err != nil {
		t.Fatalf("load aggregates: %v", err)
	}
	if d := Diff(want, got, 10); len(d) > 0 {
		t.Errorf("aggregates in %s differ from the reference (%d conn rows, %d seen rows, %d batch rows, %d gaps, %d end rows, %d process rows, %d name rows wanted):\n  %s",
			st.Kind(), len(want.Conns), len(want.Seen), len(want.Batches), len(want.Gaps), len(want.Ends), len(want.Procs), len(want.Names), strings.Join(d, "\n  "))
	}
}

// TotalConns sums the connections of a snapshot (the events it counted).
func (s *Snapshot) TotalConns() int64 {
	var n int64
	for _, v := range s.Conns {
		var x int64
		fmt.Sscan(v, &x)
		n += x
	}
	return n
}

// Fleet is a set of agent runs publishing a realistic mix: two hosts, both directions, drops now and
// then, a lost batch now and then (a gap), and one agent restart (a new run id).
type Fleet struct {
	Gen      *Gen
	T0       time.Time     // events are timestamped in [T0, T0+Span)
	Span     time.Duration //
	PerBatch int           // events per batch, on average
	// Ends makes each batch of begins followed by an end batch of the same connections (EndsFor),
	// lost now and then on its own (a gap of the end chain).
	Ends   bool
	agents []*tailtest.Agent
	ips    []netip.Addr
	n      int
}

// NewFleet returns a fleet whose events fall in [t0, t0+span).
func NewFleet(seed uint64, t0 time.Time, span time.Duration, perBatch int) *Fleet {
	return &Fleet{
		Gen: NewGen(seed, 60), T0: t0, Span: span, PerBatch: perBatch,
		agents: []*tailtest.Agent{tailtest.NewAgent("web-01", "run-a"), tailtest.NewAgent("db-02", "run-b")},
		ips:    []netip.Addr{netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("2001:db8::20")},
	}
}

// Publish publishes the fleet's next n batches through rec.
func (f *Fleet) Publish(t testing.TB, rec *Recorder, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		f.n++
		k := f.n % len(f.agents)
		if f.n == 40 { // web-01's agent restarts: a new run, whose chains start again at prev_seq 0
			f.agents[0] = tailtest.NewAgent("web-01", "run-c")
		}
		dir := schema.Outgoing
		if f.n%3 == 0 {
			dir = schema.Incoming
		}
		var drops schema.Drops
		if f.n%11 == 0 {
			drops = schema.Drops{Kernel: uint64(f.n), Queue: 2}
		}
		if f.n%17 == 0 {
			drops.Publish = 5
		}
		lose := f.n%13 == 0
		cnt := f.PerBatch/2 + f.Gen.r.IntN(f.PerBatch+1)
		evs := f.Gen.Events(cnt, dir, f.ips[k], f.T0, f.Span)
		rec.Publish(t, f.agents[k], dir, drops, lose, evs)
		if f.Ends {
			var endDrops schema.Drops
			if f.n%5 == 0 {
				endDrops.Kernel = 3
			}
			rec.PublishEnd(t, f.agents[k], dir, endDrops, f.n%7 == 0, EndsFor(uint64(f.n), dir, evs, 90*time.Second))
		}
	}
}

// endRef is the reference of one end_agg row, computed from the events in plain arithmetic (the
// scenarios stay far from the caps).
type endRef struct {
	ends, srcBytes, dstBytes, srcSegs, dstSegs, retrans, durSum, durMax, srttSum, srttN int64
	reasons                                                                             [6]int64
}

func (r *endRef) add(e *schema.EndEvent) {
	r.ends++
	r.srcBytes += int64(e.SrcBytes)
	r.dstBytes += int64(e.DstBytes)
	r.srcSegs += int64(e.SrcSegs)
	r.dstSegs += int64(e.DstSegs)
	r.retrans += int64(e.Retrans)
	d := max(e.EndNs-e.BeginNs, 0)
	r.durSum += d
	r.durMax = max(r.durMax, d)
	if e.SRTTus > 0 {
		r.srttSum += int64(e.SRTTus)
		r.srttN++
	}
	// fin, rst_sent, rst_received, timeout, never_established; unknown and later codes are other.
	switch e.Reason {
	case schema.EndFIN, schema.EndRSTSent, schema.EndRSTReceived, schema.EndTimeout, schema.EndNeverEstablished:
		r.reasons[e.Reason-1]++
	default:
		r.reasons[5]++
	}
}

func (r *endRef) String() string {
	return fmt.Sprintf("ends=%d bytes=%d/%d segs=%d/%d retrans=%d dur=%d/%d srtt=%d/%d reasons=%v", r.ends, r.srcBytes, r.dstBytes,
		r.srcSegs, r.dstSegs, r.retrans, r.durSum, r.durMax, r.srttSum, r.srttN, r.reasons)
}

// EndsFor returns, for every begin event of evs (of direction dir), the end event of its connection:
// ended between 1 ms and span later, with bytes, segments, retransmits, RTT and reasons drawn from
// seed (every reason, a future code 9 among them).
func EndsFor(seed uint64, dir schema.Direction, evs []schema.Event, span time.Duration) []schema.EndEvent {
	r := rand.New(rand.NewPCG(seed, seed^0x5851f42d4c957f2d))
	reasons := []schema.EndReason{schema.EndFIN, schema.EndFIN, schema.EndFIN, schema.EndRSTSent, schema.EndRSTReceived, schema.EndTimeout,
		schema.EndNeverEstablished, schema.EndUnknown, 9}
	out := make([]schema.EndEvent, len(evs))
	for i, e := range evs {
		dur := time.Millisecond + time.Duration(r.Int64N(int64(span)))
		out[i] = schema.EndEvent{Direction: dir, Src: e.Src, Dst: e.Dst, SrcPort: e.SrcPort, DstPort: e.DstPort, SrcDNS: e.SrcDNS, DstDNS: e.DstDNS,
			BeginNs: e.Timestamp, EndNs: e.Timestamp + int64(dur), SrcBytes: uint64(r.IntN(5000)), DstBytes: uint64(r.IntN(1 << 20)),
			SrcSegs: uint64(r.IntN(10)), DstSegs: uint64(r.IntN(800)), Retrans: uint64(r.IntN(3)), SRTTus: uint32(r.IntN(3) * 250),
			Reason: reasons[r.IntN(len(reasons))], PID: e.PID, Comm: e.Comm}
	}
	return out
}
