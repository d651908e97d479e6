package agent

import (
	"io"
	"log/slog"
)

// WarnUnknown logs the warnings about unknown FLOWBUS_* variables.
func WarnUnknown(log *slog.Logger, warnings []string) {
	for _, w := range warnings {
		log.Warn(w)
	}
}

// NewLogger is the agent's logger, at FLOWBUS_LOG_LEVEL in FLOWBUS_LOG_FORMAT.
func NewLogger(cfg Config, w io.Writer) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(cfg.LogLevel))
	opts := &slog.HandlerOptions{Level: lvl}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
