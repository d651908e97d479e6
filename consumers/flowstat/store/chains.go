package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/flowbus/flowbus/schema"
)

// Chain is one batch chain's state with its holes (sorted by From).
type Chain struct {
	Key   RunKey
	State ChainState
	Holes []Hole
}

// RecentChains loads the n most recently active chains (by ChainState.Stored, newest first) with their
// holes: what a consumer keeps in memory at start. The others are read by key when a batch of theirs
// arrives (ChainReader), so a start reads at most n chains whatever the database holds. Rows with ids
// beyond the bounds are never read (see PurgeOverlongChains).
func (s *Store) RecentChains(ctx context.Context, n int) ([]Chain, error) {
	if n <= 0 {
		return nil, nil
	}
	// One query, so the chains and their holes are read from one set: the index on stored_ns yields
	// the n newest without reading the others.
	q := `SELECT r.host, r.run_id, r.direction, r.kind, r.last_seq, r.seen_batches, r.from_start, r.linked, r.stored_ns, h.from_seq, h.to_seq
		FROM (SELECT host, run_id, direction, kind, last_seq, seen_batches, from_start, linked, stored_ns FROM run_state WHERE NOT ` + s.overlong() + `
			ORDER BY stored_ns DESC LIMIT ?) r
		LEFT JOIN holes h ON h.host = r.host AND h.run_id = r.run_id AND h.direction = r.direction AND h.kind = r.kind
		ORDER BY r.stored_ns DESC, r.host, r.run_id, r.direction, r.kind, h.from_seq`
	var out []Chain
	err := s.each(ctx, q, []any{n}, func(sc scanner) error {
		var k RunKey
		var dir, kind string
		var seq, seen, fromStart, linked, stored int64
		var from, to sql.NullInt64
		if err := sc.Scan(&k.Host, &k.RunID, &dir, &kind, &seq, &seen, &fromStart, &linked, &stored, &from, &to); err != nil {
			return err
		}
		k.Dir, _ = schema.ParseDirection(dir)
		k.Kind = parseKind(kind)
		if len(out) == 0 || out[len(out)-1].Key != k {
			out = append(out, Chain{Key: k, State: ChainState{Last: uint64(seq), Seen: uint64(seen), FromStart: fromStart != 0, Linked: linked != 0, Stored: stored}})
		}
		if from.Valid {
			c := &out[len(out)-1]
			c.Holes = append(c.Holes, Hole{From: uint64(from.Int64), To: uint64(to.Int64)})
		}
		return nil
	})
	return out, err
}

// ChainReader reads one chain's state and holes by key (primary-key lookups, statements prepared once).
type ChainReader struct {
	state, holes *sql.Stmt
}

// ChainReader prepares the lookups of Chain; Close releases them.
func (s *Store) ChainReader(ctx context.Context) (*ChainReader, error) {
	st, err := s.db.PrepareContext(ctx, s.rebind(`SELECT host, run_id, direction, kind, last_seq, seen_batches, from_start, linked, stored_ns
		FROM run_state WHERE host = ? AND run_id = ? AND direction = ? AND kind = ?`))
	if err != nil {
		return nil, err
	}
	hs, err := s.db.PrepareContext(ctx, s.rebind(`SELECT from_seq, to_seq FROM holes WHERE host = ? AND run_id = ? AND direction = ? AND kind = ? ORDER BY from_seq`))
	if err != nil {
		st.Close()
		return nil, err
	}
	return &ChainReader{state: st, holes: hs}, nil
}

// Chain returns the committed state and holes of chain k; found is false when the database holds no
// state of it (a chain never seen, or pruned).
func (r *ChainReader) Chain(ctx context.Context, k RunKey) (c ChainState, holes []Hole, found bool, err error) {
	_, c, err = scanChain(r.state.QueryRowContext(ctx, k.Host, k.RunID, dirText(k.Dir), k.Kind.String()))
	if errors.Is(err, sql.ErrNoRows) {
		// Holes are only ever written with their chain's run_state row, and removed with it: a chain
		// without one has none, and the common miss (a new run) costs one lookup.
		return ChainState{}, nil, false, nil
	}
	if err != nil {
		return c, nil, false, err
	}
	rows, err := r.holes.QueryContext(ctx, k.Host, k.RunID, dirText(k.Dir), k.Kind.String())
	if err != nil {
		return c, nil, false, err
	}
	defer rows.Close()
	for rows.Next() {
		var from, to int64
		if err := rows.Scan(&from, &to); err != nil {
			return c, nil, false, err
		}
		holes = append(holes, Hole{From: uint64(from), To: uint64(to)})
	}
	return c, holes, true, rows.Err()
}

// Close releases the prepared statements.
func (r *ChainReader) Close() {
	r.state.Close()
	r.holes.Close()
}

// Pruned is what PruneChains deleted: Chains run_state rows and Holes holes rows of the chains last
// active before Before (unix ns).
type Pruned struct {
	Chains, Holes int64
	Before        int64
}

// PruneChains deletes, in one transaction, the state (run_state and holes rows) of the chains inactive
// for longer than retention: last active before the newest chain's activity minus retention. Measured
// against the newest activity the database holds rather than the clock, so a consumer that was stopped
// for longer than the retention prunes nothing of the chains its backlog continues. A chain pruned and
// then continued is seen as a run first seen after its start (one gap with after_seq 0), and a link to
// it tells no K.
func (s *Store) PruneChains(ctx context.Context, retention time.Duration) (Pruned, error) {
	var p Pruned
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		p = Pruned{}
		var newest int64
		if err := tx.QueryRowContext(ctx, `SELECT COALESCE(MAX(stored_ns), 0) FROM run_state`).Scan(&newest); err != nil {
			return fmt.Errorf("run_state: %w", err)
		}
		if newest <= 0 || retention <= 0 || newest-int64(retention) <= 0 {
			return nil
		}
		p.Before = newest - int64(retention)
		res, err := tx.ExecContext(ctx, s.rebind(`DELETE FROM holes WHERE EXISTS (SELECT 1 FROM run_state r
			WHERE r.host = holes.host AND r.run_id = holes.run_id AND r.direction = holes.direction AND r.kind = holes.kind AND r.stored_ns < ?)`), p.Before)
		if err != nil {
			return fmt.Errorf("holes: %w", err)
		}
		p.Holes, _ = res.RowsAffected()
		res, err = tx.ExecContext(ctx, s.rebind(`DELETE FROM run_state WHERE stored_ns < ?`), p.Before)
		if err != nil {
			return fmt.Errorf("run_state: %w", err)
		}
		p.Chains, _ = res.RowsAffected()
		return nil
	})
	return p, err
}
