package main

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/flowbus/flowbus/consumers/flowstat/store"
)

// topBy are the values of `top --by`: the connection groups, bytes (from the end events) and process.
var topBy = append(append([]string{}, store.TopBy...), "bytes", "process")

// topBytes answers `top --by bytes`: peers and ports by the bytes of the connections that ended.
func topBytes(ctx context.Context, st *store.Store, cfg *config) (any, func(io.Writer), error) {
	res := map[string][]store.EndRow{}
	for _, by := range store.TopBytesBy {
		rows, err := st.TopBytes(ctx, by, cfg.filter, cfg.limit)
		if err != nil {
			return nil, nil, err
		}
		res[by] = rows
	}
	out := map[string]any{"since": cfg.filter.Since.UTC(), "host": cfg.filter.Host, "direction": cfg.filter.Direction, "by": "bytes"}
	if !cfg.filter.Until.IsZero() {
		out["until"] = cfg.filter.Until.UTC()
	}
	ports := make([]map[string]any, 0, len(res["port"]))
	for _, r := range res["port"] {
		n, _ := strconv.Atoi(r.Key)
		ports = append(ports, map[string]any{"key": n, "ends": r.Ends, "bytes": r.Bytes, "bytes_sent": r.BytesSent, "bytes_received": r.BytesReceived,
			"retransmits": r.Retrans, "mean_duration_ns": r.MeanDuration, "max_duration_ns": r.MaxDuration, "reasons": r.Reasons})
	}
	out["peers"], out["ports"] = res["peer"], ports
	return out, func(w io.Writer) {
		cells := func(r store.EndRow) []any {
			return []any{r.Ends, r.BytesSent, r.BytesReceived, seconds(r.MeanDuration), seconds(r.MaxDuration), r.Retrans, reasonsText(r.Reasons)}
		}
		const tail = "\tENDS\tSENT\tRECEIVED\tMEAN DURATION\tMAX DURATION\tRETRANS\tREASONS"
		table(w, "Top peers by bytes of ended connections, "+cfg.rangeText(), "PEER\tNAME"+tail, "(none)", res["peer"], func(r store.EndRow) []any {
			return append([]any{orDash(r.Key), orDash(r.Name)}, cells(r)...)
		})
		fmt.Fprintln(w)
		table(w, "Top ports by bytes of ended connections, "+cfg.rangeText(), "PORT"+tail, "(none)", res["port"], func(r store.EndRow) []any {
			return append([]any{orDash(r.Key)}, cells(r)...)
		})
	}, nil
}

// reasonsText lists the non-zero reason counts, in the order of store.ReasonNames.
func reasonsText(m map[string]int64) string {
	var parts []string
	for _, n := range store.ReasonNames {
		if m[n] > 0 {
			parts = append(parts, n+"="+strconv.FormatInt(m[n], 10))
		}
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, " ")
}

// topProcesses answers `top --by process`: begins by host and process context.
func topProcesses(ctx context.Context, st *store.Store, cfg *config) (any, func(io.Writer), error) {
	rows, err := st.TopProcesses(ctx, cfg.filter, cfg.limit)
	if err != nil {
		return nil, nil, err
	}
	out := map[string]any{"since": cfg.filter.Since.UTC(), "host": cfg.filter.Host, "direction": cfg.filter.Direction, "processes": rows}
	if !cfg.filter.Until.IsZero() {
		out["until"] = cfg.filter.Until.UTC()
	}
	return out, func(w io.Writer) {
		table(w, "Top processes by connections, "+cfg.rangeText(), "HOST\tPROCESS\tCONNECTIONS", "(none)", rows, func(r store.ProcRow) []any {
			return []any{r.Host, store.ProcessLabel(r.Comm, r.PID), r.Conns}
		})
	}, nil
}
