package agent

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/bpf"
	"github.com/flowbus/flowbus/bpf/cgrouptest"
)

// Every bad filter is reported at once, each naming its variable and what
// to write instead.
func TestConfigFilterProblems(t *testing.T) {
	_, err := LoadConfig(map[string]string{
		"FLOWBUS_FILTER_DIRECTION":  "inbound",
		"FLOWBUS_FILTER_PORTS":      "80,70000",
		"FLOWBUS_FILTER_SKIP_PORTS": "10-5",
		"FLOWBUS_FILTER_CIDRS":      "10.0.0.0/33",
		"FLOWBUS_FILTER_SKIP_CIDRS": "fe80::1%eth0",
		"FLOWBUS_FILTER_COMMS":      "a-name-longer-than-15",
		"FLOWBUS_FILTER_SKIP_COMMS": "ok,",
		"FLOWBUS_BATCH_MAX_EVENTS":  "0", // reported with the others
	})
	var ce *ConfigError
	if !errors.As(err, &ce) {
		t.Fatalf("want a ConfigError, got %v", err)
	}
	for _, want := range []string{
		`FLOWBUS_FILTER_DIRECTION: "inbound": must be both, incoming or outgoing`,
		`FLOWBUS_FILTER_PORTS: "70000" is not a port: write a number from 1 to 65535`,
		`FLOWBUS_FILTER_SKIP_PORTS: range "10-5" runs backwards: write the lower port first (5-10)`,
		`FLOWBUS_FILTER_CIDRS: "10.0.0.0/33" is not a CIDR prefix`,
		`FLOWBUS_FILTER_SKIP_CIDRS: "fe80::1%eth0" is not a CIDR prefix`,
		`FLOWBUS_FILTER_COMMS: command name "a-name-longer-than-15": must be 1 to 15 bytes`,
		`FLOWBUS_BATCH_MAX_EVENTS:`,
	} {
		found := false
		for _, p := range ce.Problems {
			found = found || strings.HasPrefix(p, want)
		}
		if !found {
			t.Errorf("no problem starting %q in:\n%s", want, strings.Join(ce.Problems, "\n"))
		}
	}
	for _, p := range ce.Problems {
		if strings.HasPrefix(p, "FLOWBUS_FILTER_SKIP_COMMS") {
			t.Errorf("a trailing comma is no error: %s", p)
		}
	}
	if len(ce.Problems) != 7 {
		t.Errorf("%d problems, want 7:\n%s", len(ce.Problems), strings.Join(ce.Problems, "\n"))
	}
}

// Valid filters parse into what the kernel gets; unset, only the agent's
// own connections are dropped.
func TestConfigFilter(t *testing.T) {
	cfg, err := LoadConfig(map[string]string{
		"FLOWBUS_FILTER_DIRECTION":  "outgoing",
		"FLOWBUS_FILTER_PORTS":      " 443, 8000-8999 ,",
		"FLOWBUS_FILTER_SKIP_PORTS": "8080",
		"FLOWBUS_FILTER_CIDRS":      "10.1.2.3/8,fd00::/8,::ffff:192.168.0.0/112,192.0.2.7",
		"FLOWBUS_FILTER_COMMS":      "curl,nginx",
		"FLOWBUS_FILTER_SKIP_COMMS": "exactly15bytes_",
	})
	if err != nil {
		t.Fatal(err)
	}
	f := cfg.Filter()
	if f.Direction != "outgoing" || !f.ExcludeSelf || len(f.Ports) != 2 || f.Ports[1] != (bpf.PortRange{First: 8000, Last: 8999}) ||
		len(f.ExcludePorts) != 1 || f.ExcludePorts[0].First != 8080 {
		t.Errorf("filter %+v", f)
	}
	want := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8"),
		netip.MustParsePrefix("192.168.0.0/16"), netip.MustParsePrefix("192.0.2.7/32")}
	if len(f.CIDRs) != len(want) {
		t.Fatalf("cidrs %v, want %v", f.CIDRs, want)
	}
	for i := range want {
		if f.CIDRs[i] != want[i] {
			t.Errorf("cidr %d: %v, want %v", i, f.CIDRs[i], want[i])
		}
	}
	if strings.Join(f.Comms, ",") != "curl,nginx" || strings.Join(f.ExcludeComms, ",") != "exactly15bytes_" {
		t.Errorf("comms %v, skip %v", f.Comms, f.ExcludeComms)
	}
	if got := f.String(); got != "direction=outgoing ports=443,8000-8999 exclude_ports=8080 cidrs=10.0.0.0/8,fd00::/8,192.168.0.0/16,192.0.2.7/32 comms=curl,nginx exclude_comms=exactly15bytes_ exclude_self" {
		t.Errorf("String: %s", got)
	}

	def, err := LoadConfig(map[string]string{})
	if err != nil {
		t.Fatal(err)
	}
	if f := def.Filter(); f.String() != "exclude_self" {
		t.Errorf("default filter: %s", f.String())
	}
}

// The agent exports the kernel's drops by reason: with only incoming
// begins kept, every outgoing connection of the traffic is counted under
// direction, and neither its begin nor its end is published.
func TestMetricFilteredEvents(t *testing.T) {
	cgrouptest.RequirePrivileged(t)
	cg := cgrouptest.NewChild(t)
	cfg := testConfig(t, cg.Path)
	cfg.FilterDirection = "incoming"
	a := startAgent(t, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, err := ServeMetrics(ctx, "127.0.0.1:0", a, testBuild, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	const n = 10
	cg.Traffic(t, "127.0.0.1", n, false)
	deadline := time.Now().Add(10 * time.Second)
	for (a.Snapshot().Publisher.EventsAcked < n || a.Snapshot().Publisher.EndsAcked < n || a.Snapshot().Kernel.FilteredDirection < n) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // anything extra shows
	_, page := get(t, "http://"+addr.String()+"/metrics")
	for sample, want := range map[string]float64{
		`flowbus_agent_filtered_events_total{reason="direction"}`: n,
		`flowbus_agent_filtered_events_total{reason="port"}`:      0,
		`flowbus_agent_filtered_events_total{reason="cidr"}`:      0,
		`flowbus_agent_filtered_events_total{reason="comm"}`:      0,
		`flowbus_agent_filtered_events_total{reason="self"}`:      0,
		`flowbus_agent_events_total{stage="captured"}`:            n,
		`flowbus_agent_events_total{stage="acked"}`:               n,
		`flowbus_agent_ends_total{stage="captured"}`:              n,
		`flowbus_agent_ends_total{stage="acked"}`:                 n,
	} {
		if got := metric(t, page, sample); got != want {
			t.Errorf("%s = %v, want %v", sample, got, want)
		}
	}
}
