package publisher

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// StreamSettings describe the stream the agent manages.
type StreamSettings struct {
	Name       string
	Prefix     string // the stream holds <Prefix>.>
	MaxAge     time.Duration
	MaxBytes   int64
	Replicas   int
	Storage    jetstream.StorageType
	Duplicates time.Duration // dedupe window for Nats-Msg-Id
}

// EnsureStream creates the stream or updates it to these settings. It keeps
// other subjects an operator may have added to the stream.
func EnsureStream(ctx context.Context, js jetstream.JetStream, s StreamSettings) (jetstream.Stream, error) {
	subject := s.Prefix + ".>"
	cfg := jetstream.StreamConfig{
		Name:       s.Name,
		Subjects:   []string{subject},
		MaxAge:     s.MaxAge,
		MaxBytes:   s.MaxBytes,
		Replicas:   s.Replicas,
		Storage:    s.Storage,
		Duplicates: s.Duplicates,
		Discard:    jetstream.DiscardOld,
	}
	if cfg.MaxBytes == 0 {
		cfg.MaxBytes = -1
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	if existing, err := js.Stream(ctx, s.Name); err == nil {
		info := existing.CachedInfo()
		have := false
		for _, sub := range info.Config.Subjects {
			if sub == subject {
				have = true
			}
		}
		if !have {
			cfg.Subjects = append(append([]string{}, info.Config.Subjects...), subject)
		} else {
			cfg.Subjects = info.Config.Subjects
		}
		if info.Config.Storage != cfg.Storage {
			return nil, fmt.Errorf("stream %s exists with %s storage but %s is configured: storage cannot change; set FLOWBUS_STREAM_STORAGE=%s or delete the stream", s.Name, info.Config.Storage, cfg.Storage, info.Config.Storage)
		}
		st, err := js.UpdateStream(ctx, cfg)
		if err != nil {
			return nil, fmt.Errorf("updating stream %s: %w", s.Name, err)
		}
		return st, nil
	} else if !errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, fmt.Errorf("looking up stream %s: %w", s.Name, err)
	}
	st, err := js.CreateStream(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("creating stream %s (subjects %s): %w", s.Name, subject, err)
	}
	return st, nil
}
