package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/flowbus/flowbus/cmd/internal/cli"
	"github.com/flowbus/flowbus/consumers/stream"
	"github.com/flowbus/flowbus/consumers/tail"
	"github.com/flowbus/flowbus/schema"
)

// parseArgs parses and validates the command line, reporting every problem at once rather than making
// the user fix them one run at a time. getenv and now are parameters so tests control them.
func parseArgs(args []string, getenv func(string) string, now time.Time) (*config, error) {
	fs := flag.NewFlagSet("flowtail", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	for _, name := range []string{"nats", "stream", "prefix"} {
		fs.String(name, "", "") // read through cli.Values: flag, else environment, else default
	}
	var (
		host     = fs.String("host", "", "")
		dir      = fs.String("direction", "", "")
		event    = fs.String("event", "", "")
		since    = fs.String("since", "", "")
		fromSeq  = fs.String("from-seq", "", "")
		all      = fs.Bool("all", false, "")
		jsonOut  = fs.Bool("json", false, "")
		local    = fs.Bool("local", false, "")
		version  = fs.Bool("version", false, "")
		count    = fs.String("count", "", "")
		idleExit = fs.String("idle-exit", "", "")
	)
	errs, err := cli.ParseFlags(fs, args, "flowtail", "")
	if err != nil {
		return nil, err
	}
	if *version {
		return nil, errVersion
	}
	v := cli.NewValues(fs, getenv)

	cfg := &config{json: *jsonOut, local: *local}
	o := &cfg.opts

	// A value from the environment is reported under the variable's name, so the user knows where to fix it.
	natsURL, src := v.Get("nats", "FLOWBUS_NATS_URL", stream.DefaultURL)
	if urls, err := cli.ParseURLs(natsURL); err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", src, err))
	} else {
		o.URLs = urls
	}

	o.Stream, src = v.Get("stream", "FLOWBUS_STREAM", stream.DefaultStream)
	if err := stream.ValidateName("stream name", o.Stream); err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", src, err))
	}

	o.Prefix, src = v.Get("prefix", "FLOWBUS_SUBJECT_PREFIX", schema.DefaultPrefix)
	if err := schema.ValidatePrefix(o.Prefix); err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", src, err))
	}

	if v.Set("host") {
		if err := schema.ValidateHostToken(*host); err != nil {
			errs = append(errs, fmt.Errorf("--host: %w", err))
		}
		o.Host = *host
	}
	if v.Set("direction") {
		d, err := schema.ParseDirection(*dir)
		if err != nil {
			errs = append(errs, fmt.Errorf("--direction: %w", err))
		}
		o.Direction = d
	}

	if v.Set("event") {
		e, err := tail.ParseEvents(*event)
		if err != nil {
			errs = append(errs, fmt.Errorf("--event: %w", err))
		}
		o.Events = e
	}

	var starts []string
	if v.Set("all") && *all {
		starts = append(starts, "--all")
		o.Start = stream.StartAll
	}
	if v.Set("since") {
		starts = append(starts, "--since")
		t, err := parseSince(*since, now)
		if err != nil {
			errs = append(errs, fmt.Errorf("--since: %w", err))
		}
		o.Start, o.Since = stream.StartTime, t
	}
	if v.Set("from-seq") {
		starts = append(starts, "--from-seq")
		n, err := strconv.ParseUint(*fromSeq, 10, 64)
		if err != nil || n == 0 {
			errs = append(errs, fmt.Errorf("--from-seq: %q is not a stream sequence (want an integer >= 1)", *fromSeq))
		}
		o.Start, o.FromSeq = stream.StartSeq, n
	}
	if len(starts) > 1 {
		errs = append(errs, fmt.Errorf("%s are mutually exclusive: choose one place to start", strings.Join(starts, ", ")))
	}

	if v.Set("count") {
		n, err := strconv.Atoi(*count)
		if err != nil || n < 1 {
			errs = append(errs, fmt.Errorf("--count: %q is not a positive integer", *count))
		}
		o.Count = n
	}
	if v.Set("idle-exit") {
		d, err := time.ParseDuration(*idleExit)
		if err != nil || d <= 0 {
			errs = append(errs, fmt.Errorf("--idle-exit: %q is not a positive duration (e.g. 5s, 1m)", *idleExit))
		}
		o.IdleExit = d
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return cfg, nil
}

// parseSince accepts what cli.ParseWhen does, but not a time in the future: the tail would show nothing
// until then, which looks like a hang.
func parseSince(s string, now time.Time) (time.Time, error) {
	t, err := cli.ParseWhen(s, now)
	if err != nil {
		return time.Time{}, err
	}
	if t.After(now) {
		return time.Time{}, fmt.Errorf("%q is in the future", s)
	}
	return t, nil
}
