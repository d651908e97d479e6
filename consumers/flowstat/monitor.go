package flowstat

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Monitor lets health probes and Prometheus see a Run: give it to Options.Monitor and serve Handler.
// /healthz answers while the process is alive; /readyz only while Run is connected to NATS, its
// database answers and its durable consumer is bound; /metrics has the counters of what was committed.
// The zero value is not usable: use NewMonitor.
type Monitor struct {
	mu    sync.Mutex
	state string // why Run is not consuming yet (or any more); "" while it consumes
	nc    *nats.Conn
	st    *store.Store
	// committing is set while a commit runs: SQLite has one connection, so a ping would wait behind a
	// long transaction and a busy consumer would look unready.
	committing atomic.Bool

	reg                                             *prometheus.Registry
	events, batches, commits, notCopied, gaps, dups prometheus.Counter
	restarts, restartMissing                        prometheus.Counter
	committedSeq, pending, lastCommit               prometheus.Gauge
	dead                                            *prometheus.CounterVec
	commitLatency                                   prometheus.Histogram
	// commitStart is when the running commit began; only Run's goroutine touches it.
	commitStart time.Time
	// everCommitted: lastCommit holds a commit's time, not the time consuming began.
	everCommitted bool
}

// DeadLetterReasons are the values of the reason label of flowbus_flowstat_dead_letters_total, each
// exported from the start so that an increase from 0 is seen.
var DeadLetterReasons = []string{ReasonMalformed, ReasonTruncated, ReasonUnsupportedMajor, ReasonSubjectMismatch}

// NewMonitor returns a Monitor in the "starting" state, with its metrics registered.
func NewMonitor() *Monitor {
	m := &Monitor{state: "starting", reg: prometheus.NewRegistry()}
	counter := func(name, help string) prometheus.Counter {
		c := prometheus.NewCounter(prometheus.CounterOpts{Name: "flowbus_flowstat_" + name, Help: help})
		m.reg.MustRegister(c)
		return c
	}
	gauge := func(name, help string) prometheus.Gauge {
		g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "flowbus_flowstat_" + name, Help: help})
		m.reg.MustRegister(g)
		return g
	}
	m.events = counter("events_total", "Events counted into the database (committed).")
	m.batches = counter("batches_total", "Valid batches counted into the database (committed).")
	m.commits = counter("commits_total", "Transactions committed (aggregates with the checkpoint).")
	m.dead = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "flowbus_flowstat_dead_letters_total",
		Help: "Messages that were not valid batches (dead letters), committed, by reason (the Flowbus-Deadletter-Reason header)."}, []string{"reason"})
	m.reg.MustRegister(m.dead)
	for _, r := range DeadLetterReasons {
		m.dead.WithLabelValues(r)
	}
	m.notCopied = counter("dead_letters_not_copied_total", "Dead letters whose copy to the dead-letter subject failed.")
	m.gaps = counter("gaps_total", "Breaks in batch chains recorded (missing batches).")
	m.restarts = counter("restarts_total", "Agent restarts recorded: first batches of a direction naming the previous run of their host.")
	m.restartMissing = counter("restart_missing_batches_total", "Batches of previous runs that had not arrived when the next run named them (where told); later arrivals lower the summary, not this.")
	m.dups = counter("duplicate_batches_total", "Messages repeating a batch already counted (not counted again).")
	m.committedSeq = gauge("committed_sequence", "Stream sequence up to which everything is committed (the checkpoint).")
	m.pending = gauge("pending_messages", "Messages in the stream after the last one read (the consumer's lag), as of that message.")
	m.lastCommit = gauge("last_commit_timestamp_seconds", "Unix time of the last commit; before the first one, of when consuming began (0 before that).")
	// From a millisecond (a few rows in SQLite) to tens of seconds (a large chunk on a slow PostgreSQL).
	m.commitLatency = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "flowbus_flowstat_commit_latency_seconds",
		Help:    "Time one commit takes: the transaction writing a chunk's aggregates with the checkpoint.",
		Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 12)})
	m.reg.MustRegister(m.commitLatency)
	m.reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "flowbus_flowstat_ready", Help: "1 while consuming: connected to NATS with the durable consumer bound."},
			func() float64 {
				if m.consuming() == nil {
					return 1
				}
				return 0
			}),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Handler serves /healthz, /readyz and /metrics.
func (m *Monitor) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := m.Ready(r.Context()); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	return mux
}

// Ready returns nil when Run consumes: connected to NATS, the durable consumer bound and the database
// answering; otherwise what is missing.
func (m *Monitor) Ready(ctx context.Context) error {
	if err := m.consuming(); err != nil {
		return err
	}
	m.mu.Lock()
	st := m.st
	m.mu.Unlock()
	if m.committing.Load() {
		return nil // a commit is in progress: the database answers
	}
	pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := st.DB().PingContext(pctx); err != nil && !m.committing.Load() {
		return fmt.Errorf("database %s does not answer: %v", st.Where(), err)
	}
	return nil
}

// consuming is Ready without the database ping.
func (m *Monitor) consuming() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case m.state != "":
		return errors.New(m.state)
	case !m.nc.IsConnected():
		return fmt.Errorf("not connected to NATS (%s)", m.nc.Status())
	}
	return nil
}

// The methods below are nil-safe, so Run calls them whether or not it has a Monitor.

func (m *Monitor) setState(state string) {
	if m == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.state = state
}

// bound records that Run consumes through nc into st.
func (m *Monitor) bound(nc *nats.Conn, st *store.Store) {
	if m == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.nc, m.st, m.state = nc, st, ""
	if !m.everCommitted {
		// Nothing committed yet: the age of the last commit counts from now, so that a consumer which
		// never manages its first commit still ages.
		m.lastCommit.Set(float64(time.Now().UnixNano()) / 1e9)
	}
}

func (m *Monitor) setCommitting(b bool) {
	if m == nil {
		return
	}
	if b {
		m.commitStart = time.Now()
	}
	m.committing.Store(b)
}

// committed adds what one commit wrote.
func (m *Monitor) committed(d *store.Delta, seq uint64) {
	if m == nil {
		return
	}
	now := time.Now()
	if !m.commitStart.IsZero() {
		m.commitLatency.Observe(now.Sub(m.commitStart).Seconds())
		m.commitStart = time.Time{}
	}
	m.mu.Lock()
	m.everCommitted = true
	m.mu.Unlock()
	m.lastCommit.Set(float64(now.UnixNano()) / 1e9)
	m.commits.Inc()
	m.events.Add(float64(d.Events))
	m.batches.Add(float64(d.Messages))
	m.gaps.Add(float64(len(d.Gaps)))
	m.dups.Add(float64(len(d.Dups)))
	m.restarts.Add(float64(len(d.Restarts)))
	for _, r := range d.Restarts {
		if r.Missing > 0 {
			m.restartMissing.Add(float64(r.Missing))
		}
	}
	for _, dl := range d.Dead {
		m.dead.WithLabelValues(dl.Reason).Inc()
		if !dl.Copied {
			m.notCopied.Inc()
		}
	}
	m.committedSeq.Set(float64(seq))
}

func (m *Monitor) setPending(n uint64) {
	if m != nil {
		m.pending.Set(float64(n))
	}
}

func (m *Monitor) setCheckpoint(seq uint64) {
	if m != nil {
		m.committedSeq.Set(float64(seq))
	}
}
