package netnstest

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Packet is one TCP segment tcpdump saw.
type Packet struct {
	Time     time.Time
	Src, Dst netip.AddrPort
	Seq, Ack uint32
	Flags    uint8 // TCP flags byte
	Payload  int   // TCP payload bytes
}

// TCP flag bits of Packet.Flags.
const (
	FlagFIN = 0x01
	FlagSYN = 0x02
	FlagRST = 0x04
)

// Tcpdump captures TCP on dev in namespace ns (with filter, tcpdump's
// syntax) from now on; stop ends the capture and returns the packets, with
// nanosecond times of the capture's clock (the host's wall clock).
func Tcpdump(t testing.TB, ns, dev, filter string) (stop func() []Packet) {
	t.Helper()
	if _, err := exec.LookPath("tcpdump"); err != nil {
		t.Skip("needs tcpdump")
	}
	file := filepath.Join(t.TempDir(), "cap.pcap")
	args := []string{"netns", "exec", ns, "tcpdump", "-i", dev, "-n", "-U", "--immediate-mode", "-Z", "root", "-s", "256", "--time-stamp-precision=nano", "-w", file}
	args = append(args, strings.Fields(filter)...)
	cmd := exec.Command("ip", args...)
	errp, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	br := bufio.NewReader(errp)
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("tcpdump did not start: %v %q", err, line)
		}
		if strings.Contains(line, "listening on") {
			break
		}
	}
	go func() { _, _ = br.WriteTo(discard{}) }()
	return func() []Packet {
		t.Helper()
		time.Sleep(50 * time.Millisecond) // -U: written per packet, but let the last ones land
		_ = cmd.Process.Signal(syscall.SIGINT)
		_ = cmd.Wait()
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		pk, err := parsePcap(b)
		if err != nil {
			t.Fatal(err)
		}
		return pk
	}
}

type discard struct{}

func (discard) Write(b []byte) (int, error) { return len(b), nil }

// parsePcap reads an Ethernet pcap with nanosecond times (what Tcpdump
// writes) into TCP packets; other packets are skipped.
func parsePcap(b []byte) ([]Packet, error) {
	if len(b) < 24 {
		return nil, fmt.Errorf("pcap: short file")
	}
	le := binary.LittleEndian
	if le.Uint32(b) != 0xa1b23c4d {
		return nil, fmt.Errorf("pcap: magic %x, want nanosecond little endian", le.Uint32(b))
	}
	if lt := le.Uint32(b[20:]); lt != 1 {
		return nil, fmt.Errorf("pcap: link type %d, want Ethernet", lt)
	}
	var out []Packet
	be := binary.BigEndian
	for off := 24; off+16 <= len(b); {
		sec, nsec := le.Uint32(b[off:]), le.Uint32(b[off+4:])
		incl := int(le.Uint32(b[off+8:]))
		off += 16
		if off+incl > len(b) {
			break
		}
		f := b[off : off+incl]
		off += incl
		if len(f) < 14 {
			continue
		}
		et := be.Uint16(f[12:])
		ip := f[14:]
		var p Packet
		p.Time = time.Unix(int64(sec), int64(nsec))
		var tcp []byte
		var ipPayload int
		switch et {
		case 0x0800:
			if len(ip) < 20 || ip[9] != 6 {
				continue
			}
			ihl := int(ip[0]&0xf) * 4
			total := int(be.Uint16(ip[2:]))
			if len(ip) < ihl+20 {
				continue
			}
			src, dst := netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
			tcp = ip[ihl:]
			ipPayload = total - ihl
			p.Src, p.Dst = netip.AddrPortFrom(src, be.Uint16(tcp)), netip.AddrPortFrom(dst, be.Uint16(tcp[2:]))
		case 0x86dd:
			if len(ip) < 60 || ip[6] != 6 {
				continue // no extension headers in these tests
			}
			src, dst := netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
			tcp = ip[40:]
			ipPayload = int(be.Uint16(ip[4:]))
			p.Src, p.Dst = netip.AddrPortFrom(src, be.Uint16(tcp)), netip.AddrPortFrom(dst, be.Uint16(tcp[2:]))
		default:
			continue
		}
		doff := int(tcp[12]>>4) * 4
		p.Seq, p.Ack = be.Uint32(tcp[4:]), be.Uint32(tcp[8:])
		p.Flags = tcp[13]
		p.Payload = ipPayload - doff
		out = append(out, p)
	}
	return out, nil
}

// Flow sums up one connection's packets as the kernel should count them.
type Flow struct {
	Client, Server netip.AddrPort
	// Bytes each way: payload in sequence space, each byte once however
	// often it was sent (what the receiver took); Sent counts every copy.
	ClientBytes, ServerBytes uint64
	ClientSent, ServerSent   uint64
	// Retransmitted data packets each way (a packet whose payload starts
	// below the highest sequence number already sent).
	ClientRetrans, ServerRetrans int
	SYN, Last                    time.Time // the first SYN, the last FIN or RST
	// Established is the client's first packet after a SYN-ACK: the
	// handshake's ACK (zero if none was seen).
	Established          time.Time
	ClientRST, ServerRST bool
}

// Summarize sums up the packets of the connection from client to server.
func Summarize(pk []Packet, client, server netip.AddrPort) Flow {
	f := Flow{Client: client, Server: server}
	var high [2]uint32
	var started [2]bool
	for _, p := range pk {
		p.Src = netip.AddrPortFrom(p.Src.Addr().Unmap(), p.Src.Port())
		p.Dst = netip.AddrPortFrom(p.Dst.Addr().Unmap(), p.Dst.Port())
		var d int
		switch {
		case p.Src == client && p.Dst == server:
			d = 0
		case p.Src == server && p.Dst == client:
			d = 1
		default:
			continue
		}
		if p.Flags&FlagSYN != 0 {
			if d == 0 && f.SYN.IsZero() {
				f.SYN = p.Time
			}
			high[d] = p.Seq + 1
			started[d] = true
			continue
		}
		if d == 0 && started[1] && f.Established.IsZero() {
			f.Established = p.Time
		}
		if p.Flags&(FlagFIN|FlagRST) != 0 {
			f.Last = p.Time
			if p.Flags&FlagRST != 0 {
				if d == 0 {
					f.ClientRST = true
				} else {
					f.ServerRST = true
				}
			}
		}
		if p.Payload <= 0 || !started[d] {
			continue
		}
		end := p.Seq + uint32(p.Payload)
		sent, uniq, retrans := &f.ClientSent, &f.ClientBytes, &f.ClientRetrans
		if d == 1 {
			sent, uniq, retrans = &f.ServerSent, &f.ServerBytes, &f.ServerRetrans
		}
		*sent += uint64(p.Payload)
		if int32(p.Seq-high[d]) < 0 {
			*retrans++
		}
		if int32(end-high[d]) > 0 {
			*uniq += uint64(end - high[d])
			high[d] = end
		}
	}
	return f
}
