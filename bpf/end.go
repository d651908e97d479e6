package bpf

import (
	"encoding/binary"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/flowbus/flowbus/schema"
)

// Record layout of struct end_event (bpf/flowbus.c), native byte order.
const (
	endRecSize       = 152
	offEndTs         = 0
	offEndBegin      = 8
	offEndCgroup     = 16
	offEndBytesRcvd  = 24
	offEndBytesAcked = 32
	offEndSrc        = 40
	offEndDst        = 56
	offEndSrcPort    = 72
	offEndDstPort    = 74
	offEndKind       = 76
	offEndFamily     = 77
	offEndDirection  = 78
	offEndOldState   = 79
	offEndSegsIn     = 80
	offEndSegsOut    = 84
	offEndRetrans    = 88
	offEndSRTT       = 92
	offEndSkErr      = 96
	offEndFinRcvd    = 100
	offEndIfindex    = 104
	offEndNetns      = 112
	recKindConfirm   = 4
	recKindEnd       = 5
	originSynAck     = 0
	originFastOpen   = 2
)

// TCP states (include/net/tcp_states.h), as the kernel passes them to the
// state callback.
const (
	tcpEstablished = 1
	tcpSynSent     = 2
	tcpSynRecv     = 3
	tcpFinWait1    = 4
	tcpFinWait2    = 5
	tcpTimeWait    = 6
	tcpClose       = 7
	tcpCloseWait   = 8
	tcpLastAck     = 9
	tcpClosing     = 11
)

// Errors the kernel leaves in sk_err when a connection dies.
const (
	errEPIPE      = 32
	errECONNRESET = 104
)

// endReason names how a connection ended, from the state it left for
// TCP_CLOSE and the socket's error, as the kernel sets them (verified by
// TestEndReasons, one case each):
//   - ECONNRESET (a RST in any synchronized state) and EPIPE (a RST in
//     CLOSE_WAIT): the peer reset it;
//   - any other error: the kernel gave up (tcp_write_err: ETIMEDOUT, or the
//     soft error an ICMP left, such as EHOSTUNREACH);
//   - no error, from a state after a FIN (FIN_WAIT1/2, CLOSING, LAST_ACK,
//     TIME_WAIT): an orderly close;
//   - no error, from ESTABLISHED or CLOSE_WAIT: this host closed it without
//     a FIN, i.e. with a RST (tcp_close with unread data, SO_LINGER 0,
//     tcp_abort);
//   - SYN_RECV, SYN_SENT: it never completed its handshake.
func endReason(oldState uint8, skErr int32) schema.EndReason {
	switch oldState {
	case tcpSynRecv, tcpSynSent:
		return schema.EndNeverEstablished
	}
	switch {
	case skErr == errECONNRESET || skErr == errEPIPE:
		return schema.EndRSTReceived
	case skErr != 0:
		return schema.EndTimeout
	}
	switch oldState {
	case tcpFinWait1, tcpFinWait2, tcpClosing, tcpLastAck, tcpTimeWait:
		return schema.EndFIN
	case tcpEstablished, tcpCloseWait:
		return schema.EndRSTSent
	}
	return schema.EndUnknown
}

// payloadBytes takes the sequence numbers that carry no payload out of the
// kernel's byte counters: bytes_acked counts the SYN of an active open (its
// ACK moves snd_una past it) and our FIN once acknowledged, bytes_received
// the peer's FIN once taken. Verified against tcpdump by TestEndBytes.
func payloadBytes(dir schema.Direction, oldState uint8, skErr int32, finRcvd bool, acked, received uint64) (sent, got uint64) {
	sent, got = acked, received
	if dir == schema.Outgoing && sent > 0 {
		sent--
	}
	// Our FIN was acknowledged: FIN_WAIT2 is the state that says so; from
	// CLOSING and LAST_ACK only its acknowledgment closes without an error.
	if oldState == tcpFinWait2 || (skErr == 0 && (oldState == tcpClosing || oldState == tcpLastAck)) {
		if sent > 0 {
			sent--
		}
	}
	if finRcvd && got > 0 {
		got--
	}
	return sent, got
}

// decodeEnd fills ev from an end record without allocating.
func decodeEnd(b []byte, ev *schema.EndEvent, clock *wallClock) bool {
	if len(b) != endRecSize || b[offEndKind] != recKindEnd {
		return false
	}
	ne := binary.NativeEndian
	*ev = schema.EndEvent{}
	switch b[offEndFamily] {
	case 4:
		ev.Src = netip.AddrFrom4([4]byte(b[offEndSrc : offEndSrc+4]))
		ev.Dst = netip.AddrFrom4([4]byte(b[offEndDst : offEndDst+4]))
	case 6:
		ev.Src = netip.AddrFrom16([16]byte(b[offEndSrc : offEndSrc+16])).Unmap()
		ev.Dst = netip.AddrFrom16([16]byte(b[offEndDst : offEndDst+16])).Unmap()
	default:
		return false
	}
	var ok bool
	if ev.Direction, ok = recDirection(b[offEndDirection]); !ok {
		return false
	}
	ev.SrcPort = ne.Uint16(b[offEndSrcPort:])
	ev.DstPort = ne.Uint16(b[offEndDstPort:])
	ev.BeginNs = clock.wall(ne.Uint64(b[offEndBegin:]))
	ev.EndNs = clock.wall(ne.Uint64(b[offEndTs:]))
	ev.CgroupID = ne.Uint64(b[offEndCgroup:])
	old := b[offEndOldState]
	skErr := int32(ne.Uint32(b[offEndSkErr:]))
	sent, got := payloadBytes(ev.Direction, old, skErr, b[offEndFinRcvd] != 0,
		ne.Uint64(b[offEndBytesAcked:]), ne.Uint64(b[offEndBytesRcvd:]))
	segsIn, segsOut := uint64(ne.Uint32(b[offEndSegsIn:])), uint64(ne.Uint32(b[offEndSegsOut:]))
	if ev.Direction == schema.Outgoing {
		ev.SrcBytes, ev.DstBytes, ev.SrcSegs, ev.DstSegs = sent, got, segsOut, segsIn
	} else {
		ev.SrcBytes, ev.DstBytes, ev.SrcSegs, ev.DstSegs = got, sent, segsIn, segsOut
	}
	ev.Retrans = uint64(ne.Uint32(b[offEndRetrans:]))
	ev.SRTTus = ne.Uint32(b[offEndSRTT:]) >> 3
	ev.Reason = endReason(old, skErr)
	return true
}

// applyEnd gives the link-local addresses of an end their zone.
func (z *zoneNames) applyEnd(ev *schema.EndEvent, b []byte) {
	if !ev.Src.Is6() || !(ev.Src.IsLinkLocalUnicast() || ev.Dst.IsLinkLocalUnicast()) || len(b) < endRecSize {
		return
	}
	ne := binary.NativeEndian
	idx := ne.Uint32(b[offEndIfindex:])
	if idx == 0 {
		return
	}
	name := z.name(ne.Uint64(b[offEndNetns:]), idx)
	if ev.Src.IsLinkLocalUnicast() {
		ev.Src = ev.Src.WithZone(name)
	}
	if ev.Dst.IsLinkLocalUnicast() {
		ev.Dst = ev.Dst.WithZone(name)
	}
}

// SynAckWindow is how long the kernel keeps retrying a SYN-ACK with
// net.ipv4.tcp_synack_retries = retries before it drops the half-open
// connection: the initial RTO of 1 s, doubled each time, summed over the
// first send and every retry.
func SynAckWindow(retries int) time.Duration {
	if retries < 0 {
		retries = 0
	}
	if retries > 10 {
		retries = 10
	}
	return time.Duration(1<<(retries+1)-1) * time.Second
}

// HalfOpenSlack is added to the SYN-ACK window: the kernel's timers fire a
// little late, and the reader polls.
const HalfOpenSlack = 2 * time.Second

// DefaultHalfOpenTimeout is the window of this network namespace's
// net.ipv4.tcp_synack_retries (5 when unreadable: the kernel's default),
// plus HalfOpenSlack.
func DefaultHalfOpenTimeout() time.Duration {
	retries := 5
	if b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_synack_retries"); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			retries = n
		}
	}
	return SynAckWindow(retries) + HalfOpenSlack
}
