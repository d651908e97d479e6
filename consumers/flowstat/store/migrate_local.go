package store

// migration8 keeps the local end of every begin, which the aggregates never had: conn_local counts the
// connections per bucket, host, direction, local address, remote address and responder's port, and the
// view connections_by_local gives it the analysts' names and types (inet, timestamptz, NULL for
// unknown). conn_agg keeps its key, so the views built on it stay as they are; the local address
// multiplies rows only by the host's own addresses (a handful: its interfaces, loopback, containers'
// bridges). Buckets from before schema 8 have no rows here (the local address was never stored):
// `flowstat replay` of a range the stream still holds fills them. Frozen like 6 and 7.
func migration8(kind Kind) []string {
	d := dialects[kind]
	stmts := []string{
		`CREATE TABLE conn_local (
			bucket BIGINT NOT NULL, host TEXT NOT NULL, direction TEXT NOT NULL,
			local TEXT NOT NULL, peer TEXT NOT NULL, port INTEGER NOT NULL, conns BIGINT NOT NULL,
			PRIMARY KEY (bucket, host, direction, local, peer, port))` + withoutRowID,
	}
	if kind == Postgres {
		stmts = append(stmts, analystIndexes(d, "conn_local")...)
	}
	return append(stmts, viewStatements(kind, views8, schemaDocs8)...)
}

// views8 are migration 8's views.
var views8 = []view{
	{"connections_by_local", func(d dialect) string {
		return `SELECT ` + d.ts("l.bucket") + ` AS bucket_start` + d.rawBucket("l.bucket") + `, l.host, l.direction AS conn_direction,
			` + d.addr("l.local") + ` AS local_addr, ` + d.zone("l.local") + ` AS local_zone,
			` + d.addr("l.peer") + ` AS remote_addr, ` + d.zone("l.peer") + ` AS remote_zone,
			l.port AS responder_port,
			CASE WHEN l.direction = 'incoming' THEN l.port END AS local_port,
			l.conns AS connections
			FROM conn_local l`
	}},
}

// schemaDocs8 documents migration 8's objects.
var schemaDocs8 = []objDoc{
	{name: "conn_local", comment: "Connections (begin events) per bucket of event time, host, direction, local end, remote end and the responder's port; from schema 8 on (or what a replay rebuilt). Analysts: read the view connections_by_local.", cols: []colDoc{
		{"bucket", docBucketS}, {"host", docHost}, {"direction", docDirText},
		{"local", "Local end's address as text with any %zone ('' when none): the initiator of outgoing, the responder of incoming connections."},
		{"peer", docPeer}, {"port", docPort}, {"conns", "Connections (begin events)."}}},
	{name: "connections_by_local", view: true, comment: "Connections per bucket by local and remote address (conn_local): which of the host's addresses talked to whom. Buckets from before schema 8 have no rows unless replayed; for names, join connections_by_name on bucket_start, host, conn_direction, remote_addr and responder_port.", cols: []colDoc{
		{"bucket_start", docBucketStart}, {"bucket_start_s", docBucketStartS}, {"host", docHost}, {"conn_direction", docDirection},
		{"local_addr", "Local end's address (the initiator of outgoing, the responder of incoming connections): inet in PostgreSQL, text in SQLite; NULL when the event had none."},
		{"local_zone", "IPv6 zone of local_addr (e.g. eth0 for a link-local address), NULL when none."},
		{"remote_addr", docRemoteAddr}, {"remote_zone", docRemoteZone},
		{"responder_port", docResponder},
		{"local_port", "Local port: the responder's for incoming, NULL for outgoing (the initiator's port is not kept)."},
		{"connections", "Connections (begin events)."}}},
}
