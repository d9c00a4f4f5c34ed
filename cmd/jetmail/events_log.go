package main

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/jetmail/jetmail/events"
	"github.com/jetmail/jetmail/spool"
)

// eventFlags are the event log's stream settings, on every role that
// writes events (serve, gateway, deliverer).
type eventFlags struct {
	maxAge   time.Duration
	maxBytes int64
}

func (f *eventFlags) register(fl *pflag.FlagSet) {
	fl.DurationVar(&f.maxAge, "events-max-age", events.DefaultMaxAge, "how long the event log (stream "+events.Stream+") keeps events")
	fl.Int64Var(&f.maxBytes, "events-max-bytes", events.DefaultMaxBytes, "cap on the event log stream; the oldest events go first (-1: no cap)")
}

// openEventLog creates or updates the event stream, with the queue's
// replicas and storage, and starts the process's event log. The event log
// is for reports, not mail: a stream that cannot be set up (an older
// permissions file, say) is logged, and the log still publishes, in case
// another role could set it up.
func openEventLog(ctx context.Context, f *eventFlags, sp *spool.Spool, pod string, reg prometheus.Registerer, log *zap.Logger) *events.Log {
	cfg := sp.Config()
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := events.OpenStream(sctx, sp.JetStream(), events.StreamConfig{Replicas: cfg.Replicas, Storage: cfg.Storage,
		MaxAge: f.maxAge, MaxBytes: f.maxBytes}); err != nil {
		log.Error("event log: cannot create or update its stream; events are published anyway and are lost if it does not exist", zap.Error(err))
	}
	return events.New(events.Config{JetStream: sp.JetStream(), Pod: pod, Registerer: reg, Log: log.Named("events")})
}

// closeEventLog publishes the last batch.
func closeEventLog(l *events.Log) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = l.Close(ctx)
}
