package store

import (
	"context"
	"fmt"
	"strconv"
)

// sum is the SQL of a column sum as BIGINT. PostgreSQL sums bigints exactly as numeric, so the cast
// is bounded first; SQLite's SUM is exact too and fails only past 2^63 (a hostile publisher's
// counters, already capped per row).
func (s *Store) sum(expr string) string {
	if s.kind == Postgres {
		return "CAST(LEAST(SUM(" + expr + "), 9223372036854775807) AS BIGINT)"
	}
	return "SUM(" + expr + ")"
}

// sentExpr and receivedExpr are the bytes the host (the local end) sent and received, from the
// initiator's and the responder's counts by direction.
const (
	sentExpr     = "CASE WHEN direction = 'outgoing' THEN src_bytes ELSE dst_bytes END"
	receivedExpr = "CASE WHEN direction = 'outgoing' THEN dst_bytes ELSE src_bytes END"
)

// EndRow is one line of `flowstat top --by bytes`: a peer (with a DNS name it was seen with) or a
// service port, and the connections to it that ended in the range. BytesSent and BytesReceived are
// from the hosts' side (what the local end sent and got), whatever the direction.
type EndRow struct {
	Key           string           `json:"key"`
	Name          string           `json:"name,omitempty"`
	Ends          int64            `json:"ends"`
	Bytes         int64            `json:"bytes"`
	BytesSent     int64            `json:"bytes_sent"`
	BytesReceived int64            `json:"bytes_received"`
	Retrans       int64            `json:"retransmits"`
	MeanDuration  int64            `json:"mean_duration_ns"`
	MaxDuration   int64            `json:"max_duration_ns"`
	Reasons       map[string]int64 `json:"reasons"`
}

// TopBytesBy lists the groups TopBytes can rank by.
var TopBytesBy = []string{"peer", "port"}

// TopBytes returns the limit peers or ports ("peer", "port") with the most bytes (both ways) in the
// ends of f (buckets of end time), with their ends, bytes each way, retransmits, mean and max duration
// and reasons, from the view bytes_per_peer.
func (s *Store) TopBytes(ctx context.Context, by string, f Filter, limit int) ([]EndRow, error) {
	key := map[string]string{"peer": s.peerText(), "port": "CAST(responder_port AS TEXT)"}[by]
	if key == "" {
		return nil, fmt.Errorf("top bytes by %q: want one of %v", by, TopBytesBy)
	}
	group := map[string]string{"peer": "remote_addr, remote_zone", "port": "responder_port"}[by]
	tie := map[string]string{"peer": "k", "port": "responder_port"}[by] // the order of the tables' peer and port
	width, err := s.BucketWidth(ctx)
	if err != nil {
		return nil, err
	}
	name := "''"
	if by == "peer" {
		name = "COALESCE(MAX(remote_name), '')"
	}
	sel := `SELECT ` + key + ` AS k, ` + name + `, ` + s.sum("ends") + `, ` + s.sum("bytes_sent") + `, ` + s.sum("bytes_received") + `, ` +
		s.sum("retransmits") + `, ` + s.sum("duration_total_ns") + `, MAX(duration_max_ns)`
	for _, r := range ReasonNames {
		sel += `, ` + s.sum("reason_"+r)
	}
	q, args := s.viewWhere(sel+` FROM bytes_per_peer`, f, width)
	q += ` GROUP BY ` + group + ` ORDER BY SUM(initiator_bytes) + SUM(responder_bytes) DESC, ` + s.sum("ends") + ` DESC, ` + tie + ` LIMIT ?`
	args = append(args, limit)
	out := []EndRow{}
	err = s.each(ctx, q, args, func(sc scanner) error {
		var r EndRow
		var durSum int64
		var reasons [NumReasons]int64
		dest := []any{&r.Key, &r.Name, &r.Ends, &r.BytesSent, &r.BytesReceived, &r.Retrans, &durSum, &r.MaxDuration}
		for i := range reasons {
			dest = append(dest, &reasons[i])
		}
		if err := sc.Scan(dest...); err != nil {
			return err
		}
		r.Bytes = int64(SatAdd(uint64(r.BytesSent), uint64(r.BytesReceived)))
		if r.Ends > 0 {
			r.MeanDuration = durSum / r.Ends
		}
		r.Reasons = map[string]int64{}
		for i, n := range reasons {
			r.Reasons[ReasonNames[i]] = n
		}
		out = append(out, r)
		return nil
	})
	return out, err
}

// ProcRow is one line of `flowstat top --by process`: the connections (begins) of one process of one
// host; Comm "" and PID 0 stand for the events that carried no process.
type ProcRow struct {
	Host  string `json:"host"`
	Comm  string `json:"comm"`
	PID   int64  `json:"pid"`
	Conns int64  `json:"connections"`
}

// TopProcesses returns the limit processes (host, comm, pid) with the most connections in f.
func (s *Store) TopProcesses(ctx context.Context, f Filter, limit int) ([]ProcRow, error) {
	width, err := s.BucketWidth(ctx)
	if err != nil {
		return nil, err
	}
	q, args := f.where(`SELECT host, comm, pid, CAST(SUM(conns) AS BIGINT) AS n FROM proc_agg`, nil, width)
	q += ` GROUP BY host, comm, pid ORDER BY n DESC, host, comm, pid LIMIT ?`
	args = append(args, limit)
	out := []ProcRow{}
	err = s.each(ctx, q, args, func(sc scanner) error {
		var r ProcRow
		if err := sc.Scan(&r.Host, &r.Comm, &r.PID, &r.Conns); err != nil {
			return err
		}
		out = append(out, r)
		return nil
	})
	return out, err
}

// endTotals adds the end totals per host and direction to the summary's rows (get makes a row).
func (s *Store) endTotals(ctx context.Context, get func(h, d string) *HostTotal) error {
	return s.each(ctx, `SELECT host, direction, `+s.sum("ends")+`, `+s.sum(sentExpr)+`, `+s.sum(receivedExpr)+`, `+s.sum("duration_sum_ns")+`
		FROM end_agg GROUP BY host, direction`, nil, func(sc scanner) error {
		var h, d string
		var n, sent, recv, dur int64
		if err := sc.Scan(&h, &d, &n, &sent, &recv, &dur); err != nil {
			return err
		}
		t := get(h, d)
		t.Ends, t.BytesSent, t.BytesReceived = n, sent, recv
		if n > 0 {
			t.MeanDuration = dur / n
		}
		return nil
	})
}

// ProcessLabel is how a table shows a process: "comm[pid]", "-" when the events carried none.
func ProcessLabel(comm string, pid int64) string {
	switch {
	case comm == "" && pid == 0:
		return "-"
	case pid == 0:
		return comm
	}
	return comm + "[" + strconv.FormatInt(pid, 10) + "]"
}
