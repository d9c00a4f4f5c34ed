package main

import (
	"context"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// The configuration path of every role is a policy.Source: -f files
// (policy.FileSource) or the controller's snapshots in KV
// (policy.FollowStore). This file only wires them to the logs, the
// heartbeats and the metrics.

// openFiles compiles -f files into a Source, re-read when they change.
func openFiles(ctx context.Context, paths []string, opts policy.CompileOptions, log *zap.Logger) (*policy.Source, error) {
	src, err := policy.LoadFileSource(paths, opts)
	if err != nil {
		return nil, err
	}
	go src.Watch(ctx, 2*time.Second, func(cfg *policy.Config, err error) {
		if err != nil {
			log.Error("configuration change rejected; the previous configuration stays in force", zap.Error(err))
			return
		}
		log.Info("configuration reloaded", zap.Strings("relay", cfg.Relay.Sources), zap.Strings("delivery", cfg.Delivery.Sources))
	})
	return src.Source, nil
}

// heartbeat reports the revision this pod runs, to the controller (KV) and
// to Prometheus, until ctx ends.
func heartbeat(ctx context.Context, c *policy.Source, store *policy.Store, pod, role string, reg prometheus.Registerer, log *zap.Logger) {
	g := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "jetmail_config_revision",
		Help: "Configuration revision this process runs.",
	}, func() float64 { return float64(c.Revision()) })
	if reg != nil {
		_ = reg.Register(g)
	}
	if store == nil {
		return
	}
	changed := make(chan struct{}, 1)
	c.Subscribe(func(*policy.Config) {
		select {
		case changed <- struct{}{}:
		default:
		}
	})
	t := time.NewTicker(policy.PodTTL / 6)
	defer t.Stop()
	for {
		if err := store.Heartbeat(ctx, pod, role, c.Revision()); err != nil && ctx.Err() == nil {
			log.Warn("heartbeat", zap.Error(err))
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-changed:
		}
	}
}

// openConfig picks the configuration path of a cluster role: -f files if
// given, else the controller's snapshots in KV, with heartbeats.
func openConfig(ctx context.Context, paths []string, sp interface {
	JetStream() jetstream.JetStream
	Config() spool.Config
}, pod, role string, reg prometheus.Registerer, log *zap.Logger) (*policy.Source, error) {
	if len(paths) > 0 {
		// Files mounted into a cluster pod (a ConfigMap) are compiled as
		// the cluster compiles: no field may make the pod read a file.
		src, err := openFiles(ctx, paths, policy.CompileOptions{}, log)
		if err != nil {
			return nil, err
		}
		go heartbeat(ctx, src, nil, pod, role, reg, log)
		return src, nil
	}
	store, err := untilUp(ctx, log, "opening the configuration bucket", func(c context.Context) (*policy.Store, error) {
		return policy.OpenStore(c, sp.JetStream(), sp.Config().Replicas)
	})
	if err != nil {
		return nil, err
	}
	// FollowStore's context is the watch's: it must outlive the try.
	src, err := untilUp(ctx, log, "reading the configuration", func(context.Context) (*policy.Source, error) {
		return policy.FollowStore(ctx, store, func(rev uint64, cfg *policy.Config, err error) {
			if err != nil {
				log.Error("configuration revision rejected; the previous one stays in force", zap.Uint64("revision", rev), zap.Error(err))
				return
			}
			log.Info("configuration revision applied", zap.Uint64("revision", rev),
				zap.Strings("relay", cfg.Relay.Sources), zap.Strings("delivery", cfg.Delivery.Sources))
		})
	})
	if err != nil {
		return nil, err
	}
	go heartbeat(ctx, src, store, pod, role, reg, log)
	return src, nil
}
