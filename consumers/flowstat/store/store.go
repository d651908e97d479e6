// Package store persists flowstat aggregates in SQLite (modernc.org/sqlite, pure Go, the embedded default)
// or PostgreSQL (pgx), with the same SQL wherever both accept it.
//
// Every change the consumer makes goes through Commit, which applies one Delta (the aggregates of a run
// of stream messages) and the consumer's checkpoint (the last stream sequence) in ONE transaction: the
// checkpoint can never say a message was counted when its counts were not committed, or the reverse.
// That is what makes flowstat exactly-once in effect.
package store

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // "pgx" database/sql driver
	_ "modernc.org/sqlite"             // "sqlite" database/sql driver
)

// Kind is the database flavour behind a Store.
type Kind string

const (
	// SQLite is the embedded default: a file in the state directory.
	SQLite Kind = "sqlite"
	// Postgres is PostgreSQL reached by a postgres:// or postgresql:// URL or a libpq key=value DSN.
	Postgres Kind = "postgres"
)

// Store is an open flowstat database with its schema migrated to the newest version.
type Store struct {
	db   *sql.DB
	kind Kind
	// where is a printable form of the DSN (password redacted) for error messages.
	where string

	// InTxHook, if set, runs inside every Commit transaction after the aggregates are written and before
	// COMMIT; a non-nil error rolls the transaction back. Fault-injection tests use it to die or fail
	// in the middle of a transaction.
	InTxHook func() error
}

// pgKeywords are the libpq connection keywords that mark a key=value DSN (host=db dbname=stats ...).
var pgKeywords = map[string]bool{"host": true, "hostaddr": true, "port": true, "dbname": true, "user": true,
	"password": true, "sslmode": true, "connect_timeout": true, "application_name": true, "service": true,
	"sslrootcert": true, "sslcert": true, "sslkey": true, "options": true, "target_session_attrs": true}

// isKeyValueDSN reports whether dsn is a libpq key=value string: its first word is keyword=value with a
// libpq keyword. A file name such as "a=b.db" is not one.
func isKeyValueDSN(dsn string) bool {
	m := kvFirstKey.FindStringSubmatch(dsn)
	return m != nil && pgKeywords[m[1]]
}

// kvFirstKey matches the first keyword of a key=value DSN (libpq allows spaces around '=').
var kvFirstKey = regexp.MustCompile(`^\s*([a-z_]+)\s*=`)

// ParseDSN tells which database a FLOWBUS_DB value names. A postgres:// or postgresql:// URL, or a libpq
// key=value string (host=db dbname=stats user=flowstat), is PostgreSQL; anything else is a SQLite file
// path (an optional "sqlite:" or "file:" prefix is stripped).
func ParseDSN(dsn string) (Kind, string, error) {
	dsn = strings.TrimSpace(dsn)
	switch {
	case dsn == "":
		return "", "", errors.New("empty database DSN")
	case isKeyValueDSN(dsn):
		return Postgres, dsn, nil
	case strings.Contains(dsn, "=") && !strings.Contains(dsn, "://") && strings.ContainsAny(dsn, " \t") && !strings.ContainsAny(dsn, "/\\"):
		// Looks like key=value settings, but not libpq's: refuse rather than create a file of that name.
		return "", "", fmt.Errorf("%q looks like key=value settings but does not start with a PostgreSQL keyword (host, dbname, user, ...): use e.g. \"host=db dbname=stats user=flowstat\" or postgres://user@db/stats for PostgreSQL, or a file path for SQLite",
			kvPassword.ReplaceAllString(dsn, "${1}xxxxx"))
	case strings.HasPrefix(dsn, "postgres://"), strings.HasPrefix(dsn, "postgresql://"):
		u, err := url.Parse(dsn)
		if err != nil {
			return "", "", fmt.Errorf("bad PostgreSQL URL: %v", redactErr(err, dsn))
		}
		if u.Host == "" && u.Query().Get("host") == "" {
			return "", "", errors.New("bad PostgreSQL URL: no host")
		}
		return Postgres, dsn, nil
	case strings.Contains(dsn, "://"):
		return "", "", fmt.Errorf("unsupported database URL scheme in %q: use a SQLite file path or postgres://", Redact(dsn))
	}
	p := strings.TrimPrefix(strings.TrimPrefix(dsn, "sqlite:"), "file:")
	if i := strings.IndexByte(p, '?'); i >= 0 {
		p = p[:i]
	}
	if p == "" {
		return "", "", errors.New("empty SQLite path")
	}
	return SQLite, p, nil
}

// kvPassword matches the password of a key=value DSN, quoted or not.
var kvPassword = regexp.MustCompile(`(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s]+)`)

// Redact hides the password of a URL or key=value DSN so it can be printed.
func Redact(dsn string) string {
	if isKeyValueDSN(dsn) {
		return kvPassword.ReplaceAllString(dsn, "${1}xxxxx")
	}
	u, err := url.Parse(dsn)
	if err != nil || u.User == nil {
		return dsn
	}
	if _, ok := u.User.Password(); ok {
		u.User = url.UserPassword(u.User.Username(), "xxxxx")
	}
	return u.String()
}

func redactErr(err error, dsn string) error {
	if isKeyValueDSN(dsn) {
		text := err.Error()
		for _, m := range kvPassword.FindAllStringSubmatch(dsn, -1) {
			if pw := strings.Trim(m[2], "'"); pw != "" {
				text = strings.ReplaceAll(text, pw, "xxxxx")
			}
		}
		return errors.New(text)
	}
	u, perr := url.Parse(dsn)
	if perr != nil || u.User == nil {
		return err
	}
	if pw, ok := u.User.Password(); ok && pw != "" {
		return errors.New(strings.ReplaceAll(err.Error(), pw, "xxxxx"))
	}
	return err
}

// OpenOptions adjust Open.
type OpenOptions struct {
	// MustExist refuses to create a missing SQLite file: the query commands use it, so a typo in the path
	// says so instead of showing an empty database.
	MustExist bool
	// CreateDir creates the SQLite file's missing parent directories. Only the default location (the
	// state directory) wants it: for a path the user typed, a missing directory is far more often a typo
	// than a wish, and creating it would hide the database somewhere unexpected.
	CreateDir bool
}

// Open connects to dsn (see ParseDSN), creates the SQLite file if needed (its directory must exist), and
// applies pending migrations. It fails fast with a clear message when the server is unreachable.
func Open(ctx context.Context, dsn string) (*Store, error) {
	return OpenWith(ctx, dsn, OpenOptions{})
}

// CheckSQLitePath reports what makes path unusable as a SQLite database file before anything is opened:
// a directory, or (unless createDir) a parent directory that does not exist or is not a directory.
// Messages say what to give instead; they do not name the setting, the caller does.
func CheckSQLitePath(path string, createDir bool) error {
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		return fmt.Errorf("%s is a directory, give a file path (e.g. %s)", path, filepath.Join(path, "flowstat.db"))
	}
	if createDir {
		return nil
	}
	dir := filepath.Dir(path)
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("the directory %s of %s does not exist: create it (mkdir -p %s) or give a path in an existing directory", dir, path, dir)
	case err != nil:
		return fmt.Errorf("cannot use the directory %s of %s: %v", dir, path, errors.Unwrap(err))
	case !fi.IsDir():
		return fmt.Errorf("%s is not a directory, so %s cannot be created in it: give another path", dir, path)
	}
	return nil
}

// OpenWith is Open with options.
func OpenWith(ctx context.Context, dsn string, oo OpenOptions) (*Store, error) {
	kind, target, err := ParseDSN(dsn)
	if err != nil {
		return nil, err
	}
	s := &Store{kind: kind, where: Redact(target)}
	switch kind {
	case SQLite:
		if fi, err := os.Stat(target); err == nil && fi.IsDir() {
			return nil, CheckSQLitePath(target, false)
		}
		if oo.MustExist {
			if _, err := os.Stat(target); err != nil {
				return nil, fmt.Errorf("no flowstat database at %s (%v): run `flowstat run` first, or set --db or FLOWBUS_DB to the database it writes", target, errors.Unwrap(err))
			}
		} else if oo.CreateDir {
			if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
				return nil, fmt.Errorf("cannot create the database directory: %w (set --db or FLOWBUS_DB to a writable path)", err)
			}
		} else if err := CheckSQLitePath(target, false); err != nil {
			return nil, err
		}
		// WAL lets the CLI read while `flowstat run` writes; synchronous=NORMAL may lose the last
		// commits on power loss but never splits a commit, and since the checkpoint commits with the
		// counts the lost messages are simply consumed again. _txlock=immediate takes the write lock at
		// BEGIN, so two writers queue on busy_timeout instead of failing on lock upgrade.
		q := url.Values{}
		for _, p := range []string{"busy_timeout(10000)", "journal_mode(WAL)", "synchronous(NORMAL)", "temp_store(MEMORY)", "cache_size(-65536)"} {
			q.Add("_pragma", p)
		}
		q.Set("_txlock", "immediate")
		s.db, err = sql.Open("sqlite", "file:"+target+"?"+q.Encode())
		if err != nil {
			return nil, err
		}
		// One connection: SQLite has one writer anyway, and a single connection keeps the page cache
		// in one place.
		s.db.SetMaxOpenConns(1)
	case Postgres:
		s.db, err = sql.Open("pgx", target)
		if err != nil {
			return nil, fmt.Errorf("bad PostgreSQL DSN %s: %v", s.where, redactErr(err, target))
		}
		s.db.SetMaxOpenConns(4)
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := s.db.PingContext(pctx); err != nil {
		s.db.Close()
		hint := " (is the file and its directory writable by this user? set --db or FLOWBUS_DB to a writable path)"
		if kind == Postgres {
			hint = " (is the server running and the database created? check the URL in --db or FLOWBUS_DB)"
		}
		return nil, fmt.Errorf("cannot open %s database %s: %s%s", kind, s.where, oneLine(redactErr(err, target).Error()), hint)
	}
	if err := s.migrate(ctx); err != nil {
		s.db.Close()
		return nil, fmt.Errorf("migrating %s database %s: %w", kind, s.where, err)
	}
	return s, nil
}

// oneLine joins the lines of a driver's error, dropping repeated ones: pgx reports every connection
// attempt on its own line, and with sslmode=prefer a refused connection is tried twice (TLS, then
// plain), which printed the same line twice.
func oneLine(s string) string {
	var out []string
	seen := map[string]bool{}
	for _, l := range strings.Split(s, "\n") {
		l = strings.TrimSpace(l)
		if l == "" || seen[l] {
			continue
		}
		seen[l] = true
		out = append(out, l)
	}
	if len(out) < 2 {
		return strings.Join(out, "")
	}
	// The first line introduces the attempts ("failed to connect to ...:"), which follow it.
	return out[0] + " " + strings.Join(out[1:], "; ")
}

// Kind reports which database this is.
func (s *Store) Kind() Kind { return s.kind }

// Where is the database location with any password redacted.
func (s *Store) Where() string { return s.where }

// DB exposes the handle for tests and ad-hoc queries.
func (s *Store) DB() *sql.DB { return s.db }

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// rebind turns the ? placeholders the queries are written with into PostgreSQL's $n.
func (s *Store) rebind(q string) string {
	if s.kind != Postgres {
		return q
	}
	var b strings.Builder
	n := 0
	for i := 0; i < len(q); i++ {
		if q[i] == '?' {
			n++
			fmt.Fprintf(&b, "$%d", n)
			continue
		}
		b.WriteByte(q[i])
	}
	return b.String()
}

// ID returns the database's identity, a random token recorded on first use. flowstat writes it into the
// metadata of the durable consumers it creates, so a second database given the same consumer name is
// told apart from this one instead of being mistaken for a restored backup.
func (s *Store) ID(ctx context.Context) (string, error) {
	var b [12]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	if _, err := s.db.ExecContext(ctx, s.rebind(`INSERT INTO meta (key, value) VALUES ('database_id', ?) ON CONFLICT (key) DO NOTHING`), hex.EncodeToString(b[:])); err != nil {
		return "", err
	}
	var id string
	err := s.db.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = 'database_id'`).Scan(&id)
	return id, err
}
