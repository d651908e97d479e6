package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
)

// OpenReadOnly opens dsn for queries only, as `flowstat serve` does: SQLite with mode=ro and
// query_only (a missing file is an error, never created), PostgreSQL with every transaction read-only
// (default_transaction_read_only). It never migrates: a database that has no flowstat schema yet is
// refused, naming the command that creates it.
func OpenReadOnly(ctx context.Context, dsn string) (*Store, error) {
	kind, target, err := ParseDSN(dsn)
	if err != nil {
		return nil, err
	}
	s := &Store{kind: kind, where: Redact(target)}
	switch kind {
	case SQLite:
		fi, err := os.Stat(target)
		if err != nil {
			return nil, fmt.Errorf("no flowstat database at %s (%v): run `flowstat run` first, or set --db or FLOWBUS_DB to the database it writes", target, errors.Unwrap(err))
		}
		if fi.IsDir() {
			return nil, CheckSQLitePath(target, false)
		}
		q := url.Values{}
		q.Set("mode", "ro")
		for _, p := range []string{"busy_timeout(10000)", "query_only(1)"} {
			q.Add("_pragma", p)
		}
		if s.db, err = sql.Open("sqlite", "file:"+target+"?"+q.Encode()); err != nil {
			return nil, err
		}
		s.db.SetMaxOpenConns(2)
	case Postgres:
		cfg, err := pgx.ParseConfig(target)
		if err != nil {
			return nil, fmt.Errorf("bad PostgreSQL DSN %s: %v", s.where, redactErr(err, target))
		}
		cfg.RuntimeParams["default_transaction_read_only"] = "on"
		s.db = stdlib.OpenDB(*cfg)
		s.db.SetMaxOpenConns(4)
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	v, err := s.SchemaVersion(pctx)
	if err != nil {
		s.db.Close()
		hint := " (is it a flowstat database, readable by this user? `flowstat run` creates it)"
		if kind == Postgres {
			hint = " (is the server running and the schema created by `flowstat run`? check the URL in --db or FLOWBUS_DB)"
		}
		return nil, fmt.Errorf("cannot read %s database %s: %s%s", kind, s.where, oneLine(redactErr(err, target).Error()), hint)
	}
	if v == 0 {
		s.db.Close()
		return nil, fmt.Errorf("%s database %s has no flowstat schema yet: run `flowstat run` on it first", kind, s.where)
	}
	return s, nil
}
