package store

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/flowbus/flowbus/schema"
	"github.com/jackc/pgx/v5/pgconn"
)

// ConnKey is one row of conn_agg: connections of a bucket by host, direction, peer, peer name and service
// port. Bucket is the bucket's start in unix seconds.
type ConnKey struct {
	Bucket int64
	Host   string
	Dir    schema.Direction
	Peer   netip.Addr
	Name   string
	Port   uint16
}

// NameKey is one row of conn_more_names: connections of a bucket by host, direction, peer, service
// port and one DNS name the events carried for the peer after the first (the first is conn_agg's).
type NameKey struct {
	Bucket int64
	Host   string
	Dir    schema.Direction
	Peer   netip.Addr
	Port   uint16
	Name   string
}

// LocalKey is one row of conn_local: connections of a bucket by host, direction, local address, peer
// and service port.
type LocalKey struct {
	Bucket int64
	Host   string
	Dir    schema.Direction
	Local  netip.Addr
	Peer   netip.Addr
	Port   uint16
}

// SeenKey is one row of peer_seen.
type SeenKey struct {
	Host string
	Dir  schema.Direction
	Peer netip.Addr
	Port uint16
}

// Span is the first and last event timestamp (unix ns) of a SeenKey, and the earliest DNS name seen for
// it with that event's timestamp (NameNS 0 and Name "" when none). Keeping the earliest named event, not
// the latest, makes the name independent of the order in which messages are applied.
type Span struct {
	First, Last int64
	Name        string
	NameNS      int64
}

// Merge widens sp to cover an event at ns that carried name ("" when none).
func (sp *Span) Merge(ns int64, name string) {
	sp.First = min(sp.First, ns)
	sp.Last = max(sp.Last, ns)
	if name != "" && (sp.Name == "" || ns < sp.NameNS || ns == sp.NameNS && name < sp.Name) {
		sp.Name, sp.NameNS = name, ns
	}
}

// BatchKey is one row of batch_agg (bucket of the message's stored time).
type BatchKey struct {
	Bucket int64
	Host   string
	Dir    schema.Direction
}

// BatchAgg counts batches, events and drops, of begin batches and of end batches.
type BatchAgg struct {
	Batches, Events       uint64
	Drops                 schema.Drops
	EndBatches, EndEvents uint64
	EndDrops              schema.Drops
}

// RunKey identifies a batch chain: one direction of one agent run, for one kind of batch (end batches
// chain on their own).
type RunKey struct {
	Host, RunID string
	Dir         schema.Direction
	Kind        schema.Kind
}

// ChainState is what a consumer keeps of one batch chain (a row of run_state).
type ChainState struct {
	Last uint64 // the highest seq seen
	// Seen counts the distinct batches counted; FromStart says the first was the chain's first
	// (prev_seq 0), so Seen is every batch that arrived (false for chains counted before migration 3).
	Seen      uint64
	FromStart bool
	// Linked: a run link (prev_run) named this chain; its batches counted since lower that link's K.
	Linked bool
	// Stored is when the chain was last active: the stored time (unix ns) of the newest batch that
	// changed it (a batch of it, or a run link naming it). Retention and the chains kept in memory
	// at start go by it.
	Stored int64
}

// Restart is one run link (a row of restarts): the first batch of direction Dir of run RunID of Host
// named the previous run of the host.
type Restart struct {
	RunKey
	PrevRunID, PrevEnd string
	PrevLastSeq        uint64
	PrevBatches        uint64
	PrevEvents         uint64
	PrevSeen           string // all, partial or unseen (stream.PrevSeen)
	Seen               uint64 // batches of the previous run (this direction) counted
	Missing            int64  // K; -1 when it cannot be told
	DownFrom, DownTo   int64  // unix ns
	StreamSeq          uint64
	Stored             time.Time
}

// Gap is a batch that did not follow the last one seen of its chain.
type Gap struct {
	RunKey
	AfterSeq, Seq, PrevSeq, StreamSeq uint64
	Stored                            time.Time
}

// Hole is a range of batch seqs [From, To] of a chain that a gap showed missing and no batch filled yet.
type Hole struct{ From, To uint64 }

// Duplicate is a message repeating a batch already counted (same host, run, direction and seq).
type Duplicate struct {
	RunKey
	Seq       uint64
	Stream    string
	StreamSeq uint64
	Stored    time.Time
}

// DeadLetter is a message that was not a valid batch.
type DeadLetter struct {
	Stream    string
	StreamSeq uint64
	Subject   string
	Reason    string // short token: malformed, truncated, unsupported_major
	Detail    string // the decoder's error
	Stored    time.Time
	Copied    bool // the copy reached the dead-letter subject
}

// Delta is everything one transaction adds. The zero value is not usable: call NewDelta.
type Delta struct {
	Conns   map[ConnKey]uint64
	Seen    map[SeenKey]Span
	Batches map[BatchKey]*BatchAgg
	Runs    map[RunKey]ChainState
	Gaps    []Gap
	// Restarts are new run links; Recovered counts, per previous run's chain, the batches counted after
	// a link named it, applied to that link after Restarts.
	Restarts  []Restart
	Recovered map[RunKey]uint64
	Dead      []DeadLetter
	// Holes holds the complete new hole list of every chain whose holes changed (empty: none left).
	Holes map[RunKey][]Hole
	Dups  []Duplicate
	// Ends holds the end events per ConnKey (bucket of end time); Procs the connections per process.
	Ends  map[ConnKey]*EndAgg
	Procs map[ProcKey]uint64
	// Names counts the connections per DNS name after the first (conn_more_names): an event with k
	// distinct names adds to k-1 rows.
	Names map[NameKey]uint64
	// Locals counts the connections per local address (conn_local).
	Locals map[LocalKey]uint64
	// EndNames sums the end events per DNS name after the first (end_more_names), as Names.
	EndNames map[NameKey]*EndNameAgg
	// Events (begins), EndEvents and Messages (valid batches of both kinds) count what went into the
	// delta (for stats).
	Events, EndEvents, Messages uint64
}

// NewDelta returns an empty Delta.
func NewDelta() *Delta {
	return &Delta{Conns: map[ConnKey]uint64{}, Seen: map[SeenKey]Span{}, Batches: map[BatchKey]*BatchAgg{}, Runs: map[RunKey]ChainState{}, Holes: map[RunKey][]Hole{},
		Recovered: map[RunKey]uint64{}, Ends: map[ConnKey]*EndAgg{}, Procs: map[ProcKey]uint64{}, Names: map[NameKey]uint64{},
		Locals: map[LocalKey]uint64{}, EndNames: map[NameKey]*EndNameAgg{}}
}

// Reset empties d for reuse, keeping the maps' memory.
func (d *Delta) Reset() {
	clear(d.Conns)
	clear(d.Seen)
	clear(d.Batches)
	clear(d.Runs)
	clear(d.Holes)
	clear(d.Recovered)
	clear(d.Ends)
	clear(d.Procs)
	clear(d.Names)
	clear(d.Locals)
	clear(d.EndNames)
	d.Gaps, d.Dead, d.Dups, d.Restarts = d.Gaps[:0], d.Dead[:0], d.Dups[:0], d.Restarts[:0]
	d.Events, d.EndEvents, d.Messages = 0, 0, 0
}

// Checkpoint names the consumer whose position a Commit advances.
type Checkpoint struct {
	Consumer, Stream string
	Filters          []string
	Seq              uint64
}

// ErrCheckpointMoved means another writer advanced the checkpoint past what this one expected: two
// flowstat processes share the durable name and database. The transaction was rolled back.
var ErrCheckpointMoved = errors.New("checkpoint moved by another writer")

// Commit applies d and moves the checkpoint from prev to cp.Seq in one transaction. prev is the
// checkpoint this writer last read or wrote; if the stored one differs the commit is refused, so a
// second process on the same durable cannot double count.
func (s *Store) Commit(ctx context.Context, d *Delta, cp Checkpoint, prev uint64) error {
	return s.inTx(ctx, func(tx *sql.Tx) error {
		var cur sql.NullInt64
		err := tx.QueryRowContext(ctx, s.rebind(`SELECT seq FROM checkpoints WHERE consumer = ? AND stream = ?`+s.forUpdate()), cp.Consumer, cp.Stream).Scan(&cur)
		if err != nil && !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		if uint64(cur.Int64) != prev {
			return fmt.Errorf("%w: stored %d, expected %d", ErrCheckpointMoved, cur.Int64, prev)
		}
		if err := s.applyDelta(ctx, tx, d); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, s.rebind(`INSERT INTO checkpoints (consumer, stream, seq, filters, updated_ns) VALUES (?, ?, ?, ?, ?)
			ON CONFLICT (consumer, stream) DO UPDATE SET seq = excluded.seq, filters = excluded.filters, updated_ns = excluded.updated_ns`),
			cp.Consumer, cp.Stream, int64(cp.Seq), strings.Join(cp.Filters, " "), time.Now().UnixNano()); err != nil {
			return err
		}
		if s.InTxHook != nil {
			return s.InTxHook()
		}
		return nil
	})
}

// ApplyReplay adds d without touching any checkpoint (a replay chunk; see BeginReplay).
func (s *Store) ApplyReplay(ctx context.Context, d *Delta) error {
	return s.inTx(ctx, func(tx *sql.Tx) error { return s.applyDelta(ctx, tx, d) })
}

// inTx runs f in a transaction and commits it. PostgreSQL may abort a transaction that deadlocks with
// another writer (a replay beside the live consumer); that one is retried, f being repeatable.
func (s *Store) inTx(ctx context.Context, f func(tx *sql.Tx) error) error {
	for attempt := 0; ; attempt++ {
		err := func() error {
			tx, err := s.db.BeginTx(ctx, nil)
			if err != nil {
				return err
			}
			defer tx.Rollback()
			if err := f(tx); err != nil {
				return err
			}
			return tx.Commit()
		}()
		var pe *pgconn.PgError
		if attempt < 5 && errors.As(err, &pe) && (pe.Code == "40P01" || pe.Code == "40001") {
			time.Sleep(time.Duration(10<<attempt) * time.Millisecond)
			continue
		}
		return err
	}
}

func (s *Store) forUpdate() string {
	if s.kind == Postgres {
		return " FOR UPDATE"
	}
	return ""
}

// rowsPerStmt bounds multi-row upserts: far below SQLite's 32766 variables and PostgreSQL's 65535
// parameters, large enough that statement overhead is negligible.
const rowsPerStmt = 200

// upserter batches rows into multi-row INSERT ... ON CONFLICT statements.
type upserter struct {
	s      *Store
	tx     *sql.Tx
	head   string // INSERT INTO t (cols) VALUES
	tail   string // ON CONFLICT ...
	ncol   int
	args   []any
	rows   int
	stmts  map[int]*sql.Stmt
	ctx    context.Context
	placeh string
}

func newUpserter(ctx context.Context, s *Store, tx *sql.Tx, head, tail string, ncol int) *upserter {
	ph := "(" + strings.TrimSuffix(strings.Repeat("?,", ncol), ",") + ")"
	return &upserter{s: s, tx: tx, head: head, tail: tail, ncol: ncol, ctx: ctx, placeh: ph, stmts: map[int]*sql.Stmt{}}
}

func (u *upserter) add(vals ...any) error {
	u.args = append(u.args, vals...)
	u.rows++
	if u.rows == rowsPerStmt {
		return u.flush()
	}
	return nil
}

func (u *upserter) flush() error {
	if u.rows == 0 {
		return nil
	}
	st := u.stmts[u.rows]
	if st == nil {
		var b strings.Builder
		b.WriteString(u.head)
		for i := 0; i < u.rows; i++ {
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteString(u.placeh)
		}
		b.WriteByte(' ')
		b.WriteString(u.tail)
		var err error
		st, err = u.tx.PrepareContext(u.ctx, u.s.rebind(b.String()))
		if err != nil {
			return err
		}
		u.stmts[u.rows] = st
	}
	if _, err := st.ExecContext(u.ctx, u.args...); err != nil {
		return err
	}
	u.args, u.rows = u.args[:0], 0
	return nil
}

func (u *upserter) close() {
	for _, st := range u.stmts {
		st.Close()
	}
}

func dirText(d schema.Direction) string { return d.String() }

func boolInt(b bool) int64 {
	if b {
		return 1
	}
	return 0
}

func mapKeys[K comparable, V any](m map[K]V) []K {
	ks := make([]K, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}

// order sorts keys by primary key. PostgreSQL takes row locks in the order rows are written, so two
// transactions writing overlapping rows in the same order cannot deadlock; SQLite's b-tree inserts go
// faster in key order (measured: about a fifth of B6).
func order[K any](keys []K, cmp func(a, b K) int) []K {
	slices.SortFunc(keys, cmp)
	return keys
}

func cmpConnKey(a, b ConnKey) int {
	return cmp.Or(cmp.Compare(a.Bucket, b.Bucket), strings.Compare(a.Host, b.Host), cmp.Compare(a.Dir, b.Dir),
		a.Peer.Compare(b.Peer), strings.Compare(a.Name, b.Name), cmp.Compare(a.Port, b.Port))
}

func cmpNameKey(a, b NameKey) int {
	return cmp.Or(cmp.Compare(a.Bucket, b.Bucket), strings.Compare(a.Host, b.Host), cmp.Compare(a.Dir, b.Dir),
		a.Peer.Compare(b.Peer), cmp.Compare(a.Port, b.Port), strings.Compare(a.Name, b.Name))
}

func cmpLocalKey(a, b LocalKey) int {
	return cmp.Or(cmp.Compare(a.Bucket, b.Bucket), strings.Compare(a.Host, b.Host), cmp.Compare(a.Dir, b.Dir),
		a.Local.Compare(b.Local), a.Peer.Compare(b.Peer), cmp.Compare(a.Port, b.Port))
}

func cmpSeenKey(a, b SeenKey) int {
	return cmp.Or(strings.Compare(a.Host, b.Host), cmp.Compare(a.Dir, b.Dir), a.Peer.Compare(b.Peer), cmp.Compare(a.Port, b.Port))
}

func cmpBatchKey(a, b BatchKey) int {
	return cmp.Or(cmp.Compare(a.Bucket, b.Bucket), strings.Compare(a.Host, b.Host), cmp.Compare(a.Dir, b.Dir))
}

func cmpRunKey(a, b RunKey) int {
	return cmp.Or(strings.Compare(a.Host, b.Host), strings.Compare(a.RunID, b.RunID), cmp.Compare(a.Dir, b.Dir), cmp.Compare(a.Kind, b.Kind))
}

// addrText caches the text form of addresses: a chunk has far fewer distinct peers than rows.
type addrText map[netip.Addr]string

func (m addrText) get(a netip.Addr) string {
	if s, ok := m[a]; ok {
		return s
	}
	s := ""
	if a.IsValid() {
		s = a.String()
	}
	m[a] = s
	return s
}

func (s *Store) applyDelta(ctx context.Context, tx *sql.Tx, d *Delta) error {
	at := addrText{}
	u := newUpserter(ctx, s, tx, `INSERT INTO conn_agg (bucket, host, direction, peer, peer_name, port, conns) VALUES `,
		`ON CONFLICT (bucket, host, direction, peer, peer_name, port) DO UPDATE SET conns = conn_agg.conns + excluded.conns`, 7)
	defer u.close()
	for _, k := range order(mapKeys(d.Conns), cmpConnKey) {
		n := d.Conns[k]
		if err := u.add(k.Bucket, k.Host, dirText(k.Dir), at.get(k.Peer), k.Name, int64(k.Port), int64(n)); err != nil {
			return fmt.Errorf("conn_agg: %w", err)
		}
	}
	if err := u.flush(); err != nil {
		return fmt.Errorf("conn_agg: %w", err)
	}

	if len(d.Names) > 0 {
		un := newUpserter(ctx, s, tx, `INSERT INTO conn_more_names (bucket, host, direction, peer, port, name, conns) VALUES `,
			`ON CONFLICT (bucket, host, direction, peer, port, name) DO UPDATE SET conns = conn_more_names.conns + excluded.conns`, 7)
		defer un.close()
		for _, k := range order(mapKeys(d.Names), cmpNameKey) {
			if err := un.add(k.Bucket, k.Host, dirText(k.Dir), at.get(k.Peer), int64(k.Port), k.Name, int64(d.Names[k])); err != nil {
				return fmt.Errorf("conn_more_names: %w", err)
			}
		}
		if err := un.flush(); err != nil {
			return fmt.Errorf("conn_more_names: %w", err)
		}
	}

	ul := newUpserter(ctx, s, tx, `INSERT INTO conn_local (bucket, host, direction, local, peer, port, conns) VALUES `,
		`ON CONFLICT (bucket, host, direction, local, peer, port) DO UPDATE SET conns = conn_local.conns + excluded.conns`, 7)
	defer ul.close()
	for _, k := range order(mapKeys(d.Locals), cmpLocalKey) {
		if err := ul.add(k.Bucket, k.Host, dirText(k.Dir), at.get(k.Local), at.get(k.Peer), int64(k.Port), int64(d.Locals[k])); err != nil {
			return fmt.Errorf("conn_local: %w", err)
		}
	}
	if err := ul.flush(); err != nil {
		return fmt.Errorf("conn_local: %w", err)
	}

	// MIN/MAX as CASE: SQLite's two-argument min() is PostgreSQL's LEAST(); CASE is the same in both.
	u2 := newUpserter(ctx, s, tx, `INSERT INTO peer_seen (host, direction, peer, port, first_ns, last_ns, peer_name, name_ns) VALUES `,
		`ON CONFLICT (host, direction, peer, port) DO UPDATE SET
			first_ns = CASE WHEN excluded.first_ns < peer_seen.first_ns THEN excluded.first_ns ELSE peer_seen.first_ns END,
			last_ns = CASE WHEN excluded.last_ns > peer_seen.last_ns THEN excluded.last_ns ELSE peer_seen.last_ns END,
			peer_name = CASE WHEN excluded.peer_name <> '' AND (peer_seen.peer_name = '' OR excluded.name_ns < peer_seen.name_ns
				OR excluded.name_ns = peer_seen.name_ns AND excluded.peer_name < peer_seen.peer_name) THEN excluded.peer_name ELSE peer_seen.peer_name END,
			name_ns = CASE WHEN excluded.peer_name <> '' AND (peer_seen.peer_name = '' OR excluded.name_ns < peer_seen.name_ns
				OR excluded.name_ns = peer_seen.name_ns AND excluded.peer_name < peer_seen.peer_name) THEN excluded.name_ns ELSE peer_seen.name_ns END`, 8)
	defer u2.close()
	for _, k := range order(mapKeys(d.Seen), cmpSeenKey) {
		sp := d.Seen[k]
		if err := u2.add(k.Host, dirText(k.Dir), at.get(k.Peer), int64(k.Port), sp.First, sp.Last, sp.Name, sp.NameNS); err != nil {
			return fmt.Errorf("peer_seen: %w", err)
		}
	}
	if err := u2.flush(); err != nil {
		return fmt.Errorf("peer_seen: %w", err)
	}

	u3 := newUpserter(ctx, s, tx, `INSERT INTO batch_agg (bucket, host, direction, batches, events, drops_kernel, drops_reader, drops_queue, drops_spool, drops_publish,
			end_batches, end_events, end_drops_kernel, end_drops_reader, end_drops_queue, end_drops_spool, end_drops_publish) VALUES `,
		`ON CONFLICT (bucket, host, direction) DO UPDATE SET batches = batch_agg.batches + excluded.batches,
			events = batch_agg.events + excluded.events, drops_kernel = batch_agg.drops_kernel + excluded.drops_kernel,
			drops_reader = batch_agg.drops_reader + excluded.drops_reader, drops_queue = batch_agg.drops_queue + excluded.drops_queue,
			drops_spool = batch_agg.drops_spool + excluded.drops_spool, drops_publish = batch_agg.drops_publish + excluded.drops_publish,
			end_batches = batch_agg.end_batches + excluded.end_batches, end_events = batch_agg.end_events + excluded.end_events,
			end_drops_kernel = batch_agg.end_drops_kernel + excluded.end_drops_kernel, end_drops_reader = batch_agg.end_drops_reader + excluded.end_drops_reader,
			end_drops_queue = batch_agg.end_drops_queue + excluded.end_drops_queue, end_drops_spool = batch_agg.end_drops_spool + excluded.end_drops_spool,
			end_drops_publish = batch_agg.end_drops_publish + excluded.end_drops_publish`, 17)
	defer u3.close()
	for _, k := range order(mapKeys(d.Batches), cmpBatchKey) {
		b := d.Batches[k]
		if err := u3.add(k.Bucket, k.Host, dirText(k.Dir), int64(b.Batches), int64(b.Events), int64(b.Drops.Kernel), int64(b.Drops.Reader),
			int64(b.Drops.Queue), int64(b.Drops.Spool), int64(b.Drops.Publish), int64(b.EndBatches), int64(b.EndEvents),
			int64(b.EndDrops.Kernel), int64(b.EndDrops.Reader), int64(b.EndDrops.Queue), int64(b.EndDrops.Spool), int64(b.EndDrops.Publish)); err != nil {
			return fmt.Errorf("batch_agg: %w", err)
		}
	}
	if err := u3.flush(); err != nil {
		return fmt.Errorf("batch_agg: %w", err)
	}

	if err := s.applyEnds(ctx, tx, d, at); err != nil {
		return err
	}

	u4 := newUpserter(ctx, s, tx, `INSERT INTO run_state (host, run_id, direction, kind, last_seq, seen_batches, from_start, linked, stored_ns) VALUES `,
		`ON CONFLICT (host, run_id, direction, kind) DO UPDATE SET last_seq = excluded.last_seq, seen_batches = excluded.seen_batches,
			from_start = excluded.from_start, linked = excluded.linked, stored_ns = excluded.stored_ns`, 9)
	defer u4.close()
	for _, k := range order(mapKeys(d.Runs), cmpRunKey) {
		c := d.Runs[k]
		if err := u4.add(k.Host, k.RunID, dirText(k.Dir), k.Kind.String(), int64(c.Last), int64(c.Seen), boolInt(c.FromStart), boolInt(c.Linked), c.Stored); err != nil {
			return fmt.Errorf("run_state: %w", err)
		}
	}
	if err := u4.flush(); err != nil {
		return fmt.Errorf("run_state: %w", err)
	}

	// Gaps and dead letters are facts keyed by what they describe: DO NOTHING keeps them idempotent.
	for _, g := range d.Gaps {
		if _, err := tx.ExecContext(ctx, s.rebind(`INSERT INTO gaps (host, run_id, direction, kind, after_seq, seq, prev_seq, stream_seq, stored_ns)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (host, run_id, direction, seq) DO NOTHING`),
			g.Host, g.RunID, dirText(g.Dir), g.Kind.String(), int64(g.AfterSeq), int64(g.Seq), int64(g.PrevSeq), int64(g.StreamSeq), g.Stored.UnixNano()); err != nil {
			return fmt.Errorf("gaps: %w", err)
		}
	}
	for _, k := range order(mapKeys(d.Holes), cmpRunKey) {
		if _, err := tx.ExecContext(ctx, s.rebind(`DELETE FROM holes WHERE host = ? AND run_id = ? AND direction = ? AND kind = ?`), k.Host, k.RunID, dirText(k.Dir), k.Kind.String()); err != nil {
			return fmt.Errorf("holes: %w", err)
		}
		for _, h := range d.Holes[k] {
			if _, err := tx.ExecContext(ctx, s.rebind(`INSERT INTO holes (host, run_id, direction, kind, from_seq, to_seq) VALUES (?, ?, ?, ?, ?, ?)`),
				k.Host, k.RunID, dirText(k.Dir), k.Kind.String(), int64(h.From), int64(h.To)); err != nil {
				return fmt.Errorf("holes: %w", err)
			}
		}
	}
	for _, r := range d.Restarts {
		if _, err := tx.ExecContext(ctx, s.rebind(`INSERT INTO restarts (host, run_id, direction, kind, prev_run_id, prev_end, prev_last_seq,
			prev_batches, prev_events, prev_seen, seen_batches, missing_batches, down_from, down_to, stream_seq, stored_ns)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (host, run_id, direction, kind) DO NOTHING`),
			r.Host, r.RunID, dirText(r.Dir), r.Kind.String(), r.PrevRunID, r.PrevEnd, int64(r.PrevLastSeq), int64(r.PrevBatches), int64(r.PrevEvents),
			r.PrevSeen, int64(r.Seen), r.Missing, r.DownFrom, r.DownTo, int64(r.StreamSeq), r.Stored.UnixNano()); err != nil {
			return fmt.Errorf("restarts: %w", err)
		}
	}
	// Late batches of a linked run lower its K (only where K is told: prev_seen all).
	for _, k := range order(mapKeys(d.Recovered), cmpRunKey) {
		n := int64(d.Recovered[k])
		if _, err := tx.ExecContext(ctx, s.rebind(`UPDATE restarts SET seen_batches = seen_batches + ?,
			missing_batches = CASE WHEN prev_seen <> 'all' THEN -1 WHEN prev_batches > seen_batches + ? THEN prev_batches - seen_batches - ? ELSE 0 END
			WHERE host = ? AND prev_run_id = ? AND direction = ? AND kind = ?`), n, n, n, k.Host, k.RunID, dirText(k.Dir), k.Kind.String()); err != nil {
			return fmt.Errorf("restarts: %w", err)
		}
	}
	for _, du := range d.Dups {
		if _, err := tx.ExecContext(ctx, s.rebind(`INSERT INTO duplicate_batches (stream, stream_seq, host, run_id, direction, kind, seq, stored_ns)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (stream, stream_seq) DO NOTHING`),
			du.Stream, int64(du.StreamSeq), du.Host, du.RunID, dirText(du.Dir), du.Kind.String(), int64(du.Seq), du.Stored.UnixNano()); err != nil {
			return fmt.Errorf("duplicate_batches: %w", err)
		}
	}
	for _, dl := range d.Dead {
		copied := 0
		if dl.Copied {
			copied = 1
		}
		if _, err := tx.ExecContext(ctx, s.rebind(`INSERT INTO deadletters (stream, stream_seq, subject, reason, detail, stored_ns, copied)
			VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (stream, stream_seq) DO NOTHING`),
			dl.Stream, int64(dl.StreamSeq), dl.Subject, dl.Reason, dl.Detail, dl.Stored.UnixNano(), copied); err != nil {
			return fmt.Errorf("deadletters: %w", err)
		}
	}
	return nil
}

// CheckpointOf returns the committed stream sequence and filters of consumer on stream; found is false
// when the database holds no checkpoint for it (a consumer this database never started).
func (s *Store) CheckpointOf(ctx context.Context, consumer, stream string) (seq uint64, filters []string, found bool, err error) {
	var n int64
	var f string
	err = s.db.QueryRowContext(ctx, s.rebind(`SELECT seq, filters FROM checkpoints WHERE consumer = ? AND stream = ?`), consumer, stream).Scan(&n, &f)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil, false, nil
	}
	if err != nil {
		return 0, nil, false, err
	}
	return uint64(n), strings.Fields(f), true, nil
}

// InitCheckpoint records where a newly created consumer starts (seq = its first stream sequence - 1)
// unless a checkpoint exists already, and returns the stored one. From then on a restart resumes from
// the database even if nothing was consumed yet, so a consumer created with "new" or "from a time"
// never skips what arrived while flowstat was down.
func (s *Store) InitCheckpoint(ctx context.Context, cp Checkpoint) (uint64, error) {
	if _, err := s.db.ExecContext(ctx, s.rebind(`INSERT INTO checkpoints (consumer, stream, seq, filters, updated_ns) VALUES (?, ?, ?, ?, ?)
		ON CONFLICT (consumer, stream) DO NOTHING`),
		cp.Consumer, cp.Stream, int64(cp.Seq), strings.Join(cp.Filters, " "), time.Now().UnixNano()); err != nil {
		return 0, err
	}
	seq, _, _, err := s.CheckpointOf(ctx, cp.Consumer, cp.Stream)
	return seq, err
}

// RecordLoss notes that stream sequences [from, to] were deleted from the stream before consumer read
// them, so the database shows that data is missing there.
func (s *Store) RecordLoss(ctx context.Context, consumer, stream string, from, to uint64) error {
	_, err := s.db.ExecContext(ctx, s.rebind(`INSERT INTO stream_losses (consumer, stream, from_seq, to_seq, detected_ns) VALUES (?, ?, ?, ?, ?)
		ON CONFLICT (consumer, stream, from_seq) DO UPDATE SET to_seq = excluded.to_seq`),
		consumer, stream, int64(from), int64(to), time.Now().UnixNano())
	return err
}

// overlong is the SQL condition on a row's host and run_id columns for ids beyond the bounds the
// decoder enforces (schema.MaxHostLen, schema.MaxRunIDLen). Counted in characters: the consumer stores a
// run id after replacing each run of invalid UTF-8 bytes with one U+FFFD, so a valid one may take up to
// three bytes a character. SQLite's length() stops at a NUL, so there the bytes are bounded too (four
// bytes a character at most). Only a flowstat from before the bounds wrote longer ids.
func (s *Store) overlong() string {
	c := fmt.Sprintf(`(length(host) > %d OR length(run_id) > %d`, schema.MaxHostLen, schema.MaxRunIDLen)
	if s.kind == SQLite {
		c += fmt.Sprintf(` OR length(CAST(host AS BLOB)) > %d OR length(CAST(run_id AS BLOB)) > %d`, 4*schema.MaxHostLen, 4*schema.MaxRunIDLen)
	}
	return c + `)`
}

// chainTables hold the state of the batch chains (host, run id, direction), of which a consumer keeps
// the most recent in memory.
var chainTables = []string{"run_state", "holes"}

// PurgeOverlongChains deletes the chain-state rows whose host or run id exceed the decoder's bounds,
// without reading them, and returns how many it deleted. A flowstat from before the bounds stored
// whatever a publisher sent: loading 900 KB run ids took a restart 1 GB of memory. Such a chain cannot
// continue anyway (its batches are refused now), so only its gap detection is lost.
func (s *Store) PurgeOverlongChains(ctx context.Context) (int64, error) {
	var total int64
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		total = 0
		for _, t := range chainTables {
			res, err := tx.ExecContext(ctx, `DELETE FROM `+t+` WHERE `+s.overlong())
			if err != nil {
				return fmt.Errorf("%s: %w", t, err)
			}
			n, _ := res.RowsAffected()
			total += n
		}
		return nil
	})
	return total, err
}

// RunStates loads the state of every batch chain; the consumer loads only the most recent ones
// (RecentChains) and the others by key (ChainReader). Rows with ids beyond the bounds are never read
// (see PurgeOverlongChains).
func (s *Store) RunStates(ctx context.Context) (map[RunKey]ChainState, error) {
	m := map[RunKey]ChainState{}
	err := s.each(ctx, `SELECT host, run_id, direction, kind, last_seq, seen_batches, from_start, linked, stored_ns FROM run_state WHERE NOT `+s.overlong(), nil,
		func(sc scanner) error {
			k, c, err := scanChain(sc)
			m[k] = c
			return err
		})
	return m, err
}

// scanChain reads the columns host, run_id, direction, kind, last_seq, seen_batches, from_start,
// linked, stored_ns.
func scanChain(sc scanner) (RunKey, ChainState, error) {
	var k RunKey
	var dir, kind string
	var seq, seen, fromStart, linked, stored int64
	if err := sc.Scan(&k.Host, &k.RunID, &dir, &kind, &seq, &seen, &fromStart, &linked, &stored); err != nil {
		return k, ChainState{}, err
	}
	k.Dir, _ = schema.ParseDirection(dir)
	k.Kind = parseKind(kind)
	return k, ChainState{Last: uint64(seq), Seen: uint64(seen), FromStart: fromStart != 0, Linked: linked != 0, Stored: stored}, nil
}

// Holes loads the missing seq ranges of every chain, sorted by From, to tell a late batch from a copy.
// Rows with ids beyond the bounds are never read (see PurgeOverlongChains).
func (s *Store) Holes(ctx context.Context) (map[RunKey][]Hole, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT host, run_id, direction, kind, from_seq, to_seq FROM holes WHERE NOT `+s.overlong()+` ORDER BY host, run_id, direction, kind, from_seq`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	m := map[RunKey][]Hole{}
	for rows.Next() {
		var k RunKey
		var dir, kind string
		var from, to int64
		if err := rows.Scan(&k.Host, &k.RunID, &dir, &kind, &from, &to); err != nil {
			return nil, err
		}
		k.Dir, _ = schema.ParseDirection(dir)
		k.Kind = parseKind(kind)
		m[k] = append(m[k], Hole{From: uint64(from), To: uint64(to)})
	}
	return m, rows.Err()
}

// DuplicateStreamSeqs returns the stream sequences of stream whose messages repeated a counted batch, so
// a replay skips them as the live consumer did.
func (s *Store) DuplicateStreamSeqs(ctx context.Context, stream string) (map[uint64]bool, error) {
	rows, err := s.db.QueryContext(ctx, s.rebind(`SELECT stream_seq FROM duplicate_batches WHERE stream = ?`), stream)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	m := map[uint64]bool{}
	for rows.Next() {
		var n int64
		if err := rows.Scan(&n); err != nil {
			return nil, err
		}
		m[uint64(n)] = true
	}
	return m, rows.Err()
}

// EnsureBucket records the bucket width on first use and refuses a different one later: buckets of
// different widths in one table would make every per-bucket query wrong.
func (s *Store) EnsureBucket(ctx context.Context, width time.Duration) error {
	secs := int64(width / time.Second)
	if secs < 1 || width%time.Second != 0 {
		return fmt.Errorf("bucket %v: must be a whole number of seconds, at least 1s", width)
	}
	if _, err := s.db.ExecContext(ctx, s.rebind(`INSERT INTO meta (key, value) VALUES ('bucket_seconds', ?) ON CONFLICT (key) DO NOTHING`), strconv.FormatInt(secs, 10)); err != nil {
		return err
	}
	got, err := s.BucketWidth(ctx)
	if err != nil {
		return err
	}
	if got != width {
		return fmt.Errorf("database %s aggregates in buckets of %v, not %v: use --bucket %v or another database", s.where, got, width, got)
	}
	return nil
}

// BucketWidth returns the recorded bucket width, or 0 when nothing was aggregated yet.
func (s *Store) BucketWidth(ctx context.Context) (time.Duration, error) {
	var v string
	err := s.db.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = 'bucket_seconds'`).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("meta bucket_seconds %q: %v", v, err)
	}
	return time.Duration(n) * time.Second, nil
}
