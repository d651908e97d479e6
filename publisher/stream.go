package publisher

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// MaxMsgHeadroom is added to the batch size bound for the stream's max
// message size: a batch is sealed once it reaches the bound, so it may pass
// it by one event (at most 64 names of up to 253 bytes each way), and the
// headers count too.
const MaxMsgHeadroom = 64 << 10

// StreamSettings describe the stream the agent manages.
type StreamSettings struct {
	Name       string
	Prefix     string // the stream holds <Prefix>.>
	MaxAge     time.Duration
	MaxBytes   int64
	Replicas   int
	Storage    jetstream.StorageType
	Duplicates time.Duration // dedupe window for Nats-Msg-Id
	// MaxMsgSize is the largest message the agent may send (its batch bound
	// plus MaxMsgHeadroom); 0 leaves it unlimited. A stream with a smaller
	// one is raised to it, a larger one is kept.
	MaxMsgSize int32
	// Log receives one line per setting changed on an existing stream; nil
	// uses slog.Default().
	Log *slog.Logger
}

// EnsureStream creates the stream, or updates an existing one. An update
// starts from the stream's current configuration and changes only what
// flowbus is configured with (subjects, max age, max bytes, replicas,
// duplicates window; storage cannot change), so that what an operator set
// with `nats stream edit` (description, direct get, per-subject limits, a
// larger max message size, other subjects) survives every restart. Each
// change is logged with its old and new value.
func EnsureStream(ctx context.Context, js jetstream.JetStream, s StreamSettings) (jetstream.Stream, error) {
	log := s.Log
	if log == nil {
		log = slog.Default()
	}
	subject := s.Prefix + ".>"
	maxBytes := s.MaxBytes
	if maxBytes == 0 {
		maxBytes = -1
	}
	replicas := max(s.Replicas, 1)
	existing, err := js.Stream(ctx, s.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		cfg := jetstream.StreamConfig{
			Name:       s.Name,
			Subjects:   []string{subject},
			MaxAge:     s.MaxAge,
			MaxBytes:   maxBytes,
			Replicas:   replicas,
			Storage:    s.Storage,
			Duplicates: s.Duplicates,
			Discard:    jetstream.DiscardOld,
			MaxMsgSize: -1,
		}
		if s.MaxMsgSize > 0 {
			cfg.MaxMsgSize = s.MaxMsgSize
		}
		st, err := js.CreateStream(ctx, cfg)
		if err != nil {
			return nil, fmt.Errorf("creating stream %s (subjects %s): %w", s.Name, subject, err)
		}
		return st, nil
	}
	if err != nil {
		return nil, fmt.Errorf("looking up stream %s: %w", s.Name, err)
	}
	cur := existing.CachedInfo().Config
	if cur.Storage != s.Storage {
		return nil, fmt.Errorf("stream %s exists with %s storage but %s is configured: storage cannot change; set FLOWBUS_STREAM_STORAGE=%s or delete the stream", s.Name, cur.Storage, s.Storage, cur.Storage)
	}
	cfg := cur // the operator's settings, then ours on top
	var changes int
	change := func(setting string, old, new any, why string) {
		changes++
		log.Info("stream setting changed", "stream", s.Name, "setting", setting, "old", old, "new", new, "why", why)
	}
	if !slices.Contains(cur.Subjects, subject) {
		cfg.Subjects = append(slices.Clone(cur.Subjects), subject)
		change("subjects", cur.Subjects, cfg.Subjects, "the agent publishes to "+subject+" (FLOWBUS_SUBJECT_PREFIX); other subjects are kept")
	}
	if cur.MaxAge != s.MaxAge {
		cfg.MaxAge = s.MaxAge
		change("max_age", cur.MaxAge, s.MaxAge, "FLOWBUS_STREAM_MAX_AGE")
	}
	if cur.MaxBytes != maxBytes {
		cfg.MaxBytes = maxBytes
		change("max_bytes", cur.MaxBytes, maxBytes, "FLOWBUS_STREAM_MAX_BYTES")
	}
	if cur.Replicas != replicas {
		cfg.Replicas = replicas
		change("replicas", cur.Replicas, replicas, "FLOWBUS_STREAM_REPLICAS")
	}
	if cur.Duplicates != s.Duplicates && s.Duplicates > 0 {
		cfg.Duplicates = s.Duplicates
		change("duplicates", cur.Duplicates, s.Duplicates, "FLOWBUS_STREAM_DUPLICATES: retries within it are stored once")
	}
	if s.MaxMsgSize > 0 && cur.MaxMsgSize > 0 && cur.MaxMsgSize < s.MaxMsgSize {
		cfg.MaxMsgSize = s.MaxMsgSize
		change("max_msg_size", cur.MaxMsgSize, s.MaxMsgSize, "the stream would refuse the agent's largest batches (FLOWBUS_BATCH_MAX_BYTES plus headroom)")
	}
	if changes == 0 {
		return existing, nil
	}
	st, err := js.UpdateStream(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("updating stream %s: %w", s.Name, err)
	}
	return st, nil
}
