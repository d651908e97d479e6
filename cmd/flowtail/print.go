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

// printer writes one event.
type printer interface {
	event(m *tail.Meta, ev *schema.Event) error
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

// tablePrinter writes aligned columns. A live tail cannot know the widest value in advance, so columns
// start at typical widths and only ever grow; the header is printed once.
type tablePrinter struct {
	w       *bufio.Writer
	widths  [6]int // all columns but the last
	printed bool   // the header
	loc     *time.Location
	buf     []byte
}

// timeLayout is RFC3339 with milliseconds: "Z" for UTC, the offset otherwise, so a time read off the
// table is unambiguous and can be given back to --since.
const timeLayout = "2006-01-02T15:04:05.000Z07:00"

func newTablePrinter(w *bufio.Writer, local bool) *tablePrinter {
	p := &tablePrinter{w: w, loc: time.UTC}
	if local {
		p.loc = time.Local
	}
	p.widths = [6]int{len(p.fmtTime(0)), 10, 8, 21, 21, 12}
	return p
}

func (p *tablePrinter) fmtTime(ns int64) string { return time.Unix(0, ns).In(p.loc).Format(timeLayout) }

// header appends the header line to buf the first time.
func (p *tablePrinter) header() {
	if !p.printed {
		p.printed = true
		p.row("TIME", "HOST", "DIRECTION", "SRC", "DST", "SRC_DNS", "DST_DNS")
	}
}

// maxNameWidth keeps one long CDN name list from pushing the last column off screen for good.
const maxNameWidth = 40

func (p *tablePrinter) event(m *tail.Meta, ev *schema.Event) error {
	p.header()
	p.row(p.fmtTime(ev.Timestamp),
		m.Host,
		ev.Direction.String(),
		endpoint(ev.Src, ev.SrcPort),
		endpoint(ev.Dst, ev.DstPort),
		names(ev.SrcDNS),
		names(ev.DstDNS))
	_, err := p.w.Write(p.buf)
	p.buf = p.buf[:0]
	return err
}

// row writes one line; every cell is escaped and bounded, since it comes from the stream.
func (p *tablePrinter) row(cols ...string) {
	for i, c := range cols {
		c = stream.Escape(c, stream.MaxCell)
		if i == len(cols)-1 {
			p.buf = append(p.buf, c...)
			break
		}
		if i < len(p.widths) && len(c) > p.widths[i] && (i != 5 || len(c) <= maxNameWidth) {
			p.widths[i] = len(c)
		}
		p.buf = append(p.buf, c...)
		for n := len(c); n < p.widths[i]; n++ {
			p.buf = append(p.buf, ' ')
		}
		p.buf = append(p.buf, ' ', ' ')
	}
	p.buf = append(p.buf, '\n')
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
