package flowstat_test

import (
	"bytes"
	"context"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flowbus/flowbus/consumers/flowstat"
	"github.com/flowbus/flowbus/consumers/flowstat/flowstattest"
	"github.com/flowbus/flowbus/consumers/flowstat/store"
	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/consumers/tail/tailtest"
	"github.com/flowbus/flowbus/schema"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func sqlitePath(t *testing.T) string { return filepath.Join(t.TempDir(), "flowstat.db") }

// Each start policy decides where a consumer new to the database begins; once it has a checkpoint the
// policy no longer matters, and nothing published while it was stopped is skipped.
func TestStartPolicies(t *testing.T) {
	e := newEnv(t)
	e.fleet.Publish(t, e.rec, 6)
	before := len(e.rec.Batches)

	st := open(t, sqlitePath(t))
	o := e.opts()
	o.Durable, o.Start = "new", stream.StartNew
	if stats := run(t, st, o); stats.Events != 0 {
		t.Fatalf("start new read %d events of the existing stream", stats.Events)
	}
	e.fleet.Publish(t, e.rec, 6)
	run(t, st, o)
	flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches[before:], time.Minute))

	third := e.rec.Batches[2]
	st = open(t, sqlitePath(t))
	o = e.opts()
	o.Durable, o.Start, o.FromSeq = "seq", stream.StartSeq, third.StreamSeq
	run(t, st, o)
	flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches[2:], time.Minute))

	st = open(t, sqlitePath(t))
	o = e.opts()
	o.Durable, o.Start, o.Since = "time", stream.StartTime, e.rec.Batches[4].Stored
	run(t, st, o)
	flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches[4:], time.Minute))
}

// A subject filter restricts what is counted.
func TestFilters(t *testing.T) {
	e := newEnv(t)
	e.fleet.Publish(t, e.rec, 20)
	st := open(t, sqlitePath(t))
	o := e.opts()
	o.Filters = []string{"flows.*.incoming"}
	run(t, st, o)
	var incoming []flowstattest.Published
	for _, b := range e.rec.Batches {
		if b.Dir == schema.Incoming {
			incoming = append(incoming, b)
		}
	}
	if len(incoming) == 0 || len(incoming) == len(e.rec.Batches) {
		t.Fatalf("scenario has %d incoming batches of %d", len(incoming), len(e.rec.Batches))
	}
	flowstattest.Check(t, st, flowstattest.Reference(incoming, time.Minute))
}

// The database is the source of truth: restored from an older copy, it is brought up to date from the
// stream although the server's consumer had acknowledged everything.
func TestRestoredDatabaseCatchesUp(t *testing.T) {
	e := newEnv(t)
	e.fleet.Publish(t, e.rec, 10)
	path := sqlitePath(t)
	st := open(t, path)
	run(t, st, e.opts())
	st.Close() // the last connection folds the WAL into the file
	backup, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	st = open(t, path)
	e.fleet.Publish(t, e.rec, 10)
	run(t, st, e.opts())
	st.Close()
	for _, suffix := range []string{"-wal", "-shm"} {
		os.Remove(path + suffix)
	}
	if err := os.WriteFile(path, backup, 0o600); err != nil {
		t.Fatal(err)
	}
	st = open(t, path)
	var log bytes.Buffer
	o := e.opts()
	o.Log = &log
	run(t, st, o)
	if !strings.Contains(log.String(), "ahead of the database checkpoint") {
		t.Errorf("the log does not say why the consumer was recreated:\n%s", log.String())
	}
	flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
}

// A durable consumer belongs to the database that created it (its metadata says which): another
// database given the same name is refused and leaves it alone, and a consumer of a flowstat that did not
// mark them yet is marked by its database's next run.
func TestConsumerOfAnotherDatabase(t *testing.T) {
	e := newEnv(t)
	e.fleet.Publish(t, e.rec, 10)
	ctx := context.Background()
	a := open(t, sqlitePath(t))
	run(t, a, e.opts())
	idA, err := a.ID(ctx)
	if err != nil {
		t.Fatal(err)
	}
	info := func() *jetstream.ConsumerInfo {
		t.Helper()
		c, err := e.srv.JS.Consumer(ctx, "FLOWS", flowstat.DefaultDurable)
		if err != nil {
			t.Fatal(err)
		}
		return c.CachedInfo()
	}
	if got := info().Config.Metadata[flowstat.MetadataDatabase]; got != idA {
		t.Fatalf("consumer metadata names database %q, want %q", got, idA)
	}

	// As an older flowstat left it: no mark.
	cfg := info().Config
	cfg.Metadata = nil
	if _, err := e.srv.JS.UpdateConsumer(ctx, "FLOWS", cfg); err != nil {
		t.Fatal(err)
	}
	if got := info().Config.Metadata[flowstat.MetadataDatabase]; got != "" {
		t.Fatalf("metadata not cleared: %q", got)
	}
	e.fleet.Publish(t, e.rec, 5)
	var log bytes.Buffer
	o := e.opts()
	o.Log = &log
	run(t, a, o)
	if got := info().Config.Metadata[flowstat.MetadataDatabase]; got != idA || strings.Contains(log.String(), "recreating") {
		t.Errorf("after a run of its database: metadata %q, want %q; log:\n%s", got, idA, log.String())
	}

	before := info()
	b := open(t, sqlitePath(t))
	_, err = flowstat.Run(ctx, b, e.opts())
	var shared *flowstat.ConsumerSharedError
	if !errors.As(err, &shared) || !strings.Contains(err.Error(), "is also used by another database; give each database its own --consumer") {
		t.Fatalf("second database: %v", err)
	}
	after := info()
	if after.Created != before.Created || after.AckFloor.Stream != before.AckFloor.Stream || after.Config.Metadata[flowstat.MetadataDatabase] != idA {
		t.Errorf("the refused database changed the consumer: %+v -> %+v", before, after)
	}
	if cps, err := b.Checkpoints(ctx); err != nil || len(cps) != 0 {
		t.Errorf("the refused database recorded checkpoints %+v (%v)", cps, err)
	}
	flowstattest.Check(t, a, flowstattest.Reference(e.rec.Batches, time.Minute))
}

// Messages the stream deleted before the consumer read them are recorded as a loss, and the consumer
// carries on with what is left.
func TestStreamLossIsRecorded(t *testing.T) {
	e := newEnv(t)
	e.fleet.Publish(t, e.rec, 5)
	st := open(t, sqlitePath(t))
	run(t, st, e.opts())
	n := len(e.rec.Batches)
	e.fleet.Publish(t, e.rec, 6)
	keep := e.rec.Batches[len(e.rec.Batches)-2]
	s, err := e.srv.JS.Stream(context.Background(), "FLOWS")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Purge(context.Background(), jetstream.WithPurgeSequence(keep.StreamSeq)); err != nil {
		t.Fatal(err)
	}
	var log bytes.Buffer
	o := e.opts()
	o.Log = &log
	run(t, st, o)
	if l := log.String(); !strings.Contains(l, "deleted sequences") || strings.Contains(l, "backup") {
		t.Errorf("the log does not blame the stream:\n%s", l)
	}
	kept := append(append([]flowstattest.Published(nil), e.rec.Batches[:n]...), e.rec.Batches[len(e.rec.Batches)-2:]...)
	flowstattest.Check(t, st, flowstattest.Reference(kept, time.Minute))
	sum, err := st.Summary(context.Background(), 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(sum.Losses) != 1 || uint64(sum.Losses[0].From) != e.rec.Batches[n-1].StreamSeq+1 || uint64(sum.Losses[0].To) != keep.StreamSeq-1 {
		t.Errorf("losses %+v, want %d..%d", sum.Losses, e.rec.Batches[n-1].StreamSeq+1, keep.StreamSeq-1)
	}
}

// A batch published after its successor (a retried publish) is counted once and is not a gap; the gap
// its successor revealed stays recorded.
func TestLateBatch(t *testing.T) {
	e := newEnv(t)
	a := tailtest.NewAgent("web-05", "run-l")
	gen := flowstattest.NewGen(9, 10)
	ip := mustAddr("192.0.2.5")
	mk := func() (flowstattest.Published, []byte) {
		return e.rec.Encode(a, schema.Outgoing, schema.Drops{}, gen.Events(10, schema.Outgoing, ip, e.fleet.T0, time.Minute))
	}
	p1, d1 := mk()
	p2, d2 := mk()
	p3, d3 := mk()
	e.rec.PublishEncoded(t, p1, d1)
	e.rec.PublishEncoded(t, p3, d3)
	e.rec.PublishEncoded(t, p2, d2)
	st := open(t, sqlitePath(t))
	stats := run(t, st, e.opts())
	want := flowstattest.Reference(e.rec.Batches, time.Minute)
	flowstattest.Check(t, st, want)
	if stats.Late != 1 || stats.Events != 30 || len(want.Gaps) != 1 {
		t.Errorf("stats %+v with %d gaps wanted, want 1 late batch and 30 events", stats, len(want.Gaps))
	}
}

func TestValidate(t *testing.T) {
	o := flowstat.Options{Durable: "a.b", Filters: []string{"flows.>.x", ""}, DeadLetterSubject: "dl.*", Bucket: 1500 * time.Millisecond, Start: stream.StartTime}
	err := o.Validate()
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{"consumer name", "'>' must be the last token", "filter is empty", "dead-letter subject", "bucket", "start time"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %q:\n%v", want, err)
		}
	}
}

// Batches a hostile or broken publisher could send, valid msgpack but with text PostgreSQL refuses (NUL,
// invalid UTF-8), counters near 2^64 or a host that is no subject token, neither stop the consumer nor
// make it commit something else in SQLite than in PostgreSQL.
func TestHostileBatches(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := newEnv(t)
		a := tailtest.NewAgent("web-07", "r\x00\xff")
		ev := schema.Event{Timestamp: e.fleet.T0.UnixNano(), Src: mustAddr("192.0.2.7"), Dst: mustAddr("fe80::1%e\xffth"), DstDNS: []string{"a\x00b.example", "\xff"}, DstPort: 443}
		for i := 0; i < 3; i++ {
			e.rec.Publish(t, a, schema.Outgoing, schema.Drops{Kernel: 1<<64 - 1}, false, []schema.Event{ev})
		}
		bad := schema.NewBatchEncoder("Web 07", "r", schema.Outgoing)
		bad.Add(&ev)
		e.rec.PublishRaw(t, "flows.web-07.outgoing", bad.Finish(nil, 1, schema.Drops{}))
		st := open(t, dsn)
		stats := run(t, st, e.opts())
		if stats.Events != 3 || stats.DeadLetters != 1 {
			t.Errorf("stats %+v, want the 3 hostile but valid events counted and the bad host dead-lettered", stats)
		}
		var name, peer, run string
		var drops int64
		db := st.DB()
		if err := db.QueryRow(`SELECT peer_name, peer FROM conn_agg`).Scan(&name, &peer); err != nil || name != "a\uFFFDb.example" || peer != "fe80::1%e\uFFFDth" {
			t.Errorf("conn_agg peer %q name %q (%v)", peer, name, err)
		}
		if err := db.QueryRow(`SELECT run_id FROM run_state`).Scan(&run); err != nil || run != "r\uFFFD\uFFFD" {
			t.Errorf("run_state run_id %q (%v)", run, err)
		}
		if err := db.QueryRow(`SELECT drops_kernel FROM batch_agg`).Scan(&drops); err != nil || drops != 3<<40 {
			t.Errorf("drops %d (%v), want each batch capped at 2^40", drops, err)
		}
	})
}

// A user not allowed to publish to the dead-letter subject: the copy is refused by the server, which
// the consumer notices, logs with the fix and records (copied = 0), and it carries on.
func TestDeadLetterRefusedByPermissions(t *testing.T) {
	opts := &server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true,
		Users: []*server.User{
			{Username: "admin", Password: "a"},
			{Username: "stat", Password: "s", Permissions: &server.Permissions{Publish: &server.SubjectPermission{Deny: []string{flowstat.DefaultDeadLetterSubject}}}},
		}}
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("server not ready")
	}
	t.Cleanup(srv.Shutdown)
	nc, err := nats.Connect(srv.ClientURL(), nats.UserInfo("admin", "a"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "FLOWS", Subjects: []string{"flows.>"}}); err != nil {
		t.Fatal(err)
	}
	a := tailtest.NewAgent("web-01", "r")
	_, good := a.Batch(schema.Outgoing, schema.Drops{}, flowstattest.NewGen(1, 3).Events(5, schema.Outgoing, mustAddr("192.0.2.1"), time.Now(), time.Second)...)
	for _, data := range [][]byte{[]byte("junk"), good} {
		if _, err := js.Publish(ctx, "flows.web-01.outgoing", data); err != nil {
			t.Fatal(err)
		}
	}
	u, _ := url.Parse(srv.ClientURL())
	u.User = url.UserPassword("stat", "s")
	st := open(t, sqlitePath(t))
	var log bytes.Buffer
	stats := run(t, st, flowstat.Options{URLs: []string{u.String()}, ExitWhenCaughtUp: true, Log: &log})
	if stats.DeadLetters != 1 || stats.NotCopied != 1 || stats.Events != 5 {
		t.Errorf("stats %+v, want 1 dead letter not copied and the 5 events of the valid batch", stats)
	}
	if !strings.Contains(log.String(), "allow this user to publish to flowbus.deadletter") {
		t.Errorf("log does not name the fix:\n%s", log.String())
	}
	var copied int
	if err := st.DB().QueryRow(`SELECT copied FROM deadletters`).Scan(&copied); err != nil || copied != 0 {
		t.Errorf("deadletters.copied = %d (%v), want 0", copied, err)
	}
}

func TestFilterOutsideTheStream(t *testing.T) {
	e := newEnv(t)
	o := e.opts()
	o.Filters, o.Prefix = []string{"acme.>"}, "acme"
	_, err := flowstat.Run(context.Background(), open(t, sqlitePath(t)), o)
	if !errors.Is(err, stream.ErrFilterOutsideStream) || !strings.Contains(err.Error(), "FLOWBUS_FLOWSTAT_FILTER") {
		t.Errorf("filter outside the stream: %v", err)
	}
}

// Replay refuses a database that two consumers write: rebuilding from one's messages would drop the
// other's counts.
func TestReplayRefusesSharedDatabase(t *testing.T) {
	e := newEnv(t)
	e.fleet.Publish(t, e.rec, 6)
	st := open(t, sqlitePath(t))
	for _, f := range []string{"flows.*.incoming", "flows.*.outgoing"} {
		o := e.opts()
		o.Durable, o.Filters = strings.Split(f, ".")[2], []string{f}
		run(t, st, o)
	}
	flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
	_, err := flowstat.Replay(context.Background(), st, flowstat.ReplayOptions{URLs: []string{e.srv.URL}, Durable: "incoming", From: e.fleet.T0, To: time.Now()})
	if err == nil || !strings.Contains(err.Error(), "several consumers") {
		t.Errorf("replay of a shared database: %v", err)
	}
	flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
}

// The subject, which per-host publish permissions control, is trusted, not the batch: a host may only
// report itself. A batch claiming another host or direction than its subject names (also hidden below
// the publisher's own subject) is dead-lettered as subject_mismatch and counts nothing.
func TestSubjectMismatchDeadLettered(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := newEnv(t)
		e.fleet.Publish(t, e.rec, 4)
		ev := schema.Event{Timestamp: e.fleet.T0.UnixNano(), Src: mustAddr("192.0.2.7"), Dst: mustAddr("198.51.100.9"), SrcPort: 40000, DstPort: 443}
		_, web02 := tailtest.NewAgent("web-02", "r").Batch(schema.Outgoing, schema.Drops{}, ev)
		for _, subject := range []string{"flows.web-01.outgoing", "flows.web-01.web-02.outgoing", "flows.web-02.incoming"} {
			e.rec.PublishRaw(t, subject, web02)
		}
		e.fleet.Publish(t, e.rec, 2)
		st := open(t, dsn)
		var log bytes.Buffer
		o := e.opts()
		o.Log = &log
		stats := run(t, st, o)
		if stats.DeadLetters != 3 {
			t.Errorf("stats %+v, want the 3 mismatched batches dead-lettered", stats)
		}
		flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
		sum, err := st.Summary(context.Background(), 0)
		if err != nil {
			t.Fatal(err)
		}
		if sum.DeadByReason[flowstat.ReasonSubjectMismatch] != 3 {
			t.Errorf("dead letters by reason %v, want 3 %s", sum.DeadByReason, flowstat.ReasonSubjectMismatch)
		}
		var n int
		if err := st.DB().QueryRow(`SELECT COUNT(*) FROM conn_agg WHERE host = 'web-02'`).Scan(&n); err != nil || n != 0 {
			t.Errorf("%d conn_agg rows for the impersonated host (%v), want 0", n, err)
		}
		if !strings.Contains(log.String(), "flows.web-01.web-02.outgoing is not a valid batch (subject_mismatch") {
			t.Errorf("log does not explain the mismatch:\n%s", log.String())
		}
	})
}

// A filter outside <prefix>.<host>.<direction> would dead-letter everything it reads: refused, naming
// the prefix setting.
func TestFilterOutsidePrefix(t *testing.T) {
	o := flowstat.Options{Filters: []string{"acme.>"}, Bucket: time.Minute, DeadLetterSubject: "dl"}
	if err := o.Validate(); err == nil || !strings.Contains(err.Error(), "--prefix") {
		t.Errorf("filter outside the prefix: %v", err)
	}
	o.Prefix = "acme.eu"
	if err := o.Validate(); err != nil {
		t.Errorf("filter covering the prefix: %v", err)
	}
}

// Messages the stream's own limits delete while flowstat is stopped, its durable consumer surviving, are
// recorded as a loss too, and the log blames the stream's limits, not the database.
func TestStreamLimitLossWithKeptConsumer(t *testing.T) {
	srv := tailtest.Start(t)
	if _, err := srv.JS.CreateStream(context.Background(), jetstream.StreamConfig{Name: "FLOWS", Subjects: []string{"flows.>"},
		Storage: jetstream.FileStorage, MaxMsgs: 8, Discard: jetstream.DiscardOld}); err != nil {
		t.Fatal(err)
	}
	e := &env{srv: srv, rec: flowstattest.NewRecorder(srv, "FLOWS", "flows"),
		fleet: flowstattest.NewFleet(1, time.Now().Add(-time.Hour).Truncate(time.Minute), 3*time.Minute, 40)}
	e.fleet.Publish(t, e.rec, 5)
	st := open(t, sqlitePath(t))
	run(t, st, e.opts())
	n := len(e.rec.Batches)
	e.fleet.Publish(t, e.rec, 12) // 17 stored in all, 8 kept: sequences n+1.. are deleted unread
	first := e.rec.Batches[len(e.rec.Batches)-8]
	if first.StreamSeq <= e.rec.Batches[n-1].StreamSeq+1 {
		t.Fatalf("the stream kept sequence %d: no loss to detect", first.StreamSeq)
	}
	var log bytes.Buffer
	o := e.opts()
	o.Log = &log
	run(t, st, o)
	kept := append(append([]flowstattest.Published(nil), e.rec.Batches[:n]...), e.rec.Batches[len(e.rec.Batches)-8:]...)
	flowstattest.Check(t, st, flowstattest.Reference(kept, time.Minute))
	sum, err := st.Summary(context.Background(), 10)
	if err != nil {
		t.Fatal(err)
	}
	from, to := e.rec.Batches[n-1].StreamSeq+1, first.StreamSeq-1
	if len(sum.Losses) != 1 || uint64(sum.Losses[0].From) != from || uint64(sum.Losses[0].To) != to {
		t.Errorf("losses %+v, want %d..%d", sum.Losses, from, to)
	}
	l := log.String()
	if !strings.Contains(l, "deleted sequences") || strings.Contains(l, "backup") {
		t.Errorf("the log does not blame the stream's limits:\n%s", l)
	}
}

// A batch the stream stores twice (the agent retried it with its message id after the stream's
// duplicates window, or under another id) is counted once, by its identity (host, run, direction, seq):
// an in-order batch, a late batch that filled a gap, and across a restart and a replay. The copies are
// recorded as duplicates.
func TestDuplicateBatchCountedOnce(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := newEnv(t)
		a := tailtest.NewAgent("web-06", "run-d")
		gen := flowstattest.NewGen(11, 10)
		ip := mustAddr("192.0.2.6")
		type enc struct {
			p    flowstattest.Published
			data []byte
		}
		var b []enc
		for i := 0; i < 6; i++ {
			p, data := e.rec.Encode(a, schema.Outgoing, schema.Drops{}, gen.Events(10, schema.Outgoing, ip, e.fleet.T0, time.Minute))
			b = append(b, enc{p, data})
		}
		copyN := 0
		again := func(x enc) { // the same batch under a new message id, as a retry past the window is
			t.Helper()
			copyN++
			m := nats.NewMsg(schema.Subject("flows", x.p.Host, x.p.Dir))
			m.Data = x.data
			m.Header.Set(nats.MsgIdHdr, "retry-"+strconv.Itoa(copyN))
			if _, err := e.srv.JS.PublishMsg(context.Background(), m); err != nil {
				t.Fatal(err)
			}
		}
		pub := func(x enc) { e.rec.PublishEncoded(t, x.p, x.data) }
		pub(b[0])
		pub(b[1])
		again(b[1]) // the newest batch of its chain, repeated
		pub(b[3])   // b[2] missing: a gap
		again(b[0]) // an older batch, repeated
		pub(b[2])   // late: fills the gap, counted
		again(b[2]) // the late batch, repeated
		st := open(t, dsn)
		var log bytes.Buffer
		o := e.opts()
		o.Log = &log
		stats := run(t, st, o)
		want := flowstattest.Reference(e.rec.Batches, time.Minute)
		flowstattest.Check(t, st, want)
		if stats.Duplicates != 3 || stats.Late != 1 || stats.Events != 40 {
			t.Errorf("stats %+v, want 3 duplicates, 1 late batch and 40 events", stats)
		}
		if !strings.Contains(log.String(), "repeats batch 2 of host web-06 run run-d outgoing, already counted") {
			t.Errorf("the log does not report the duplicate:\n%s", log.String())
		}

		// After a restart the chain and its holes come from the database.
		again(b[2])
		again(b[3])
		pub(b[5]) // b[4] missing
		pub(b[4])
		again(b[4])
		stats = run(t, st, e.opts())
		flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
		if stats.Duplicates != 3 || stats.Events != 20 {
			t.Errorf("after a restart: stats %+v, want 3 duplicates and 20 events", stats)
		}
		sum, err := st.Summary(context.Background(), 0)
		if err != nil {
			t.Fatal(err)
		}
		if sum.Duplicates != 6 {
			t.Errorf("summary: %d duplicates, want 6", sum.Duplicates)
		}

		// A replay reads the copies again and skips them as the live consumer did.
		rs, err := flowstat.Replay(context.Background(), st, flowstat.ReplayOptions{URLs: []string{e.srv.URL}, From: e.fleet.T0, To: time.Now().Add(time.Minute)})
		if err != nil {
			t.Fatal(err)
		}
		flowstattest.Check(t, st, flowstattest.Reference(e.rec.Batches, time.Minute))
		if rs.Duplicates != 6 {
			t.Errorf("replay: stats %+v, want 6 duplicates skipped", rs)
		}
	})
}

// A database written by a flowstat from before the string bounds may hold chain state (run_state,
// holes) with hosts and run ids of any length. Those rows are never loaded: Run deletes them first, with
// one log line counting them, and continues the chains whose ids are within the bounds (64 characters,
// also when they take more bytes).
func TestOverlongChainStateNotLoaded(t *testing.T) {
	forEachDB(t, func(t *testing.T, dsn string) {
		e := newEnv(t)
		st := open(t, dsn)
		db := st.DB()
		ins := func(q string, args ...any) {
			t.Helper()
			if st.Kind() == store.Postgres {
				for i := 1; strings.Contains(q, "?"); i++ {
					q = strings.Replace(q, "?", "$"+strconv.Itoa(i), 1)
				}
			}
			if _, err := db.Exec(q, args...); err != nil {
				t.Fatal(err)
			}
		}
		// 1 MB ids in SQLite; PostgreSQL's primary-key index refuses rows beyond about 2.7 KB, so no
		// PostgreSQL database can hold longer ones.
		size := 1 << 20
		if st.Kind() == store.Postgres {
			size = 2000
		}
		huge := strings.Repeat("r", size)
		for i := range 6 {
			ins(`INSERT INTO run_state (host, run_id, direction, last_seq) VALUES (?, ?, 'outgoing', 5)`, "web-07", huge+strconv.Itoa(i))
		}
		ins(`INSERT INTO run_state (host, run_id, direction, last_seq) VALUES (?, 'r1', 'outgoing', 5)`, strings.Repeat("h", size))
		ins(`INSERT INTO run_state (host, run_id, direction, last_seq) VALUES ('web-07', ?, 'incoming', 5)`, strings.Repeat("x", 65))
		for i := range 3 {
			ins(`INSERT INTO holes (host, run_id, direction, from_seq, to_seq) VALUES ('web-07', ?, 'outgoing', 1, 2)`, huge+strconv.Itoa(i))
		}
		// At the bound: 64 characters of 2 bytes each, as a cleaned run id can be.
		atBound := strings.Repeat("é", 64)
		ins(`INSERT INTO run_state (host, run_id, direction, last_seq) VALUES ('web-07', ?, 'outgoing', 3)`, atBound)
		// The chain a publisher continues: its batch 1 was counted before.
		ins(`INSERT INTO run_state (host, run_id, direction, last_seq) VALUES ('web-07', 'run-ok', 'outgoing', 1)`)
		ins(`INSERT INTO holes (host, run_id, direction, from_seq, to_seq) VALUES ('web-07', 'run-ok', 'incoming', 7, 9)`)

		runs, err := st.RunStates(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		holes, err := st.Holes(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if len(runs) != 2 || runs[store.RunKey{Host: "web-07", RunID: atBound, Dir: schema.Outgoing}].Last != 3 || len(holes) != 1 {
			t.Fatalf("loaded %d chains, %d hole lists; want only the 2 chains and 1 hole list within the bounds", len(runs), len(holes))
		}

		a := tailtest.NewAgent("web-07", "run-ok")
		gen := flowstattest.NewGen(12, 10)
		e.rec.Encode(a, schema.Outgoing, schema.Drops{}, nil) // batch 1, counted before
		p, data := e.rec.Encode(a, schema.Outgoing, schema.Drops{}, gen.Events(5, schema.Outgoing, mustAddr("192.0.2.7"), e.fleet.T0, time.Minute))
		e.rec.PublishEncoded(t, p, data)
		var log bytes.Buffer
		o := e.opts()
		o.Log = &log
		stats := run(t, st, o)
		if stats.Gaps != 0 || stats.Events != 5 {
			t.Errorf("stats %+v: want batch 2 to continue the chain of run-ok (no gap), 5 events", stats)
		}
		if n := strings.Count(log.String(), "chain-state rows"); n != 1 || !strings.Contains(log.String(), "flowstat: removed 11 chain-state rows whose host or run id is longer than the bounds (host 64, run id 64 characters)") {
			t.Errorf("want one line counting 11 rows, got %d:\n%s", n, log.String())
		}
		for _, tb := range []string{"run_state", "holes"} {
			var n, long int
			if err := db.QueryRow(`SELECT COUNT(*), COALESCE(SUM(CASE WHEN length(run_id) > 64 OR length(host) > 64 THEN 1 ELSE 0 END), 0) FROM `+tb).Scan(&n, &long); err != nil {
				t.Fatal(err)
			}
			if long != 0 {
				t.Errorf("%s keeps %d over-long rows", tb, long)
			}
			if want := map[string]int{"run_state": 2, "holes": 1}[tb]; n != want {
				t.Errorf("%s has %d rows, want %d", tb, n, want)
			}
		}
		// A second start finds nothing to remove and says nothing.
		log.Reset()
		run(t, st, o)
		if strings.Contains(log.String(), "chain-state rows") {
			t.Errorf("second start:\n%s", log.String())
		}
	})
}
