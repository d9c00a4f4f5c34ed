package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// configSource holds the configuration in force and tells its users when it
// changes. It is fed either by -f files (re-read when they change) or by
// the controller's snapshots in NATS KV. A change that does not compile is
// logged and the last good configuration stays in force.
type configSource struct {
	cur      atomic.Pointer[policy.Config]
	revision atomic.Uint64

	mu       sync.Mutex
	onChange []func(*policy.Config)

	// File mode.
	paths []string
	opts  policy.CompileOptions
	stamp string
}

func (c *configSource) Relay() *policy.Relay       { return c.cur.Load().Relay }
func (c *configSource) Delivery() *policy.Delivery { return c.cur.Load().Delivery }

// subscribe registers f to run on every change.
func (c *configSource) subscribe(f func(*policy.Config)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.onChange = append(c.onChange, f)
}

func (c *configSource) set(cfg *policy.Config, revision uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cur.Store(cfg)
	c.revision.Store(revision)
	for _, f := range c.onChange {
		f(cfg)
	}
}

// newConfigSource compiles -f files (none: the built-in defaults).
func newConfigSource(paths []string, opts policy.CompileOptions) (*configSource, error) {
	c := &configSource{paths: paths, opts: opts}
	cfg, err := loadConfig(paths, opts)
	if err != nil {
		return nil, err
	}
	c.cur.Store(cfg)
	c.stamp = c.fingerprint()
	return c, nil
}

// fingerprint summarises the files' names, sizes and modification times.
func (c *configSource) fingerprint() string {
	var parts []string
	for _, p := range c.paths {
		_ = filepath.WalkDir(p, func(path string, d os.DirEntry, err error) error {
			if err != nil {
				parts = append(parts, path+":err")
				return nil
			}
			if info, err := d.Info(); err == nil && !d.IsDir() {
				parts = append(parts, fmt.Sprintf("%s:%d:%d", path, info.Size(), info.ModTime().UnixNano()))
			}
			return nil
		})
	}
	sort.Strings(parts)
	return strings.Join(parts, "|")
}

// watchFiles reloads -f files on change until ctx ends.
func (c *configSource) watchFiles(ctx context.Context, every time.Duration, log *zap.Logger) {
	if len(c.paths) == 0 {
		return
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		stamp := c.fingerprint()
		if stamp == c.stamp {
			continue
		}
		c.stamp = stamp
		cfg, err := loadConfig(c.paths, c.opts)
		if err != nil {
			log.Error("configuration change rejected; the previous configuration stays in force", zap.Error(err))
			continue
		}
		c.set(cfg, c.revision.Load()+1)
		log.Info("configuration reloaded", zap.Strings("relay", cfg.Relay.Sources), zap.Strings("delivery", cfg.Delivery.Sources))
	}
}

// newKVSource starts from the snapshot in KV (so a pod that starts while
// the controller is down runs the last configuration), or the built-in
// defaults when there has never been one, and follows new snapshots.
func newKVSource(ctx context.Context, store *policy.Store, log *zap.Logger) (*configSource, error) {
	c := &configSource{}
	snap, rev, err := store.Current(ctx)
	if err != nil {
		return nil, err
	}
	if snap == nil {
		snap = &policy.Snapshot{}
	}
	cfg, err := snap.Compile()
	if err != nil {
		log.Error("the configuration in KV does not compile; starting on the built-in defaults", zap.Uint64("revision", rev), zap.Error(err))
		cfg, _ = (&policy.Snapshot{}).Compile()
		rev = 0
	}
	c.cur.Store(cfg)
	c.revision.Store(rev)
	go func() {
		err := store.Watch(ctx, func(cfg *policy.Config, rev uint64) {
			if rev <= c.revision.Load() {
				return
			}
			c.set(cfg, rev)
			log.Info("configuration revision applied", zap.Uint64("revision", rev),
				zap.Strings("relay", cfg.Relay.Sources), zap.Strings("delivery", cfg.Delivery.Sources))
		}, func(rev uint64, err error) {
			log.Error("configuration revision rejected; the previous one stays in force", zap.Uint64("revision", rev), zap.Error(err))
		})
		if err != nil && ctx.Err() == nil {
			log.Error("watching the configuration stopped", zap.Error(err))
		}
	}()
	return c, nil
}

// heartbeat reports the revision this pod runs, to the controller (KV) and
// to Prometheus, until ctx ends.
func (c *configSource) heartbeat(ctx context.Context, store *policy.Store, pod, role string, reg prometheus.Registerer, log *zap.Logger) {
	g := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "jetmail_config_revision",
		Help: "Configuration revision this process runs.",
	}, func() float64 { return float64(c.revision.Load()) })
	if reg != nil {
		_ = reg.Register(g)
	}
	if store == nil {
		return
	}
	changed := make(chan struct{}, 1)
	c.subscribe(func(*policy.Config) {
		select {
		case changed <- struct{}{}:
		default:
		}
	})
	t := time.NewTicker(policy.PodTTL / 6)
	defer t.Stop()
	for {
		if err := store.Heartbeat(ctx, pod, role, c.revision.Load()); err != nil && ctx.Err() == nil {
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
}, pod, role string, reg prometheus.Registerer, log *zap.Logger) (*configSource, error) {
	if len(paths) > 0 {
		// Files mounted into a cluster pod (a ConfigMap) are compiled as
		// the cluster compiles: no field may make the pod read a file.
		src, err := newConfigSource(paths, policy.CompileOptions{})
		if err != nil {
			return nil, err
		}
		go src.watchFiles(ctx, 2*time.Second, log)
		go src.heartbeat(ctx, nil, pod, role, reg, log)
		return src, nil
	}
	store, err := policy.OpenStore(ctx, sp.JetStream(), sp.Config().Replicas)
	if err != nil {
		return nil, err
	}
	src, err := newKVSource(ctx, store, log)
	if err != nil {
		return nil, err
	}
	go src.heartbeat(ctx, store, pod, role, reg, log)
	return src, nil
}
