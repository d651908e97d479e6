package flowstat_test

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat/flowstattest"
	"github.com/flowbus/flowbus/consumers/flowstat/pgtest"
	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/flowbus/flowbus/schema"
)

// analystQuery is the README's one-statement answer to "who talked to 10.0.0.0/8 in the last hour, by
// name" (section "Querying with SQL"), verbatim.
const analystQuery = `SELECT host, remote_addr, remote_name, sum(connections) AS connections
FROM connections_by_name
WHERE remote_addr << '10.0.0.0/8' AND bucket_start > now() - interval '1 hour'
GROUP BY host, remote_addr, remote_name
ORDER BY connections DESC, host, remote_addr, remote_name;`

// sqlScenario publishes, as agents do, connections of two hosts: to a 10/8 peer with two DNS names,
// to one without a name, to one outside 10/8, to the named peer two hours ago, and an incoming one
// from a 10/8 peer with a name; plus their ends. It runs flowstat into a new PostgreSQL database.
func sqlScenario(t *testing.T) *store.Store {
	t.Helper()
	e := newEnv(t)
	web, db := tailtest.NewAgent("web-07", "run-w"), tailtest.NewAgent("db-01", "run-d")
	me, dbAddr := mustAddr("192.0.2.7"), mustAddr("192.0.2.9")
	npm, anon, outside, app := mustAddr("10.2.0.5"), mustAddr("10.9.9.9"), mustAddr("93.184.215.14"), mustAddr("10.3.0.1")
	now := time.Now().UnixNano()
	ago := func(d time.Duration) int64 { return now - int64(d) }
	two := []string{"registry.npmjs.org", "proxy.golang.org"}
	var out []schema.Event
	for i := 0; i < 3; i++ {
		out = append(out, schema.Event{Timestamp: ago(10*time.Minute) + int64(i), Src: me, Dst: npm, SrcPort: uint16(40000 + i), DstPort: 443, DstDNS: two})
	}
	for i := 0; i < 2; i++ {
		out = append(out, schema.Event{Timestamp: ago(5*time.Minute) + int64(i), Src: me, Dst: anon, SrcPort: uint16(41000 + i), DstPort: 5432})
	}
	out = append(out, schema.Event{Timestamp: ago(5 * time.Minute), Src: me, Dst: outside, SrcPort: 42000, DstPort: 443, DstDNS: []string{"example.com"}})
	for i := 0; i < 4; i++ {
		out = append(out, schema.Event{Timestamp: ago(2*time.Hour) + int64(i), Src: me, Dst: npm, SrcPort: uint16(43000 + i), DstPort: 443, DstDNS: two})
	}
	e.rec.Publish(t, web, schema.Outgoing, schema.Drops{Kernel: 3}, false, out)
	in := []schema.Event{
		{Timestamp: ago(20 * time.Minute), Src: app, Dst: dbAddr, SrcPort: 50000, DstPort: 5432, SrcDNS: []string{"app.internal"}},
		{Timestamp: ago(19 * time.Minute), Src: app, Dst: dbAddr, SrcPort: 50001, DstPort: 5432, SrcDNS: []string{"app.internal"}},
	}
	e.rec.Publish(t, db, schema.Incoming, schema.Drops{}, false, in)
	// A lost batch, so the gap panels have a row.
	e.rec.Publish(t, db, schema.Incoming, schema.Drops{}, true, in[:1])
	e.rec.Publish(t, db, schema.Incoming, schema.Drops{Reader: 1}, false, in[1:])
	var ends []schema.EndEvent
	for _, ev := range out {
		ends = append(ends, schema.EndEvent{Src: ev.Src, Dst: ev.Dst, SrcPort: ev.SrcPort, DstPort: ev.DstPort, DstDNS: ev.DstDNS,
			BeginNs: ev.Timestamp, EndNs: ev.Timestamp + 2e9, SrcBytes: 1000, DstBytes: 20000, Reason: schema.EndFIN})
	}
	e.rec.PublishEnd(t, web, schema.Outgoing, schema.Drops{}, false, ends)
	st := open(t, pgtest.Shared(t).NewDB(t))
	run(t, st, e.opts())
	flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
	return st
}

// readmeStatement runs q, which the README must hold verbatim, on what sqlScenario put into PostgreSQL,
// and returns each row as line formats it.
func readmeStatement(t *testing.T, q string, line func(scan func(...any) error) (string, error)) []string {
	t.Helper()
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(readme), q) {
		t.Fatalf("README.md no longer holds the statement this test runs:\n%s", q)
	}
	st := sqlScenario(t)
	rows, err := st.DB().QueryContext(context.Background(), q)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var got []string
	for rows.Next() {
		l, err := line(rows.Scan)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, l)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return got
}

// The README's statement, run as it is on what the real consumer path put into PostgreSQL: every DNS
// name of a peer (not only the first), NULL for a connection without one, nothing outside 10/8 or
// older than the hour, incoming connections by their initiator.
func TestAnalystQueryWhoTalkedTo10By(t *testing.T) {
	got := readmeStatement(t, analystQuery, func(scan func(...any) error) (string, error) {
		var host, addr string
		var name sql.NullString
		var n int64
		err := scan(&host, &addr, &name, &n)
		return fmt.Sprintf("%s %s %s %d", host, addr, nullText(name), n), err
	})
	want := []string{
		// Two incoming batches arrived (a third was lost): three connections.
		"db-01 10.3.0.1 app.internal 3",
		"web-07 10.2.0.5 proxy.golang.org 3",
		"web-07 10.2.0.5 registry.npmjs.org 3",
		"web-07 10.9.9.9 NULL 2",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("README statement returned\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// localQuery is the README's statement on connections_by_local, verbatim.
const localQuery = `SELECT host, local_addr, remote_addr, responder_port, sum(connections) AS connections
FROM connections_by_local
WHERE remote_addr << '10.0.0.0/8' AND bucket_start > now() - interval '1 hour'
GROUP BY host, local_addr, remote_addr, responder_port
ORDER BY connections DESC, host, local_addr, remote_addr, responder_port;`

// The local end of each connection, by the README's statement: the initiator's address of outgoing
// connections, the responder's of incoming ones, typed inet, within the hour and 10/8 only.
func TestAnalystQueryLocalAddress(t *testing.T) {
	got := readmeStatement(t, localQuery, func(scan func(...any) error) (string, error) {
		var host, local, remote string
		var port, n int64
		err := scan(&host, &local, &remote, &port, &n)
		return fmt.Sprintf("%s %s %s %d %d", host, local, remote, port, n), err
	})
	want := []string{
		"db-01 192.0.2.9 10.3.0.1 5432 3",
		"web-07 192.0.2.7 10.2.0.5 443 3",
		"web-07 192.0.2.7 10.9.9.9 5432 2",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("README statement returned\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func nullText(s sql.NullString) string {
	if !s.Valid {
		return "NULL"
	}
	return s.String
}

// `flowstat new` and `flowstat top --by name` see every DNS name of a peer, not only the first.
func TestEveryNameInQueries(t *testing.T) {
	st := sqlScenario(t)
	ctx := context.Background()
	f := store.Filter{Since: time.Now().Add(-3 * time.Hour), Host: "web-07"}
	nd, err := st.NewDestinations(ctx, f, 10)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, d := range nd {
		got = append(got, fmt.Sprintf("%s:%d=%s", d.Peer, d.Port, strings.Join(d.Names, ",")))
	}
	if want := "10.2.0.5:443=registry.npmjs.org,proxy.golang.org 10.9.9.9:5432= 93.184.215.14:443=example.com"; strings.Join(got, " ") != want {
		t.Errorf("new destinations %s, want %s", strings.Join(got, " "), want)
	}
	top, err := st.Top(ctx, "name", f, 10)
	if err != nil {
		t.Fatal(err)
	}
	got = got[:0]
	for _, r := range top {
		got = append(got, fmt.Sprintf("%s=%d", r.Key, r.Conns))
	}
	if want := "proxy.golang.org=7 registry.npmjs.org=7 example.com=1"; strings.Join(got, " ") != want {
		t.Errorf("top by name %s, want %s", strings.Join(got, " "), want)
	}
}
