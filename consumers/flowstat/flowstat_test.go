package flowstat_test

import (
	"bytes"
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat"
	"github.com/flowbus/flowbus/consumers/flowstat/flowstattest"
	"github.com/flowbus/flowbus/consumers/flowstat/pgtest"
	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/flowbus/flowbus/schema"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// forEachDB runs f against a fresh SQLite file and a fresh database on a real PostgreSQL server.
func forEachDB(t *testing.T, f func(t *testing.T, dsn string)) {
	t.Run("sqlite", func(t *testing.T) { f(t, filepath.Join(t.TempDir(), "state", "flowstat.db")) })
	t.Run("postgres", func(t *testing.T) { f(t, pgtest.Shared(t).NewDB(t)) })
}

func open(t *testing.T, dsn string) *store.Store {
	t.Helper()
	// The SQLite path is below a directory to create, as the default state directory is.
	st, err := store.OpenWith(context.Background(), dsn, store.OpenOptions{CreateDir: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// env is a NATS server with the agent's stream and a recorder of what was published.
type env struct {
	srv   *tailtest.Server
	rec   *flowstattest.Recorder
	fleet *flowstattest.Fleet
}

func newEnv(t *testing.T) *env {
	t.Helper()
	srv := tailtest.Start(t)
	flowstattest.CreateStream(t, srv, "FLOWS", "flows.>")
	// Three one-minute buckets of events, starting on a bucket boundary an hour ago.
	t0 := time.Now().Add(-time.Hour).Truncate(time.Minute)
	return &env{srv: srv, rec: flowstattest.NewRecorder(srv, "FLOWS", "flows"), fleet: flowstattest.NewFleet(1, t0, 3*time.Minute, 40)}
}

func (e *env) opts() flowstat.Options {
	return flowstat.Options{URLs: []string{e.srv.URL}, ExitWhenCaughtUp: true, MaxChunkMessages: 7}
}

func run(t *testing.T, st *store.Store, o flowstat.Options) flowstat.Stats {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stats, err := flowstat.Run(ctx, st, o)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	return stats
}

// The aggregates equal a reference computed from the published events, and a second run resumes after
// the checkpoint: only the new messages are added.
func TestAggregatesMatchReference(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := newEnv(t)
		e.fleet.Publish(t, e.rec, 60)
		st := open(t, dsn)
		stats := run(t, st, e.opts())
		want := flowstattest.Reference(e.rec.Batches, time.Minute)
		flowstattest.Check(t, st, want)
		if stats.Events != uint64(e.rec.Events()) || stats.Messages != uint64(len(e.rec.Batches)) || stats.Gaps != uint64(len(want.Gaps)) {
			t.Errorf("stats %+v, want %d events, %d batches, %d gaps", stats, e.rec.Events(), len(e.rec.Batches), len(want.Gaps))
		}
		if len(want.Gaps) < 4 || len(want.Batches) < 4 || len(want.Conns) < 100 {
			t.Fatalf("scenario too small to prove much: %d gaps, %d batch rows, %d conn rows", len(want.Gaps), len(want.Batches), len(want.Conns))
		}
		if stats.Commits < 5 {
			t.Errorf("%d commits: the chunk bound of 7 messages was not applied", stats.Commits)
		}

		e.fleet.Publish(t, e.rec, 15)
		stats = run(t, st, e.opts())
		if stats.Messages != 15-countLost(60, 75) {
			t.Errorf("second run read %d batches, want only the %d new ones", stats.Messages, 15-countLost(60, 75))
		}
		flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
	})
}

// countLost is how many of the fleet's batches n in (from, to] are lost on purpose.
func countLost(from, to int) uint64 {
	var n uint64
	for i := from + 1; i <= to; i++ {
		if i%13 == 0 {
			n++
		}
	}
	return n
}

// A consumer that dies with a chunk folded but not committed, or whose transaction fails after writing
// its rows, loses nothing and counts nothing twice once it runs again.
func TestCrashesCountEverythingOnce(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := newEnv(t)
		e.fleet.Publish(t, e.rec, 50)
		st := open(t, dsn)
		o := e.opts()
		crashes := 0
		for _, after := range []int{3, 9, 1, 12} {
			flowstat.SetCrashAfter(&o, after)
			if _, err := flowstat.Run(context.Background(), st, o); !errors.Is(err, flowstat.ErrCrashed) {
				t.Fatalf("Run with CrashAfter %d: %v, want ErrCrashed", after, err)
			}
			crashes++
		}
		// Abandon a transaction after its rows are written: the hook fails the third commit.
		flowstat.SetCrashAfter(&o, 0)
		commits := 0
		errHook := errors.New("killed inside the transaction")
		st.InTxHook = func() error {
			if commits++; commits == 3 {
				return errHook
			}
			return nil
		}
		if _, err := flowstat.Run(context.Background(), st, o); !errors.Is(err, errHook) {
			t.Fatalf("Run with a failing transaction: %v, want the hook's error", err)
		}
		st.InTxHook = nil
		cp, _, _, err := st.CheckpointOf(context.Background(), flowstat.DefaultDurable, "FLOWS")
		if err != nil || cp == 0 || cp >= e.rec.Batches[len(e.rec.Batches)-1].StreamSeq {
			t.Fatalf("checkpoint %d (%v) after the crashes: want some but not all of the stream committed", cp, err)
		}
		run(t, st, o)
		flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
	})
}

// Replaying the whole stream twice, a part of it, or a range while the live consumer keeps committing,
// leaves exactly the reference.
func TestReplay(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := newEnv(t)
		e.fleet.Publish(t, e.rec, 40)
		st := open(t, dsn)
		run(t, st, e.opts())
		want := flowstattest.Reference(e.rec.Batches, time.Minute)
		ro := flowstat.ReplayOptions{URLs: []string{e.srv.URL}, From: e.fleet.T0.Add(-24 * time.Hour), To: time.Now().Add(time.Hour), MaxChunkEvents: 300}
		for i := 0; i < 2; i++ {
			stats, err := flowstat.Replay(context.Background(), st, ro)
			if err != nil {
				t.Fatalf("replay %d: %v", i, err)
			}
			if stats.Events != uint64(e.rec.Events()) || stats.Commits < 2 {
				t.Errorf("replay %d: %+v, want %d events in several commits", i, stats, e.rec.Events())
			}
			flowstattest.Check(t, st, want)
		}

		// One bucket in the middle: events of other buckets must not be added again.
		mid := flowstat.ReplayOptions{URLs: ro.URLs, From: e.fleet.T0.Add(time.Minute), To: e.fleet.T0.Add(2 * time.Minute)}
		if _, err := flowstat.Replay(context.Background(), st, mid); err != nil {
			t.Fatal(err)
		}
		flowstattest.Check(t, st, want)

		// A replay racing the live consumer: what the live consumer commits meanwhile is neither lost
		// nor counted twice.
		var wg sync.WaitGroup
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		live := e.opts()
		live.ExitWhenCaughtUp = false
		var liveErr error
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, liveErr = flowstat.Run(ctx, st, live)
		}()
		for i := 0; i < 3; i++ {
			e.fleet.Publish(t, e.rec, 8)
			if _, err := flowstat.Replay(context.Background(), st, ro); err != nil {
				t.Fatalf("replay during live consumption: %v", err)
			}
		}
		waitCheckpoint(t, st, e.rec.Batches[len(e.rec.Batches)-1].StreamSeq)
		cancel()
		wg.Wait()
		if liveErr != nil {
			t.Fatalf("live consumer: %v", liveErr)
		}
		flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
		if sum, err := st.Summary(context.Background(), 0); err != nil || sum.Unfinished != 0 {
			t.Errorf("summary: %d unfinished replays (%v), want 0", sum.Unfinished, err)
		}
	})
}

func waitCheckpoint(t *testing.T, st *store.Store, seq uint64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		cp, _, _, err := st.CheckpointOf(context.Background(), flowstat.DefaultDurable, "FLOWS")
		if err == nil && cp >= seq {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("checkpoint %d (%v) did not reach %d", cp, err, seq)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Replay refuses to delete a range the stream can no longer rebuild.
func TestReplayRefusesWhatTheStreamLost(t *testing.T) {
	e := newEnv(t)
	e.fleet.Publish(t, e.rec, 10)
	st := open(t, filepath.Join(t.TempDir(), "flowstat.db"))
	run(t, st, e.opts())
	s, err := e.srv.JS.Stream(context.Background(), "FLOWS")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteMsg(context.Background(), e.rec.Batches[0].StreamSeq); err != nil {
		t.Fatal(err)
	}
	ro := flowstat.ReplayOptions{URLs: []string{e.srv.URL}, From: e.fleet.T0.Add(-time.Hour), To: time.Now()}
	_, err = flowstat.Replay(context.Background(), st, ro)
	if !errors.Is(err, flowstat.ErrStreamTooShort) || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("replay after the stream lost its first message: %v, want ErrStreamTooShort naming --force", err)
	}
	flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
	ro.Force = true
	if _, err := flowstat.Replay(context.Background(), st, ro); err != nil {
		t.Fatal(err)
	}
	// Connections and batches are rebuilt from what is left; first/last seen and gaps are kept.
	all, left := flowstattest.Reference(e.rec.Batches, time.Minute), flowstattest.Reference(e.rec.Batches[1:], time.Minute)
	left.Seen, left.Gaps = all.Seen, all.Gaps
	flowstattest.Check(t, st, left)
}

// poison returns messages that are not valid batches, with the reason each must be dead-lettered for.
func poison(t *testing.T) map[string][]byte {
	t.Helper()
	a := tailtest.NewAgent("web-09", "run-p")
	_, good := a.Batch(schema.Outgoing, schema.Drops{}, flowstattest.NewGen(3, 5).Events(20, schema.Outgoing, mustAddr("192.0.2.9"), time.Now(), time.Second)...)
	major2 := bytes.Replace(good, []byte("\xacschema_major\x01"), []byte("\xacschema_major\x02"), 1)
	if bytes.Equal(major2, good) {
		t.Fatal("could not find schema_major in the encoded batch")
	}
	return map[string][]byte{
		"foreign":   []byte(`{"src":"10.0.0.1","dst":"10.0.0.2"}`),
		"major2":    major2,
		"truncated": good[:len(good)/2],
	}
}

var poisonReason = map[string]string{"foreign": flowstat.ReasonMalformed, "major2": flowstat.ReasonUnsupportedMajor, "truncated": flowstat.ReasonTruncated}

type dlMsg struct {
	subject string
	header  map[string][]string
	data    []byte
}

// Messages that are not batches are copied to the dead-letter subject with the reason in a header,
// recorded once in the database, and the consumer carries on with the valid batches around them, also
// after a crash that makes it read them again. With a stream on the dead-letter subject the copies are
// stored once; without one, a plain subscriber gets them.
func TestPoisonMessagesAreDeadLettered(t *testing.T) {
	for _, mode := range []string{"stream", "subscriber"} {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t)
			var next func() []dlMsg
			if mode == "stream" {
				flowstattest.CreateStream(t, e.srv, "DEADLETTER", flowstat.DefaultDeadLetterSubject)
				next = func() []dlMsg {
					s, err := e.srv.JS.Stream(context.Background(), "DEADLETTER")
					if err != nil {
						t.Fatal(err)
					}
					c, err := s.OrderedConsumer(context.Background(), jetstream.OrderedConsumerConfig{})
					if err != nil {
						t.Fatal(err)
					}
					batch, err := c.Fetch(100, jetstream.FetchMaxWait(500*time.Millisecond))
					if err != nil {
						t.Fatal(err)
					}
					var out []dlMsg
					for m := range batch.Messages() {
						out = append(out, dlMsg{m.Subject(), m.Headers(), m.Data()})
					}
					return out
				}
			} else {
				sub, err := e.srv.NC.SubscribeSync(flowstat.DefaultDeadLetterSubject)
				if err != nil {
					t.Fatal(err)
				}
				next = func() []dlMsg {
					var out []dlMsg
					for {
						m, err := sub.NextMsg(200 * time.Millisecond)
						if err != nil {
							return out
						}
						out = append(out, dlMsg{m.Subject, m.Header, m.Data})
					}
				}
			}
			bad := poison(t)
			seqs := map[uint64]string{}
			e.fleet.Publish(t, e.rec, 3)
			for _, name := range []string{"foreign", "major2", "truncated"} {
				seqs[e.rec.PublishRaw(t, "flows.web-09.outgoing", bad[name])] = name
				e.fleet.Publish(t, e.rec, 2)
			}
			st := open(t, filepath.Join(t.TempDir(), "flowstat.db"))
			o := e.opts()
			// Crash right after the first dead letter, before its commit: it is sent again on restart.
			flowstat.SetCrashAfter(&o, 4)
			if _, err := flowstat.Run(context.Background(), st, o); !errors.Is(err, flowstat.ErrCrashed) {
				t.Fatalf("crash run: %v", err)
			}
			flowstat.SetCrashAfter(&o, 0)
			var log bytes.Buffer
			o.Log = &log
			stats := run(t, st, o)
			flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
			if stats.DeadLetters != 3 || stats.NotCopied != 0 {
				t.Errorf("stats %+v, want 3 dead letters, all copied", stats)
			}
			sum, err := st.Summary(context.Background(), 0)
			if err != nil {
				t.Fatal(err)
			}
			if sum.DeadLetters != 3 || sum.NotCopied != 0 || sum.DeadByReason[flowstat.ReasonTruncated] != 1 || sum.DeadByReason[flowstat.ReasonUnsupportedMajor] != 1 {
				t.Errorf("summary: %d dead letters %v, %d not copied; want one per reason, all copied", sum.DeadLetters, sum.DeadByReason, sum.NotCopied)
			}
			if !strings.Contains(log.String(), "not a valid batch") {
				t.Errorf("log does not mention the dead letters:\n%s", log.String())
			}

			got := next()
			byName := map[string]int{}
			for _, m := range got {
				h := jetstreamHeader(m.header)
				name := seqs[parseUint(h.Get(flowstat.HeaderDLSeq))]
				byName[name]++
				switch {
				case name == "":
					t.Errorf("dead letter with sequence header %q names no poison message", h.Get(flowstat.HeaderDLSeq))
				case m.subject != flowstat.DefaultDeadLetterSubject:
					t.Errorf("%s: dead letter on %q, want %q", name, m.subject, flowstat.DefaultDeadLetterSubject)
				case h.Get(flowstat.HeaderDLReason) != poisonReason[name]:
					t.Errorf("%s: reason header %q, want %q", name, h.Get(flowstat.HeaderDLReason), poisonReason[name])
				case h.Get(flowstat.HeaderDLError) == "" || h.Get(flowstat.HeaderDLSubject) != "flows.web-09.outgoing" || h.Get(flowstat.HeaderDLStream) != "FLOWS":
					t.Errorf("%s: headers %v lack the error, the original subject or the stream", name, m.header)
				case !bytes.Equal(m.data, bad[name]):
					t.Errorf("%s: the dead letter's body is not the original message", name)
				}
			}
			for _, name := range []string{"foreign", "major2", "truncated"} {
				want := 1
				if mode == "subscriber" && name == "foreign" {
					want = 2 // sent before the crash and again after it; only a stream dedupes
				}
				if byName[name] != want {
					t.Errorf("%s: %d dead letters, want %d", name, byName[name], want)
				}
			}
		})
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

func parseUint(s string) uint64 {
	n, _ := strconv.ParseUint(s, 10, 64)
	return n
}

func jetstreamHeader(h map[string][]string) nats.Header { return nats.Header(h) }
