package store

import (
	"cmp"
	"context"
	"database/sql"
	"fmt"
	"math"
	"strings"

	"github.com/flowbus/flowbus/schema"
)

// Reason indexes of EndAgg.Reasons: the reason codes flowstat counts on their own, and ReasonOther for
// unknown (0) and any code a later schema minor adds.
const (
	ReasonFin = iota
	ReasonRSTSent
	ReasonRSTReceived
	ReasonTimeout
	ReasonNeverEstablished
	ReasonOther
	NumReasons
)

// ReasonNames are the names of the EndAgg.Reasons slots, as the end_agg columns (reason_<name>) and the
// JSON outputs spell them.
var ReasonNames = [NumReasons]string{"fin", "rst_sent", "rst_received", "timeout", "never_established", "other"}

// ReasonIndex is the EndAgg.Reasons slot of wire reason r.
func ReasonIndex(r schema.EndReason) int {
	switch r {
	case schema.EndFIN:
		return ReasonFin
	case schema.EndRSTSent:
		return ReasonRSTSent
	case schema.EndRSTReceived:
		return ReasonRSTReceived
	case schema.EndTimeout:
		return ReasonTimeout
	case schema.EndNeverEstablished:
		return ReasonNeverEstablished
	}
	return ReasonOther
}

// EndAgg sums the end events of one ConnKey (a row of end_agg). Every field stays at most
// math.MaxInt64 (see SatAdd), so it fits the database's signed 64-bit columns.
type EndAgg struct {
	Ends               uint64
	SrcBytes, DstBytes uint64 // payload bytes the initiator / the responder sent
	SrcSegs, DstSegs   uint64
	Retrans            uint64
	DurationSum        uint64 // ns
	DurationMax        uint64 // ns
	SRTTSum, SRTTCount uint64 // µs, over the ends whose RTT was known
	Reasons            [NumReasons]uint64
}

// SatAdd is a + b, saturating at math.MaxInt64: a hostile publisher's counters must not overflow the
// database's 64-bit sums, where PostgreSQL would refuse the commit and stop the consumer.
func SatAdd(a, b uint64) uint64 {
	if a > math.MaxInt64-min(b, math.MaxInt64) {
		return math.MaxInt64
	}
	return a + b
}

// ProcKey is one row of proc_agg: connections of a bucket by host, direction and process context
// (Comm "" and PID 0 when the event carried none).
type ProcKey struct {
	Bucket int64
	Host   string
	Dir    schema.Direction
	Comm   string
	PID    uint32
}

func cmpProcKey(a, b ProcKey) int {
	return cmp.Or(cmp.Compare(a.Bucket, b.Bucket), strings.Compare(a.Host, b.Host), cmp.Compare(a.Dir, b.Dir),
		strings.Compare(a.Comm, b.Comm), cmp.Compare(a.PID, b.PID))
}

// parseKind reads a kind column: "end" or, for anything else, begin.
func parseKind(s string) schema.Kind {
	if s == schema.KindEnd.String() {
		return schema.KindEnd
	}
	return schema.KindBegin
}

// satSum is the SQL of a saturating column sum in an upsert, the same in both databases (both sides
// are never negative, so the subtraction cannot overflow).
func satSum(table, col string) string {
	return fmt.Sprintf("%[2]s = CASE WHEN %[1]s.%[2]s > 9223372036854775807 - excluded.%[2]s THEN 9223372036854775807 ELSE %[1]s.%[2]s + excluded.%[2]s END", table, col)
}

// EndNameAgg sums the end events of one NameKey (a row of end_more_names): what an analyst asks of a
// name, the ends and their bytes each way; each field stays at most math.MaxInt64.
type EndNameAgg struct {
	Ends, SrcBytes, DstBytes uint64
}

// endColumns are end_agg's counter columns in EndAgg order (reasons last).
var endColumns = []string{"ends", "src_bytes", "dst_bytes", "src_segs", "dst_segs", "retrans", "duration_sum_ns", "duration_max_ns",
	"srtt_sum_us", "srtt_count", "reason_fin", "reason_rst_sent", "reason_rst_received", "reason_timeout", "reason_never_established", "reason_other"}

// applyEnds writes the end and process aggregates of d.
func (s *Store) applyEnds(ctx context.Context, tx *sql.Tx, d *Delta, at addrText) error {
	if len(d.Ends) > 0 {
		var set []string
		for _, c := range endColumns {
			if c == "duration_max_ns" {
				set = append(set, "duration_max_ns = CASE WHEN excluded.duration_max_ns > end_agg.duration_max_ns THEN excluded.duration_max_ns ELSE end_agg.duration_max_ns END")
				continue
			}
			set = append(set, satSum("end_agg", c))
		}
		u := newUpserter(ctx, s, tx, `INSERT INTO end_agg (bucket, host, direction, peer, peer_name, port, `+strings.Join(endColumns, ", ")+`) VALUES `,
			`ON CONFLICT (bucket, host, direction, peer, peer_name, port) DO UPDATE SET `+strings.Join(set, ", "), 6+len(endColumns))
		defer u.close()
		for _, k := range order(mapKeys(d.Ends), cmpConnKey) {
			e := d.Ends[k]
			vals := []any{k.Bucket, k.Host, dirText(k.Dir), at.get(k.Peer), k.Name, int64(k.Port),
				int64(e.Ends), int64(e.SrcBytes), int64(e.DstBytes), int64(e.SrcSegs), int64(e.DstSegs), int64(e.Retrans),
				int64(e.DurationSum), int64(e.DurationMax), int64(e.SRTTSum), int64(e.SRTTCount)}
			for _, n := range e.Reasons {
				vals = append(vals, int64(n))
			}
			if err := u.add(vals...); err != nil {
				return fmt.Errorf("end_agg: %w", err)
			}
		}
		if err := u.flush(); err != nil {
			return fmt.Errorf("end_agg: %w", err)
		}
	}
	if len(d.EndNames) > 0 {
		u := newUpserter(ctx, s, tx, `INSERT INTO end_more_names (bucket, host, direction, peer, port, name, ends, src_bytes, dst_bytes) VALUES `,
			`ON CONFLICT (bucket, host, direction, peer, port, name) DO UPDATE SET `+satSum("end_more_names", "ends")+", "+
				satSum("end_more_names", "src_bytes")+", "+satSum("end_more_names", "dst_bytes"), 9)
		defer u.close()
		for _, k := range order(mapKeys(d.EndNames), cmpNameKey) {
			e := d.EndNames[k]
			if err := u.add(k.Bucket, k.Host, dirText(k.Dir), at.get(k.Peer), int64(k.Port), k.Name, int64(e.Ends), int64(e.SrcBytes), int64(e.DstBytes)); err != nil {
				return fmt.Errorf("end_more_names: %w", err)
			}
		}
		if err := u.flush(); err != nil {
			return fmt.Errorf("end_more_names: %w", err)
		}
	}
	if len(d.Procs) > 0 {
		u := newUpserter(ctx, s, tx, `INSERT INTO proc_agg (bucket, host, direction, comm, pid, conns) VALUES `,
			`ON CONFLICT (bucket, host, direction, comm, pid) DO UPDATE SET conns = proc_agg.conns + excluded.conns`, 6)
		defer u.close()
		for _, k := range order(mapKeys(d.Procs), cmpProcKey) {
			if err := u.add(k.Bucket, k.Host, dirText(k.Dir), k.Comm, int64(k.PID), int64(d.Procs[k])); err != nil {
				return fmt.Errorf("proc_agg: %w", err)
			}
		}
		if err := u.flush(); err != nil {
			return fmt.Errorf("proc_agg: %w", err)
		}
	}
	return nil
}
