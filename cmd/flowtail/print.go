package main

import (
	"bufio"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/consumers/tail"
	"github.com/flowbus/flowbus/schema"
)

// printer writes one event of either kind.
type printer interface {
	event(m *tail.Meta, ev *schema.Event) error
	end(m *tail.Meta, ev *schema.EndEvent) error
}

type jsonPrinter struct {
	w   *bufio.Writer
	buf []byte
}

func (p *jsonPrinter) event(m *tail.Meta, ev *schema.Event) error {
	p.buf = ev.AppendJSON(p.buf[:0], m.Host)
	p.buf = append(p.buf, '\n')
	_, err := p.w.Write(p.buf)
	return err
}

// end writes an end object: it starts with "event":"net_flow_tcp_end" (schema.EndEvent.AppendJSON).
func (p *jsonPrinter) end(m *tail.Meta, ev *schema.EndEvent) error {
	p.buf = ev.AppendJSON(p.buf[:0], m.Host)
	p.buf = append(p.buf, '\n')
	_, err := p.w.Write(p.buf)
	return err
}

// Table columns.
const (
	colTime = iota
	colHost
	colEvent
	colDirection
	colSrc
	colDst
	colDuration
	colBytes
	colReason
	colProcess
	colSrcDNS
	colDstDNS
	numCols
)

var colNames = [numCols]string{"TIME", "HOST", "EVENT", "DIRECTION", "SRC", "DST", "DURATION", "BYTES", "REASON", "PROCESS", "SRC_DNS", "DST_DNS"}

// colWidths are the typical widths columns start at (TIME's is set from the layout).
var colWidths = [numCols]int{0, 10, 5, 8, 21, 21, 8, 13, 17, 20, 12, 0} // REASON: never_established; PROCESS: comm[pid]

// tablePrinter writes aligned columns. A live tail cannot know the widest value in advance, so columns
// start at typical widths and only ever grow; the header is printed first, and again above the row that
// made a column grow, so that every row lines up with the header above it. The columns depend on the
// events shown: begins only, the table of before end events; ends add DURATION, BYTES and REASON; both
// add EVENT too, with "-" in the end columns of a begin.
type tablePrinter struct {
	w       *bufio.Writer
	cols    []int // the columns shown, in order
	widths  [numCols]int
	printed bool // the header
	loc     *time.Location
	buf     []byte
	cells   [numCols]string
}

// timeLayout is RFC3339 with milliseconds: "Z" for UTC, the offset otherwise, so a time read off the
// table is unambiguous and can be given back to --since.
const timeLayout = "2006-01-02T15:04:05.000Z07:00"

func newTablePrinter(w *bufio.Writer, local bool, events tail.Events) *tablePrinter {
	p := &tablePrinter{w: w, loc: time.UTC, widths: colWidths}
	if local {
		p.loc = time.Local
	}
	p.widths[colTime] = len(p.fmtTime(0))
	switch events {
	case tail.EventsBegin:
		p.cols = []int{colTime, colHost, colDirection, colSrc, colDst, colProcess, colSrcDNS, colDstDNS}
	case tail.EventsEnd:
		p.cols = []int{colTime, colHost, colDirection, colSrc, colDst, colDuration, colBytes, colReason, colProcess, colSrcDNS, colDstDNS}
	default:
		p.cols = []int{colTime, colHost, colEvent, colDirection, colSrc, colDst, colDuration, colBytes, colReason, colProcess, colSrcDNS, colDstDNS}
	}
	return p
}

func (p *tablePrinter) fmtTime(ns int64) string { return time.Unix(0, ns).In(p.loc).Format(timeLayout) }

// header appends the header line to buf the first time.
func (p *tablePrinter) header() {
	if !p.printed {
		p.printed = true
		p.cells = colNames
		p.fit()
		p.row()
	}
}

// maxNameWidth keeps one long CDN name list from pushing the last column off screen for good.
const maxNameWidth = 40

func (p *tablePrinter) event(m *tail.Meta, ev *schema.Event) error {
	p.header()
	c := &p.cells
	c[colTime], c[colHost], c[colEvent], c[colDirection] = p.fmtTime(ev.Timestamp), m.Host, "begin", ev.Direction.String()
	c[colSrc], c[colDst] = endpoint(ev.Src, ev.SrcPort), endpoint(ev.Dst, ev.DstPort)
	c[colDuration], c[colBytes], c[colReason] = "-", "-", "-"
	c[colProcess] = process(ev.PID, ev.Comm)
	c[colSrcDNS], c[colDstDNS] = names(ev.SrcDNS), names(ev.DstDNS)
	return p.flush()
}

// end writes an end row: TIME is when the connection ended, BYTES what src sent / what dst sent.
func (p *tablePrinter) end(m *tail.Meta, ev *schema.EndEvent) error {
	p.header()
	c := &p.cells
	c[colTime], c[colHost], c[colEvent], c[colDirection] = p.fmtTime(ev.EndNs), m.Host, "end", ev.Direction.String()
	c[colSrc], c[colDst] = endpoint(ev.Src, ev.SrcPort), endpoint(ev.Dst, ev.DstPort)
	c[colDuration] = duration(ev.Duration())
	c[colBytes] = strconv.FormatUint(ev.SrcBytes, 10) + "/" + strconv.FormatUint(ev.DstBytes, 10)
	c[colReason] = ev.Reason.String()
	c[colProcess] = process(ev.PID, ev.Comm)
	c[colSrcDNS], c[colDstDNS] = names(ev.SrcDNS), names(ev.DstDNS)
	return p.flush()
}

func (p *tablePrinter) flush() error {
	if p.fit() {
		row := p.cells
		p.cells = colNames
		p.row()
		p.cells = row
	}
	p.row()
	_, err := p.w.Write(p.buf)
	p.buf = p.buf[:0]
	return err
}

// fit widens the columns the cells need (the last one never: it is not padded) and tells whether any
// grew.
func (p *tablePrinter) fit() bool {
	grew := false
	for _, col := range p.cols[:len(p.cols)-1] {
		c := stream.Escape(p.cells[col], stream.MaxCell)
		if len(c) > p.widths[col] && (col != colSrcDNS || len(c) <= maxNameWidth) {
			p.widths[col] = len(c)
			grew = true
		}
	}
	return grew
}

// row writes the cells of the shown columns as one line; every cell is escaped and bounded, since it
// comes from the stream.
func (p *tablePrinter) row() {
	for i, col := range p.cols {
		c := stream.Escape(p.cells[col], stream.MaxCell)
		if i == len(p.cols)-1 {
			p.buf = append(p.buf, c...)
			break
		}
		p.buf = append(p.buf, c...)
		for n := len(c); n < p.widths[col]; n++ {
			p.buf = append(p.buf, ' ')
		}
		p.buf = append(p.buf, ' ', ' ')
	}
	p.buf = append(p.buf, '\n')
}

// duration formats a connection's duration: exact below a millisecond, else to the millisecond.
func duration(ns int64) string {
	d := time.Duration(ns)
	if d < time.Millisecond && d > -time.Millisecond {
		return d.String()
	}
	return d.Round(time.Millisecond).String()
}

// endpoint formats addr:port with IPv6 in brackets.
func endpoint(a netip.Addr, port uint16) string {
	if !a.IsValid() {
		return "?:" + strconv.Itoa(int(port))
	}
	return netip.AddrPortFrom(a, port).String()
}

func names(n []string) string {
	if len(n) == 0 {
		return "-"
	}
	return strings.Join(n, ",")
}

// process formats the process that opened the connection (the listener's, for incoming ones) as
// comm[pid]; "-" when the event has none.
func process(pid uint32, comm string) string {
	switch {
	case pid == 0 && comm == "":
		return "-"
	case pid == 0:
		return comm
	case comm == "":
		return "[" + strconv.FormatUint(uint64(pid), 10) + "]"
	}
	return comm + "[" + strconv.FormatUint(uint64(pid), 10) + "]"
}
