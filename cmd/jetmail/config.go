package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/jetmail/jetmail/policy"
)

// configSource holds the configuration compiled from -f files and keeps it
// current: the files are looked at every interval, and a change that
// compiles replaces the running configuration for new sessions and the next
// delivery attempts. A change that does not compile is logged and the last
// good configuration stays in force.
type configSource struct {
	paths     []string
	relayhost string
	cur       atomic.Pointer[policy.Config]
	stamp     string
	onChange  []func(*policy.Config)
}

func newConfigSource(paths []string, relayhost string) (*configSource, error) {
	c := &configSource{paths: paths, relayhost: relayhost}
	cfg, err := loadConfig(paths, relayhost)
	if err != nil {
		return nil, err
	}
	c.cur.Store(cfg)
	c.stamp = c.fingerprint()
	return c, nil
}

func (c *configSource) Relay() *policy.Relay       { return c.cur.Load().Relay }
func (c *configSource) Delivery() *policy.Delivery { return c.cur.Load().Delivery }

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

// watch reloads on change until ctx ends.
func (c *configSource) watch(ctx context.Context, every time.Duration, log *zap.Logger) {
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
		cfg, err := loadConfig(c.paths, c.relayhost)
		if err != nil {
			log.Error("configuration change rejected; the previous configuration stays in force", zap.Error(err))
			continue
		}
		c.cur.Store(cfg)
		for _, f := range c.onChange {
			f(cfg)
		}
		log.Info("configuration reloaded", zap.Strings("relay", cfg.Relay.Sources), zap.Strings("delivery", cfg.Delivery.Sources))
	}
}
