package bpf

import (
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/flowbus/flowbus/bpf/cgrouptest"
	"github.com/flowbus/flowbus/bpf/netnstest"
)

// takenSlots counts the socket slots a socket holds.
func takenSlots(t *testing.T, c *Capture) int {
	t.Helper()
	n := 0
	iter := c.objs.Slots.Iterate()
	var k uint32
	var v flowbusSockSlot
	for iter.Next(&k, &v) {
		if v.Cookie != 0 {
			n++
		}
	}
	if err := iter.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestSlotsGivenBack: every socket slot sock_create took is given back once
// its socket is gone, whatever the way it went: 40 connections that
// complete and close (both ends in the watched cgroup, on a veth pair), 20
// refused (RST to the SYN), the listener itself (its state moves to socket
// storage at bind), and a connection held open meanwhile, whose slot is
// held until it closes; with end events (the close gives the slot back)
// and without (the release does). A slot never
// given back would not lose an event, but would send every later socket
// that maps to it to socket storage, at the cost this design avoids.
func TestSlotsGivenBack(t *testing.T) {
	for _, noEnds := range []bool{false, true} {
		t.Run("ends="+strconv.FormatBool(!noEnds), func(t *testing.T) {
			cgrouptest.RequirePrivileged(t)
			pair := netnstest.New(t)
			watched := cgrouptest.NewChild(t)
			c, col := runCaptureWith(t, Options{CgroupPath: watched.Path, NoEnds: noEnds})
			held := startHelper(t, watched, helperExes(t, "fbclient")["fbclient"], 4242, "proc-connect", testServer(t))
			port, stop := netnstest.Server(t, watched, pair.A, 128)
			const n, refused = 40, 20
			res := netnstest.Clients(t, watched, pair.B, strconv.Itoa(n), net.JoinHostPort(pair.A4.String(), strconv.Itoa(port)))
			if len(res.Conns) != n {
				t.Fatalf("%d of %d connections (%s)", len(res.Conns), n, res.Err)
			}
			bad := netnstest.Clients(t, watched, pair.B, strconv.Itoa(refused), net.JoinHostPort(pair.A4.String(), strconv.Itoa(port+1)))
			if len(bad.Conns) != 0 {
				t.Fatalf("%d connections to a closed port completed", len(bad.Conns))
			}
			during := takenSlots(t, c) // the held connection's
			stop()
			held.stop()
			col.wait(2*n, 300*time.Millisecond)
			if !noEnds {
				col.waitEnds(2*n, 300*time.Millisecond, 10*time.Second)
			}
			var after int
			for i := 0; i < 50; i++ {
				if after = takenSlots(t, c); after == 0 {
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			t.Logf("slots held: %d with one connection open, %d after every socket closed", during, after)
			if during != 1 || after != 0 {
				t.Errorf("want the open connection's slot held and none once every socket is gone")
			}
		})
	}
}
