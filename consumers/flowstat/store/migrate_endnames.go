package store

// migration7 keeps every DNS name of an ended connection's remote end, as migration 6 did for begins:
// end_agg keeps the first (its peer_name), the table end_more_names the others with the counts an
// analyst asks of them by name (ends and bytes each way), and the views end_names (every name, in the
// tables' columns) and bytes_per_name (typed, bytes from the host's side) read both. Frozen like 6.
func migration7(kind Kind) []string {
	d := dialects[kind]
	stmts := []string{
		`CREATE TABLE end_more_names (
			bucket BIGINT NOT NULL, host TEXT NOT NULL, direction TEXT NOT NULL,
			peer TEXT NOT NULL, port INTEGER NOT NULL, name TEXT NOT NULL,
			ends BIGINT NOT NULL, src_bytes BIGINT NOT NULL, dst_bytes BIGINT NOT NULL,
			PRIMARY KEY (bucket, host, direction, peer, port, name))` + withoutRowID,
	}
	if kind == Postgres {
		stmts = append(stmts, analystIndexes(d, "end_more_names")...)
	}
	return append(stmts, viewStatements(kind, views7, schemaDocs7)...)
}

// views7 are migration 7's views.
var views7 = []view{
	{"end_names", func(d dialect) string {
		return `SELECT e.bucket, e.host, e.direction, e.peer, e.port, e.peer_name AS name, e.ends, e.src_bytes, e.dst_bytes
			FROM end_agg e WHERE e.peer_name <> ''
			UNION ALL
			SELECT m.bucket, m.host, m.direction, m.peer, m.port, m.name, m.ends, m.src_bytes, m.dst_bytes FROM end_more_names m`
	}},
	{"bytes_per_name", func(d dialect) string {
		return `SELECT ` + d.ts("e.bucket") + ` AS bucket_start` + d.rawBucket("e.bucket") + `, e.host, e.direction AS conn_direction,
			e.name AS remote_name, CAST(SUM(e.ends) AS BIGINT) AS ends,
			CAST(SUM(` + sentCol + `) AS BIGINT) AS bytes_sent, CAST(SUM(` + receivedCol + `) AS BIGINT) AS bytes_received
			FROM end_names e GROUP BY e.bucket, e.host, e.direction, e.name`
	}},
}

// schemaDocs7 documents migration 7's objects.
var schemaDocs7 = []objDoc{
	{name: "end_more_names", comment: "Ended connections per bucket of end time by each DNS name their end events carried for the remote end after the first (end_agg has the first), with their bytes: read the views end_names and bytes_per_name, which have every name.", cols: []colDoc{
		{"bucket", docBucketS}, {"host", docHost}, {"direction", docDirText}, {"peer", docPeer}, {"port", docPort},
		{"name", "A DNS name of the remote end other than the event's first."}, {"ends", "Connections whose end event carried this name after the first."},
		{"src_bytes", "Payload bytes their initiators sent."}, {"dst_bytes", "Payload bytes their responders sent."}}},
	{name: "end_names", view: true, comment: "Ended connections per bucket of end time by EVERY DNS name their end events carried for the remote end (end_agg's first names and end_more_names), in the tables' columns: a connection with two names counts once under each. Buckets from before schema 7 have only the first name. The same row key may appear twice (a name first in one event, second in another): sum.", cols: []colDoc{
		{"bucket", docBucketS}, {"host", docHost}, {"direction", docDirText}, {"peer", docPeer}, {"port", docPort},
		{"name", "One DNS name of the remote end."}, {"ends", "Connections whose end event carried this name."},
		{"src_bytes", "Payload bytes their initiators sent."}, {"dst_bytes", "Payload bytes their responders sent."}}},
	{name: "bytes_per_name", view: true, comment: "Ended connections and their bytes from the host's side per bucket of end time, host, direction and every DNS name of the remote end (view end_names): a connection with two names counts under both, so sum per name, not across names.", cols: []colDoc{
		{"bucket_start", docBucketStart}, {"bucket_start_s", docBucketStartS}, {"host", docHost}, {"conn_direction", docDirection},
		{"remote_name", "One DNS name of the remote end."}, {"ends", "Connections that ended."},
		{"bytes_sent", "Payload bytes this host sent."}, {"bytes_received", "Payload bytes this host received."}}},
}
