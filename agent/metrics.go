package agent

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/flowbus/flowbus/bpf"
)

// agentCollector reads the agent's counters at scrape time, so the hot path
// pays nothing for metrics.
type agentCollector struct {
	a *Agent

	events, drops, pending, pendingBytes, batches, bytes, dups, collisions, pubErrors, kernelDup, seenEvicted, atEstablished, ready *prometheus.Desc
	dnsEntries, dnsLookups, dnsAnswers, dnsEvictions, dnsExpired                                                                    *prometheus.Desc
	dnsQueries, dnsPending, checkOK                                                                                                 *prometheus.Desc
	dnsBytes, dnsNames, dnsDisplaced, dnsRecords, dnsDropped, dnsKernelCut                                                          *prometheus.Desc
	spoolBatches, spoolBytes, spoolEvents, spooled, spoolCorrupt                                                                    *prometheus.Desc
	ends, endDrops, halfOpenPending, halfOpenTimeout, confirmsLost                                                                  *prometheus.Desc
	filtered                                                                                                                        *prometheus.Desc
}

func newAgentCollector(a *Agent) *agentCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("flowbus_agent_"+name, help, labels, nil)
	}
	return &agentCollector{
		a:               a,
		events:          d("events_total", "Events by pipeline stage: captured (left the kernel), self_excluded (the agent's own connections the kernel let through: the server side of its connection to the embedded server), published (handed to batching), acked (stored by the stream).", "stage"),
		drops:           d("dropped_events_total", "Events lost, by the stage that lost them.", "stage"),
		filtered:        d("filtered_events_total", "Begins the kernel's filters dropped before the ring buffer (their connections get no end either), by the first test that failed: self (the agent's own outgoing connections), direction, port, cidr, comm (FLOWBUS_FILTER_*).", "reason"),
		ends:            d("ends_total", "End events (net_flow_tcp_end) by pipeline stage: captured (left the kernel, or made for a handshake that never completed), self_excluded, published, acked; never_established (those of captured made for an incoming handshake that did not complete within the half-open timeout).", "stage"),
		endDrops:        d("dropped_ends_total", "Ends lost, by where: kernel_ringbuf (ring buffer full), kernel_storage (no socket storage for the begin), half_open_overflow (an incoming begin the half-open table had no room for), queue, spool, publish (also in dropped_events_total).", "stage"),
		halfOpenPending: d("half_open_pending", "Incoming begins taken at the SYN-ACK whose handshake has not completed yet (bounded by the half-open table)."),
		halfOpenTimeout: d("half_open_timeout_seconds", "How long an incoming handshake may take before its begin gets a never_established end (FLOWBUS_HALF_OPEN_TIMEOUT)."),
		confirmsLost:    d("half_open_confirms_lost_total", "Completed handshakes whose confirmation the ring buffer had no room for: each got a never_established end instead of its real one."),
		pending:         d("pending_batches", "Batches sealed and not yet acknowledged."),
		pendingBytes:    d("pending_bytes", "Bytes of batches sealed and not yet acknowledged."),
		batches:         d("batches_acked_total", "Batches acknowledged by the stream."),
		bytes:           d("batch_bytes_acked_total", "Encoded bytes acknowledged by the stream."),
		dups:            d("duplicate_acks_total", "Batches the stream already held (retries after a lost ack)."),
		collisions:      d("id_collisions_total", "Duplicate acks for a message another publisher stored under the batch's id (read back and compared); each such batch was republished under a fresh random id."),
		pubErrors:       d("publish_errors_total", "Failed publish attempts (each retried or given up)."),
		kernelDup:       d("synack_retransmits_suppressed_total", "Retransmitted SYN-ACKs the kernel did not report again."),
		seenEvicted:     d("synack_table_evictions_total", "Incoming handshakes under way whose entry in the kernel's table of SYN-ACKs (65,536 handshakes) went to a newer one: a SYN flood past that many half-open handshakes. Each may get a second begin, from a retransmitted SYN-ACK or at its handshake's end."),
		atEstablished:   d("begins_at_established_total", "Incoming begins emitted when the handshake completed, because the kernel sent no SYN-ACK the egress program could see: SYN cookies (a SYN flood or an overloaded listener), and handshakes under way when the programs attached."),
		ready:           d("ready", "1 when every readiness check passes (flowbus_agent_check_ok); /readyz names the ones that fail."),
		checkOK:         d("check_ok", "1 when the readiness check passes: nats (connected), stream (exists and takes the agent's subjects), acks (the stream answered within FLOWBUS_ACK_TIMEOUT), cgroup (the watched cgroup exists and the programs are attached to it).", "check"),
		dnsEntries:      d("dns_cache_entries", "Addresses held in the DNS cache."),
		spoolBatches:    d("spool_batches", "Batches waiting in the on-disk spool."),
		spoolBytes:      d("spool_bytes", "Disk space used by the spool."),
		spoolEvents:     d("spool_events", "Events waiting in the on-disk spool."),
		spooled:         d("spooled_batches_total", "Batches written to the spool (memory bound reached, or unacknowledged at shutdown)."),
		spoolCorrupt:    d("spool_corrupt_files", "Spool files found unreadable at start and set aside as *.corrupt: their events are lost, in a number the file no longer tells."),
		dnsLookups:      d("dns_cache_lookups_total", "DNS cache lookups by result (hit: names found).", "result"),
		dnsAnswers:      d("dns_messages_total", "DNS messages seen, each in one outcome: learned (every answer record read, its addresses learned), partial (cut or broken after some addresses, which were learned), truncated (cut before any address), malformed (not a parsable DNS message), ignored (nothing to learn), lost (ring buffer full), unsolicited (answers no query a watched socket sent; never learned).", "outcome"),
		dnsEvictions:    d("dns_cache_evictions_total", "Addresses removed from the DNS cache, by reason: entries (FLOWBUS_DNS_CACHE_ENTRIES), bytes (FLOWBUS_DNS_CACHE_BYTES), ttl (all its names expired).", "reason"),
		dnsBytes:        d("dns_cache_bytes", "Memory the DNS cache holds, as it accounts it against FLOWBUS_DNS_CACHE_BYTES."),
		dnsNames:        d("dns_cache_names", "Distinct names held in the DNS cache (each stored once however many addresses share it)."),
		dnsDisplaced:    d("dns_cache_names_displaced_total", "Names pushed out of an address that held FLOWBUS_DNS_MAX_NAMES names."),
		dnsRecords:      d("dns_records_learned_total", "A and AAAA records learned from DNS answers."),
		dnsDropped:      d("dns_records_dropped_total", "Answer records not read, by reason: cut (past the end of what the kernel copied or of a TCP segment), malformed (unparsable, or after one that was).", "reason"),
		dnsKernelCut:    d("dns_cut_in_kernel_total", "DNS messages longer than the 2047 bytes the kernel copies, passed on in part (each also counted in dns_messages_total)."),
		dnsExpired:      d("dns_cache_expired_total", "Names dropped from the DNS cache when their TTL ran out."),
		dnsQueries:      d("dns_queries_total", "DNS queries the watched sockets sent, by outcome: answered (an answer with its id and question came), expired (none came in time), evicted (pushed out by the bound on outstanding queries), malformed (no single question: not tracked), lost (ring buffer full).", "outcome"),
		dnsPending:      d("dns_queries_outstanding", "DNS queries waiting for their answer."),
	}
}

func (c *agentCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.dnsQueries
	ch <- c.dnsPending
	ch <- c.checkOK
	for _, d := range []*prometheus.Desc{c.events, c.drops, c.pending, c.pendingBytes, c.batches, c.bytes, c.dups, c.collisions, c.pubErrors, c.kernelDup, c.seenEvicted, c.atEstablished, c.ready,
		c.dnsEntries, c.dnsLookups, c.dnsAnswers, c.dnsEvictions, c.dnsExpired, c.dnsBytes, c.dnsNames, c.dnsDisplaced, c.dnsRecords, c.dnsDropped, c.dnsKernelCut, c.spoolBatches, c.spoolBytes, c.spoolEvents, c.spooled, c.spoolCorrupt,
		c.ends, c.endDrops, c.halfOpenPending, c.halfOpenTimeout, c.confirmsLost, c.filtered} {
		ch <- d
	}
}

func (c *agentCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.a.Snapshot()
	p := s.Publisher
	counter := func(d *prometheus.Desc, v uint64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), l...)
	}
	gauge := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v)
	}
	counter(c.events, s.Captured, "captured")
	counter(c.events, s.SelfExcluded, "self_excluded")
	counter(c.events, p.EventsIn, "published")
	counter(c.events, p.EventsAcked, "acked")
	counter(c.ends, s.Ends, "captured")
	counter(c.ends, s.HalfOpen.NeverEstablished, "never_established")
	counter(c.ends, s.SelfEnds, "self_excluded")
	counter(c.ends, p.EndsIn, "published")
	counter(c.ends, p.EndsAcked, "acked")
	counter(c.endDrops, s.Kernel.EndsLost, "kernel_ringbuf")
	counter(c.endDrops, s.Kernel.NoStorage, "kernel_storage")
	counter(c.endDrops, s.HalfOpen.Overflow, "half_open_overflow")
	counter(c.endDrops, p.EndsDropped, "publisher")
	gauge(c.halfOpenPending, float64(s.HalfOpen.Pending))
	gauge(c.halfOpenTimeout, c.a.capture.HalfOpenTimeout().Seconds())
	counter(c.confirmsLost, s.Kernel.ConfirmsLost)
	for _, r := range bpf.FilterReasons {
		counter(c.filtered, s.Kernel.Filtered(r), r)
	}
	counter(c.drops, s.Kernel.RingbufFull, "kernel_ringbuf")
	counter(c.drops, s.Kernel.Truncated, "kernel_truncated")
	counter(c.drops, s.BadRecords, "reader")
	counter(c.drops, p.Drops.Queue, "queue")
	counter(c.drops, p.Drops.Spool, "spool")
	counter(c.drops, p.Drops.Publish, "publish")
	gauge(c.pending, float64(p.PendingBatches))
	gauge(c.pendingBytes, float64(p.PendingBytes))
	counter(c.batches, p.BatchesAcked)
	counter(c.bytes, p.BytesAcked)
	counter(c.dups, p.DuplicateAcks)
	counter(c.collisions, p.IDCollisions)
	counter(c.pubErrors, p.PublishErrors)
	counter(c.kernelDup, s.Kernel.Duplicates)
	counter(c.seenEvicted, s.Kernel.SeenEvicted)
	counter(c.atEstablished, s.Kernel.BeginsAtEstablished)
	gauge(c.dnsEntries, float64(s.DNS.Entries))
	gauge(c.spoolBatches, float64(p.SpoolBatches))
	gauge(c.spoolBytes, float64(p.SpoolBytes))
	gauge(c.spoolEvents, float64(p.SpoolEvents))
	counter(c.spooled, p.Spooled)
	gauge(c.spoolCorrupt, float64(p.SpoolCorrupt))
	counter(c.dnsLookups, s.DNS.Hits, "hit")
	counter(c.dnsLookups, s.DNS.Misses, "miss")
	counter(c.dnsAnswers, s.DNS.Answers, "learned")
	counter(c.dnsAnswers, s.DNS.Partial, "partial")
	counter(c.dnsAnswers, s.DNS.Ignored, "ignored")
	counter(c.dnsAnswers, s.DNS.Malformed, "malformed")
	counter(c.dnsAnswers, s.DNS.Truncated, "truncated")
	counter(c.dnsAnswers, s.Kernel.DNSFull, "lost")
	counter(c.dnsKernelCut, s.Kernel.DNSCut)
	counter(c.dnsEvictions, s.DNS.Evictions, "entries")
	counter(c.dnsEvictions, s.DNS.BytesEvictions, "bytes")
	counter(c.dnsEvictions, s.DNS.TTLEvictions, "ttl")
	gauge(c.dnsBytes, float64(s.DNS.Bytes))
	gauge(c.dnsNames, float64(s.DNS.Names))
	counter(c.dnsDisplaced, s.DNS.Displaced)
	counter(c.dnsRecords, s.DNS.Records)
	counter(c.dnsDropped, s.DNS.DroppedCut, "cut")
	counter(c.dnsDropped, s.DNS.DroppedMalformed, "malformed")
	counter(c.dnsExpired, s.DNS.Expired)
	// Unsolicited: dropped in the kernel (no query of that socket, ends and
	// id) or here (not the query's question); never learned.
	counter(c.dnsAnswers, s.Kernel.DNSUnsolicited+s.DNSMatch.Unsolicited, "unsolicited")
	counter(c.dnsQueries, s.DNSMatch.Answered, "answered")
	counter(c.dnsQueries, s.DNSMatch.Expired, "expired")
	counter(c.dnsQueries, s.DNSMatch.Evicted, "evicted")
	counter(c.dnsQueries, s.DNSMatch.Malformed, "malformed")
	counter(c.dnsQueries, s.Kernel.DNSQueryFull, "lost")
	gauge(c.dnsPending, float64(s.DNSMatch.Outstanding))
	r := 0.0
	if s.Ready {
		r = 1
	}
	gauge(c.ready, r)
	for _, ck := range s.Checks {
		v := 0.0
		if ck.OK {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(c.checkOK, prometheus.GaugeValue, v, ck.Name)
	}
}

// batchMetrics are observed once per acknowledged batch.
type batchMetrics struct {
	events, bytes, latency prometheus.Histogram
}

func newBatchMetrics() *batchMetrics {
	return &batchMetrics{
		events: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "flowbus_agent_batch_events", Help: "Events per acknowledged batch.",
			Buckets: prometheus.ExponentialBuckets(1, 4, 8),
		}),
		bytes: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "flowbus_agent_batch_bytes", Help: "Encoded size of acknowledged batches.",
			Buckets: prometheus.ExponentialBuckets(256, 4, 8),
		}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "flowbus_agent_publish_latency_seconds", Help: "Time from sealing a batch to its ack by the stream, retries included.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 12),
		}),
	}
}

func (m *batchMetrics) observe(events, bytes int, sealedAt time.Time) {
	m.events.Observe(float64(events))
	m.bytes.Observe(float64(bytes))
	m.latency.Observe(time.Since(sealedAt).Seconds())
}

// buildInfoCollector exports flowbus_build_info, always 1: its labels tell
// which build runs, so dashboards can show a fleet's versions and join them
// to other metrics.
type buildInfoCollector struct {
	desc   *prometheus.Desc
	labels []string
}

// Build names the running build in flowbus_build_info. The command knows
// it (the version is stamped into it at link time), so it passes it in.
type Build struct {
	Version   string // release version, or "dev"
	Commit    string // short VCS commit, "-dirty" for a modified checkout
	GoVersion string // Go toolchain that built the binary
}

// NewBuildInfoCollector exports flowbus_build_info for build b and the
// nats-server compiled in.
func NewBuildInfoCollector(b Build) prometheus.Collector {
	return &buildInfoCollector{
		desc: prometheus.NewDesc("flowbus_build_info", "Always 1; the labels tell the agent's version, commit, Go version and embedded nats-server version.",
			[]string{"version", "commit", "goversion", "nats_server"}, nil),
		labels: []string{b.Version, b.Commit, b.GoVersion, server.VERSION},
	}
}

func (c *buildInfoCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *buildInfoCollector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, 1, c.labels...)
}

// ServeMetrics serves /metrics, /healthz and /readyz until ctx ends, with
// build in flowbus_build_info. It returns the address it listens on.
func ServeMetrics(ctx context.Context, addr string, a *Agent, build Build, log *slog.Logger) (net.Addr, error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(newAgentCollector(a), NewBuildInfoCollector(build), collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		a.batchMetrics.events, a.batchMetrics.bytes, a.batchMetrics.latency)
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if body, ok := readyzBody(a.health.checks()); !ok {
			http.Error(w, body, http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server", "err", err)
		}
	}()
	return ln.Addr(), nil
}

// readyzBody is "ready", or "not ready" and one line per failing check
// with its cause and fix.
func readyzBody(checks []Check) (string, bool) {
	var b strings.Builder
	for _, c := range checks {
		if !c.OK {
			b.WriteString(c.Name + ": " + c.Cause + "\n")
		}
	}
	if b.Len() == 0 {
		return "ready", true
	}
	return "not ready:\n" + strings.TrimSuffix(b.String(), "\n"), false
}
