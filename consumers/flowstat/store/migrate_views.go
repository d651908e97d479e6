package store

import (
	"fmt"
	"strings"
)

// migration6 is the analyst schema (issue 19). The tables the aggregator writes keep their compact
// form (integer epochs, text addresses, ” and 0 for unknown), which both databases store and upsert
// fast; on top of them:
//
//   - conn_names: connections per bucket by EVERY DNS name the events carried for their remote end
//     (conn_agg and peer_seen keep only the first), a view of conn_agg's first names and the table
//     conn_more_names, which the aggregator fills with the names after the first. Storing every
//     name in a table of its own took BenchmarkConsume (B6) from 530-630k to 230k events/s with the
//     index below; most events carry one name or none, so the extra names cost little.
//   - views with the event's names (conn_direction, remote_addr, responder_port, ...), typed times
//     (timestamptz in PostgreSQL, ISO-8601 UTC text in SQLite), inet addresses in PostgreSQL and NULL
//     for unknown: connections, connections_by_name, top_talkers_hourly, new_destinations,
//     connections_per_host, bytes_per_peer, gaps_and_drops, batch_gaps.
//   - indexes leading with host, on peer_seen.last_ns (PostgreSQL only, see below), and on the
//     views' time expressions so a time range on a view is an index range.
//   - PostgreSQL: a comment on every table, view and column (schemaDocs; SQLite has none, SCHEMA.md
//     says the same).
//
// The statements differ by dialect, so they are built for the store's kind. They are frozen as they
// are: a later change of a view or comment is a new migration.
func migration6(kind Kind) []string {
	d := dialects[kind]
	stmts := []string{
		`CREATE TABLE conn_more_names (
			bucket BIGINT NOT NULL, host TEXT NOT NULL, direction TEXT NOT NULL,
			peer TEXT NOT NULL, port INTEGER NOT NULL, name TEXT NOT NULL, conns BIGINT NOT NULL,
			PRIMARY KEY (bucket, host, direction, peer, port, name))` + withoutRowID,
		`CREATE INDEX gaps_stored ON gaps (stored_ns)`,
	}
	if kind == Postgres {
		// The analysts' indexes, in PostgreSQL only: leading with host; the views' time columns as the
		// views compute them, so "bucket_start > now() - interval '1 hour'" reads a range of an index;
		// peer_seen's last sighting. Each costs the consumer at every insert (peer_seen_last at almost
		// every update too, last_ns moving). In SQLite, the embedded default, they took flowstat's CPU
		// per 1M events of B6 (BenchmarkConsume) from 1.4 s to 3.1 s, the every-name table alone to
		// 2.0 s; there the views carry the integer bucket_start_s, which the primary keys serve.
		stmts = append(stmts,
			`CREATE INDEX conn_agg_host ON conn_agg (host, bucket)`,
			`CREATE INDEX conn_more_names_host ON conn_more_names (host, bucket)`,
			`CREATE INDEX end_agg_host ON end_agg (host, bucket)`,
			`CREATE INDEX batch_agg_host ON batch_agg (host, bucket)`,
			`CREATE INDEX proc_agg_host ON proc_agg (host, bucket)`,
			`CREATE INDEX conn_agg_time ON conn_agg (`+d.ts("bucket")+`)`,
			`CREATE INDEX conn_more_names_time ON conn_more_names (`+d.ts("bucket")+`)`,
			`CREATE INDEX end_agg_time ON end_agg (`+d.ts("bucket")+`)`,
			`CREATE INDEX batch_agg_time ON batch_agg (`+d.ts("bucket")+`)`,
			`CREATE INDEX peer_seen_first_time ON peer_seen (`+d.tsNS("first_ns")+`)`,
			`CREATE INDEX peer_seen_last ON peer_seen (last_ns)`,
			`CREATE INDEX peer_seen_last_time ON peer_seen (`+d.tsNS("last_ns")+`)`)
	}
	return append(stmts, viewStatements(kind, views, schemaDocs6)...)
}

// analystIndexes are migration 6's two indexes of a bucketed table, for a table added later: leading
// with host, and on the time the views compute (PostgreSQL only, see migration6).
func analystIndexes(d dialect, table string) []string {
	return []string{
		`CREATE INDEX ` + table + `_host ON ` + table + ` (host, bucket)`,
		`CREATE INDEX ` + table + `_time ON ` + table + ` (` + d.ts("bucket") + `)`,
	}
}

// viewStatements create a migration's views and, in PostgreSQL, its objects' comments.
func viewStatements(kind Kind, vs []view, docs []objDoc) []string {
	var out []string
	for _, v := range vs {
		out = append(out, "CREATE VIEW "+v.name+" AS "+v.sql(dialects[kind]))
	}
	if kind == Postgres {
		out = append(out, commentStatements(docs)...)
	}
	return out
}

// dialect spells the expressions the views need in one database.
type dialect struct {
	// ts is a unix-seconds expression as a time; tsNS a unix-ns one (sub-second kept: µs in
	// PostgreSQL, ms in SQLite's text).
	ts, tsNS func(expr string) string
	// addr is the address part of a peer column (without its zone), zone the zone (NULL when none);
	// both NULL for ''.
	addr, zone func(expr string) string
	// names aggregates DISTINCT name into a list: text[] in PostgreSQL, comma-separated text in SQLite.
	names func(expr string) string
	// rawBucket is, in SQLite, the column bucket_start_s (the unix-seconds bucket, which the primary
	// keys index) after a view's bucket_start; "" in PostgreSQL, whose bucket_start is indexed.
	rawBucket func(expr string) string
}

var dialects = map[Kind]dialect{
	Postgres: {
		ts:   func(e string) string { return "to_timestamp(" + e + ")" },
		tsNS: func(e string) string { return "to_timestamp(" + e + " / 1e9)" },
		addr: func(e string) string { return "CAST(NULLIF(split_part(" + e + ", '%', 1), '') AS inet)" },
		// Everything after the first '%': a hostile zone may hold another.
		zone: func(e string) string {
			return fmt.Sprintf("CASE WHEN strpos(%[1]s, '%%') > 0 THEN substr(%[1]s, strpos(%[1]s, '%%') + 1) END", e)
		},
		names:     func(e string) string { return "array_agg(DISTINCT " + e + " ORDER BY " + e + ")" },
		rawBucket: func(string) string { return "" },
	},
	SQLite: {
		ts:   func(e string) string { return "strftime('%Y-%m-%dT%H:%M:%SZ', " + e + ", 'unixepoch')" },
		tsNS: func(e string) string { return "strftime('%Y-%m-%dT%H:%M:%fZ', " + e + " / 1e9, 'unixepoch')" },
		addr: func(e string) string {
			return fmt.Sprintf("NULLIF(CASE WHEN instr(%[1]s, '%%') > 0 THEN substr(%[1]s, 1, instr(%[1]s, '%%') - 1) ELSE %[1]s END, '')", e)
		},
		zone: func(e string) string {
			return fmt.Sprintf("CASE WHEN instr(%[1]s, '%%') > 0 THEN substr(%[1]s, instr(%[1]s, '%%') + 1) END", e)
		},
		names:     func(e string) string { return "group_concat(DISTINCT " + e + ")" },
		rawBucket: func(e string) string { return ", " + e + " AS bucket_start_s" },
	},
}

// hourOf floors a unix-seconds expression to its UTC hour, the same in both databases and for
// negative times (PostgreSQL's date_trunc would follow the session's time zone).
func hourOf(e string) string { return fmt.Sprintf("(%[1]s - ((%[1]s %% 3600) + 3600) %% 3600)", e) }

// bucketSeconds is the bucket width as the views read it (meta, recorded on first use).
const bucketSeconds = `(SELECT CAST(value AS BIGINT) FROM meta WHERE key = 'bucket_seconds')`

// sentCol and receivedCol are the end_agg bytes from the host's side (see sentExpr).
const (
	sentCol     = "CASE WHEN e.direction = 'outgoing' THEN e.src_bytes ELSE e.dst_bytes END"
	receivedCol = "CASE WHEN e.direction = 'outgoing' THEN e.dst_bytes ELSE e.src_bytes END"
)

// view is one analyst view: its name and its SELECT in a dialect.
type view struct {
	name string
	sql  func(d dialect) string
}

var views = []view{
	// conn_names keeps the tables' columns: the other views and flowstat's queries read every name
	// from it.
	{"conn_names", func(d dialect) string {
		return `SELECT c.bucket, c.host, c.direction, c.peer, c.port, c.peer_name AS name, c.conns
			FROM conn_agg c WHERE c.peer_name <> ''
			UNION ALL
			SELECT m.bucket, m.host, m.direction, m.peer, m.port, m.name, m.conns FROM conn_more_names m`
	}},
	{"connections", func(d dialect) string {
		return `SELECT ` + d.ts("c.bucket") + ` AS bucket_start` + d.rawBucket("c.bucket") + `, c.host, c.direction AS conn_direction,
			` + d.addr("c.peer") + ` AS remote_addr, ` + d.zone("c.peer") + ` AS remote_zone, NULLIF(c.peer_name, '') AS remote_name,
			c.port AS responder_port,
			CASE WHEN c.direction = 'outgoing' THEN c.port END AS remote_port,
			CASE WHEN c.direction = 'incoming' THEN c.port END AS local_port,
			c.conns AS connections
			FROM conn_agg c`
	}},
	{"connections_by_name", func(d dialect) string {
		return `SELECT ` + d.ts("n.bucket") + ` AS bucket_start` + d.rawBucket("n.bucket") + `, n.host, n.direction AS conn_direction,
			` + d.addr("n.peer") + ` AS remote_addr, ` + d.zone("n.peer") + ` AS remote_zone, n.name AS remote_name,
			n.port AS responder_port, n.conns AS connections
			FROM conn_names n
			UNION ALL
			SELECT ` + d.ts("c.bucket") + d.rawBucket("c.bucket") + `, c.host, c.direction, ` + d.addr("c.peer") + `, ` + d.zone("c.peer") + `, NULL,
			c.port, c.conns
			FROM conn_agg c WHERE c.peer_name = ''`
	}},
	{"top_talkers_hourly", func(d dialect) string {
		return `SELECT ` + d.ts("t.hour") + ` AS hour_start, t.host, t.conn_direction,
			` + d.addr("t.peer") + ` AS remote_addr, ` + d.zone("t.peer") + ` AS remote_zone,
			(SELECT ` + d.names("n.name") + ` FROM conn_names n WHERE n.bucket >= t.hour AND n.bucket < t.hour + 3600
				AND n.host = t.host AND n.direction = t.conn_direction AND n.peer = t.peer) AS remote_names,
			t.connections
			FROM (SELECT ` + hourOf("c.bucket") + ` AS hour, c.host, c.direction AS conn_direction, c.peer, SUM(c.conns) AS connections
				FROM conn_agg c GROUP BY ` + hourOf("c.bucket") + `, c.host, c.direction, c.peer) t`
	}},
	{"new_destinations", func(d dialect) string {
		return `SELECT p.host, p.direction AS conn_direction, ` + d.addr("p.peer") + ` AS remote_addr, ` + d.zone("p.peer") + ` AS remote_zone,
			p.port AS responder_port, ` + d.tsNS("p.first_ns") + ` AS first_seen, ` + d.tsNS("p.last_ns") + ` AS last_seen,
			NULLIF(p.peer_name, '') AS first_name, ` + d.tsNS("NULLIF(p.name_ns, 0)") + ` AS first_name_seen,
			(SELECT ` + d.names("n.name") + ` FROM conn_names n WHERE n.host = p.host AND n.direction = p.direction
				AND n.peer = p.peer AND n.port = p.port) AS remote_names
			FROM peer_seen p`
	}},
	{"connections_per_host", func(d dialect) string {
		return `SELECT ` + d.ts("c.bucket") + ` AS bucket_start` + d.rawBucket("c.bucket") + `, c.host, c.direction AS conn_direction,
			SUM(c.conns) AS connections, COUNT(DISTINCT c.peer) AS remotes
			FROM conn_agg c GROUP BY c.bucket, c.host, c.direction`
	}},
	{"bytes_per_peer", func(d dialect) string {
		return `SELECT ` + d.ts("e.bucket") + ` AS bucket_start` + d.rawBucket("e.bucket") + `, e.host, e.direction AS conn_direction,
			` + d.addr("e.peer") + ` AS remote_addr, ` + d.zone("e.peer") + ` AS remote_zone, NULLIF(e.peer_name, '') AS remote_name,
			e.port AS responder_port, e.ends,
			` + sentCol + ` AS bytes_sent, ` + receivedCol + ` AS bytes_received,
			e.src_bytes AS initiator_bytes, e.dst_bytes AS responder_bytes, e.src_segs AS initiator_segs, e.dst_segs AS responder_segs,
			e.retrans AS retransmits, e.duration_sum_ns AS duration_total_ns, e.duration_max_ns,
			CASE WHEN e.srtt_count > 0 THEN e.srtt_sum_us / e.srtt_count END AS srtt_mean_us,
			e.reason_fin, e.reason_rst_sent, e.reason_rst_received, e.reason_timeout, e.reason_never_established, e.reason_other
			FROM end_agg e`
	}},
	{"gaps_and_drops", func(d dialect) string {
		return `SELECT ` + d.ts("b.bucket") + ` AS bucket_start` + d.rawBucket("b.bucket") + `, b.host, b.direction AS conn_direction,
			b.batches, b.events, b.drops_kernel + b.drops_reader + b.drops_queue + b.drops_spool + b.drops_publish AS drops,
			b.drops_kernel, b.drops_reader, b.drops_queue, b.drops_spool, b.drops_publish,
			b.end_batches, b.end_events,
			b.end_drops_kernel + b.end_drops_reader + b.end_drops_queue + b.end_drops_spool + b.end_drops_publish AS end_drops,
			(SELECT COUNT(*) FROM gaps g WHERE g.host = b.host AND g.direction = b.direction
				AND g.stored_ns >= b.bucket * 1000000000 AND g.stored_ns < (b.bucket + ` + bucketSeconds + `) * 1000000000) AS gaps
			FROM batch_agg b`
	}},
	{"batch_gaps", func(d dialect) string {
		return `SELECT ` + d.tsNS("g.stored_ns") + ` AS stored_at, g.host, g.run_id, g.direction AS conn_direction, g.kind,
			NULLIF(g.after_seq, 0) AS after_seq, g.seq, g.prev_seq,
			CASE WHEN g.after_seq > 0 THEN g.after_seq + 1 END AS missing_from,
			CASE WHEN g.after_seq = 0 THEN NULL WHEN g.prev_seq < g.seq THEN g.prev_seq ELSE g.seq - 1 END AS missing_to,
			g.stream_seq
			FROM gaps g`
	}},
}

// ViewNames lists the analyst views migrations 6 to 8 create: what dashboards and ad-hoc SQL should read.
func ViewNames() []string {
	var out []string
	for _, v := range append(append(append([]view{}, views...), views7...), views8...) {
		out = append(out, v.name)
	}
	return out
}

// commentStatements are PostgreSQL's COMMENT ON statements of docs.
func commentStatements(docs []objDoc) []string {
	var out []string
	q := func(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
	for _, o := range docs {
		kind := "TABLE"
		if o.view {
			kind = "VIEW"
		}
		out = append(out, "COMMENT ON "+kind+" "+o.name+" IS "+q(o.comment))
		for _, c := range o.cols {
			if sqliteOnly[c.name] {
				continue
			}
			out = append(out, "COMMENT ON COLUMN "+o.name+"."+c.name+" IS "+q(c.comment))
		}
	}
	return out
}
