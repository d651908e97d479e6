package store_test

import (
	"context"
	"database/sql"
	"flag"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat/pgtest"
	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/schema"
)

var update = flag.Bool("update", false, "rewrite SCHEMA.md from schema_docs.go")

// SCHEMA.md, SQLite's stand-in for comments, says what the PostgreSQL comments say.
func TestSchemaDoc(t *testing.T) {
	const path = "../SCHEMA.md"
	want := store.SchemaMarkdown()
	if *update {
		if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(path)
	if err != nil || string(got) != want {
		t.Errorf("%s is not what schema_docs.go makes (%v): run go test ./consumers/flowstat/store -run TestSchemaDoc -update", path, err)
	}
}

// Every table, view and column of a migrated PostgreSQL database has a comment, and every view exists.
func TestEveryObjectCommented(t *testing.T) {
	st := open(t, pgtest.Shared(t).NewDB(t))
	ctx := context.Background()
	var missing []string
	rows, err := st.DB().QueryContext(ctx, `SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v') AND COALESCE(obj_description(c.oid, 'pg_class'), '') = ''`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var name, kind string
		if err := rows.Scan(&name, &kind); err != nil {
			t.Fatal(err)
		}
		missing = append(missing, name)
	}
	rows.Close()
	rows, err = st.DB().QueryContext(ctx, `SELECT c.relname || '.' || a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
		JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v') AND a.attnum > 0 AND NOT a.attisdropped
			AND COALESCE(col_description(c.oid, a.attnum), '') = ''`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			t.Fatal(err)
		}
		missing = append(missing, name)
	}
	rows.Close()
	if len(missing) > 0 {
		t.Errorf("without a comment: %s", strings.Join(missing, ", "))
	}
	var views []string
	rows, err = st.DB().QueryContext(ctx, `SELECT viewname FROM pg_views WHERE schemaname = 'public' ORDER BY viewname`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var v string
		rows.Scan(&v)
		views = append(views, v)
	}
	want := slices.Sorted(slices.Values(store.ViewNames()))
	if !slices.Equal(views, want) {
		t.Errorf("views %v, want %v", views, want)
	}
}

// A database a schema-5 flowstat wrote keeps every row through migrations 6 and 7, its first DNS names are in
// the view conn_names, and the views read them with the events' names, typed times, NULL for
// unknown and (PostgreSQL) inet addresses.
func TestMigration6FromSchema5(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		ctx := context.Background()
		restore := store.LimitMigrations(5)
		old, err := store.Open(ctx, dsn)
		if err != nil {
			restore()
			t.Fatal(err)
		}
		if err := old.EnsureBucket(ctx, time.Minute); err != nil {
			t.Fatal(err)
		}
		base := time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)
		d := store.NewDelta()
		v4, zoned := netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("fe80::5%eth0")
		d.Conns[store.ConnKey{Bucket: base.Unix(), Host: "web-01", Dir: schema.Outgoing, Peer: v4, Name: "api.example.com", Port: 443}] = 5
		d.Conns[store.ConnKey{Bucket: base.Unix(), Host: "web-01", Dir: schema.Outgoing, Peer: v4, Name: "", Port: 443}] = 2
		d.Conns[store.ConnKey{Bucket: base.Unix() + 60, Host: "db-01", Dir: schema.Incoming, Peer: zoned, Name: "", Port: 5432}] = 1
		d.Seen[store.SeenKey{Host: "web-01", Dir: schema.Outgoing, Peer: v4, Port: 443}] = store.Span{First: base.UnixNano() + 5e6, Last: base.UnixNano() + 9e6, Name: "api.example.com", NameNS: base.UnixNano() + 5e6}
		d.Seen[store.SeenKey{Host: "db-01", Dir: schema.Incoming, Peer: zoned, Port: 5432}] = store.Span{First: base.UnixNano() + 61e9, Last: base.UnixNano() + 61e9}
		d.Batches[store.BatchKey{Bucket: base.Unix(), Host: "web-01", Dir: schema.Outgoing}] = &store.BatchAgg{Batches: 2, Events: 7, Drops: schema.Drops{Kernel: 4}}
		d.Gaps = append(d.Gaps, store.Gap{RunKey: store.RunKey{Host: "web-01", RunID: "r1", Dir: schema.Outgoing}, AfterSeq: 3, Seq: 6, PrevSeq: 5, StreamSeq: 9, Stored: base.Add(time.Second)})
		d.Ends[store.ConnKey{Bucket: base.Unix(), Host: "web-01", Dir: schema.Outgoing, Peer: v4, Name: "api.example.com", Port: 443}] = &store.EndAgg{Ends: 2, SrcBytes: 100, DstBytes: 900, DurationSum: 4e9, DurationMax: 3e9}
		if err := old.Commit(ctx, d, store.Checkpoint{Consumer: "c", Stream: "S", Seq: 9}, 0); err != nil {
			t.Fatal(err)
		}
		old.Close()
		restore()

		st := open(t, dsn)
		if v, err := st.SchemaVersion(ctx); err != nil || v != store.Version() {
			t.Fatalf("version %d (%v), want %d", v, err, store.Version())
		}
		db := st.DB()
		count := func(q string) int64 {
			t.Helper()
			var n int64
			if err := db.QueryRowContext(ctx, q).Scan(&n); err != nil {
				t.Fatalf("%s: %v", q, err)
			}
			return n
		}
		for q, want := range map[string]int64{
			`SELECT COUNT(*) FROM conn_agg`: 3, `SELECT COUNT(*) FROM peer_seen`: 2, `SELECT COUNT(*) FROM end_agg`: 1,
			`SELECT COUNT(*) FROM gaps`: 1, `SELECT COUNT(*) FROM batch_agg`: 1,
			`SELECT COUNT(*) FROM conn_names`: 1, `SELECT SUM(conns) FROM conn_names WHERE name = 'api.example.com'`: 5,
			`SELECT COUNT(*) FROM connections WHERE remote_name IS NULL`:                                                2,
			`SELECT SUM(connections) FROM connections_by_name WHERE remote_name IS NULL`:                                3,
			`SELECT COUNT(*) FROM connections WHERE remote_zone = 'eth0' AND local_port = 5432 AND remote_port IS NULL`: 1,
			`SELECT COUNT(*) FROM new_destinations WHERE first_name IS NULL AND first_name_seen IS NULL`:                1,
			`SELECT SUM(drops) FROM gaps_and_drops WHERE gaps = 1`:                                                      4,
			`SELECT COUNT(*) FROM batch_gaps WHERE missing_from = 4 AND missing_to = 5`:                                 1,
			`SELECT SUM(bytes_sent) FROM bytes_per_peer WHERE conn_direction = 'outgoing'`:                              100,
			// Migration 7: the ends' first names are in end_names and bytes_per_name.
			`SELECT COUNT(*) FROM end_names WHERE name = 'api.example.com' AND ends = 2`:           1,
			`SELECT SUM(bytes_received) FROM bytes_per_name WHERE remote_name = 'api.example.com'`: 900,
		} {
			if got := count(q); got != want {
				t.Errorf("%s = %d, want %d", q, got, want)
			}
		}
		var first, last, hour string
		var firstT, hourT time.Time
		if st.Kind() == store.Postgres {
			if n := count(`SELECT COUNT(*) FROM connections WHERE remote_addr << '10.0.0.0/8'`); n != 2 {
				t.Errorf("%d rows in 10.0.0.0/8, want 2", n)
			}
			if n := count(`SELECT COUNT(*) FROM connections WHERE remote_addr = 'fe80::5'`); n != 1 {
				t.Errorf("%d rows of fe80::5 (zone apart), want 1", n)
			}
			if err := db.QueryRowContext(ctx, `SELECT first_seen, hour_start FROM new_destinations, top_talkers_hourly
				WHERE new_destinations.host = 'web-01' AND top_talkers_hourly.host = 'web-01'`).Scan(&firstT, &hourT); err != nil {
				t.Fatal(err)
			}
			first, hour = firstT.UTC().Format(time.RFC3339Nano), hourT.UTC().Format(time.RFC3339)
			if err := db.QueryRowContext(ctx, `SELECT array_to_string(remote_names, ',') FROM top_talkers_hourly WHERE host = 'web-01'`).Scan(&last); err != nil {
				t.Fatal(err)
			}
		} else {
			if err := db.QueryRowContext(ctx, `SELECT first_seen, hour_start, top_talkers_hourly.remote_names FROM new_destinations, top_talkers_hourly
				WHERE new_destinations.host = 'web-01' AND top_talkers_hourly.host = 'web-01'`).Scan(&first, &hour, &last); err != nil {
				t.Fatal(err)
			}
		}
		if want := map[store.Kind]string{store.Postgres: "2026-11-24T10:00:00.005Z", store.SQLite: "2026-11-24T10:00:00.005Z"}[st.Kind()]; first != want {
			t.Errorf("first_seen %s, want %s", first, want)
		}
		if hour != "2026-11-24T10:00:00Z" || last != "api.example.com" {
			t.Errorf("top_talkers_hourly hour %s names %q, want 2026-11-24T10:00:00Z and api.example.com", hour, last)
		}
	})
}

// A time range on a view is a range of an index, not a scan of the table: in PostgreSQL the index on
// the view's time expression, in SQLite the primary key through bucket_start_s.
func TestViewTimeRangeUsesIndex(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		st := open(t, dsn)
		ctx := context.Background()
		db := st.DB()
		var plan []string
		collect := func(rows *sql.Rows, err error) {
			t.Helper()
			if err != nil {
				t.Fatal(err)
			}
			defer rows.Close()
			cols, _ := rows.Columns()
			for rows.Next() {
				vals := make([]any, len(cols))
				ptrs := make([]any, len(cols))
				for i := range vals {
					ptrs[i] = &vals[i]
				}
				if err := rows.Scan(ptrs...); err != nil {
					t.Fatal(err)
				}
				for _, v := range vals {
					if s, ok := v.(string); ok {
						plan = append(plan, s)
					} else if b, ok := v.([]byte); ok {
						plan = append(plan, string(b))
					}
				}
			}
		}
		if st.Kind() == store.Postgres {
			conn, err := db.Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			// An empty table is read whole whatever its indexes: ask whether the index can serve.
			if _, err := conn.ExecContext(ctx, `SET enable_seqscan = off`); err != nil {
				t.Fatal(err)
			}
			collect(conn.QueryContext(ctx, `EXPLAIN SELECT * FROM connections WHERE bucket_start > now() - interval '1 hour'`))
			// The README's question: the name tables of connections_by_name's union by their time
			// index (the unnamed side may go by another index on an empty table).
			var byName []string
			plan, byName = nil, plan
			collect(conn.QueryContext(ctx, `EXPLAIN SELECT host, remote_addr, remote_name, sum(connections) FROM connections_by_name
				WHERE remote_addr << '10.0.0.0/8' AND bucket_start > now() - interval '1 hour' GROUP BY 1, 2, 3`))
			p := strings.Join(plan, "\n")
			if !strings.Contains(p, "conn_more_names_time") || !strings.Contains(p, "conn_agg_time") {
				t.Errorf("connections_by_name plan does not read conn_agg_time and conn_more_names_time:\n%s", p)
			}
			plan = byName
		} else {
			collect(db.QueryContext(ctx, `EXPLAIN QUERY PLAN SELECT * FROM connections WHERE bucket_start_s > 1795000000`))
		}
		// SQLite: a search of conn_agg's primary key (bucket first), not a scan.
		want := map[store.Kind]string{store.Postgres: "conn_agg_time", store.SQLite: "SEARCH c USING PRIMARY KEY (bucket>?)"}[st.Kind()]
		if p := strings.Join(plan, "\n"); !strings.Contains(p, want) {
			t.Errorf("plan does not hold %q:\n%s", want, p)
		}
	})
}

// The views split a peer into address and zone and flowstat's top joins them again: the keys are the
// peers as stored, a zone holding '%' (only a hostile publisher's) and IPv4-mapped addresses included.
func TestPeerTextRoundTrip(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		st := open(t, dsn)
		ctx := context.Background()
		if err := st.EnsureBucket(ctx, time.Minute); err != nil {
			t.Fatal(err)
		}
		base := time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)
		d := store.NewDelta()
		peers := []string{"fe80::6%a%b", "fe80::5%eth0", "::ffff:10.0.0.1", "2001:db8::1:0:0:1", "10.0.0.2"}
		for i, p := range peers {
			d.Conns[store.ConnKey{Bucket: base.Unix(), Host: "h", Dir: schema.Outgoing, Peer: netip.MustParseAddr(p), Port: 443}] = uint64(10 - i)
		}
		if err := st.Commit(ctx, d, store.Checkpoint{Consumer: "c", Stream: "S", Seq: 1}, 0); err != nil {
			t.Fatal(err)
		}
		rows, err := st.Top(ctx, "peer", store.Filter{Since: base}, 10)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, r := range rows {
			got = append(got, r.Key)
		}
		if !slices.Equal(got, peers) {
			t.Errorf("top peers %q, want %q", got, peers)
		}
	})
}
