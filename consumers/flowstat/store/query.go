package store

import (
	"context"
	"database/sql"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/flowbus/flowbus/schema"
)

// BeginReplay starts the rebuild of buckets [fromS, toS) (unix seconds, bucket aligned): in one
// transaction it deletes their conn_agg, conn_more_names, conn_local, batch_agg, end_agg, end_more_names and proc_agg rows, records the replay as unfinished, and reads
// the consumer's checkpoint. The caller then re-reads the stream up to that sequence (messages after it
// are the live consumer's) and adds only what falls in the range with ApplyReplay, then calls
// FinishReplay. Reading the checkpoint and deleting in one transaction is what keeps a concurrent
// `flowstat run` and the replay from counting a message twice or not at all.
func (s *Store) BeginReplay(ctx context.Context, consumer, stream string, fromS, toS int64) (id int64, upto uint64, filters []string, err error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, 0, nil, err
	}
	defer tx.Rollback()
	var seq int64
	var f string
	if err := tx.QueryRowContext(ctx, s.rebind(`SELECT seq, filters FROM checkpoints WHERE consumer = ? AND stream = ?`+s.forUpdate()), consumer, stream).Scan(&seq, &f); err != nil {
		return 0, 0, nil, fmt.Errorf("no checkpoint of consumer %q on stream %q in %s: run `flowstat run` first (%v)", consumer, stream, s.where, err)
	}
	for _, t := range []string{"conn_agg", "conn_more_names", "conn_local", "batch_agg", "end_agg", "end_more_names", "proc_agg"} {
		if _, err := tx.ExecContext(ctx, s.rebind(`DELETE FROM `+t+` WHERE bucket >= ? AND bucket < ?`), fromS, toS); err != nil {
			return 0, 0, nil, err
		}
	}
	id = time.Now().UnixNano()
	if _, err := tx.ExecContext(ctx, s.rebind(`INSERT INTO replays (started_ns, from_s, to_s, upto_seq, finished_ns) VALUES (?, ?, ?, ?, 0)`), id, fromS, toS, seq); err != nil {
		return 0, 0, nil, err
	}
	if err := tx.Commit(); err != nil {
		return 0, 0, nil, err
	}
	return id, uint64(seq), splitFilters(f), nil
}

// FinishReplay marks replay id complete.
func (s *Store) FinishReplay(ctx context.Context, id int64) error {
	_, err := s.db.ExecContext(ctx, s.rebind(`UPDATE replays SET finished_ns = ? WHERE started_ns = ?`), time.Now().UnixNano(), id)
	return err
}

func splitFilters(f string) []string {
	var out []string
	start := -1
	for i := 0; i <= len(f); i++ {
		if i == len(f) || f[i] == ' ' {
			if start >= 0 {
				out = append(out, f[start:i])
				start = -1
			}
			continue
		}
		if start < 0 {
			start = i
		}
	}
	return out
}

// HostTotal is one line of the summary: what the database holds for one host and direction.
type HostTotal struct {
	Host      string `json:"host"`
	Direction string `json:"direction"`
	Conns     int64  `json:"connections"`
	Batches   int64  `json:"batches"`
	Events    int64  `json:"events"`
	Drops     int64  `json:"drops"`
	Kernel    int64  `json:"drops_kernel"`
	Reader    int64  `json:"drops_reader"`
	Queue     int64  `json:"drops_queue"`
	Spool     int64  `json:"drops_spool"`
	Publish   int64  `json:"drops_publish"`
	Gaps      int64  `json:"gaps"`
	// Restarts counts the run links of this host and direction (first batches naming the previous
	// run); NeverArrived sums their K where it is told; DownNs sums their capture downtime.
	Restarts     int64 `json:"restarts"`
	NeverArrived int64 `json:"restart_missing_batches"`
	DownNs       int64 `json:"restart_downtime_ns"`
	// Ends counts the end events (connections that ended), EndBatches and EndEvents the end batches
	// and their events, EndDrops the end events the agents reported lost; BytesSent and
	// BytesReceived are the ends' payload bytes from this host's side, MeanDuration their mean.
	Ends          int64 `json:"ends"`
	EndBatches    int64 `json:"end_batches"`
	EndEvents     int64 `json:"end_events"`
	EndDrops      int64 `json:"end_drops"`
	BytesSent     int64 `json:"bytes_sent"`
	BytesReceived int64 `json:"bytes_received"`
	MeanDuration  int64 `json:"mean_duration_ns"`
	// First and Last are the first and last bucket holding batches of this host and direction.
	First time.Time `json:"first_bucket"`
	Last  time.Time `json:"last_bucket"`
}

// GapRow is one recorded gap: batches of (host, run, direction) between AfterSeq and Seq are missing
// (AfterSeq 0: the run's batches before Seq were never seen).
type GapRow struct {
	Host      string    `json:"host"`
	RunID     string    `json:"run_id"`
	Direction string    `json:"direction"`
	Kind      string    `json:"kind"` // begin or end: the chain of begin or of end batches
	AfterSeq  int64     `json:"after_seq"`
	Seq       int64     `json:"seq"`
	PrevSeq   int64     `json:"prev_seq"`
	StreamSeq int64     `json:"stream_seq"`
	Stored    time.Time `json:"stored"`
}

// RestartRow is one run link: run RunID of Host began, in direction Direction, after run PrevRunID
// ended (PrevEnd: stopped or unknown) having sealed PrevBatches batches up to seq PrevLastSeq, of which
// Missing never arrived (-1: not told, PrevSeen is partial or unseen); capture was down from DownFrom
// to DownTo.
type RestartRow struct {
	Host        string    `json:"host"`
	RunID       string    `json:"run_id"`
	Direction   string    `json:"direction"`
	PrevRunID   string    `json:"prev_run_id"`
	PrevEnd     string    `json:"prev_end"`
	PrevLastSeq int64     `json:"prev_last_seq"`
	PrevBatches int64     `json:"prev_batches"`
	PrevEvents  int64     `json:"prev_events"`
	PrevSeen    string    `json:"prev_seen"`
	Seen        int64     `json:"seen_batches"`
	Missing     int64     `json:"missing_batches"`
	DownFrom    time.Time `json:"down_from"`
	DownTo      time.Time `json:"down_to"`
	DownNs      int64     `json:"down_ns"`
	StreamSeq   int64     `json:"stream_seq"`
	Stored      time.Time `json:"stored"`
}

// RestartTotals sums the run links: Links rows, Runs distinct new runs (a run links once per
// direction), DownNs their capture downtime (each run's once), Missing the batches that never arrived
// where told, Untold the links whose K is not told.
type RestartTotals struct {
	Links   int64 `json:"links"`
	Runs    int64 `json:"runs"`
	DownNs  int64 `json:"downtime_ns"`
	Missing int64 `json:"missing_batches"`
	Untold  int64 `json:"links_missing_unknown"`
}

// CheckpointRow is one consumer position.
type CheckpointRow struct {
	Consumer string    `json:"consumer"`
	Stream   string    `json:"stream"`
	Seq      int64     `json:"seq"`
	Filters  string    `json:"filters"`
	Updated  time.Time `json:"updated"`
}

// LossRow is a range of stream sequences deleted from the stream before the consumer read them.
type LossRow struct {
	Consumer string    `json:"consumer"`
	Stream   string    `json:"stream"`
	From     int64     `json:"from_seq"`
	To       int64     `json:"to_seq"`
	Detected time.Time `json:"detected"`
}

// Summary is what `flowstat summary` prints.
type Summary struct {
	Database      string          `json:"database"`
	SchemaVersion int             `json:"schema_version"`
	BucketSeconds int64           `json:"bucket_seconds"`
	Hosts         []HostTotal     `json:"hosts"`
	GapCount      int64           `json:"gap_count"`
	Gaps          []GapRow        `json:"gaps"`
	DeadLetters   int64           `json:"dead_letters"`
	DeadByReason  map[string]int  `json:"dead_letters_by_reason"`
	NotCopied     int64           `json:"dead_letters_not_copied"`
	Losses        []LossRow       `json:"stream_losses"`
	Duplicates    int64           `json:"duplicate_batches"` // messages repeating a counted batch, counted once
	RestartTotals RestartTotals   `json:"restart_totals"`
	Restarts      []RestartRow    `json:"restarts"` // the newest (at most maxRows)
	Checkpoints   []CheckpointRow `json:"checkpoints"`
	Unfinished    int64           `json:"unfinished_replays"`
}

// Summary totals per host and direction, the newest gaps and restarts (at most maxGaps each), dead
// letters, stream losses and checkpoints.
func (s *Store) Summary(ctx context.Context, maxGaps int) (*Summary, error) {
	sum := &Summary{Database: string(s.kind) + ":" + s.where, DeadByReason: map[string]int{},
		Hosts: []HostTotal{}, Gaps: []GapRow{}, Losses: []LossRow{}, Checkpoints: []CheckpointRow{}, Restarts: []RestartRow{}}
	var err error
	if sum.SchemaVersion, err = s.SchemaVersion(ctx); err != nil {
		return nil, err
	}
	w, err := s.BucketWidth(ctx)
	if err != nil {
		return nil, err
	}
	sum.BucketSeconds = int64(w / time.Second)

	totals := map[[2]string]*HostTotal{}
	get := func(h, d string) *HostTotal {
		k := [2]string{h, d}
		if totals[k] == nil {
			totals[k] = &HostTotal{Host: h, Direction: d}
		}
		return totals[k]
	}
	// The analyst views, so flowstat reports what an analyst's SQL on them finds.
	err = s.each(ctx, `SELECT host, conn_direction, CAST(SUM(batches) AS BIGINT), CAST(SUM(events) AS BIGINT),
		CAST(SUM(drops_kernel) AS BIGINT), CAST(SUM(drops_reader) AS BIGINT), CAST(SUM(drops_queue) AS BIGINT),
		CAST(SUM(drops_spool) AS BIGINT), CAST(SUM(drops_publish) AS BIGINT), MIN(bucket_start), MAX(bucket_start),
		CAST(SUM(end_batches) AS BIGINT), CAST(SUM(end_events) AS BIGINT), CAST(SUM(end_drops) AS BIGINT)
		FROM gaps_and_drops GROUP BY host, conn_direction`, nil, func(sc scanner) error {
		var h, d string
		var v [12]int64
		var first, last dbTime
		if err := sc.Scan(&h, &d, &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &first, &last, &v[9], &v[10], &v[11]); err != nil {
			return err
		}
		t := get(h, d)
		t.Batches, t.Events = v[0], v[1]
		t.Kernel, t.Reader, t.Queue, t.Spool, t.Publish = v[2], v[3], v[4], v[5], v[6]
		// Sums of counters that are never negative: the conversions keep them.
		drops := schema.Drops{Kernel: uint64(v[2]), Reader: uint64(v[3]), Queue: uint64(v[4]), Spool: uint64(v[5]), Publish: uint64(v[6])}
		t.Drops = int64(drops.Total())
		t.First, t.Last = first.T, last.T
		t.EndBatches, t.EndEvents, t.EndDrops = v[9], v[10], v[11]
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := s.endTotals(ctx, get); err != nil {
		return nil, err
	}
	err = s.each(ctx, `SELECT host, conn_direction, CAST(SUM(connections) AS BIGINT) FROM connections_per_host GROUP BY host, conn_direction`, nil, func(sc scanner) error {
		var h, d string
		var n int64
		if err := sc.Scan(&h, &d, &n); err != nil {
			return err
		}
		get(h, d).Conns = n
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = s.each(ctx, `SELECT host, conn_direction, COUNT(*) FROM batch_gaps GROUP BY host, conn_direction`, nil, func(sc scanner) error {
		var h, d string
		var n int64
		if err := sc.Scan(&h, &d, &n); err != nil {
			return err
		}
		get(h, d).Gaps = n
		sum.GapCount += n
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = s.each(ctx, `SELECT host, direction, COUNT(*), CAST(SUM(CASE WHEN missing_batches > 0 THEN missing_batches ELSE 0 END) AS BIGINT),
		CAST(SUM(down_to - down_from) AS BIGINT) FROM restarts WHERE kind = 'begin' GROUP BY host, direction`, nil, func(sc scanner) error {
		var h, d string
		var n, missing, down int64
		if err := sc.Scan(&h, &d, &n, &missing, &down); err != nil {
			return err
		}
		t := get(h, d)
		t.Restarts, t.NeverArrived, t.DownNs = n, missing, down
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, t := range totals {
		sum.Hosts = append(sum.Hosts, *t)
	}
	sort.Slice(sum.Hosts, func(i, j int) bool {
		a, b := sum.Hosts[i], sum.Hosts[j]
		return a.Host < b.Host || a.Host == b.Host && a.Direction < b.Direction
	})

	if maxGaps > 0 {
		err = s.each(ctx, `SELECT host, run_id, direction, kind, after_seq, seq, prev_seq, stream_seq, stored_ns FROM gaps ORDER BY stream_seq DESC, host, run_id, direction LIMIT ?`,
			[]any{maxGaps}, func(sc scanner) error {
				var g GapRow
				var ns int64
				if err := sc.Scan(&g.Host, &g.RunID, &g.Direction, &g.Kind, &g.AfterSeq, &g.Seq, &g.PrevSeq, &g.StreamSeq, &ns); err != nil {
					return err
				}
				g.Stored = time.Unix(0, ns).UTC()
				sum.Gaps = append(sum.Gaps, g)
				return nil
			})
		if err != nil {
			return nil, err
		}
	}
	rt := &sum.RestartTotals
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*), COALESCE(CAST(SUM(CASE WHEN missing_batches > 0 THEN missing_batches ELSE 0 END) AS BIGINT), 0),
		COALESCE(CAST(SUM(CASE WHEN missing_batches < 0 THEN 1 ELSE 0 END) AS BIGINT), 0) FROM restarts WHERE kind = 'begin'`).Scan(&rt.Links, &rt.Missing, &rt.Untold); err != nil {
		return nil, err
	}
	// A run links once per direction, with the same downtime: count each run's once.
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*), COALESCE(CAST(SUM(d) AS BIGINT), 0) FROM
		(SELECT MAX(down_to - down_from) AS d FROM restarts GROUP BY host, run_id) per_run`).Scan(&rt.Runs, &rt.DownNs); err != nil {
		return nil, err
	}
	if maxGaps > 0 {
		err = s.each(ctx, `SELECT host, run_id, direction, prev_run_id, prev_end, prev_last_seq, prev_batches, prev_events, prev_seen,
			seen_batches, missing_batches, down_from, down_to, stream_seq, stored_ns FROM restarts WHERE kind = 'begin' ORDER BY stream_seq DESC, host, run_id, direction LIMIT ?`,
			[]any{maxGaps}, func(sc scanner) error {
				var r RestartRow
				var from, to, ns int64
				if err := sc.Scan(&r.Host, &r.RunID, &r.Direction, &r.PrevRunID, &r.PrevEnd, &r.PrevLastSeq, &r.PrevBatches, &r.PrevEvents, &r.PrevSeen,
					&r.Seen, &r.Missing, &from, &to, &r.StreamSeq, &ns); err != nil {
					return err
				}
				r.DownFrom, r.DownTo, r.DownNs, r.Stored = time.Unix(0, from).UTC(), time.Unix(0, to).UTC(), to-from, time.Unix(0, ns).UTC()
				sum.Restarts = append(sum.Restarts, r)
				return nil
			})
		if err != nil {
			return nil, err
		}
	}
	err = s.each(ctx, `SELECT reason, COUNT(*), CAST(SUM(1 - copied) AS BIGINT) FROM deadletters GROUP BY reason`, nil, func(sc scanner) error {
		var r string
		var n, notCopied int64
		if err := sc.Scan(&r, &n, &notCopied); err != nil {
			return err
		}
		sum.DeadByReason[r] = int(n)
		sum.DeadLetters += n
		sum.NotCopied += notCopied
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM duplicate_batches`).Scan(&sum.Duplicates); err != nil {
		return nil, err
	}
	err = s.each(ctx, `SELECT consumer, stream, from_seq, to_seq, detected_ns FROM stream_losses ORDER BY consumer, stream, from_seq`, nil, func(sc scanner) error {
		var l LossRow
		var ns int64
		if err := sc.Scan(&l.Consumer, &l.Stream, &l.From, &l.To, &ns); err != nil {
			return err
		}
		l.Detected = time.Unix(0, ns).UTC()
		sum.Losses = append(sum.Losses, l)
		return nil
	})
	if err != nil {
		return nil, err
	}
	if sum.Checkpoints, err = s.Checkpoints(ctx); err != nil {
		return nil, err
	}
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM replays WHERE finished_ns = 0`).Scan(&sum.Unfinished); err != nil {
		return nil, err
	}
	return sum, nil
}

// Checkpoints lists every consumer position the database holds.
func (s *Store) Checkpoints(ctx context.Context) ([]CheckpointRow, error) {
	out := []CheckpointRow{}
	err := s.each(ctx, `SELECT consumer, stream, seq, filters, updated_ns FROM checkpoints ORDER BY consumer, stream`, nil, func(sc scanner) error {
		var c CheckpointRow
		var ns int64
		if err := sc.Scan(&c.Consumer, &c.Stream, &c.Seq, &c.Filters, &ns); err != nil {
			return err
		}
		c.Updated = time.Unix(0, ns).UTC()
		out = append(out, c)
		return nil
	})
	return out, err
}

type scanner interface{ Scan(dest ...any) error }

// each runs query q (written with ? placeholders) and calls f for every row.
func (s *Store) each(ctx context.Context, q string, args []any, f func(scanner) error) error {
	rs, err := s.db.QueryContext(ctx, s.rebind(q), args...)
	if err != nil {
		return err
	}
	defer rs.Close()
	for rs.Next() {
		if err := f(rs); err != nil {
			return err
		}
	}
	return rs.Err()
}

// Filter restricts a query to a time range and, optionally, one host and one direction.
type Filter struct {
	Since, Until time.Time // event time; a zero Until means no upper bound
	Host         string    // "" = every host
	Direction    string    // "" = both
}

// where appends the filter's conditions on conn_agg's bucket, host and direction. A bucket counts when
// it starts at or after the bucket holding Since (so --since 1h includes the current partial bucket).
func (f Filter) where(q string, args []any, width time.Duration) (string, []any) {
	q += ` WHERE bucket >= ?`
	args = append(args, floorBucket(f.Since, width))
	if !f.Until.IsZero() {
		q += ` AND bucket < ?`
		args = append(args, f.Until.Unix())
	}
	return f.hostDir(q, args)
}

// floorBucket is the start (unix seconds) of the bucket of width holding t.
func floorBucket(t time.Time, width time.Duration) int64 {
	ws := max(int64(width/time.Second), 1)
	u := t.Unix()
	b := u / ws * ws
	if u < 0 && u%ws != 0 {
		b -= ws
	}
	return b
}

// hostDir narrows q to f's host and direction, when set.
func (f Filter) hostDir(q string, args []any) (string, []any) {
	if f.Host != "" {
		q += ` AND host = ?`
		args = append(args, f.Host)
	}
	if f.Direction != "" {
		q += ` AND direction = ?`
		args = append(args, f.Direction)
	}
	return q, args
}

// TopRow is one line of `flowstat top`: a peer (with a DNS name it was seen with), a service port, a
// peer name or a host, and its connections.
type TopRow struct {
	Key   string `json:"key"`
	Name  string `json:"name,omitempty"`
	Conns int64  `json:"connections"`
}

// TopBy lists the groups Top can rank by.
var TopBy = []string{"peer", "port", "name", "host"}

// Top returns the limit groups with the most connections in f, grouped by "peer", "port", "name" or
// "host", from the views connections and (by name) connections_by_name. For peers Name is the
// alphabetically greatest name seen (an address often has several). By name, every DNS name a
// connection carried counts it: one with two names counts under both.
func (s *Store) Top(ctx context.Context, by string, f Filter, limit int) ([]TopRow, error) {
	peer := s.peerText()
	key := map[string]string{"peer": peer, "name": "remote_name", "port": "CAST(responder_port AS TEXT)", "host": "host"}[by]
	if key == "" {
		return nil, fmt.Errorf("top by %q: want one of %v", by, TopBy)
	}
	width, err := s.BucketWidth(ctx)
	if err != nil {
		return nil, err
	}
	name, from, group := "''", "connections", key
	switch by {
	case "peer":
		name, group = "COALESCE(MAX(remote_name), '')", "remote_addr, remote_zone"
	case "name":
		from = "connections_by_name"
	case "port":
		group = "responder_port"
	}
	q, args := s.viewWhere(`SELECT `+key+` AS k, `+name+`, CAST(SUM(connections) AS BIGINT) AS n FROM `+from, f, width)
	if by == "name" {
		q += ` AND remote_name IS NOT NULL`
	}
	q += ` GROUP BY ` + group + ` ORDER BY n DESC, k LIMIT ?`
	args = append(args, limit)
	out := []TopRow{}
	err = s.each(ctx, q, args, func(sc scanner) error {
		var r TopRow
		if err := sc.Scan(&r.Key, &r.Name, &r.Conns); err != nil {
			return err
		}
		out = append(out, r)
		return nil
	})
	return out, err
}

// peerText is the text form of a view's remote_addr and remote_zone as the base tables store a peer
// (address%zone, ” for none), so output keys stay what they were.
func (s *Store) peerText() string {
	addr := "remote_addr"
	if s.kind == Postgres {
		addr = "host(remote_addr)"
	}
	return "COALESCE(" + addr + ", '') || COALESCE('%' || remote_zone, '')"
}

// timeArg is t as a view's time column compares: timestamptz in PostgreSQL, ISO-8601 UTC text in
// SQLite (whose text orders as the times do for years 1 to 9999).
func (s *Store) timeArg(t time.Time) any {
	if s.kind == Postgres {
		return t.UTC()
	}
	return t.UTC().Format("2006-01-02T15:04:05Z")
}

// viewWhere appends f's conditions on a view's bucket_start, host and conn_direction, with the same
// bucket rule as where.
func (s *Store) viewWhere(q string, f Filter, width time.Duration) (string, []any) {
	// In SQLite the view's bucket_start_s, which the primary key serves (bucket_start is text there).
	if s.kind == SQLite {
		q += ` WHERE bucket_start_s >= ?`
		args := []any{floorBucket(f.Since, width)}
		if !f.Until.IsZero() {
			q += ` AND bucket_start_s < ?`
			args = append(args, f.Until.Unix())
		}
		return f.viewHostDir(q, args)
	}
	q += ` WHERE bucket_start >= ?`
	args := []any{s.timeArg(time.Unix(floorBucket(f.Since, width), 0))}
	if !f.Until.IsZero() {
		q += ` AND bucket_start < ?`
		args = append(args, s.timeArg(time.Unix(f.Until.Unix(), 0)))
	}
	return f.viewHostDir(q, args)
}

// viewHostDir narrows a query on a view to f's host and conn_direction, when set.
func (f Filter) viewHostDir(q string, args []any) (string, []any) {
	if f.Host != "" {
		q += ` AND host = ?`
		args = append(args, f.Host)
	}
	if f.Direction != "" {
		q += ` AND conn_direction = ?`
		args = append(args, f.Direction)
	}
	return q, args
}

// dbTime scans a view's time column: a time.Time from PostgreSQL, ISO-8601 text from SQLite.
type dbTime struct{ T time.Time }

// Scan implements sql.Scanner.
func (d *dbTime) Scan(src any) error {
	switch v := src.(type) {
	case time.Time:
		d.T = v.UTC()
	case string:
		return d.parse(v)
	case []byte:
		return d.parse(string(v))
	case nil:
		d.T = time.Time{}
	default:
		return fmt.Errorf("time column of type %T", src)
	}
	return nil
}

func (d *dbTime) parse(v string) error {
	t, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		return fmt.Errorf("time column %q: %v", v, err)
	}
	d.T = t.UTC()
	return nil
}

// NewDest is a (host, direction, peer, port) first seen in the queried range.
type NewDest struct {
	Host      string `json:"host"`
	Direction string `json:"direction"`
	Peer      string `json:"peer"`
	Name      string `json:"name"`
	// Names is every DNS name seen for it in the buckets still held (conn_names), Name first.
	Names []string  `json:"names"`
	Port  int       `json:"port"`
	First time.Time `json:"first_seen"`
	Last  time.Time `json:"last_seen"`
}

// NewDestinations lists (host, direction, peer, port) first seen at or after f.Since (and before
// f.Until when set), oldest first, with every DNS name seen for it. These are exact event times, not
// buckets (so peer_seen's index on first_ns, not the view new_destinations, whose text times in SQLite
// are in milliseconds).
func (s *Store) NewDestinations(ctx context.Context, f Filter, limit int) ([]NewDest, error) {
	names := "group_concat(DISTINCT n.name)"
	if s.kind == Postgres {
		names = "string_agg(DISTINCT n.name, ',' ORDER BY n.name)"
	}
	q := `SELECT host, direction, peer, peer_name, port, first_ns, last_ns, (SELECT ` + names + ` FROM conn_names n WHERE n.host = peer_seen.host
		AND n.direction = peer_seen.direction AND n.peer = peer_seen.peer AND n.port = peer_seen.port) FROM peer_seen WHERE first_ns >= ?`
	args := []any{f.Since.UnixNano()}
	if !f.Until.IsZero() {
		q += ` AND first_ns < ?`
		args = append(args, f.Until.UnixNano())
	}
	q, args = f.hostDir(q, args)
	q += ` ORDER BY first_ns, host, direction, peer, port LIMIT ?`
	args = append(args, limit)
	out := []NewDest{}
	err := s.each(ctx, q, args, func(sc scanner) error {
		var d NewDest
		var fns, lns int64
		var names sql.NullString
		if err := sc.Scan(&d.Host, &d.Direction, &d.Peer, &d.Name, &d.Port, &fns, &lns, &names); err != nil {
			return err
		}
		d.Names = []string{}
		if d.Name != "" {
			d.Names = append(d.Names, d.Name)
		}
		if names.Valid {
			all := strings.Split(names.String, ",")
			sort.Strings(all)
			for _, n := range all {
				if n != d.Name {
					d.Names = append(d.Names, n)
				}
			}
		}
		d.First, d.Last = time.Unix(0, fns).UTC(), time.Unix(0, lns).UTC()
		out = append(out, d)
		return nil
	})
	return out, err
}

// HostPoint is the connections of one host in one interval.
type HostPoint struct {
	Start time.Time `json:"start"`
	Host  string    `json:"host"`
	Conns int64     `json:"connections"`
}

// PerHost returns connections per host per step (rounded up to a multiple of the bucket width; 0 means
// one bucket) in f, oldest first.
func (s *Store) PerHost(ctx context.Context, f Filter, step time.Duration) ([]HostPoint, error) {
	width, err := s.BucketWidth(ctx)
	if err != nil {
		return nil, err
	}
	ws := max(int64(width/time.Second), 1)
	st := max(int64(step/time.Second), ws)
	st = (st + ws - 1) / ws * ws
	// From the view connections_per_host, as an analyst would ask; the bucket start in unix seconds
	// (SQLite's bucket_start_s, which its primary key serves; PostgreSQL's from the timestamptz, whose
	// index on the same expression serves the range), floored to the step so that both databases
	// agree for negative times.
	b := "bucket_start_s"
	if s.kind == Postgres {
		b = "CAST(EXTRACT(EPOCH FROM bucket_start) AS BIGINT)"
	}
	q, args := s.viewWhere(`SELECT (`+b+` - ((`+b+` % ?) + ?) % ?) AS t, host, CAST(SUM(connections) AS BIGINT) FROM connections_per_host`, f, width)
	args = append([]any{st, st, st}, args...)
	q += ` GROUP BY t, host ORDER BY t, host`
	out := []HostPoint{}
	err = s.each(ctx, q, args, func(sc scanner) error {
		var p HostPoint
		var t int64
		if err := sc.Scan(&t, &p.Host, &p.Conns); err != nil {
			return err
		}
		p.Start = time.Unix(t, 0).UTC()
		out = append(out, p)
		return nil
	})
	return out, err
}
