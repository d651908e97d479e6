package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

const tracefsDir = "/sys/kernel/tracing"

// findTcpstates locates libbpf-tools' tcpstates (Debian installs it in
// /usr/sbin, which a non-login root shell may not have on PATH).
func findTcpstates() (string, error) {
	if p, err := exec.LookPath("tcpstates"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/sbin/tcpstates", "/usr/bin/tcpstates", "/usr/sbin/libbpf-tcpstates"} {
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	return "", errors.New("tcpstates not found: install the Debian package libbpf-tools (apt-get install libbpf-tools)")
}

// ensureTracefs mounts tracefs when it is not, because tcpstates attaches to
// the sock:inet_sock_set_state tracepoint through it; unmount undoes only
// what it did.
func ensureTracefs() (unmount func(), err error) {
	if _, err := os.Stat(tracefsDir + "/events"); err == nil {
		return func() {}, nil
	}
	if err := syscall.Mount("tracefs", tracefsDir, "tracefs", 0, ""); err != nil {
		return nil, fmt.Errorf("mounting tracefs at %s: %w", tracefsDir, err)
	}
	return func() { _ = syscall.Unmount(tracefsDir, 0) }, nil
}

// tcpstatesObserver runs tcpstates system-wide for each B run with its output
// discarded, as the reference a user would otherwise pick.
func tcpstatesObserver(bin string) observer {
	return func(ctx context.Context) (func() (string, error), error) {
		cmd := exec.Command(bin)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		// tcpstates says nothing on stdout about being attached; give it the
		// time to load and attach, and fail if it exits meanwhile.
		select {
		case err := <-exited:
			return nil, fmt.Errorf("tcpstates exited (%v): %s", err, strings.TrimSpace(stderr.String()))
		case <-ctx.Done():
			_ = cmd.Process.Kill()
			<-exited
			return nil, ctx.Err()
		case <-time.After(time.Second):
		}
		return func() (string, error) {
			_ = cmd.Process.Signal(syscall.SIGINT)
			select {
			case <-exited:
			case <-time.After(5 * time.Second):
				_ = cmd.Process.Kill()
				<-exited
			}
			return "", nil
		}, nil
	}
}

// runB1p is B1's storm with tcpstates attached instead of the agent.
func runB1p(ctx context.Context, p Params, prev []Row, progress func(string, ...any)) []Row {
	row := Row{ID: "B1p", What: "conn-rate ratio, tcpstates ÷ none (peer)", Target: "ours >= peer's", Met: "n/a", Figures: "n/a"}
	fail := func(err error) []Row {
		row.Note = err.Error()
		return []Row{row}
	}
	bin, err := findTcpstates()
	if err != nil {
		return fail(err)
	}
	unmount, err := ensureTracefs()
	if err != nil {
		return fail(err)
	}
	defer unmount()
	cgA, err := newCgroup("pa")
	if err != nil {
		return fail(err)
	}
	defer cgA.Remove()
	cgB, err := newCgroup("pb")
	if err != nil {
		return fail(err)
	}
	defer cgB.Remove()

	progress("B1p: %d pairs, storm %g s x %d workers, B with %s (system-wide, output discarded)", p.Pairs, p.StormSeconds, p.Workers, bin)
	recs, err := runPairs(ctx, "B1p", p, cgA, cgB, false, tcpstatesObserver(bin), progress)
	if len(recs) == 0 {
		if err == nil {
			err = errors.New("no pairs")
		}
		return fail(err)
	}
	var ratios, rateA, rateB []float64
	for _, r := range recs {
		ratios, rateA, rateB = append(ratios, r.ConnRatio), append(rateA, r.RateA), append(rateB, r.RateB)
	}
	peer := median(ratios)
	row.Figures = fmt.Sprintf("%.3f (%d pairs, min %.3f max %.3f; %.0f vs %.0f conn/s)", peer, len(recs), minOf(ratios), maxOf(ratios), median(rateB), median(rateA))
	row.Data = map[string]any{"median_ratio": peer, "median_rate_a": median(rateA), "median_rate_b": median(rateB), "pairs": recs, "tcpstates": bin}
	ours, haveOurs := 0.0, false
	for _, r := range prev {
		if r.ID == "B1" && r.Data != nil {
			if v, ok := r.Data["median_ratio"].(float64); ok && strings.HasPrefix(r.What, "conn-rate") {
				ours, haveOurs = v, true
			}
		}
	}
	if haveOurs {
		row.Figures += fmt.Sprintf("; ours %.3f", ours)
		row.Met = metStr(ours >= peer)
	} else {
		row.Note = "B1 did not run: nothing to compare"
	}
	if err != nil {
		row.Note = fmt.Sprintf("stopped early: %v", err)
	}
	if len(recs) < 5 {
		row.Met = "n/a"
	}
	return []Row{row}
}
