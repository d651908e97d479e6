package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
)

// `top --by bytes` and `top --by process` answer from what `run --once` stored of begins and ends
// published with the real encoders: every end is in the peers' table, the JSON ports are numbers, and
// summary shows the end totals.
func TestTopByBytesAndProcess(t *testing.T) {
	f := newFixture(t)
	f.fleet.Ends = true
	f.fleet.Publish(t, f.rec, 20)
	db := filepath.Join(t.TempDir(), "flowstat.db")
	e := map[string]string{"FLOWBUS_NATS_URL": f.srv.URL, "FLOWBUS_DB": db}
	if code, _, stderr := runCLI(t, e, "run", "--once"); code != exitOK {
		t.Fatalf("run --once: exit %d\n%s", code, stderr)
	}
	code, out, stderr := runCLI(t, e, "top", "--by", "bytes", "--since", "2h", "--limit", "100000", "--json")
	var top struct {
		Peers []struct {
			Ends  int64 `json:"ends"`
			Bytes int64 `json:"bytes"`
		} `json:"peers"`
		Ports []struct {
			Key int `json:"key"`
		} `json:"ports"`
	}
	if code != exitOK || json.Unmarshal([]byte(out), &top) != nil {
		t.Fatalf("top --by bytes: exit %d: %s\n%s", code, stderr, out)
	}
	var ends int64
	for i, p := range top.Peers {
		ends += p.Ends
		if i > 0 && p.Bytes > top.Peers[i-1].Bytes {
			t.Errorf("peers not ordered by bytes: %+v", top.Peers)
		}
	}
	if ends != int64(f.rec.EndEvents()) || len(top.Ports) == 0 || top.Ports[0].Key == 0 {
		t.Errorf("top --by bytes: %d ends in the peers (want %d), ports %+v", ends, f.rec.EndEvents(), top.Ports)
	}
	code, out, _ = runCLI(t, e, "top", "--by", "bytes", "--since", "2h")
	if code != exitOK || !strings.Contains(out, "Top peers by bytes") || !strings.Contains(out, "MEAN DURATION") || !strings.Contains(out, "fin=") {
		t.Errorf("top --by bytes table: exit %d\n%s", code, out)
	}
	code, out, _ = runCLI(t, e, "top", "--by", "process", "--since", "2h")
	if code != exitOK || !strings.Contains(out, "proc[") || !strings.Contains(out, "Top processes") {
		t.Errorf("top --by process: exit %d\n%s", code, out)
	}
	code, out, _ = runCLI(t, e, "summary")
	if code != exitOK || !strings.Contains(out, "ENDS") || !strings.Contains(out, "MEAN DURATION") {
		t.Errorf("summary: exit %d\n%s", code, out)
	}
	if code, _, stderr := runCLI(t, e, "top", "--by", "frob"); code != exitUsage || !strings.Contains(stderr, "bytes, process") {
		t.Errorf("top --by frob: exit %d, %s", code, stderr)
	}
}
