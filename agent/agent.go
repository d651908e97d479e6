// Package agent is the flowbus host agent: it captures the beginning of
// every TCP connection on a cgroup (bpf), enriches it (enrich), batches and
// publishes it to NATS JetStream (publisher). Start wires the stages and Run
// moves events until it is told to stop, then shuts the stages down in
// order. Configuration comes from FLOWBUS_* environment variables (Config).
package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/flowbus/flowbus/agent/enrich"
	"github.com/flowbus/flowbus/bpf"
	"github.com/flowbus/flowbus/dnscache"
	"github.com/flowbus/flowbus/internal/redact"
	"github.com/flowbus/flowbus/publisher"
	"github.com/flowbus/flowbus/publisher/embedded"
	"github.com/flowbus/flowbus/publisher/spool"
	"github.com/flowbus/flowbus/schema"
)

// Agent wires the stages: capture (bpf), enrich, batch and publish
// (publisher). Each event passes each stage once, in that order.
type Agent struct {
	cfg   Config
	log   *slog.Logger
	runID string

	srv     *server.Server // embedded server, nil when FLOWBUS_NATS_URL is set
	nc      *nats.Conn
	pub     *publisher.Publisher
	capture *bpf.Capture
	self    *enrich.SelfFilter
	enrich  *enrich.Enricher

	batchMetrics *batchMetrics
	locks        agentLocks
	chain        *runChain // the record of this run for the next (runchain.go)

	kernelSeen       bpf.Counters // kernel counters already reported
	halfOpenOverflow uint64       // half-open overflows already reported
	health           *health
	// streamCreated: ensureStream succeeded at least once in this run.
	streamCreated atomic.Bool
}

// NewRunID returns a fresh random agent run id (16 lowercase hex digits).
func NewRunID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Start connects to NATS (starting the embedded server if needed), ensures
// the stream, and attaches the eBPF programs. Events flow once Run is called.
func Start(ctx context.Context, cfg Config, log *slog.Logger) (*Agent, error) {
	// The filter comes first: the NATS connections register with it.
	a := &Agent{cfg: cfg, log: log, runID: NewRunID(), self: enrich.NewSelfFilter()}
	// eBPF first: missing privileges or a wrong cgroup should be the first
	// and only thing the user hears about.
	var err error
	a.capture, err = bpf.Load(bpf.Options{
		CgroupPath:      cfg.CgroupPath,
		RingBytes:       cfg.RingbufBytes,
		PollInterval:    cfg.PollInterval,
		HalfOpenTimeout: cfg.HalfOpenTimeout,
		NoEnds:          !cfg.EndEvents,
		Filter:          cfg.Filter(),
	})
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			a.capture.Close()
			if a.enrich != nil {
				a.enrich.Close()
			}
			a.shutdownNATS()
			a.chain.close()
			a.locks.release()
		}
	}()
	// A spool that cannot be written would be found out at the first
	// outage, by dropping what it was meant to keep: refuse now.
	if cfg.SpoolDir != "off" {
		if err := spool.CheckWritable(cfg.SpoolDir); err != nil {
			return nil, err
		}
	}
	// Before anything is shared: a second agent on the same capture, store
	// or spool would double every event or corrupt the store.
	if a.locks, err = takeLocks(cfg, a.capture.CgroupPath, a.runID); err != nil {
		return nil, err
	}
	a.chain = openRunChain(cfg.RunStateFile, cfg.Host, a.runID, log)
	if err := checkListen("FLOWBUS_METRICS_ADDR", cfg.MetricsAddr); err != nil {
		return nil, err
	}
	if host, _, err := net.SplitHostPort(cfg.MetricsAddr); err == nil && !isLoopback(host) {
		// Metrics carry no secrets but name the host's cgroups, drop counts
		// and NATS state; say so rather than expose them silently.
		log.Warn("metrics are served beyond this host, without authentication: anyone who reaches the address can read /metrics, /healthz and /readyz; set FLOWBUS_METRICS_ADDR=127.0.0.1:9464 to keep them local",
			"metrics_addr", cfg.MetricsAddr)
	}
	if cfg.NATSURL == "" {
		// The embedded server fails at once too, but cannot say who holds
		// the port.
		if err := checkListen("FLOWBUS_EMBEDDED_LISTEN", cfg.EmbeddedListen); err != nil {
			return nil, err
		}
		if err := checkListen("FLOWBUS_EMBEDDED_MONITOR", cfg.EmbeddedMonitor); err != nil {
			return nil, err
		}
	}

	if cfg.NATSURL == "" {
		var srv *server.Server
		eo := embedded.Options{Listen: cfg.EmbeddedListen, StoreDir: cfg.EmbeddedStoreDir,
			Monitor: cfg.EmbeddedMonitor, Log: log}
		if cfg.EmbeddedUser != "" {
			if eo.Password, err = readEmbeddedPassword(cfg.EmbeddedPassFile); err != nil {
				return nil, fmt.Errorf("FLOWBUS_EMBEDDED_PASS_FILE: %w", err)
			}
			eo.User = cfg.EmbeddedUser
		}
		srv, err = embedded.Start(eo)
		if err != nil {
			return nil, err
		}
		a.srv = srv
		copts := []nats.Option{nats.InProcessServer(srv), nats.Name("flowagent " + cfg.Host)}
		if eo.User != "" {
			copts = append(copts, nats.UserInfo(eo.User, eo.Password))
		}
		// In-process: the agent's own connection never touches the network.
		a.nc, err = nats.Connect("", copts...)
		if err != nil {
			return nil, fmt.Errorf("connecting to the embedded NATS server: %w", err)
		}
		attrs := []any{"listen", srv.ClientURL(), "store_dir", cfg.EmbeddedStoreDir,
			"system_user", embedded.SystemUser, "system_password_file", embedded.SystemPasswordFile(cfg.EmbeddedStoreDir),
			"login_required", eo.User != ""}
		if m := srv.MonitorAddr(); m != nil {
			attrs = append(attrs, "monitor", "http://"+m.String())
		}
		log.Info("embedded NATS server with JetStream started", attrs...)
	} else {
		opts, err := NATSOptions(cfg, a.self, log)
		if err != nil {
			return nil, err
		}
		if a.nc, err = ConnectNATS(cfg, opts); err != nil {
			return nil, err
		}
		// After an outage the stream may be gone (deleted meanwhile, or
		// lost with a server's storage): look at once.
		logReconnect := a.nc.Opts.ReconnectedCB
		a.nc.SetReconnectHandler(func(nc *nats.Conn) {
			if logReconnect != nil {
				logReconnect(nc)
			}
			if a.health != nil {
				a.health.kick()
			}
		})
		if !a.nc.IsConnected() {
			log.Warn("NATS not reachable yet; starting anyway, batches are kept until it is", "url", redact.List(cfg.NATSURL))
		}
	}

	var sp *spool.Spool
	if cfg.SpoolDir != "off" {
		if sp, err = spool.Open(cfg.SpoolDir, cfg.SpoolBytes); err != nil {
			return nil, err
		}
		if sp.Len() > 0 {
			log.Info("spool from an earlier run found: it is published first", "batches", sp.Len(), "events", sp.Events(), "dir", cfg.SpoolDir)
		}
		if sp.Corrupt() > 0 {
			log.Warn("unreadable spool files set aside (*.corrupt)", "files", sp.Corrupt(), "dir", cfg.SpoolDir)
		}
	}
	a.batchMetrics = newBatchMetrics()
	a.health = newHealth(a)
	a.pub, err = publisher.New(a.nc, publisher.Config{
		Spool: sp,
		OnAck: func(events, bytes int, sealedAt time.Time) {
			a.health.acked()
			a.batchMetrics.observe(events, bytes, sealedAt)
		},
		Prefix:      cfg.SubjectPrefix,
		Host:        cfg.Host,
		RunID:       a.runID,
		MaxEvents:   cfg.BatchMaxEvents,
		MaxBytes:    cfg.BatchMaxBytes,
		Linger:      cfg.BatchLinger,
		MaxInflight: cfg.MaxInflight,
		QueueBytes:  cfg.QueueBytes,
		AckTimeout:  cfg.AckTimeout,
		ServerURL:   a.natsURL(),
		PrevRun:     a.chain.prevRun,
		OnSeal:      a.chain.sealed,
	}, log)
	if err != nil {
		return nil, err
	}
	a.pub.SetFailureReporter(a.health.publishFailed)

	if cfg.ManageStream {
		if a.srv == nil && !a.nc.IsConnected() {
			// Asking a server that is not there would hold up the capture for
			// the request's whole timeout; events are spooled meanwhile, and
			// the health watcher creates the stream once NATS answers.
			a.health.setQuiet(checkStream, fmt.Sprintf("stream %s not created yet: NATS is not reachable", cfg.Stream))
		} else if err := a.ensureStream(ctx); err != nil {
			if a.srv != nil {
				return nil, err
			}
			// A remote server may come later: keep trying while batches queue.
			log.Warn("stream not ready yet, retrying in the background", "stream", cfg.Stream, "err", err)
			a.health.setQuiet(checkStream, fmt.Sprintf("stream %s not created yet: %v", cfg.Stream, err))
		}
	}

	a.enrich = enrich.New(enrich.Config{
		CgroupRoot:        a.capture.CgroupPath,
		ContainersRefresh: 2 * time.Second,
		DNS: dnscache.Config{
			MaxEntries:      cfg.DNSCacheEntries,
			MaxBytes:        cfg.DNSCacheBytes,
			MaxNamesPerAddr: cfg.DNSMaxNames,
			MinTTL:          cfg.DNSMinTTL,
			MaxTTL:          cfg.DNSMaxTTL,
		},
		// The same bounds as the kernel's table of outstanding queries.
		MaxQueries:   bpf.DefaultQueryEntries,
		QueryTimeout: bpf.DefaultQueryTimeout,
	}, a.self, a.pub)
	if err := a.capture.Attach(); err != nil {
		return nil, err
	}
	a.chain.attached(time.Now())
	a.attribute()
	// The agent's own outgoing connections are always dropped in the
	// kernel; the rest is what FLOWBUS_FILTER_* asked for.
	f := cfg.Filter()
	f.ExcludeSelf = false
	log.Info("filters: "+f.String(), "agent_connections", "dropped in the kernel (outgoing); incoming ones to the embedded server in user space")
	if (len(f.Comms) > 0 || len(f.ExcludeComms) > 0) && len(a.capture.Attribution().Attached()) == 0 {
		log.Warn("command-name filters see no process on this kernel: FLOWBUS_FILTER_COMMS drops every begin, FLOWBUS_FILTER_SKIP_COMMS none",
			"attribution", a.capture.Attribution().Mechanism(), "fix", "filter by port or CIDR instead, or run a kernel with cgroup sock_create and connect hooks")
	}
	log.Info("flowagent attached", "cgroup", a.capture.CgroupPath, "host", cfg.Host, "run_id", a.runID,
		"subjects", schema.Subject(cfg.SubjectPrefix, cfg.Host, schema.Outgoing)+", "+schema.Subject(cfg.SubjectPrefix, cfg.Host, schema.Incoming),
		"end_subjects", schema.EndSubject(cfg.SubjectPrefix, cfg.Host, schema.Outgoing)+", "+schema.EndSubject(cfg.SubjectPrefix, cfg.Host, schema.Incoming),
		"half_open_timeout", a.capture.HalfOpenTimeout(), "stream", cfg.Stream)
	a.health.start(ctx)
	ok = true
	return a, nil
}

func (a *Agent) ensureStream(ctx context.Context) error {
	js, err := jetstream.New(a.nc)
	if err != nil {
		return err
	}
	storage := jetstream.FileStorage
	if a.cfg.StreamStorage == "memory" {
		storage = jetstream.MemoryStorage
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = publisher.EnsureStream(cctx, js, publisher.StreamSettings{
		Name:       a.cfg.Stream,
		Prefix:     a.cfg.SubjectPrefix,
		MaxAge:     a.cfg.StreamMaxAge,
		MaxBytes:   a.cfg.StreamMaxBytes,
		Replicas:   a.cfg.StreamReplicas,
		Storage:    storage,
		Duplicates: a.cfg.StreamDuplicates,
		MaxMsgSize: int32(a.cfg.BatchMaxBytes + publisher.MaxMsgHeadroom),
		Log:        a.log,
	})
	if err == nil {
		a.streamCreated.Store(true)
	}
	return err
}

// ClientURL is where consumers reach the embedded server ("" when remote).
func (a *Agent) ClientURL() string {
	if a.srv == nil {
		return ""
	}
	return a.srv.ClientURL()
}

// RunID is this agent run's id, part of every message id.
func (a *Agent) RunID() string { return a.runID }

// natsURL is the server the agent publishes to, for messages: credentials
// redacted.
func (a *Agent) natsURL() string {
	if a.srv != nil {
		return a.srv.ClientURL()
	}
	return redact.List(a.cfg.NATSURL)
}

// checkListen fails at once, naming the variable, when addr cannot be
// bound: another agent (or anything) already serving there would otherwise
// be found out late, or answer in this agent's place.
func checkListen(variable, addr string) error {
	if addr == "" || addr == "off" {
		return nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			holder := "another process (another flowagent?)"
			if pid, name := portHolder(addr); pid > 0 {
				holder = fmt.Sprintf("pid %d (%s)", pid, name)
			}
			return fmt.Errorf("%s=%s: address already in use: %s listens there: stop it, or set %s to a free address", variable, addr, holder, variable)
		}
		return fmt.Errorf("%s=%s: cannot listen: %w", variable, addr, err)
	}
	return ln.Close()
}

// portHolder finds the process listening on addr's TCP port, from /proc
// (Linux, this network namespace; processes of other users are visible to
// root only). It returns 0 when it cannot tell.
func portHolder(addr string) (int, string) {
	_, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return 0, ""
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || port == 0 {
		return 0, ""
	}
	sockets := map[string]bool{}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, _ := os.ReadFile(f)
		for _, l := range strings.Split(string(b), "\n") {
			// sl local_address rem_address st ... inode; st 0A is LISTEN.
			fs := strings.Fields(l)
			if len(fs) < 10 || fs[3] != "0A" {
				continue
			}
			i := strings.LastIndexByte(fs[1], ':')
			if p, err := strconv.ParseUint(fs[1][i+1:], 16, 16); err == nil && p == port {
				sockets["socket:["+fs[9]+"]"] = true
			}
		}
	}
	if len(sockets) == 0 {
		return 0, ""
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		fds, _ := os.ReadDir("/proc/" + p.Name() + "/fd")
		for _, fd := range fds {
			if l, err := os.Readlink("/proc/" + p.Name() + "/fd/" + fd.Name()); err == nil && sockets[l] {
				comm, _ := os.ReadFile("/proc/" + p.Name() + "/comm")
				return pid, strings.TrimSpace(string(comm))
			}
		}
	}
	return 0, ""
}

// writeReadyFile tells a supervisor (or the demo) that this agent runs,
// and which one: its pid and run id, so that an answer from another agent
// is never taken for this one's. Written whole, then renamed into place.
func (a *Agent) writeReadyFile() error {
	if a.cfg.ReadyFile == "" {
		return nil
	}
	content := fmt.Sprintf("pid=%d\nrun_id=%s\nnats_url=%s\nmetrics_addr=%s\n", os.Getpid(), a.runID, a.natsURL(), a.cfg.MetricsAddr)
	tmp := a.cfg.ReadyFile + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		return fmt.Errorf("FLOWBUS_READY_FILE: %w", err)
	}
	if err := os.Rename(tmp, a.cfg.ReadyFile); err != nil {
		return fmt.Errorf("FLOWBUS_READY_FILE: %w", err)
	}
	return nil
}

// Run moves events until ctx ends, then shuts the stages down in order:
// the capture detaches and drains the ring buffer, the enrich stage stops,
// the publisher waits (bounded by FLOWBUS_SHUTDOWN_TIMEOUT) for outstanding
// acks, and NATS goes last.
func (a *Agent) Run(ctx context.Context) error {
	pollDone := make(chan struct{})
	pollCtx, stopPoll := context.WithCancel(context.Background())
	go func() {
		defer close(pollDone)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-pollCtx.Done():
				return
			case <-t.C:
				a.reportKernelDrops()
			}
		}
	}()

	runErr := a.writeReadyFile()
	if runErr == nil {
		runErr = a.capture.Run(ctx, a.enrich)
		a.chain.detached()
		if a.cfg.ReadyFile != "" {
			_ = os.Remove(a.cfg.ReadyFile)
		}
	}
	// The watcher re-attaches and moves the capture lock: it stops first.
	a.health.close()
	stopPoll()
	<-pollDone
	a.reportKernelDrops()
	a.enrich.Close()

	sctx, cancel := context.WithTimeout(context.Background(), a.cfg.ShutdownTimeout)
	defer cancel()
	pubErr := a.pub.Close(sctx)
	a.chain.stopped() // after the close: nothing is sealed after it
	st := a.pub.Stats()
	// Acked and spooled apart: an outage must not read as "nothing sent".
	a.log.Info("flowagent stopped", "events", st.EventsIn, "acked", st.EventsAcked, "batches_acked", st.BatchesAcked,
		"batches_spooled", st.Spooled, "spool_batches_left", st.SpoolBatches, "spool_events_left", st.SpoolEvents,
		"drops_kernel", st.Drops.Kernel, "drops_queue", st.Drops.Queue, "drops_spool", st.Drops.Spool, "drops_publish", st.Drops.Publish)
	a.closeAll()
	return errors.Join(runErr, pubErr)
}

// closeAll lets go of the programs, NATS and the locks, in that order: the
// locks last, so that no second agent starts before this one has let go.
// The capture's maps stay open until here, for the counters.
func (a *Agent) closeAll() {
	a.capture.Close()
	a.shutdownNATS()
	a.locks.release()
}

// reportKernelDrops forwards new kernel losses to the publisher so that the
// next batch carries them.
func (a *Agent) reportKernelDrops() {
	c, err := a.capture.Counters()
	if err != nil {
		a.log.Warn("reading kernel counters", "err", err)
		return
	}
	lost := c.RingbufFull - a.kernelSeen.RingbufFull
	trunc := c.Truncated - a.kernelSeen.Truncated
	// An end lost in the kernel (ring full, or no socket storage for its
	// state) is an event lost too.
	ends := c.EndsLost - a.kernelSeen.EndsLost + c.NoStorage - a.kernelSeen.NoStorage
	a.kernelSeen = c
	if lost > 0 || trunc > 0 || ends > 0 {
		a.pub.AddDrops(schema.Drops{Kernel: lost + trunc + ends})
		a.log.Warn("events lost in the kernel", "ring_buffer_full", lost, "unreadable_headers", trunc, "ends", ends,
			"fix", "raise FLOWBUS_RINGBUF_BYTES or lower FLOWBUS_POLL_INTERVAL")
	}
	ho := a.capture.HalfOpen()
	if over := ho.Overflow - a.halfOpenOverflow; over > 0 {
		a.halfOpenOverflow = ho.Overflow
		a.log.Warn("half-open table full: incoming begins not tracked, they get no never_established end", "begins", over,
			"fix", "a SYN flood larger than the table; lower FLOWBUS_HALF_OPEN_TIMEOUT to free it sooner")
	}
}

func (a *Agent) shutdownNATS() {
	if a.nc != nil {
		a.nc.Close()
	}
	if a.srv != nil {
		a.srv.Shutdown()
		a.srv.WaitForShutdown()
	}
}

// Snapshot is every counter of the agent, for metrics and tests.
type Snapshot struct {
	Captured     uint64
	SelfExcluded uint64
	Ends         uint64 // ends that left the capture (never_established included)
	SelfEnds     uint64 // ends of the agent's own connections, not published
	HalfOpen     bpf.HalfOpenStats
	BadRecords   uint64
	Kernel       bpf.Counters
	Publisher    publisher.Stats
	DNS          dnscache.Stats
	DNSMatch     enrich.MatchStats
	DNSRecords   uint64
	StreamReady  bool
	Connected    bool
	// Checks are the readiness checks; Ready is true when all pass.
	Checks []Check
	Ready  bool
}

// Snapshot reads the counters.
func (a *Agent) Snapshot() Snapshot {
	k, _ := a.capture.Counters()
	e := a.enrich.Stats()
	checks := a.health.checks()
	ready := true
	for _, c := range checks {
		ready = ready && c.OK
	}
	return Snapshot{
		Captured:     a.capture.Events(),
		SelfExcluded: e.SelfExcluded,
		Ends:         a.capture.Ends(),
		SelfEnds:     e.SelfEnds,
		HalfOpen:     a.capture.HalfOpen(),
		BadRecords:   a.capture.BadRecords(),
		Kernel:       k,
		Publisher:    a.pub.Stats(),
		DNS:          e.DNS,
		DNSMatch:     e.Match,
		DNSRecords:   a.capture.DNSRecords(),
		StreamReady:  !a.health.isFailing(checkStream),
		Connected:    !a.health.isFailing(checkNATS), // the client's lock may be held for long
		Checks:       checks,
		Ready:        ready,
	}
}

// attribute logs where the process fields come from on this kernel and
// gives the sockets opened before the attach their process (a server
// started before the agent). A failure leaves those sockets unknown; it
// never stops the capture.
func (a *Agent) attribute() {
	a.log.Info("process attribution", "mechanism", a.capture.Attribution().Mechanism())
	st, err := a.capture.FillExisting()
	if err != nil {
		a.log.Warn("sockets opened before the start keep an unknown process", "err", err)
		return
	}
	args := []any{"processes", st.Processes, "sockets", st.Sockets, "already", st.Already,
		"failed", st.Failed, "mptcp_unknown", st.MPTCP, "took", st.Took}
	if st.Refused > 0 {
		args = append(args, "refused", st.Refused, "first_error", st.FirstError)
	}
	a.log.Info("sockets opened before the start attributed", args...)
}
