package agent

import (
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/flowbus/flowbus/agent/enrich"
	"github.com/flowbus/flowbus/internal/redact"
	"github.com/flowbus/flowbus/publisher"
)

// NATSOptions builds the client options from the configuration. Secrets go
// to the client library only; nothing here logs them.
func NATSOptions(cfg Config, self *enrich.SelfFilter, log *slog.Logger) ([]nats.Option, error) {
	var lastReconnectLog atomic.Int64
	url := redact.List(cfg.NATSURL)
	opts := []nats.Option{
		nats.Name("flowagent " + cfg.Host),
		nats.SetCustomDialer(publisher.Dialer(5*time.Second, self.Add)),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(time.Second),
		nats.ReconnectJitter(500*time.Millisecond, time.Second),
		nats.ReconnectBufSize(8 << 20),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			log.Warn("disconnected from NATS; batches are kept (memory, then spool) until it is back", "url", url, "err", err)
		}),
		// A server that stays away, or comes back refusing our TLS setup or
		// credentials, must not leave the agent retrying in silence; once
		// every 30 s is enough to say why.
		nats.ReconnectErrHandler(func(_ *nats.Conn, err error) {
			now := time.Now().UnixNano()
			if last := lastReconnectLog.Load(); now-last < int64(30*time.Second) || !lastReconnectLog.CompareAndSwap(last, now) {
				return
			}
			if fix := Refusal(err); fix != "" {
				log.Error("NATS refuses this agent; batches are kept (memory, then spool) meanwhile", "url", url, "err", err, "fix", fix)
				return
			}
			log.Warn("NATS is not reachable, retrying; batches are kept (memory, then spool) meanwhile", "url", url, "err", err)
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info("reconnected to NATS", "url", nc.ConnectedUrlRedacted())
		}),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if errors.Is(err, nats.ErrPermissionViolation) || strings.Contains(strings.ToLower(err.Error()), "permissions violation") {
				log.Error("NATS refused an operation: this host's credentials do not allow it. Each host may publish only to its own subjects: check that FLOWBUS_HOST matches the user's permissions", "err", err, "host", cfg.Host)
				return
			}
			log.Warn("NATS error", "err", err)
		}),
	}
	if cfg.NATSCA != "" {
		opts = append(opts, nats.RootCAs(cfg.NATSCA))
	}
	if cfg.NATSCert != "" {
		opts = append(opts, nats.ClientCert(cfg.NATSCert, cfg.NATSKey))
	}
	switch {
	case cfg.NATSCreds != "":
		opts = append(opts, nats.UserCredentials(cfg.NATSCreds))
	case cfg.NATSNKey != "":
		o, err := nats.NkeyOptionFromSeed(cfg.NATSNKey)
		if err != nil {
			return nil, fmt.Errorf("FLOWBUS_NATS_NKEY: %s is not an NKey seed file: %w", cfg.NATSNKey, err)
		}
		opts = append(opts, o)
	case cfg.NATSUser != "":
		opts = append(opts, nats.UserInfo(cfg.NATSUser, cfg.NATSPassword))
	case cfg.NATSToken != "":
		opts = append(opts, nats.Token(cfg.NATSToken))
	}
	return opts, nil
}

// ConnectNATS connects, telling apart a server that is not there yet (the
// agent starts anyway and keeps batches until it is) from a configuration
// NATS refuses (TLS, credentials), which is fatal with a clear fix.
func ConnectNATS(cfg Config, opts []nats.Option) (*nats.Conn, error) {
	first := append(append([]nats.Option{}, opts...), nats.Timeout(5*time.Second))
	nc, err := nats.Connect(cfg.NATSURL, first...)
	if err == nil {
		return nc, nil
	}
	if fix := Refusal(err); fix != "" {
		return nil, fmt.Errorf("connecting to NATS at %s: %w: %s", redact.List(cfg.NATSURL), err, fix)
	}
	// Not reachable (yet): connect in the background and queue meanwhile.
	return nats.Connect(cfg.NATSURL, append(opts, nats.RetryOnFailedConnect(true))...)
}

// Refusal returns the fix for errors that retrying cannot cure.
func Refusal(err error) string {
	var unknownCA x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	msg := strings.ToLower(err.Error())
	switch {
	case errors.As(err, &unknownCA) || strings.Contains(msg, "certificate signed by unknown authority"):
		return "the server's certificate is not signed by FLOWBUS_NATS_CA: point it at the CA that signed the server certificate"
	case errors.As(err, &hostErr) || strings.Contains(msg, "certificate is valid for"):
		return "the server's certificate does not name the host in FLOWBUS_NATS_URL: connect by a name the certificate holds"
	case errors.Is(err, nats.ErrTLS) || strings.Contains(msg, "tls: ") || strings.Contains(msg, "secure connection"):
		// ErrTLS includes a server closing the connection right after the
		// handshake, its usual answer to a missing client certificate.
		return "TLS setup mismatch: check FLOWBUS_NATS_CA, FLOWBUS_NATS_CERT and FLOWBUS_NATS_KEY against the server's tls block"
	case errors.Is(err, nats.ErrAuthorization) || strings.Contains(msg, "authorization violation") || strings.Contains(msg, "authentication"):
		return "the server refused the credentials: check FLOWBUS_NATS_CREDS, FLOWBUS_NATS_NKEY, FLOWBUS_NATS_USER/FLOWBUS_NATS_PASSWORD or FLOWBUS_NATS_TOKEN"
	}
	return ""
}
