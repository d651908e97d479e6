package publisher

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/flowbus/flowbus/internal/syncbuf"
	"github.com/flowbus/flowbus/publisher/spool"
	"github.com/flowbus/flowbus/schema"
)

// Another publisher that stores messages under the ids the agent will use
// (on a subject of its own) must not make the stream drop the agent's
// batches: each hit is counted and the batch republished under a fresh id.
func TestClaimedIDsDoNotSuppressBatches(t *testing.T) {
	_, nc, js := natsServer(t)
	const claimed, batches = 400, 61
	for seq := uint64(2); seq < 2+claimed; seq++ {
		m := &nats.Msg{Subject: "flows.other.outgoing", Header: nats.Header{schema.HeaderMsgID: []string{schema.MsgID("web-01", "run1", seq)}}}
		if _, err := js.PublishMsg(context.Background(), m); err != nil {
			t.Fatal(err)
		}
	}
	var logs syncbuf.Buffer
	start := time.Now()
	p, err := New(nc, Config{Host: "web-01", RunID: "run1", MaxEvents: 1, Linger: time.Hour}, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < batches; i++ {
		p.Add(event(i, schema.Outgoing))
	}
	waitAcked(t, p, batches)
	closePub(t, p)
	st := p.Stats()
	// Ids 2..61 of the 61 batches were claimed; id 1 was free.
	if st.IDCollisions != batches-1 {
		t.Errorf("id collisions counted %d, want %d", st.IDCollisions, batches-1)
	}
	if st.DuplicateAcks != 0 {
		t.Errorf("duplicate acks %d, want 0: collisions are not retries", st.DuplicateAcks)
	}
	// Logged at most once a second, each line naming where the other
	// message lies.
	lines := strings.Split(strings.TrimSpace(logs.Take()), "\n")
	if max := int(time.Since(start)/time.Second) + 1; len(lines) < 1 || len(lines) > max {
		t.Errorf("%d log lines in %v, want 1 to %d", len(lines), time.Since(start), max)
	}
	for _, l := range lines {
		if !strings.Contains(l, "another publisher") || !strings.Contains(l, "stored_subject=flows.other.outgoing") || !strings.Contains(l, "stored_seq=") {
			t.Errorf("log line does not name the collision, stored subject and sequence: %s", l)
		}
	}
	seqs := map[uint64]storedMsg{}
	foreign := 0
	for _, m := range fetchAllWithForeign(t, js, &foreign) {
		if m.subject != "flows.web-01.outgoing" {
			t.Errorf("batch %d stored on %s", m.batch.Seq, m.subject)
		}
		if _, dup := seqs[m.batch.Seq]; dup {
			t.Errorf("batch %d stored twice", m.batch.Seq)
		}
		seqs[m.batch.Seq] = m
		base := schema.MsgID("web-01", "run1", m.batch.Seq)
		if m.batch.Seq == 1 && m.id != base {
			t.Errorf("uncontested batch 1 has id %q, want %q", m.id, base)
		}
		if m.batch.Seq > 1 && (!strings.HasPrefix(m.id, base+".") || len(m.id) <= len(base)+1) {
			t.Errorf("republished batch %d has id %q, want %s.<random>", m.batch.Seq, m.id, base)
		}
	}
	if foreign != claimed {
		t.Errorf("stream holds %d foreign messages, want %d", foreign, claimed)
	}
	for seq := uint64(1); seq <= batches; seq++ {
		if _, ok := seqs[seq]; !ok {
			t.Errorf("batch %d missing from the stream", seq)
		}
	}

	// A genuine retry of batches already stored (here: left in the spool by
	// a run that died after the ack), under the plain id and under a fresh
	// one, is deduplicated and not taken for a collision.
	sp, err := spool.Open(t.TempDir(), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	for i, seq := range []uint64{1, 2} {
		m := seqs[seq]
		if err := sp.Put(time.Now().UnixNano()+int64(i), m.id, m.subject, len(m.batch.Events), m.raw); err != nil {
			t.Fatal(err)
		}
	}
	p2 := newPub(t, nc, Config{RunID: "run2", Spool: sp})
	waitAcked(t, p2, 2)
	closePub(t, p2)
	if st := p2.Stats(); st.DuplicateAcks != 2 || st.IDCollisions != 0 {
		t.Errorf("retry of stored batches: %d duplicate acks, %d collisions; want 2 and 0", st.DuplicateAcks, st.IDCollisions)
	}
	foreign = 0
	if got := fetchAllWithForeign(t, js, &foreign); len(got) != batches {
		t.Errorf("stream holds %d batches after the retries, want %d", len(got), batches)
	}
}

// storedMsg is one message of the stream, decoded if it is a batch.
type storedMsg struct {
	msg
	raw []byte
}

// fetchAllWithForeign reads the agent's batches from the stream and counts
// the other messages (the foreign publisher's, on flows.other.outgoing) in
// *foreign.
func fetchAllWithForeign(t *testing.T, js jetstream.JetStream, foreign *int) []storedMsg {
	t.Helper()
	var out []storedMsg
	for _, m := range storedMessages(t, js) {
		if m.Subject == "flows.other.outgoing" {
			*foreign++
			continue
		}
		var b schema.Batch
		if err := schema.DecodeBatch(m.Data, &b); err != nil {
			t.Fatalf("stream sequence %d on %s: %v", m.Sequence, m.Subject, err)
		}
		out = append(out, storedMsg{msg{m.Subject, m.Header.Get(schema.HeaderMsgID), b}, m.Data})
	}
	return out
}
