package store_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat/pgtest"
	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/schema"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

func forEachDB(t *testing.T, f func(t *testing.T, dsn string)) {
	t.Run("sqlite", func(t *testing.T) { f(t, filepath.Join(t.TempDir(), "flowstat.db")) })
	t.Run("postgres", func(t *testing.T) { f(t, pgtest.Shared(t).NewDB(t)) })
}

func open(t *testing.T, dsn string) *store.Store {
	t.Helper()
	st, err := store.Open(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func TestParseDSN(t *testing.T) {
	for _, c := range []struct {
		in, kind, target, err string
	}{
		{"/var/lib/flowbus/flowstat.db", "sqlite", "/var/lib/flowbus/flowstat.db", ""},
		{"sqlite:rel/x.db", "sqlite", "rel/x.db", ""},
		{"file:/x.db?mode=rwc", "sqlite", "/x.db", ""},
		{"postgres://u:pw@db:5432/stats?sslmode=disable", "postgres", "postgres://u:pw@db:5432/stats?sslmode=disable", ""},
		{"postgresql:///stats?host=/run/postgresql", "postgres", "postgresql:///stats?host=/run/postgresql", ""},
		{"postgres:///stats", "", "", "no host"},
		{"mysql://u:secret@h/db", "", "", "unsupported database URL scheme"},
		{"", "", "", "empty"},
		{"sqlite:", "", "", "empty SQLite path"},
		{"host=db dbname=stats user=u password=secret", "postgres", "host=db dbname=stats user=u password=secret", ""},
		{"dbname = stats", "postgres", "dbname = stats", ""},
		{"data/a=b.db", "sqlite", "data/a=b.db", ""},
		{"hots=db dbname=stats password=secret", "", "", "does not start with a PostgreSQL keyword"},
	} {
		kind, target, err := store.ParseDSN(c.in)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) || strings.Contains(err.Error(), "secret") {
				t.Errorf("ParseDSN(%q) error %v, want one mentioning %q without the password", c.in, err, c.err)
			}
			continue
		}
		if err != nil || string(kind) != c.kind || target != c.target {
			t.Errorf("ParseDSN(%q) = %q, %q, %v; want %q, %q", c.in, kind, target, err, c.kind, c.target)
		}
	}
	if r := store.Redact("postgres://u:pw@h/db"); strings.Contains(r, "pw") {
		t.Errorf("Redact kept the password: %s", r)
	}
}

// Migrations run once, leave the database at the newest version, and a database from a newer flowstat
// is refused with a message saying to upgrade.
func TestMigrations(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		st := open(t, dsn)
		v, err := st.SchemaVersion(context.Background())
		if err != nil || v != store.Version() {
			t.Fatalf("schema version %d (%v), want %d", v, err, store.Version())
		}
		st2 := open(t, dsn) // again: nothing to do
		var n int
		if err := st2.DB().QueryRow(`SELECT COUNT(*) FROM schema_migrations`).Scan(&n); err != nil || n != store.NumMigrations {
			t.Errorf("%d migration rows (%v)", n, err)
		}
		if _, err := st.DB().Exec(`INSERT INTO schema_migrations (version, applied_ns) VALUES (99, 0)`); err != nil {
			t.Fatal(err)
		}
		_, err = store.Open(context.Background(), dsn)
		if err == nil || !strings.Contains(err.Error(), "upgrade flowstat") {
			t.Errorf("opening a newer schema: %v", err)
		}
	})
}

// A second writer with a stale view of the checkpoint cannot commit: two processes on one consumer
// name cannot both count a message.
func TestCommitRefusesAMovedCheckpoint(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		a, b := open(t, dsn), open(t, dsn)
		ctx := context.Background()
		cp := store.Checkpoint{Consumer: "c", Stream: "S", Filters: []string{"flows.>"}}
		if got, err := a.InitCheckpoint(ctx, cp); err != nil || got != 0 {
			t.Fatalf("InitCheckpoint: %d, %v", got, err)
		}
		d := store.NewDelta()
		d.Conns[store.ConnKey{Bucket: 60, Host: "h", Dir: schema.Outgoing, Peer: netip.MustParseAddr("10.0.0.1"), Port: 443}] = 5
		cp.Seq = 10
		if err := a.Commit(ctx, d, cp, 0); err != nil {
			t.Fatal(err)
		}
		cp.Seq = 12
		err := b.Commit(ctx, d, cp, 0)
		if !errors.Is(err, store.ErrCheckpointMoved) {
			t.Fatalf("stale commit: %v, want ErrCheckpointMoved", err)
		}
		var conns int64
		if err := a.DB().QueryRow(`SELECT conns FROM conn_agg`).Scan(&conns); err != nil || conns != 5 {
			t.Errorf("conns %d (%v) after the refused commit, want 5", conns, err)
		}
		if got, err := a.InitCheckpoint(ctx, store.Checkpoint{Consumer: "c", Stream: "S", Seq: 3}); err != nil || got != 10 {
			t.Errorf("InitCheckpoint over an existing checkpoint: %d, %v; want it kept at 10", got, err)
		}
	})
}

func TestBucketWidthIsFixed(t *testing.T) {
	st := open(t, filepath.Join(t.TempDir(), "x.db"))
	ctx := context.Background()
	if err := st.EnsureBucket(ctx, time.Minute); err != nil {
		t.Fatal(err)
	}
	err := st.EnsureBucket(ctx, 10*time.Second)
	if err == nil || !strings.Contains(err.Error(), "--bucket 1m0s") {
		t.Errorf("another width: %v", err)
	}
}

// The queries answer from known rows: top talkers by peer, port, name and host, new destinations in a
// range, connections per host per step, and the summary's totals, gaps and dead letters.
func TestQueries(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		st := open(t, dsn)
		ctx := context.Background()
		if err := st.EnsureBucket(ctx, time.Minute); err != nil {
			t.Fatal(err)
		}
		base := time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)
		b := func(min int) int64 { return base.Add(time.Duration(min) * time.Minute).Unix() }
		ns := func(min int) int64 { return base.Add(time.Duration(min) * time.Minute).UnixNano() }
		p1, p2, p6 := netip.MustParseAddr("93.184.215.14"), netip.MustParseAddr("10.0.0.7"), netip.MustParseAddr("2001:db8::1")
		d := store.NewDelta()
		add := func(min int, host string, dir schema.Direction, peer netip.Addr, name string, port uint16, n uint64) {
			d.Conns[store.ConnKey{Bucket: b(min), Host: host, Dir: dir, Peer: peer, Name: name, Port: port}] += n
			k := store.SeenKey{Host: host, Dir: dir, Peer: peer, Port: port}
			sp, ok := d.Seen[k]
			if !ok {
				sp = store.Span{First: ns(min), Last: ns(min)}
			}
			sp.Merge(ns(min), name)
			d.Seen[k] = sp
		}
		add(0, "web-01", schema.Outgoing, p1, "api.example.com", 443, 50)
		// Those 50 carried a second name, which only conn_names keeps.
		d.Names[store.NameKey{Bucket: b(0), Host: "web-01", Dir: schema.Outgoing, Peer: p1, Port: 443, Name: "cdn.example.net"}] += 50
		add(1, "web-01", schema.Outgoing, p1, "", 443, 5)
		add(1, "web-01", schema.Outgoing, p2, "", 5432, 20)
		add(2, "db-02", schema.Incoming, p2, "", 5432, 30)
		add(3, "web-01", schema.Outgoing, p6, "www.example.org", 80, 7)
		add(30, "web-01", schema.Outgoing, p6, "www.example.org", 443, 1)
		d.Batches[store.BatchKey{Bucket: b(0), Host: "web-01", Dir: schema.Outgoing}] = &store.BatchAgg{Batches: 3, Events: 83, Drops: schema.Drops{Kernel: 2, Spool: 1}}
		d.Gaps = append(d.Gaps, store.Gap{RunKey: store.RunKey{Host: "web-01", RunID: "r1", Dir: schema.Outgoing}, AfterSeq: 4, Seq: 9, PrevSeq: 7, StreamSeq: 33, Stored: base})
		d.Dead = append(d.Dead, store.DeadLetter{Stream: "S", StreamSeq: 34, Subject: "flows.x.outgoing", Reason: "malformed", Detail: "bad", Stored: base, Copied: true})
		cp := store.Checkpoint{Consumer: "c", Stream: "S", Filters: []string{"flows.>"}, Seq: 40}
		if err := st.Commit(ctx, d, cp, 0); err != nil {
			t.Fatal(err)
		}

		all := store.Filter{Since: base}
		top := func(by string, f store.Filter) string {
			rows, err := st.Top(ctx, by, f, 10)
			if err != nil {
				t.Fatalf("top by %s: %v", by, err)
			}
			var s []string
			for _, r := range rows {
				s = append(s, r.Key+"/"+r.Name+"="+itoa(r.Conns))
			}
			return strings.Join(s, " ")
		}
		for _, c := range []struct {
			by   string
			f    store.Filter
			want string
		}{
			{"peer", all, "93.184.215.14/api.example.com=55 10.0.0.7/=50 2001:db8::1/www.example.org=8"},
			{"port", all, "443/=56 5432/=50 80/=7"},
			{"name", all, "api.example.com/=50 cdn.example.net/=50 www.example.org/=8"},
			{"host", all, "web-01/=83 db-02/=30"},
			{"peer", store.Filter{Since: base, Host: "web-01", Direction: "outgoing"}, "93.184.215.14/api.example.com=55 10.0.0.7/=20 2001:db8::1/www.example.org=8"},
			{"port", store.Filter{Since: base.Add(90 * time.Second), Until: base.Add(10 * time.Minute)}, "5432/=50 80/=7 443/=5"},
		} {
			if got := top(c.by, c.f); got != c.want {
				t.Errorf("top by %s %+v:\n got %s\nwant %s", c.by, c.f, got, c.want)
			}
		}

		nd, err := st.NewDestinations(ctx, store.Filter{Since: base.Add(time.Minute), Direction: "outgoing"}, 10)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, x := range nd {
			got = append(got, x.Peer+":"+itoa(int64(x.Port))+"/"+x.Name+"@"+x.First.Format("15:04"))
		}
		if want := "10.0.0.7:5432/@10:01 2001:db8::1:80/www.example.org@10:03 2001:db8::1:443/www.example.org@10:30"; strings.Join(got, " ") != want {
			t.Errorf("new destinations:\n got %s\nwant %s", strings.Join(got, " "), want)
		}
		nd, err = st.NewDestinations(ctx, store.Filter{Since: base.Add(time.Minute), Until: base.Add(5 * time.Minute), Host: "db-02"}, 10)
		if err != nil || len(nd) != 1 || nd[0].Direction != "incoming" {
			t.Errorf("new destinations of db-02: %+v, %v", nd, err)
		}

		pts, err := st.PerHost(ctx, store.Filter{Since: base}, 2*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		got = nil
		for _, p := range pts {
			got = append(got, p.Start.Format("15:04")+" "+p.Host+"="+itoa(p.Conns))
		}
		if want := "10:00 web-01=75, 10:02 db-02=30, 10:02 web-01=7, 10:30 web-01=1"; strings.Join(got, ", ") != want {
			t.Errorf("per host:\n got %s\nwant %s", strings.Join(got, ", "), want)
		}

		sum, err := st.Summary(ctx, 5)
		if err != nil {
			t.Fatal(err)
		}
		if len(sum.Hosts) != 2 || sum.Hosts[1].Host != "web-01" || sum.Hosts[1].Conns != 83 || sum.Hosts[1].Batches != 3 || sum.Hosts[1].Drops != 3 ||
			sum.Hosts[1].Gaps != 1 || sum.GapCount != 1 || sum.Gaps[0].PrevSeq != 7 || sum.DeadLetters != 1 || sum.BucketSeconds != 60 || len(sum.Checkpoints) != 1 {
			t.Errorf("summary %+v", sum)
		}
	})
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// A libpq key=value DSN reaches PostgreSQL (no SQLite file of that name appears), and its password is
// redacted wherever the DSN is shown.
func TestKeyValueDSN(t *testing.T) {
	u, err := url.Parse(pgtest.Shared(t).NewDB(t))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	t.Chdir(dir)
	dsn := fmt.Sprintf("host=%s port=%s dbname=%s user=%s sslmode=disable password='s3 cret'", u.Hostname(), u.Port(), strings.TrimPrefix(u.Path, "/"), u.User.Username())
	st := open(t, dsn)
	if st.Kind() != store.Postgres || strings.Contains(st.Where(), "s3 cret") || !strings.Contains(st.Where(), "password=xxxxx") {
		t.Errorf("kind %s, where %q", st.Kind(), st.Where())
	}
	if v, err := st.SchemaVersion(context.Background()); err != nil || v != store.Version() {
		t.Errorf("schema version %d (%v)", v, err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("files created in the working directory: %v", ents)
	}
	_, err = store.Open(context.Background(), fmt.Sprintf("host=%s port=%s dbname=nosuchdb user=%s password=s3cret connect_timeout=5", u.Hostname(), u.Port(), u.User.Username()))
	if err == nil || strings.Contains(err.Error(), "s3cret") {
		t.Errorf("opening a missing database: %v", err)
	}
}

// A SQLite path that cannot be a database file says what to give instead; only CreateDir (the default
// state directory) creates a missing directory.
func TestSQLitePathRefusals(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	missing := filepath.Join(dir, "no", "such", "x.db")
	if _, err := store.Open(ctx, missing); err == nil || !strings.Contains(err.Error(), "the directory "+filepath.Dir(missing)+" of "+missing+" does not exist") ||
		!strings.Contains(err.Error(), "mkdir -p") {
		t.Errorf("missing directory: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "no")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the missing directory was created: %v", err)
	}
	if _, err := store.Open(ctx, dir); err == nil || err.Error() != dir+" is a directory, give a file path (e.g. "+filepath.Join(dir, "flowstat.db")+")" {
		t.Errorf("a directory: %v", err)
	}
	file := filepath.Join(dir, "plain")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Open(ctx, filepath.Join(file, "x.db")); err == nil || !strings.Contains(err.Error(), file+" is not a directory") {
		t.Errorf("below a file: %v", err)
	}
	st, err := store.OpenWith(ctx, missing, store.OpenOptions{CreateDir: true})
	if err != nil {
		t.Fatalf("CreateDir: %v", err)
	}
	st.Close()
	if _, err := os.Stat(missing); err != nil {
		t.Errorf("CreateDir did not create the database: %v", err)
	}
}

// A refused PostgreSQL connection is one line, each attempt once (pgx tries TLS, then plain, and
// reported both), with the fix.
func TestRefusedPostgresOneLine(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	_, err = store.Open(context.Background(), "postgres://u:s3cret@"+addr+"/x")
	if err == nil {
		t.Fatal("no error")
	}
	msg := err.Error()
	if strings.Contains(msg, "\n") || strings.Count(msg, "connection refused") != 1 || strings.Contains(msg, "s3cret") || !strings.Contains(msg, "--db or FLOWBUS_DB") {
		t.Errorf("refused connection: %q", msg)
	}
}

// The database identity is made once and kept.
func TestDatabaseID(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		ctx := context.Background()
		a, err := open(t, dsn).ID(ctx)
		if err != nil || len(a) != 24 {
			t.Fatalf("ID %q, %v", a, err)
		}
		b, err := open(t, dsn).ID(ctx)
		if err != nil || b != a {
			t.Errorf("second ID %q (%v), want %q", b, err, a)
		}
		other := filepath.Join(t.TempDir(), "other.db")
		c, err := open(t, other).ID(ctx)
		if err != nil || c == a {
			t.Errorf("another database has ID %q (%v), the same as %q", c, err, a)
		}
	})
}

// A database of schema 2 (before run links) migrates to 3: its chains keep their last seq and are marked
// as not counted from their first batch (so a link to them tells no K), and restarts can be recorded.
func TestMigrationToRunLinks(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		ctx := context.Background()
		restore := store.LimitMigrations(2)
		old, err := store.Open(ctx, dsn)
		restore()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := old.DB().Exec(`INSERT INTO run_state (host, run_id, direction, last_seq) VALUES ('web-01', 'r1', 'outgoing', 7)`); err != nil {
			t.Fatal(err)
		}
		old.Close()
		st := open(t, dsn)
		if v, err := st.SchemaVersion(ctx); err != nil || v != store.Version() {
			t.Fatalf("schema version %d (%v), want %d", v, err, store.Version())
		}
		runs, err := st.RunStates(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if c := runs[store.RunKey{Host: "web-01", RunID: "r1", Dir: schema.Outgoing}]; len(runs) != 1 || c.Last != 7 || c.Seen != 0 || c.FromStart || c.Linked {
			t.Errorf("migrated chain state %+v", runs)
		}
		d := store.NewDelta()
		rk := store.RunKey{Host: "web-01", RunID: "r2", Dir: schema.Outgoing}
		d.Restarts = append(d.Restarts, store.Restart{RunKey: rk, PrevRunID: "r1", PrevEnd: "unknown", PrevLastSeq: 9, PrevBatches: 5,
			PrevSeen: "partial", Seen: 3, Missing: -1, DownFrom: 1e18, DownTo: 1e18 + 5e8, StreamSeq: 4, Stored: time.Unix(1, 0)})
		d.Recovered[store.RunKey{Host: "web-01", RunID: "r1", Dir: schema.Outgoing}] = 1
		if err := st.ApplyReplay(ctx, d); err != nil {
			t.Fatal(err)
		}
		sum, err := st.Summary(ctx, 5)
		if err != nil {
			t.Fatal(err)
		}
		if len(sum.Restarts) != 1 || sum.Restarts[0].Seen != 4 || sum.Restarts[0].Missing != -1 || sum.RestartTotals.Untold != 1 || sum.RestartTotals.DownNs != 5e8 {
			t.Errorf("restarts %+v, totals %+v", sum.Restarts, sum.RestartTotals)
		}
	})
}
