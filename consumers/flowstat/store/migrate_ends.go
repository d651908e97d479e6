package store

// migration5 adds end events (net_flow_tcp_end, issue 16) and processes:
//
//   - The chain tables get a kind ('begin' or 'end'): end batches chain on their own per host, run and
//     direction (FORMAT.md, "End batches"), so their gaps, holes, duplicates and run links are told
//     apart from the begins'. SQLite cannot change a primary key, so run_state, holes and restarts are
//     rebuilt with kind in it; every row kept is a begin chain's. gaps and duplicate_batches keep
//     their keys (a seq names one batch of a run whatever its kind) and get the column.
//   - end_agg: ends per bucket of end time and the dimensions of conn_agg, with their counters.
//   - proc_agg: connections (begins) per bucket by the process context the events carry.
//   - batch_agg: the end batches, end events and end drops of the same bucket, host and direction.
var migration5 = []string{
	`CREATE TABLE run_state_v5 (
		host TEXT NOT NULL, run_id TEXT NOT NULL, direction TEXT NOT NULL, kind TEXT NOT NULL DEFAULT 'begin',
		last_seq BIGINT NOT NULL, seen_batches BIGINT NOT NULL DEFAULT 0, from_start INTEGER NOT NULL DEFAULT 0,
		linked INTEGER NOT NULL DEFAULT 0, stored_ns BIGINT NOT NULL DEFAULT 0,
		PRIMARY KEY (host, run_id, direction, kind))`,
	`INSERT INTO run_state_v5 (host, run_id, direction, kind, last_seq, seen_batches, from_start, linked, stored_ns)
		SELECT host, run_id, direction, 'begin', last_seq, seen_batches, from_start, linked, stored_ns FROM run_state`,
	`DROP TABLE run_state`,
	`ALTER TABLE run_state_v5 RENAME TO run_state`,
	`CREATE INDEX run_state_stored ON run_state (stored_ns)`,

	`CREATE TABLE holes_v5 (
		host TEXT NOT NULL, run_id TEXT NOT NULL, direction TEXT NOT NULL, kind TEXT NOT NULL DEFAULT 'begin',
		from_seq BIGINT NOT NULL, to_seq BIGINT NOT NULL,
		PRIMARY KEY (host, run_id, direction, kind, from_seq))`,
	`INSERT INTO holes_v5 (host, run_id, direction, kind, from_seq, to_seq)
		SELECT host, run_id, direction, 'begin', from_seq, to_seq FROM holes`,
	`DROP TABLE holes`,
	`ALTER TABLE holes_v5 RENAME TO holes`,

	`CREATE TABLE restarts_v5 (
		host TEXT NOT NULL, run_id TEXT NOT NULL, direction TEXT NOT NULL, kind TEXT NOT NULL DEFAULT 'begin',
		prev_run_id TEXT NOT NULL, prev_end TEXT NOT NULL, prev_last_seq BIGINT NOT NULL,
		prev_batches BIGINT NOT NULL, prev_events BIGINT NOT NULL, prev_seen TEXT NOT NULL,
		seen_batches BIGINT NOT NULL, missing_batches BIGINT NOT NULL,
		down_from BIGINT NOT NULL, down_to BIGINT NOT NULL,
		stream_seq BIGINT NOT NULL, stored_ns BIGINT NOT NULL,
		PRIMARY KEY (host, run_id, direction, kind))`,
	`INSERT INTO restarts_v5 (host, run_id, direction, kind, prev_run_id, prev_end, prev_last_seq, prev_batches, prev_events,
			prev_seen, seen_batches, missing_batches, down_from, down_to, stream_seq, stored_ns)
		SELECT host, run_id, direction, 'begin', prev_run_id, prev_end, prev_last_seq, prev_batches, prev_events,
			prev_seen, seen_batches, missing_batches, down_from, down_to, stream_seq, stored_ns FROM restarts`,
	`DROP TABLE restarts`,
	`ALTER TABLE restarts_v5 RENAME TO restarts`,
	`CREATE INDEX restarts_prev ON restarts (host, prev_run_id, direction, kind)`,

	`ALTER TABLE gaps ADD COLUMN kind TEXT NOT NULL DEFAULT 'begin'`,
	`ALTER TABLE duplicate_batches ADD COLUMN kind TEXT NOT NULL DEFAULT 'begin'`,

	// Ends per bucket (unix seconds) of their end time, with conn_agg's dimensions. src_ and dst_ are
	// the initiator and the responder, as in the event; reason_other counts unknown (0) and codes this
	// flowstat does not know. srtt_count counts the ends whose smoothed RTT was known (not 0).
	`CREATE TABLE end_agg (
		bucket BIGINT NOT NULL, host TEXT NOT NULL, direction TEXT NOT NULL,
		peer TEXT NOT NULL, peer_name TEXT NOT NULL, port INTEGER NOT NULL,
		ends BIGINT NOT NULL, src_bytes BIGINT NOT NULL, dst_bytes BIGINT NOT NULL,
		src_segs BIGINT NOT NULL, dst_segs BIGINT NOT NULL, retrans BIGINT NOT NULL,
		duration_sum_ns BIGINT NOT NULL, duration_max_ns BIGINT NOT NULL,
		srtt_sum_us BIGINT NOT NULL, srtt_count BIGINT NOT NULL,
		reason_fin BIGINT NOT NULL, reason_rst_sent BIGINT NOT NULL, reason_rst_received BIGINT NOT NULL,
		reason_timeout BIGINT NOT NULL, reason_never_established BIGINT NOT NULL, reason_other BIGINT NOT NULL,
		PRIMARY KEY (bucket, host, direction, peer, peer_name, port))` + withoutRowID,
	// Connections (begins) per bucket by process: comm '' and pid 0 when the event carried none.
	`CREATE TABLE proc_agg (
		bucket BIGINT NOT NULL, host TEXT NOT NULL, direction TEXT NOT NULL,
		comm TEXT NOT NULL, pid BIGINT NOT NULL, conns BIGINT NOT NULL,
		PRIMARY KEY (bucket, host, direction, comm, pid))` + withoutRowID,
	`ALTER TABLE batch_agg ADD COLUMN end_batches BIGINT NOT NULL DEFAULT 0`,
	`ALTER TABLE batch_agg ADD COLUMN end_events BIGINT NOT NULL DEFAULT 0`,
	`ALTER TABLE batch_agg ADD COLUMN end_drops_kernel BIGINT NOT NULL DEFAULT 0`,
	`ALTER TABLE batch_agg ADD COLUMN end_drops_reader BIGINT NOT NULL DEFAULT 0`,
	`ALTER TABLE batch_agg ADD COLUMN end_drops_queue BIGINT NOT NULL DEFAULT 0`,
	`ALTER TABLE batch_agg ADD COLUMN end_drops_spool BIGINT NOT NULL DEFAULT 0`,
	`ALTER TABLE batch_agg ADD COLUMN end_drops_publish BIGINT NOT NULL DEFAULT 0`,
}
