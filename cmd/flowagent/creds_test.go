package main

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/flowbus/flowbus/agent"
	"github.com/flowbus/flowbus/agent/enrich"
	"github.com/flowbus/flowbus/publisher"
	"github.com/flowbus/flowbus/schema"
)

// operatorServer is a real in-process server in operator (JWT) mode with
// JetStream: the setup FLOWBUS_NATS_CREDS is for.
type operatorServer struct {
	srv     *server.Server
	account nkeys.KeyPair // signs user JWTs
}

// check returns v, or fails the test (by panicking) on err.
func check[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func newOperatorServer(t *testing.T) *operatorServer {
	op := check(nkeys.CreateOperator())
	opPub := check(op.PublicKey())
	opClaims := jwt.NewOperatorClaims(opPub)
	account := func(js bool) (nkeys.KeyPair, string, string) {
		kp := check(nkeys.CreateAccount())
		pub := check(kp.PublicKey())
		c := jwt.NewAccountClaims(pub)
		if js {
			c.Limits.JetStreamLimits = jwt.JetStreamLimits{MemoryStorage: -1, DiskStorage: -1, Streams: -1, Consumer: -1}
		}
		return kp, pub, check(c.Encode(op))
	}
	accKP, accPub, accJWT := account(true)
	_, sysPub, sysJWT := account(false) // the system account may not use JetStream
	opClaims.SystemAccount = sysPub
	check(opClaims.Encode(op)) // signs it, as nsc would
	res := &server.MemAccResolver{}
	if err := res.Store(accPub, accJWT); err != nil {
		t.Fatal(err)
	}
	if err := res.Store(sysPub, sysJWT); err != nil {
		t.Fatal(err)
	}
	srv, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(),
		TrustedOperators: []*jwt.OperatorClaims{opClaims}, SystemAccount: sysPub, AccountResolver: res, NoSigs: true, NoLog: true})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("operator-mode server did not start")
	}
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	return &operatorServer{srv: srv, account: accKP}
}

// creds writes a .creds file for a new user signed by signer; it returns
// the file and the user's seed.
func creds(t *testing.T, signer nkeys.KeyPair) (string, string) {
	user := check(nkeys.CreateUser())
	uc := jwt.NewUserClaims(check(user.PublicKey()))
	ujwt := check(uc.Encode(signer))
	seed := check(user.Seed())
	b := check(jwt.FormatUserConfig(ujwt, seed))
	p := filepath.Join(t.TempDir(), "agent.creds")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p, string(seed)
}

// FLOWBUS_NATS_CREDS authenticates the agent to an operator-mode server and
// batches reach the stream; creds of an account the server does not trust
// are refused with one error that names the variable.
func TestCredsAuthentication(t *testing.T) {
	s := newOperatorServer(t)
	url := s.srv.ClientURL()

	good, _ := creds(t, s.account)
	cfg := agent.Config{NATSURL: url, Host: "web-01", NATSCreds: good}
	opts, err := agent.NATSOptions(cfg, enrich.NewSelfFilter(), quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	nc, err := agent.ConnectNATS(cfg, opts)
	if err != nil {
		t.Fatalf("valid creds refused: %v", err)
	}
	defer nc.Close()
	js := check(jetstream.New(nc))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := publisher.EnsureStream(ctx, js, publisher.StreamSettings{Name: "FLOWS", Prefix: "flows", Duplicates: time.Minute, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	p := check(publisher.New(nc, publisher.Config{Prefix: "flows", Host: "web-01", RunID: "r1", Linger: 10 * time.Millisecond}, quietLogger()))
	p.Add(&schema.Event{Timestamp: time.Now().UnixNano(), Direction: schema.Outgoing, Src: mustAddr("10.0.0.1"), Dst: mustAddr("10.0.0.2"), SrcPort: 40000, DstPort: 443})
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if st := p.Stats(); st.EventsAcked != 1 {
		t.Fatalf("%d events acknowledged with .creds, want 1", st.EventsAcked)
	}

	// A user signed by an account the operator never signed.
	stranger := check(nkeys.CreateAccount())
	badFile, badSeed := creds(t, stranger)
	bad := agent.Config{NATSURL: url, Host: "web-01", NATSCreds: badFile}
	opts, err = agent.NATSOptions(bad, enrich.NewSelfFilter(), quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	nc2, err := agent.ConnectNATS(bad, opts)
	if err == nil {
		nc2.Close()
		t.Fatal("creds of an untrusted account were accepted")
	}
	if !strings.Contains(err.Error(), "FLOWBUS_NATS_CREDS") {
		t.Errorf("error does not name FLOWBUS_NATS_CREDS: %v", err)
	}
	if strings.Contains(err.Error(), badSeed) {
		t.Errorf("error shows the user's seed: %v", err)
	}
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }
