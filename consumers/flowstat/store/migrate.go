package store

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// migrations are applied in order, each in its own transaction with its version row, so a database is
// always at exactly one version. Never edit a released migration: append a new one.
var migrations = []struct {
	version int
	stmts   []string
	// build, when set, makes the statements for the store's kind (dialect-specific migrations).
	build func(Kind) []string
}{
	{1, []string{
		`CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)`,
		// One row per (durable consumer, stream): the last stream sequence whose effects are committed.
		`CREATE TABLE checkpoints (
			consumer TEXT NOT NULL, stream TEXT NOT NULL, seq BIGINT NOT NULL,
			filters TEXT NOT NULL, updated_ns BIGINT NOT NULL,
			PRIMARY KEY (consumer, stream))`,
		// Connections per time bucket (unix seconds of the bucket start) and every dimension. peer is
		// the other end (the responder of outgoing, the initiator of incoming connections), peer_name
		// the first DNS name the event carried for it ('' when none), port the service port.
		`CREATE TABLE conn_agg (
			bucket BIGINT NOT NULL, host TEXT NOT NULL, direction TEXT NOT NULL,
			peer TEXT NOT NULL, peer_name TEXT NOT NULL, port INTEGER NOT NULL, conns BIGINT NOT NULL,
			PRIMARY KEY (bucket, host, direction, peer, peer_name, port))` + withoutRowID,
		// First and last time (event timestamps, unix ns) each (host, direction, peer, port) was seen,
		// and the earliest DNS name seen for it (name_ns: that event's time, 0 when none yet).
		`CREATE TABLE peer_seen (
			host TEXT NOT NULL, direction TEXT NOT NULL, peer TEXT NOT NULL, port INTEGER NOT NULL,
			first_ns BIGINT NOT NULL, last_ns BIGINT NOT NULL,
			peer_name TEXT NOT NULL, name_ns BIGINT NOT NULL,
			PRIMARY KEY (host, direction, peer, port))` + withoutRowID,
		`CREATE INDEX peer_seen_first ON peer_seen (first_ns)`,
		// Batches, events and agent-reported drops per bucket of the message's stored time.
		`CREATE TABLE batch_agg (
			bucket BIGINT NOT NULL, host TEXT NOT NULL, direction TEXT NOT NULL,
			batches BIGINT NOT NULL, events BIGINT NOT NULL,
			drops_kernel BIGINT NOT NULL, drops_reader BIGINT NOT NULL, drops_queue BIGINT NOT NULL,
			drops_spool BIGINT NOT NULL, drops_publish BIGINT NOT NULL,
			PRIMARY KEY (bucket, host, direction))` + withoutRowID,
		// Highest batch seq seen per agent run and direction, to detect missing batches.
		`CREATE TABLE run_state (
			host TEXT NOT NULL, run_id TEXT NOT NULL, direction TEXT NOT NULL, last_seq BIGINT NOT NULL,
			PRIMARY KEY (host, run_id, direction))`,
		// One row per batch that arrived with prev_seq != the last seq seen of its chain (after_seq = 0:
		// the first batch seen of a run, whose predecessors were never seen).
		`CREATE TABLE gaps (
			host TEXT NOT NULL, run_id TEXT NOT NULL, direction TEXT NOT NULL,
			after_seq BIGINT NOT NULL, seq BIGINT NOT NULL, prev_seq BIGINT NOT NULL,
			stream_seq BIGINT NOT NULL, stored_ns BIGINT NOT NULL,
			PRIMARY KEY (host, run_id, direction, seq))`,
		// Messages that were not valid batches. copied = 1 when the copy reached the dead-letter subject.
		`CREATE TABLE deadletters (
			stream TEXT NOT NULL, stream_seq BIGINT NOT NULL, subject TEXT NOT NULL,
			reason TEXT NOT NULL, detail TEXT NOT NULL, stored_ns BIGINT NOT NULL, copied INTEGER NOT NULL,
			PRIMARY KEY (stream, stream_seq))`,
		// Stream sequences a consumer could not read because the stream had already deleted them (age or
		// size limits) when it (re)started there.
		`CREATE TABLE stream_losses (
			consumer TEXT NOT NULL, stream TEXT NOT NULL, from_seq BIGINT NOT NULL, to_seq BIGINT NOT NULL,
			detected_ns BIGINT NOT NULL,
			PRIMARY KEY (consumer, stream, from_seq))`,
		// Replays of a time range; finished_ns = 0 while one runs or after it failed.
		`CREATE TABLE replays (
			started_ns BIGINT NOT NULL, from_s BIGINT NOT NULL, to_s BIGINT NOT NULL,
			upto_seq BIGINT NOT NULL, finished_ns BIGINT NOT NULL,
			PRIMARY KEY (started_ns))`,
	}, nil},
	{2, []string{
		// Batch seqs of a chain known to be missing: from a gap's after_seq+1 to the prev_seq its batch
		// named. A batch at or below its chain's last seq is counted only when it fills a hole (the hole
		// then shrinks); otherwise it is a copy of a counted batch, which the stream stored twice because
		// the agent retried it after the stream's duplicates window. Holes may keep seqs of the other
		// direction that never come: they are as many as the gaps.
		`CREATE TABLE holes (
			host TEXT NOT NULL, run_id TEXT NOT NULL, direction TEXT NOT NULL,
			from_seq BIGINT NOT NULL, to_seq BIGINT NOT NULL,
			PRIMARY KEY (host, run_id, direction, from_seq))`,
		// Gaps recorded before this migration left holes; what late batches filled since is unknown.
		`INSERT INTO holes (host, run_id, direction, from_seq, to_seq)
			SELECT host, run_id, direction, after_seq + 1, CASE WHEN prev_seq < seq THEN prev_seq ELSE seq - 1 END
			FROM gaps WHERE prev_seq > after_seq AND seq > after_seq + 1
			ON CONFLICT (host, run_id, direction, from_seq) DO NOTHING`,
		// Messages that repeat a counted batch (same host, run, direction and seq): counted nothing.
		`CREATE TABLE duplicate_batches (
			stream TEXT NOT NULL, stream_seq BIGINT NOT NULL,
			host TEXT NOT NULL, run_id TEXT NOT NULL, direction TEXT NOT NULL, seq BIGINT NOT NULL,
			stored_ns BIGINT NOT NULL,
			PRIMARY KEY (stream, stream_seq))`,
	}, nil},
	{3, []string{
		// What a run link (prev_run) needs of the chain it names: the distinct batches counted, whether
		// they were counted from the chain's first batch (else K cannot be told), and whether a link
		// named it (its late batches then lower that link's missing_batches). Chains counted before this
		// migration have no count: from_start 0 says so.
		`ALTER TABLE run_state ADD COLUMN seen_batches BIGINT NOT NULL DEFAULT 0`,
		`ALTER TABLE run_state ADD COLUMN from_start INTEGER NOT NULL DEFAULT 0`,
		`ALTER TABLE run_state ADD COLUMN linked INTEGER NOT NULL DEFAULT 0`,
		// One row per run link: the first batch of a direction of run_id named the previous run of the
		// host. prev_seen is how much of it this database counted (all, partial, unseen); seen_batches
		// grows as its late batches arrive; missing_batches = prev_batches - seen_batches (K), -1 when
		// it cannot be told (prev_seen not all). down_from .. down_to (unix ns) is the capture downtime.
		`CREATE TABLE restarts (
			host TEXT NOT NULL, run_id TEXT NOT NULL, direction TEXT NOT NULL,
			prev_run_id TEXT NOT NULL, prev_end TEXT NOT NULL, prev_last_seq BIGINT NOT NULL,
			prev_batches BIGINT NOT NULL, prev_events BIGINT NOT NULL, prev_seen TEXT NOT NULL,
			seen_batches BIGINT NOT NULL, missing_batches BIGINT NOT NULL,
			down_from BIGINT NOT NULL, down_to BIGINT NOT NULL,
			stream_seq BIGINT NOT NULL, stored_ns BIGINT NOT NULL,
			PRIMARY KEY (host, run_id, direction))`,
		`CREATE INDEX restarts_prev ON restarts (host, prev_run_id, direction)`,
	}, nil},
	{4, []string{
		// When each chain was last active: the stored time (unix ns) of the newest batch that changed
		// it. The consumer keeps only the most recent chains in memory and loads the others by key; the
		// retention prunes chains inactive for longer. Chains from before this migration count as
		// active at the newest bucket of stored time the database holds, so none is pruned early.
		`ALTER TABLE run_state ADD COLUMN stored_ns BIGINT NOT NULL DEFAULT 0`,
		`UPDATE run_state SET stored_ns = COALESCE((SELECT MAX(bucket) FROM batch_agg), 0) * 1000000000`,
		`CREATE INDEX run_state_stored ON run_state (stored_ns)`,
	}, nil},
	{5, migration5, nil},
	{6, nil, migration6},
	{7, nil, migration7},
	{8, nil, migration8},
}

// withoutRowID marks tables that SQLite should store as one b-tree ordered by their primary key, which
// halves the work of every upsert (no separate rowid table). PostgreSQL has no such clause; the store
// removes it there.
const withoutRowID = " WITHOUT ROWID"

// Version is the schema version this code migrates to.
func Version() int { return migrations[len(migrations)-1].version }

func (s *Store) migrate(ctx context.Context) error {
	// Reading first keeps an up-to-date database free of write transactions, so the query commands do
	// not queue behind a running consumer's commits.
	v, err := s.SchemaVersion(ctx)
	if err == nil && v == Version() {
		return nil
	}
	if err == nil && v > Version() {
		return fmt.Errorf("database schema version %d is newer than this flowstat (supports up to %d): upgrade flowstat", v, Version())
	}
	if _, err := s.db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_ns BIGINT NOT NULL)`); err != nil {
		return err
	}
	for _, m := range migrations {
		stmts := m.stmts
		if m.build != nil {
			stmts = m.build(s.kind)
		}
		if err := s.migrateOne(ctx, m.version, stmts); err != nil {
			return fmt.Errorf("migration %d: %w", m.version, err)
		}
	}
	return nil
}

func (s *Store) migrateOne(ctx context.Context, version int, stmts []string) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	// Serialise concurrent migrators: SQLite's BEGIN IMMEDIATE already holds the write lock; PostgreSQL
	// needs an explicit lock, taken before reading the version so the check below cannot race.
	if s.kind == Postgres {
		if _, err := tx.ExecContext(ctx, `LOCK TABLE schema_migrations IN EXCLUSIVE MODE`); err != nil {
			return err
		}
	}
	var n int
	if err := tx.QueryRowContext(ctx, s.rebind(`SELECT COUNT(*) FROM schema_migrations WHERE version = ?`), version).Scan(&n); err != nil {
		return err
	}
	if n > 0 {
		return nil
	}
	var newer int
	if err := tx.QueryRowContext(ctx, s.rebind(`SELECT COUNT(*) FROM schema_migrations WHERE version > ?`), Version()).Scan(&newer); err != nil {
		return err
	}
	if newer > 0 {
		return fmt.Errorf("database schema is newer than this flowstat (supports up to %d): upgrade flowstat", Version())
	}
	for _, st := range stmts {
		if s.kind == Postgres {
			st = strings.TrimSuffix(st, withoutRowID)
		}
		if _, err := tx.ExecContext(ctx, st); err != nil {
			return fmt.Errorf("%w in %.60q", err, strings.Join(strings.Fields(st), " "))
		}
	}
	if _, err := tx.ExecContext(ctx, s.rebind(`INSERT INTO schema_migrations (version, applied_ns) VALUES (?, ?)`), version, time.Now().UnixNano()); err != nil {
		return err
	}
	return tx.Commit()
}

// SchemaVersion returns the highest applied migration (an error when the database has none yet).
func (s *Store) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := s.db.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&v)
	return v, err
}
