package schema

import (
	"net/netip"
	"strconv"
	"unicode/utf8"
)

// AppendJSON appends e as one JSON object in the shape of SPEC section 1 (field names fixed:
// conn_direction, src, dst, src_port, dst_port, src_dns, dst_dns, timestamp, host, then cgroup_id, pid,
// comm, container_id and uid only when known) and returns dst. No newline is added. src_dns and dst_dns are
// always arrays ([] when none); an unknown (zero) address is "". Strings are escaped as encoding/json
// does (invalid UTF-8 becomes U+FFFD), so the output is always valid JSON.
func (e *Event) AppendJSON(dst []byte, host string) []byte {
	dst = append(dst, `{"conn_direction":"`...)
	dst = append(dst, e.Direction.String()...)
	dst = append(dst, `","src":`...)
	dst = appendJSONAddr(dst, e.Src)
	dst = append(dst, `,"dst":`...)
	dst = appendJSONAddr(dst, e.Dst)
	dst = append(dst, `,"src_port":`...)
	dst = strconv.AppendUint(dst, uint64(e.SrcPort), 10)
	dst = append(dst, `,"dst_port":`...)
	dst = strconv.AppendUint(dst, uint64(e.DstPort), 10)
	dst = append(dst, `,"src_dns":`...)
	dst = appendJSONStrings(dst, e.SrcDNS)
	dst = append(dst, `,"dst_dns":`...)
	dst = appendJSONStrings(dst, e.DstDNS)
	dst = append(dst, `,"timestamp":`...)
	dst = strconv.AppendInt(dst, e.Timestamp, 10)
	dst = append(dst, `,"host":`...)
	dst = appendJSONString(dst, host)
	return appendJSONCtx(dst, e.ctx())
}

// appendJSONCtx appends the process context fields that are known and closes
// the object: the same for begin and end events.
func appendJSONCtx(dst []byte, k ctxKey) []byte {
	if k.cgroupID != 0 {
		dst = append(dst, `,"cgroup_id":`...)
		dst = strconv.AppendUint(dst, k.cgroupID, 10)
	}
	if k.pid != 0 {
		dst = append(dst, `,"pid":`...)
		dst = strconv.AppendUint(dst, uint64(k.pid), 10)
	}
	if k.comm != "" {
		dst = append(dst, `,"comm":`...)
		dst = appendJSONString(dst, k.comm)
	}
	if k.containerID != "" {
		dst = append(dst, `,"container_id":`...)
		dst = appendJSONString(dst, k.containerID)
	}
	if k.hasUID {
		dst = append(dst, `,"uid":`...)
		dst = strconv.AppendUint(dst, uint64(k.uid), 10)
	}
	return append(dst, '}')
}

func appendJSONAddr(dst []byte, a netip.Addr) []byte {
	if a.Zone() != "" { // a zone is arbitrary text: escape it (rare, so allocating is fine)
		return appendJSONString(dst, string(a.AppendTo(nil)))
	}
	dst = append(dst, '"')
	dst = a.AppendTo(dst) // "" for the zero Addr
	return append(dst, '"')
}

func appendJSONStrings(dst []byte, ss []string) []byte {
	dst = append(dst, '[')
	for i, s := range ss {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = appendJSONString(dst, s)
	}
	return append(dst, ']')
}

const hexDigits = "0123456789abcdef"

// appendJSONString appends s as a JSON string, escaping like encoding/json without HTML escaping.
func appendJSONString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' { // valid JSON, but not valid JavaScript: escape as encoding/json does
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

// AppendJSON appends e as one JSON object and returns dst (no newline). It starts with
// "event":"net_flow_tcp_end", so no reader of begin objects can take it for one, then the begin's
// fields under their SPEC section 1 names (conn_direction, src, dst, src_port, dst_port, src_dns,
// dst_dns), begin_ns, end_ns, duration_ns, src_bytes, dst_bytes, src_segs, dst_segs, retrans, srtt_us,
// reason (EndReason.String), host, then cgroup_id, pid, comm and container_id only when known. There
// is no timestamp key: a begin reader that requires one fails instead of misreading (FORMAT.md).
func (e *EndEvent) AppendJSON(dst []byte, host string) []byte {
	dst = append(dst, `{"event":"`+EndEventName+`","conn_direction":"`...)
	dst = append(dst, e.Direction.String()...)
	dst = append(dst, `","src":`...)
	dst = appendJSONAddr(dst, e.Src)
	dst = append(dst, `,"dst":`...)
	dst = appendJSONAddr(dst, e.Dst)
	dst = append(dst, `,"src_port":`...)
	dst = strconv.AppendUint(dst, uint64(e.SrcPort), 10)
	dst = append(dst, `,"dst_port":`...)
	dst = strconv.AppendUint(dst, uint64(e.DstPort), 10)
	dst = append(dst, `,"src_dns":`...)
	dst = appendJSONStrings(dst, e.SrcDNS)
	dst = append(dst, `,"dst_dns":`...)
	dst = appendJSONStrings(dst, e.DstDNS)
	dst = append(dst, `,"begin_ns":`...)
	dst = strconv.AppendInt(dst, e.BeginNs, 10)
	dst = append(dst, `,"end_ns":`...)
	dst = strconv.AppendInt(dst, e.EndNs, 10)
	dst = append(dst, `,"duration_ns":`...)
	dst = strconv.AppendInt(dst, e.Duration(), 10)
	dst = append(dst, `,"src_bytes":`...)
	dst = strconv.AppendUint(dst, e.SrcBytes, 10)
	dst = append(dst, `,"dst_bytes":`...)
	dst = strconv.AppendUint(dst, e.DstBytes, 10)
	dst = append(dst, `,"src_segs":`...)
	dst = strconv.AppendUint(dst, e.SrcSegs, 10)
	dst = append(dst, `,"dst_segs":`...)
	dst = strconv.AppendUint(dst, e.DstSegs, 10)
	dst = append(dst, `,"retrans":`...)
	dst = strconv.AppendUint(dst, e.Retrans, 10)
	dst = append(dst, `,"srtt_us":`...)
	dst = strconv.AppendUint(dst, uint64(e.SRTTus), 10)
	dst = append(dst, `,"reason":"`...)
	dst = append(dst, e.Reason.String()...)
	dst = append(dst, `","host":`...)
	dst = appendJSONString(dst, host)
	return appendJSONCtx(dst, e.ctx())
}
