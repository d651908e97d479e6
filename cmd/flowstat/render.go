package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/stream"
)

// queries are the commands that read the database: each returns what --json prints and what prints the
// table instead.
var queries = map[string]func(context.Context, *store.Store, *config) (any, func(io.Writer), error){
	"top": top, "new": newDests, "hosts": hosts, "summary": summary,
}

// query runs a query command and prints its answer as JSON or as aligned tables.
func query(ctx context.Context, st *store.Store, cfg *config, stdout io.Writer) error {
	out, render, err := queries[cfg.cmd](ctx, st, cfg)
	if err != nil {
		return err
	}
	if cfg.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	render(tw)
	return tw.Flush()
}

// table writes a title line (none when ""), the tab-separated column header, then one line per row with
// the cells cells gives, or empty when there are no rows (nothing when "").
func table[T any](w io.Writer, title, header, empty string, rows []T, cells func(T) []any) {
	if title != "" {
		fmt.Fprintln(w, title)
	}
	fmt.Fprintln(w, header)
	if len(rows) == 0 && empty != "" {
		fmt.Fprintln(w, empty)
	}
	for _, r := range rows {
		for i, c := range cells(r) {
			if i > 0 {
				fmt.Fprint(w, "\t")
			}
			// A cell can hold what a publisher wrote (a host, a run id, a DNS name): escaped and
			// bounded, which also keeps a tab in it from breaking the columns.
			if s, ok := c.(string); ok {
				c = stream.Escape(s, stream.MaxCell)
			}
			fmt.Fprint(w, c)
		}
		fmt.Fprintln(w)
	}
}

// timeLayout is RFC3339: "Z" for UTC (the default), the offset with --local, so a time read off a table
// is unambiguous and can be given back to --since and --until.
const timeLayout = "2006-01-02T15:04:05Z07:00"

// fmtTime formats a table time in UTC, or in the local zone with --local.
func (cfg *config) fmtTime(t time.Time) string {
	if cfg.local {
		return t.Local().Format(timeLayout)
	}
	return t.UTC().Format(timeLayout)
}

// fmtTimeMs is fmtTime with milliseconds, for capture downtimes of a second or two.
func (cfg *config) fmtTimeMs(t time.Time) string {
	const ms = "2006-01-02T15:04:05.000Z07:00"
	if cfg.local {
		return t.Local().Format(ms)
	}
	return t.UTC().Format(ms)
}

// neverArrived is the NEVER ARRIVED cell of a restart: K of the previous run's batches, or why it is
// not told.
func neverArrived(r store.RestartRow) string {
	switch {
	case r.Missing >= 0:
		return fmt.Sprintf("%d of %d", r.Missing, r.PrevBatches)
	case r.PrevSeen == "partial":
		return fmt.Sprintf("unknown of %d: not counted from its first batch", r.PrevBatches)
	}
	return fmt.Sprintf("unknown of %d: previous run not seen by this database", r.PrevBatches)
}

func plural(n int64, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// seconds formats ns as seconds with milliseconds, e.g. "2.072 s".
func seconds(ns int64) string { return strconv.FormatFloat(float64(ns)/1e9, 'f', 3, 64) + " s" }

func (cfg *config) rangeText() string {
	f := cfg.filter
	s := "since " + cfg.fmtTime(f.Since)
	if !f.Until.IsZero() {
		s += " until " + cfg.fmtTime(f.Until)
	}
	if f.Host != "" {
		s += ", host " + f.Host
	}
	if f.Direction != "" {
		s += ", " + f.Direction
	}
	return s
}

func top(ctx context.Context, st *store.Store, cfg *config) (any, func(io.Writer), error) {
	switch cfg.by {
	case "bytes":
		return topBytes(ctx, st, cfg)
	case "process":
		return topProcesses(ctx, st, cfg)
	}
	bys := []string{"peer", "port"}
	if cfg.by != "" {
		bys = []string{cfg.by}
	}
	res := map[string][]store.TopRow{}
	for _, by := range bys {
		rows, err := st.Top(ctx, by, cfg.filter, cfg.limit)
		if err != nil {
			return nil, nil, err
		}
		res[by] = rows
	}
	out := map[string]any{"since": cfg.filter.Since.UTC(), "host": cfg.filter.Host, "direction": cfg.filter.Direction}
	if !cfg.filter.Until.IsZero() {
		out["until"] = cfg.filter.Until.UTC()
	}
	for by, rows := range res {
		out[by+"s"] = topJSON(by, rows)
	}
	return out, func(w io.Writer) {
		for i, by := range bys {
			if i > 0 {
				fmt.Fprintln(w)
			}
			title := fmt.Sprintf("Top %ss by connections, %s", by, cfg.rangeText())
			if by == "peer" {
				table(w, title, "PEER\tNAME\tCONNECTIONS", "(none)", res[by], func(r store.TopRow) []any { return []any{orDash(r.Key), orDash(r.Name), r.Conns} })
			} else {
				table(w, title, strings.ToUpper(by)+"\tCONNECTIONS", "(none)", res[by], func(r store.TopRow) []any { return []any{orDash(r.Key), r.Conns} })
			}
		}
	}, nil
}

// topRowJSON is a store.TopRow as JSON output: a port is a number there, as in every other output.
type topRowJSON struct {
	Key   any    `json:"key"`
	Name  string `json:"name,omitempty"`
	Conns int64  `json:"connections"`
}

func topJSON(by string, rows []store.TopRow) []topRowJSON {
	out := make([]topRowJSON, len(rows))
	for i, r := range rows {
		out[i] = topRowJSON{Key: r.Key, Name: r.Name, Conns: r.Conns}
		if by == "port" {
			if n, err := strconv.Atoi(r.Key); err == nil {
				out[i].Key = n
			}
		}
	}
	return out
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func newDests(ctx context.Context, st *store.Store, cfg *config) (any, func(io.Writer), error) {
	rows, err := st.NewDestinations(ctx, cfg.filter, cfg.limit)
	if err != nil {
		return nil, nil, err
	}
	return rows, func(w io.Writer) {
		table(w, "Peers first seen "+cfg.rangeText(), "FIRST SEEN\tLAST SEEN\tHOST\tDIRECTION\tPEER\tPORT\tNAMES", "(none)", rows, func(r store.NewDest) []any {
			return []any{cfg.fmtTime(r.First), cfg.fmtTime(r.Last), r.Host, r.Direction, orDash(r.Peer), r.Port, orDash(strings.Join(r.Names, ","))}
		})
	}, nil
}

func hosts(ctx context.Context, st *store.Store, cfg *config) (any, func(io.Writer), error) {
	rows, err := st.PerHost(ctx, cfg.filter, cfg.step)
	if err != nil {
		return nil, nil, err
	}
	return rows, func(w io.Writer) {
		table(w, "Connections per host, "+cfg.rangeText(), "START\tHOST\tCONNECTIONS", "(none)", rows, func(r store.HostPoint) []any {
			return []any{cfg.fmtTime(r.Start), r.Host, r.Conns}
		})
	}, nil
}

func summary(ctx context.Context, st *store.Store, cfg *config) (any, func(io.Writer), error) {
	s, err := st.Summary(ctx, cfg.maxGaps)
	if err != nil {
		return nil, nil, err
	}
	if cfg.stream != "" {
		var known []string
		for _, c := range s.Checkpoints {
			if !slices.Contains(known, c.Stream) {
				known = append(known, c.Stream)
			}
		}
		if !slices.Contains(known, cfg.stream) {
			// Most likely a typo: an empty answer would look like a stream without problems.
			k := "none yet: run `flowstat run` first"
			if len(known) > 0 {
				k = "known: " + strings.Join(known, ", ")
			}
			return nil, nil, fmt.Errorf("stream %s has no checkpoints in database %s (%s)", cfg.stream, st.Where(), k)
		}
		s.Checkpoints = slices.DeleteFunc(s.Checkpoints, func(c store.CheckpointRow) bool { return c.Stream != cfg.stream })
		s.Losses = slices.DeleteFunc(s.Losses, func(l store.LossRow) bool { return l.Stream != cfg.stream })
	}
	return s, func(w io.Writer) {
		fmt.Fprintf(w, "Database %s (schema %d, buckets of %v)\n\n", s.Database, s.SchemaVersion, time.Duration(s.BucketSeconds)*time.Second)
		table(w, "", "HOST\tDIRECTION\tCONNECTIONS\tBATCHES\tDROPPED\tGAPS\tRESTARTS\tENDS\tSENT\tRECEIVED\tMEAN DURATION\tEND BATCHES\tENDS DROPPED\tFIRST BATCH\tLAST BATCH", "(no data yet)", s.Hosts, func(h store.HostTotal) []any {
			return []any{h.Host, h.Direction, h.Conns, h.Batches, h.Drops, h.Gaps, h.Restarts, h.Ends, h.BytesSent, h.BytesReceived, seconds(h.MeanDuration),
				h.EndBatches, h.EndDrops, cfg.fmtTime(h.First), cfg.fmtTime(h.Last)}
		})
		if s.GapCount > 0 {
			table(w, fmt.Sprintf("\nMissing batches (%d gaps, newest first):", s.GapCount), "HOST\tRUN\tDIRECTION\tWHAT\tSTREAM SEQ\tSTORED", "", s.Gaps, func(g store.GapRow) []any {
				missing := fmt.Sprintf("batch %d follows %d, but %d was the last seen", g.Seq, g.PrevSeq, g.AfterSeq)
				if g.AfterSeq == 0 {
					missing = fmt.Sprintf("run first seen at batch %d (follows %d): its earlier batches were never read", g.Seq, g.PrevSeq)
				}
				return []any{g.Host, g.RunID, g.Direction, missing, g.StreamSeq, cfg.fmtTime(g.Stored)}
			})
		}
		if rt := s.RestartTotals; rt.Links > 0 {
			untold := ""
			if rt.Untold > 0 {
				untold = fmt.Sprintf(", %d %s untold", rt.Untold, plural(rt.Untold, "link", "links"))
			}
			title := fmt.Sprintf("\nAgent restarts (%d %s, %d %s): capture down %s in total, %d %s of previous runs never arrived%s; newest first:",
				rt.Runs, plural(rt.Runs, "run", "runs"), rt.Links, plural(rt.Links, "link", "links"), seconds(rt.DownNs),
				rt.Missing, plural(rt.Missing, "batch", "batches"), untold)
			table(w, title, "HOST\tDIRECTION\tRUN\tPREVIOUS RUN\tENDED\tLAST SEQ\tNEVER ARRIVED\tCAPTURE STOPPED\tRESUMED\tDOWN", "", s.Restarts, func(r store.RestartRow) []any {
				return []any{r.Host, r.Direction, r.RunID, r.PrevRunID, r.PrevEnd, r.PrevLastSeq, neverArrived(r), cfg.fmtTimeMs(r.DownFrom), cfg.fmtTimeMs(r.DownTo), seconds(r.DownNs)}
			})
		}
		for _, l := range s.Losses {
			fmt.Fprintf(w, "\nStream %s deleted sequences %d..%d before consumer %s read them.\n", l.Stream, l.From, l.To, l.Consumer)
		}
		if s.DeadLetters > 0 {
			fmt.Fprintf(w, "\nDead letters: %d %v", s.DeadLetters, s.DeadByReason)
			if s.NotCopied > 0 {
				fmt.Fprintf(w, " (%d could not be copied to the dead-letter subject)", s.NotCopied)
			}
			fmt.Fprintln(w)
		}
		if s.Duplicates > 0 {
			fmt.Fprintf(w, "\nDuplicate batches: %d messages repeated a batch already counted (a retry stored again after the stream's duplicates window); each was counted once.\n", s.Duplicates)
		}
		if s.Unfinished > 0 {
			fmt.Fprintf(w, "\n%d replay(s) did not finish: their ranges are incomplete until replayed again.\n", s.Unfinished)
		}
		if len(s.Checkpoints) > 0 {
			table(w, "", "\nCONSUMER\tSTREAM\tCOMMITTED UP TO\tUPDATED\tFILTERS", "", s.Checkpoints, func(c store.CheckpointRow) []any {
				return []any{c.Consumer, c.Stream, c.Seq, cfg.fmtTime(c.Updated), c.Filters}
			})
		}
	}, nil
}
