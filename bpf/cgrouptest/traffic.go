package cgrouptest

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"syscall"
	"time"
)

// trafficHelper: args addr n refused. Runs inside the cgroup.
func trafficHelper(args []string) error {
	if len(args) != 3 {
		return fmt.Errorf("want addr n refused, got %q", args)
	}
	n, err := strconv.Atoi(args[1])
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(args[0], "0"))
	if err != nil {
		return err
	}
	defer ln.Close()
	accepted := make(chan error, 1)
	go func() {
		for i := 0; i < n; i++ {
			c, err := ln.Accept()
			if err != nil {
				accepted <- err
				return
			}
			// Echo one byte so the handshake and some data really happen.
			var b [1]byte
			if _, err := io.ReadFull(c, b[:]); err == nil {
				_, _ = c.Write(b[:])
			}
			c.Close()
		}
		accepted <- nil
	}()
	var res TrafficResult
	for i := 0; i < n; i++ {
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
		if err != nil {
			return err
		}
		if _, err := c.Write([]byte{'x'}); err != nil {
			return err
		}
		var b [1]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return err
		}
		res.Conns = append(res.Conns, Conn{Client: c.LocalAddr().String(), Server: c.RemoteAddr().String()})
		c.Close()
	}
	if err := <-accepted; err != nil {
		return err
	}
	if refused, _ := strconv.ParseBool(args[2]); refused {
		// A port that had a listener a moment ago has none now: the SYN is
		// answered by RST.
		l2, err := net.Listen("tcp", net.JoinHostPort(args[0], "0"))
		if err != nil {
			return err
		}
		port := l2.Addr().(*net.TCPAddr).Port
		l2.Close()
		_, err = net.DialTimeout("tcp", net.JoinHostPort(args[0], strconv.Itoa(port)), 2*time.Second)
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("connection to a closed port: want ECONNREFUSED, got %v", err)
		}
		res.RefusedPort = port
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}
