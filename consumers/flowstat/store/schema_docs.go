package store

import (
	"strconv"
	"strings"
)

// objDoc documents one table or view and each of its columns: PostgreSQL gets them as COMMENT ON
// (migration 6), SQLite users read them in SCHEMA.md, generated from the same text.
type objDoc struct {
	name    string
	view    bool
	comment string
	cols    []colDoc
}

type colDoc struct{ name, comment string }

// sqliteOnly are view columns only SQLite's views have (PostgreSQL's typed ones are indexed instead).
var sqliteOnly = map[string]bool{"bucket_start_s": true}

// Words every view column shares, written once.
const (
	docBucketStart  = "Start of the time bucket (its width is meta.bucket_seconds): timestamptz in PostgreSQL, ISO-8601 UTC text in SQLite."
	docBucketStartS = "SQLite only: bucket_start as unix seconds. Filter on it in SQLite: its primary key serves it, a condition on bucket_start reads the whole table."
	docHost         = "Host the agent runs on (the subject's host token)."
	docDirection    = "conn_direction of the events: outgoing (this host connected) or incoming (this host accepted)."
	docRemoteAddr   = "Remote end's address (the responder of outgoing, the initiator of incoming connections): inet in PostgreSQL, text in SQLite; NULL when the event had none."
	docRemoteZone   = "IPv6 zone of remote_addr (e.g. eth0 for a link-local peer), NULL when none."
	docRemoteName   = "First DNS name the events carried for the remote end, NULL when none."
	docResponder    = "Responder's port (the service port): the remote port of outgoing, the local port of incoming connections."
	docDirText      = "Direction: outgoing or incoming (the events' conn_direction)."
	docBucketS      = "Bucket start, unix seconds (views: bucket_start)."
	docPeer         = "Remote end's address as text with any %zone ('' when none): the responder of outgoing, the initiator of incoming connections."
	docPeerName     = "First DNS name the event carried for the remote end ('' when none; conn_names holds every name)."
	docPort         = "Responder's port (the service port) whatever the direction."
	docRunID        = "Agent run id (one per agent start)."
	docKind         = "Chain kind: begin (begin batches) or end (end batches chain on their own)."
	docStoredNS     = "Stream's stored time of the message, unix ns."
	docStream       = "JetStream stream name."
	docStreamSeq    = "Stream sequence of the message."
)

// schemaDocs is every table and view with every column: migration 6's and those added after. A test
// checks PostgreSQL has a comment on each, so a new column without one fails.
var schemaDocs = append(append(append([]objDoc{}, schemaDocs6...), schemaDocs7...), schemaDocs8...)

// schemaDocs6 is every table and view of migration 6, whose comments it sets (frozen with it).
var schemaDocs6 = []objDoc{
	{name: "schema_migrations", comment: "Migrations applied: the schema version is the highest.", cols: []colDoc{
		{"version", "Migration number."}, {"applied_ns", "When it was applied, unix ns."}}},
	{name: "meta", comment: "Settings of the database: database_id (its identity), bucket_seconds (bucket width of every *_agg table).", cols: []colDoc{
		{"key", "Setting name."}, {"value", "Setting value, as text."}}},
	{name: "checkpoints", comment: "Per durable consumer and stream, the last stream sequence whose effects are committed (with them, in one transaction).", cols: []colDoc{
		{"consumer", "Durable consumer name."}, {"stream", docStream}, {"seq", "Last stream sequence committed."},
		{"filters", "Subject filters of the consumer, space-separated."}, {"updated_ns", "Last commit, unix ns."}}},
	{name: "conn_agg", comment: "Connections (begin events) per bucket of event time, host, direction, remote end, its first DNS name and the responder's port. Analysts: read the views connections and connections_by_name.", cols: []colDoc{
		{"bucket", docBucketS}, {"host", docHost}, {"direction", docDirText}, {"peer", docPeer}, {"peer_name", docPeerName},
		{"port", docPort}, {"conns", "Connections (begin events)."}}},
	{name: "conn_more_names", comment: "Connections per bucket by each DNS name their events carried for the remote end after the first (conn_agg has the first): read the view conn_names, which has every name.", cols: []colDoc{
		{"bucket", docBucketS}, {"host", docHost}, {"direction", docDirText}, {"peer", docPeer}, {"port", docPort},
		{"name", "A DNS name of the remote end other than the event's first."}, {"conns", "Connections whose event carried this name after the first."}}},
	{name: "peer_seen", comment: "First and last time each (host, direction, remote end, responder port) was seen, exact event times. Analysts: view new_destinations.", cols: []colDoc{
		{"host", docHost}, {"direction", docDirText}, {"peer", docPeer}, {"port", docPort},
		{"first_ns", "Earliest event, unix ns."}, {"last_ns", "Latest event, unix ns."},
		{"peer_name", "Earliest DNS name seen for it ('' when none)."}, {"name_ns", "Time of the event that carried peer_name, unix ns (0 when none)."}}},
	{name: "batch_agg", comment: "Batches, events and agent-reported drops per bucket of the messages' stored time, host and direction. Analysts: view gaps_and_drops.", cols: []colDoc{
		{"bucket", docBucketS}, {"host", docHost}, {"direction", docDirText},
		{"batches", "Begin batches counted."}, {"events", "Begin events in them."},
		{"drops_kernel", "Begin events lost in the kernel ring buffer."}, {"drops_reader", "Begin events lost by the agent's reader."},
		{"drops_queue", "Begin events lost in the agent's queue."}, {"drops_spool", "Begin events lost by the agent's spool."},
		{"drops_publish", "Begin events lost publishing."},
		{"end_batches", "End batches counted."}, {"end_events", "End events in them."},
		{"end_drops_kernel", "End events lost in the kernel."}, {"end_drops_reader", "End events lost by the reader."},
		{"end_drops_queue", "End events lost in the queue."}, {"end_drops_spool", "End events lost by the spool."},
		{"end_drops_publish", "End events lost publishing."}}},
	{name: "run_state", comment: "State of each batch chain (host, run, direction, kind): the consumer's memory of what it saw, for gap and duplicate detection.", cols: []colDoc{
		{"host", docHost}, {"run_id", docRunID}, {"direction", docDirText}, {"kind", docKind},
		{"last_seq", "Highest batch seq seen."}, {"seen_batches", "Distinct batches counted."},
		{"from_start", "1 when counted from the chain's first batch (seen_batches is then all that arrived)."},
		{"linked", "1 when a later run's link (prev_run) named this chain."},
		{"stored_ns", "Stored time of the newest batch that changed the chain, unix ns (retention goes by it)."}}},
	{name: "gaps", comment: "One row per batch that did not follow the last one seen of its chain: batches between are missing. Analysts: view batch_gaps.", cols: []colDoc{
		{"host", docHost}, {"run_id", docRunID}, {"direction", docDirText},
		{"after_seq", "Last seq seen of the chain before this batch (0: the first batch seen of the run)."},
		{"seq", "This batch's seq."}, {"prev_seq", "The predecessor this batch named."},
		{"stream_seq", docStreamSeq}, {"stored_ns", docStoredNS}, {"kind", docKind}}},
	{name: "holes", comment: "Ranges of batch seqs known missing and not filled by a late batch yet.", cols: []colDoc{
		{"host", docHost}, {"run_id", docRunID}, {"direction", docDirText}, {"kind", docKind},
		{"from_seq", "First missing seq."}, {"to_seq", "Last missing seq."}}},
	{name: "duplicate_batches", comment: "Messages repeating a counted batch (same host, run, direction, kind and seq): counted nothing.", cols: []colDoc{
		{"stream", docStream}, {"stream_seq", docStreamSeq}, {"host", docHost}, {"run_id", docRunID}, {"direction", docDirText},
		{"seq", "Batch seq repeated."}, {"stored_ns", docStoredNS}, {"kind", docKind}}},
	{name: "restarts", comment: "Run links: the first batch of a run named the host's previous run, how much of it arrived, and the capture downtime.", cols: []colDoc{
		{"host", docHost}, {"run_id", "The new run."}, {"direction", docDirText}, {"kind", docKind},
		{"prev_run_id", "The previous run it named."}, {"prev_end", "How the previous run ended: stopped or unknown."},
		{"prev_last_seq", "Last seq the previous run sealed."}, {"prev_batches", "Batches the previous run sealed."},
		{"prev_events", "Events the previous run sealed."}, {"prev_seen", "How much of the previous run this database counted: all, partial or unseen."},
		{"seen_batches", "Batches of the previous run counted."}, {"missing_batches", "prev_batches - seen_batches; -1 when it cannot be told."},
		{"down_from", "Capture stopped, unix ns."}, {"down_to", "Capture started again, unix ns."},
		{"stream_seq", docStreamSeq}, {"stored_ns", docStoredNS}}},
	{name: "deadletters", comment: "Messages that were not valid batches.", cols: []colDoc{
		{"stream", docStream}, {"stream_seq", docStreamSeq}, {"subject", "Subject it arrived on."},
		{"reason", "malformed, truncated, unsupported_major or subject_mismatch."}, {"detail", "The decoder's error."},
		{"stored_ns", docStoredNS}, {"copied", "1 when the copy reached the dead-letter subject."}}},
	{name: "stream_losses", comment: "Stream sequences the stream deleted (age or size limits) before the consumer read them.", cols: []colDoc{
		{"consumer", "Durable consumer name."}, {"stream", docStream}, {"from_seq", "First lost sequence."},
		{"to_seq", "Last lost sequence."}, {"detected_ns", "When it was noticed, unix ns."}}},
	{name: "replays", comment: "Replays (rebuilds) of a time range of buckets.", cols: []colDoc{
		{"started_ns", "Start of the replay, unix ns (its id)."}, {"from_s", "First bucket rebuilt, unix seconds."},
		{"to_s", "End of the range (exclusive), unix seconds."}, {"upto_seq", "Stream sequence read up to."},
		{"finished_ns", "When it finished, unix ns; 0 while it runs or after it failed."}}},
	{name: "end_agg", comment: "Connections that ended (end events) per bucket of end time and conn_agg's dimensions, with their counters. Analysts: view bytes_per_peer.", cols: []colDoc{
		{"bucket", docBucketS}, {"host", docHost}, {"direction", docDirText}, {"peer", docPeer}, {"peer_name", docPeerName}, {"port", docPort},
		{"ends", "End events."}, {"src_bytes", "Payload bytes the initiator sent."}, {"dst_bytes", "Payload bytes the responder sent."},
		{"src_segs", "Segments the initiator sent."}, {"dst_segs", "Segments the responder sent."}, {"retrans", "Retransmitted segments."},
		{"duration_sum_ns", "Sum of the connections' durations, ns."}, {"duration_max_ns", "Longest duration, ns."},
		{"srtt_sum_us", "Sum of the smoothed RTTs that were known, µs."}, {"srtt_count", "Ends whose RTT was known."},
		{"reason_fin", "Ends by FIN."}, {"reason_rst_sent", "Ends by a reset this host sent."}, {"reason_rst_received", "Ends by a reset received."},
		{"reason_timeout", "Ends by timeout."}, {"reason_never_established", "Handshakes that never completed."},
		{"reason_other", "Ends of unknown or later reason codes."}}},
	{name: "proc_agg", comment: "Connections (begins) per bucket by the process context the events carried.", cols: []colDoc{
		{"bucket", docBucketS}, {"host", docHost}, {"direction", docDirText},
		{"comm", "Process name ('' when the event carried none)."}, {"pid", "Process id (0 when none)."}, {"conns", "Connections."}}},

	{name: "conn_names", view: true, comment: "Connections per bucket by EVERY DNS name their events carried for the remote end (conn_agg's first names and conn_more_names), in the tables' columns: a connection with two names counts once under each. Buckets from before schema 6 have only the first name (all that was kept). The same row key may appear twice (a name first in one event, second in another): sum conns.", cols: []colDoc{
		{"bucket", docBucketS}, {"host", docHost}, {"direction", docDirText}, {"peer", docPeer}, {"port", docPort},
		{"name", "One DNS name of the remote end."}, {"conns", "Connections whose event carried this name."}}},
	{name: "connections", view: true, comment: "Connections per bucket with the event's names and types (conn_agg).", cols: []colDoc{
		{"bucket_start", docBucketStart}, {"bucket_start_s", docBucketStartS}, {"host", docHost}, {"conn_direction", docDirection},
		{"remote_addr", docRemoteAddr}, {"remote_zone", docRemoteZone}, {"remote_name", docRemoteName},
		{"responder_port", docResponder}, {"remote_port", "Remote port: the responder's for outgoing, NULL for incoming (the initiator's port is not kept)."},
		{"local_port", "Local port: the responder's for incoming, NULL for outgoing (the initiator's port is not kept)."},
		{"connections", "Connections (begin events)."}}},
	{name: "connections_by_name", view: true, comment: "Connections per bucket by every DNS name of the remote end (view conn_names), and those without any name (remote_name NULL). A connection with k names is k rows: sum per name, not across names.", cols: []colDoc{
		{"bucket_start", docBucketStart}, {"bucket_start_s", docBucketStartS}, {"host", docHost}, {"conn_direction", docDirection},
		{"remote_addr", docRemoteAddr}, {"remote_zone", docRemoteZone}, {"remote_name", "One DNS name of the remote end, NULL for connections that carried none."},
		{"responder_port", docResponder}, {"connections", "Connections that carried this name."}}},
	{name: "top_talkers_hourly", view: true, comment: "Connections per UTC hour, host, direction and remote end, with every name seen for it in that hour.", cols: []colDoc{
		{"hour_start", "Start of the UTC hour: timestamptz in PostgreSQL, ISO-8601 UTC text in SQLite."}, {"host", docHost}, {"conn_direction", docDirection},
		{"remote_addr", docRemoteAddr}, {"remote_zone", docRemoteZone},
		{"remote_names", "Every DNS name seen for the remote end in the hour: text[] in PostgreSQL, comma-separated text in SQLite; NULL when none."},
		{"connections", "Connections in the hour."}}},
	{name: "new_destinations", view: true, comment: "Every (host, direction, remote end, responder port) with its first and last sighting (exact event times): filter first_seen for what is new.", cols: []colDoc{
		{"host", docHost}, {"conn_direction", docDirection}, {"remote_addr", docRemoteAddr}, {"remote_zone", docRemoteZone},
		{"responder_port", docResponder},
		{"first_seen", "Earliest event: timestamptz in PostgreSQL, ISO-8601 UTC text (ms) in SQLite."},
		{"last_seen", "Latest event, same type as first_seen."},
		{"first_name", "Earliest DNS name seen for it, NULL when none."}, {"first_name_seen", "Time of the event that carried first_name, NULL when none."},
		{"remote_names", "Every DNS name seen for it (in the buckets still held): text[] in PostgreSQL, comma-separated text in SQLite; NULL when none."}}},
	{name: "connections_per_host", view: true, comment: "Connections per bucket, host and direction.", cols: []colDoc{
		{"bucket_start", docBucketStart}, {"bucket_start_s", docBucketStartS}, {"host", docHost}, {"conn_direction", docDirection},
		{"connections", "Connections (begin events)."}, {"remotes", "Distinct remote ends."}}},
	{name: "bytes_per_peer", view: true, comment: "Ended connections per bucket of end time and remote end, bytes from the host's side (end_agg).", cols: []colDoc{
		{"bucket_start", docBucketStart}, {"bucket_start_s", docBucketStartS}, {"host", docHost}, {"conn_direction", docDirection},
		{"remote_addr", docRemoteAddr}, {"remote_zone", docRemoteZone}, {"remote_name", docRemoteName}, {"responder_port", docResponder},
		{"ends", "Connections that ended."}, {"bytes_sent", "Payload bytes this host sent."}, {"bytes_received", "Payload bytes this host received."},
		{"initiator_bytes", "Payload bytes the initiator sent (the event's src_bytes)."}, {"responder_bytes", "Payload bytes the responder sent (dst_bytes)."},
		{"initiator_segs", "Segments the initiator sent."}, {"responder_segs", "Segments the responder sent."},
		{"retransmits", "Retransmitted segments."}, {"duration_total_ns", "Sum of durations, ns (mean: duration_total_ns / ends)."},
		{"duration_max_ns", "Longest duration, ns."}, {"srtt_mean_us", "Mean smoothed RTT of the ends that knew it, µs; NULL when none did."},
		{"reason_fin", "Ends by FIN."}, {"reason_rst_sent", "Ends by a reset this host sent."}, {"reason_rst_received", "Ends by a reset received."},
		{"reason_timeout", "Ends by timeout."}, {"reason_never_established", "Handshakes that never completed."}, {"reason_other", "Ends of unknown or later reasons."}}},
	{name: "gaps_and_drops", view: true, comment: "Per bucket of stored time, host and direction: batches, events, events the agents reported lost, and the gaps (missing batches) recorded then.", cols: []colDoc{
		{"bucket_start", docBucketStart}, {"bucket_start_s", docBucketStartS}, {"host", docHost}, {"conn_direction", docDirection},
		{"batches", "Begin batches."}, {"events", "Begin events."}, {"drops", "Begin events lost, all causes."},
		{"drops_kernel", "Lost in the kernel."}, {"drops_reader", "Lost by the reader."}, {"drops_queue", "Lost in the queue."},
		{"drops_spool", "Lost by the spool."}, {"drops_publish", "Lost publishing."},
		{"end_batches", "End batches."}, {"end_events", "End events."}, {"end_drops", "End events lost, all causes."},
		{"gaps", "Gaps (batches not following their chain's last) stored in the bucket, both kinds."}}},
	{name: "batch_gaps", view: true, comment: "Each gap with the range of batch seqs it showed missing.", cols: []colDoc{
		{"stored_at", "Stored time of the batch after the gap: timestamptz in PostgreSQL, ISO-8601 UTC text in SQLite."},
		{"host", docHost}, {"run_id", docRunID}, {"conn_direction", docDirection}, {"kind", docKind},
		{"after_seq", "Last seq seen before, NULL when the run was first seen past its first batch."},
		{"seq", "Seq of the batch after the gap."}, {"prev_seq", "Predecessor it named."},
		{"missing_from", "First missing seq, NULL when unknown (after_seq NULL)."}, {"missing_to", "Last missing seq, NULL when unknown."},
		{"stream_seq", docStreamSeq}}},
}

// schemaMarkdown renders schemaDocs as the body of SCHEMA.md, the SQLite user's copy of the
// PostgreSQL comments.
func schemaMarkdown() string {
	var b strings.Builder
	b.WriteString("# flowstat database schema\n\n")
	b.WriteString("Generated from consumers/flowstat/store/schema_docs.go (`go test ./consumers/flowstat/store -run TestSchemaDoc -update`);\n")
	b.WriteString("PostgreSQL holds the same text as comments (`\\d+ connections` in psql). Schema version " + strconv.Itoa(Version()) + ".\n\n")
	b.WriteString("Read the views: they name things as the events do (`conn_direction`, `remote_addr`, `responder_port`),\n")
	b.WriteString("say NULL for unknown, and give times as `timestamptz` in PostgreSQL and as ISO-8601 UTC text in SQLite\n")
	b.WriteString("(`2026-11-24T10:00:00Z`; `_seen` and `stored_at` columns with milliseconds), which compares and sorts as\n")
	b.WriteString("the times do; in SQLite filter on `bucket_start_s` (unix seconds), which the primary keys serve. Addresses\n")
	b.WriteString("are `inet` in PostgreSQL (`remote_addr << '10.0.0.0/8'`), text in SQLite. The\n")
	b.WriteString("tables are what flowstat writes: integer epochs with the unit in the name (`_ns`, `_s`; `bucket` is unix\n")
	b.WriteString("seconds), text addresses, `''` and `0` for unknown.\n")
	for _, section := range []struct {
		title string
		view  bool
	}{{"Views", true}, {"Tables", false}} {
		b.WriteString("\n## " + section.title + "\n")
		for _, o := range schemaDocs {
			if o.view != section.view {
				continue
			}
			b.WriteString("\n### " + o.name + "\n\n" + o.comment + "\n\n| column | meaning |\n|---|---|\n")
			for _, c := range o.cols {
				b.WriteString("| `" + c.name + "` | " + strings.ReplaceAll(c.comment, "|", "\\|") + " |\n")
			}
		}
	}
	return b.String()
}
