package schema

import (
	"fmt"
	"math"
	"slices"
)

// minEndRowSize is the smallest encoded end row: fixarray header and fourteen one-byte elements.
const minEndRowSize = 1 + endRowLen

var endRowFields = [endRowLen]string{6: "duration_ns", 7: "src_bytes", 8: "dst_bytes", 9: "src_segs",
	10: "dst_segs", 11: "retrans", 12: "srtt_us", 13: "reason"}

// DecodeEndBatch decodes one end batch (schema major EndMajor, event net_flow_tcp_end) into into,
// reusing the capacity of into.Events. The rules are DecodeBatch's: keys in any order, unknown keys and
// extra row elements ignored, duplicated known keys and every string past its bound malformed. A
// begin batch, or any other major, fails with ErrUnsupportedMajor; a structural problem with
// ErrMalformed. A reason code this package does not know is kept (EndReason.String says "unknown").
func DecodeEndBatch(data []byte, into *EndBatch) error {
	var h head
	if err := decodeHead(data, KindEnd, &h); err != nil {
		return err
	}
	into.Major, into.Minor, into.Host, into.Direction, into.RunID = EndMajor, h.minor, h.host, h.dir, h.runID
	into.Seq, into.PrevSeq, into.PrevRun, into.Drops = h.seq, h.prevSeq, h.prevRun, h.drops
	r := &h.events
	n, err := r.readLen(false)
	if err != nil {
		return malformed(keyEvents, err)
	}
	into.Events = slices.Grow(into.Events[:0], min(n, r.rem()/minEndRowSize))
	for i := 0; i < n; i++ {
		var rs rowStart
		if err := readRowStart(r, i, endRowLen, h.eps, h.ctxs, &rs); err != nil {
			return err
		}
		end := h.t0 + rs.dt
		ev := EndEvent{
			Direction: into.Direction,
			Src:       rs.src.addr,
			Dst:       rs.dst.addr,
			SrcPort:   rs.sport,
			DstPort:   rs.dport,
			SrcDNS:    rs.src.names,
			DstDNS:    rs.dst.names,
			EndNs:     end,
		}
		if k := rs.ctx; k != nil {
			ev.CgroupID, ev.PID, ev.Comm, ev.ContainerID = k.cgroupID, k.pid, k.comm, k.containerID
			ev.UID, ev.UIDKnown = k.uid, k.hasUID
		}
		where := func(j int) string { return fmt.Sprintf("events[%d][%d] (%s)", i, j, endRowFields[j]) }
		dur, err := r.readInt()
		if err != nil {
			return malformed(where(6), err)
		}
		ev.BeginNs = end - dur
		for j, p := range [...]*uint64{&ev.SrcBytes, &ev.DstBytes, &ev.SrcSegs, &ev.DstSegs, &ev.Retrans} {
			if *p, err = r.readUint(math.MaxUint64); err != nil {
				return malformed(where(7+j), err)
			}
		}
		srtt, err := r.readUint(math.MaxUint32)
		if err != nil {
			return malformed(where(12), err)
		}
		ev.SRTTus = uint32(srtt)
		reason, err := r.readUint(math.MaxUint8)
		if err != nil {
			return malformed(where(13), err)
		}
		ev.Reason = EndReason(reason)
		if err := skipRowRest(r, i, endRowLen, rs.n); err != nil {
			return err
		}
		into.Events = append(into.Events, ev)
	}
	return nil
}
