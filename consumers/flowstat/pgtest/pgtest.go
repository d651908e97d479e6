// Package pgtest starts a throwaway PostgreSQL server for tests: initdb into a temporary directory, a
// server on 127.0.0.1 with a free port and its unix socket in that directory, stopped and removed when
// the tests end. Tests use a real server rather than a mock so the SQL and transactions are the real ones.
//
// One server serves every test of a test binary (starting one costs seconds); each test gets its own
// database from NewDB. Wire it up with
//
//	func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }
//
// Without PostgreSQL binaries the tests that need it are skipped with one line, unless
// FLOWBUS_REQUIRE_POSTGRES=1 (CI): then they fail. PostgreSQL refuses to run as root, so under root the
// server runs as the "postgres" user the Debian packages create (else "nobody").
package pgtest

import (
	"context"
	"database/sql"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx"
)

// RequireEnv names the variable that turns a missing PostgreSQL into a test failure.
const RequireEnv = "FLOWBUS_REQUIRE_POSTGRES"

// Server is a running test server.
type Server struct {
	Port int
	dir  string
	data string
	bin  string
	cred *syscall.Credential

	mu sync.Mutex
	n  int
}

var (
	shared    *Server
	sharedErr error
	once      sync.Once
)

// BinDir finds the newest /usr/lib/postgresql/<v>/bin holding initdb and pg_ctl, or $FLOWBUS_PG_BIN,
// or initdb on $PATH; "" when there is none.
func BinDir() string {
	if d := os.Getenv("FLOWBUS_PG_BIN"); d != "" {
		if usable(d) {
			return d
		}
		return ""
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return version(dirs[i]) > version(dirs[j]) })
	for _, d := range dirs {
		if usable(d) {
			return d
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil && usable(filepath.Dir(p)) {
		return filepath.Dir(p)
	}
	return ""
}

func usable(d string) bool {
	for _, p := range []string{"initdb", "pg_ctl", "postgres"} {
		if _, err := os.Stat(filepath.Join(d, p)); err != nil {
			return false
		}
	}
	return true
}

func version(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

// Shared returns the test binary's server, starting it on first use; without PostgreSQL it skips t (or
// fails it when FLOWBUS_REQUIRE_POSTGRES=1).
func Shared(t testing.TB) *Server {
	t.Helper()
	bin := BinDir()
	if bin == "" {
		if os.Getenv(RequireEnv) == "1" {
			t.Fatalf("PostgreSQL binaries not found (/usr/lib/postgresql/*/bin, $FLOWBUS_PG_BIN, $PATH) and %s=1: install the Debian package postgresql", RequireEnv)
		}
		t.Skipf("PostgreSQL not installed (Debian package postgresql); %s=1 makes this a failure", RequireEnv)
	}
	once.Do(func() { shared, sharedErr = start(bin) })
	if sharedErr != nil {
		t.Fatalf("start PostgreSQL: %v", sharedErr)
	}
	return shared
}

// Main runs the tests and stops the shared server, if one was started.
func Main(m *testing.M) int {
	code := m.Run()
	if shared != nil {
		shared.Stop()
	}
	return code
}

func start(bin string) (*Server, error) {
	s := &Server{bin: bin}
	// Not a test's TempDir: its parents are 0700 root, which the server's user cannot traverse.
	dir, err := os.MkdirTemp("", "flowstat-pg-")
	if err != nil {
		return nil, err
	}
	s.dir = dir
	fail := func(err error) (*Server, error) {
		os.RemoveAll(dir)
		return nil, err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return fail(err)
	}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			u, err = user.Lookup("nobody")
		}
		if err != nil {
			return fail(fmt.Errorf("PostgreSQL refuses to run as root and there is no postgres or nobody user: %v", err))
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		s.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if err := os.Chown(dir, uid, gid); err != nil {
			return fail(err)
		}
	}
	s.data = filepath.Join(dir, "data")
	if out, err := s.run("initdb", "-D", s.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"); err != nil {
		return fail(fmt.Errorf("initdb: %v\n%s", err, out))
	}
	for try := 0; ; try++ {
		s.Port, err = freePort()
		if err != nil {
			return fail(err)
		}
		opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off", s.Port, dir)
		out, err := s.run("pg_ctl", "-D", s.data, "-l", filepath.Join(dir, "log"), "-o", opts, "-w", "-t", "60", "start")
		if err == nil {
			return s, nil
		}
		if try == 2 { // the free port may have been taken in between: try a few
			log, _ := os.ReadFile(filepath.Join(dir, "log"))
			return fail(fmt.Errorf("pg_ctl start: %v\n%s\n%s", err, out, log))
		}
	}
}

// Stop stops the server and removes its files.
func (s *Server) Stop() {
	s.run("pg_ctl", "-D", s.data, "-m", "immediate", "-w", "stop")
	os.RemoveAll(s.dir)
}

func (s *Server) run(prog string, args ...string) ([]byte, error) {
	cmd := exec.Command(filepath.Join(s.bin, prog), args...)
	cmd.Dir = s.dir
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	if s.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred}
	}
	return cmd.CombinedOutput()
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// DSN is the URL of database db on this server.
func (s *Server) DSN(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", s.Port, db)
}

// NewDB creates an empty database, dropped when the test ends, and returns its URL.
func (s *Server) NewDB(t testing.TB) string {
	t.Helper()
	s.mu.Lock()
	s.n++
	name := fmt.Sprintf("flowstat_%d_%d", os.Getpid(), s.n)
	s.mu.Unlock()
	if err := s.exec("CREATE DATABASE " + name); err != nil {
		t.Fatalf("create database: %v", err)
	}
	t.Cleanup(func() {
		if err := s.exec("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)"); err != nil {
			t.Logf("drop database %s: %v", name, err)
		}
	})
	return s.DSN(name)
}

func (s *Server) exec(q string) error {
	db, err := sql.Open("pgx", s.DSN("postgres"))
	if err != nil {
		return err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = db.ExecContext(ctx, q)
	return err
}
