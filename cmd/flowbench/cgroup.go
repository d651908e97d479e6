package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"

	"github.com/flowbus/flowbus/cmd/internal/proctest"
)

// cgroup is a child cgroup v2 created for the benchmark.
type cgroup struct {
	*proctest.Cgroup
}

// newCgroup creates a fresh child of the cgroup v2 root.
func newCgroup(name string) (*cgroup, error) {
	c, err := proctest.NewCgroup("flowbus-bench-" + name + "-")
	if err != nil {
		return nil, err
	}
	return &cgroup{c}, nil
}

// command returns flowbench re-executed as a worker, started directly inside
// the cgroup so no packet escapes accounting.
func (c *cgroup) command(ctx context.Context, args ...string) *exec.Cmd {
	return c.Command(ctx, "/proc/self/exe", append([]string{workerCmd}, args...)...)
}

// runJSON runs a worker in the cgroup and decodes its JSON output into v.
func (c *cgroup) runJSON(ctx context.Context, v any, args ...string) error {
	cmd := c.command(ctx, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("worker %v: %w: %s", args, err, bytes.TrimSpace(stderr.Bytes()))
	}
	if err := json.Unmarshal(out, v); err != nil {
		return fmt.Errorf("worker %v output: %w", args, err)
	}
	return nil
}

// storm runs the connection storm worker in the cgroup.
func (c *cgroup) storm(ctx context.Context, workers int, seconds float64, ports bool) (proctest.LoadStormResult, error) {
	var r proctest.LoadStormResult
	args := []string{"storm", "-workers", fmt.Sprint(workers), "-seconds", fmt.Sprint(seconds)}
	if ports {
		args = append(args, "-ports")
	}
	err := c.runJSON(ctx, &r, args...)
	if err == nil && r.Seconds <= 0 {
		err = fmt.Errorf("storm worker reported %v s", r.Seconds)
	}
	return r, err
}

// paced runs the storm worker in the cgroup at a steady rate (connections/s).
func (c *cgroup) paced(ctx context.Context, workers int, seconds, rate float64) (proctest.LoadStormResult, error) {
	var r proctest.LoadStormResult
	err := c.runJSON(ctx, &r, "storm", "-workers", fmt.Sprint(workers), "-seconds", fmt.Sprint(seconds), "-rate", fmt.Sprint(rate))
	if err == nil && r.Seconds <= 0 {
		err = fmt.Errorf("storm worker reported %v s", r.Seconds)
	}
	return r, err
}

// bulk runs the single-stream worker in the cgroup.
func (c *cgroup) bulk(ctx context.Context, size int64) (proctest.BulkResult, error) {
	var r proctest.BulkResult
	err := c.runJSON(ctx, &r, "bulk", "-bytes", fmt.Sprint(size))
	if err == nil && r.Seconds <= 0 {
		err = fmt.Errorf("bulk worker reported %v s", r.Seconds)
	}
	return r, err
}
