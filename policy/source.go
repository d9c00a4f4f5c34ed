package policy

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
)

// Source is where a process gets its configuration: the one in force now
// and its revision, for code that reads a setting at the moment it uses it
// (every per-connection and per-attempt setting), and news of every
// change, for code that must rebuild something (the gateway's go-smtp
// fronts). A Source is fed by -f files (FileSource) or by the controller's
// snapshots in NATS KV (FollowStore); a change that does not compile is
// reported and the configuration in force stays.
type Source struct {
	cur      atomic.Pointer[Config]
	revision atomic.Uint64

	mu   sync.Mutex
	subs []func(*Config)
}

// NewSource is a Source holding cfg at revision, changed only by Set.
func NewSource(cfg *Config, revision uint64) *Source {
	s := &Source{}
	s.cur.Store(cfg)
	s.revision.Store(revision)
	return s
}

// Current is the configuration in force.
func (s *Source) Current() *Config { return s.cur.Load() }

// Relay is the relay policy in force.
func (s *Source) Relay() *Relay { return s.cur.Load().Relay }

// Delivery is the outbound policy in force.
func (s *Source) Delivery() *Delivery { return s.cur.Load().Delivery }

// Revision is the revision of the configuration in force: the KV revision
// of its snapshot, or a count of reloads for files.
func (s *Source) Revision() uint64 { return s.revision.Load() }

// Subscribe registers f to run, in order, after every change.
func (s *Source) Subscribe(f func(*Config)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.subs = append(s.subs, f)
}

// Set puts cfg in force at revision and tells the subscribers.
func (s *Source) Set(cfg *Config, revision uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cur.Store(cfg)
	s.revision.Store(revision)
	for _, f := range s.subs {
		f(cfg)
	}
}

// FileSource is a Source fed by YAML files and folders, re-read when they
// change.
type FileSource struct {
	*Source
	paths []string
	opts  CompileOptions
	stamp string
}

// LoadFiles compiles the objects in paths (none: the built-in defaults)
// into a FileSource.
func LoadFileSource(paths []string, opts CompileOptions) (*FileSource, error) {
	cfg, err := compileFiles(paths, opts)
	if err != nil {
		return nil, err
	}
	f := &FileSource{Source: NewSource(cfg, 0), paths: paths, opts: opts}
	f.stamp = f.fingerprint()
	return f, nil
}

func compileFiles(paths []string, opts CompileOptions) (*Config, error) {
	objs, err := LoadFiles(paths)
	if err != nil {
		return nil, err
	}
	return objs.Compile(opts)
}

// Watch looks at the files every interval until ctx ends, and compiles
// them again when a name, size or modification time changed and then
// stayed the same for one more interval: a file caught in the middle of
// being written (an editor truncates, then writes) must not be taken for
// an empty configuration. report is told of every reload: the new
// configuration, or why it was refused.
func (f *FileSource) Watch(ctx context.Context, every time.Duration, report func(*Config, error)) {
	if len(f.paths) == 0 {
		return
	}
	t := time.NewTicker(every)
	defer t.Stop()
	seen := f.stamp
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		stamp := f.fingerprint()
		if stamp != seen {
			seen = stamp // changed: wait until it holds still
			continue
		}
		if stamp == f.stamp {
			continue
		}
		f.stamp = stamp
		cfg, err := compileFiles(f.paths, f.opts)
		if err != nil {
			report(nil, err)
			continue
		}
		f.Set(cfg, f.Revision()+1)
		report(cfg, nil)
	}
}

// fingerprint summarises the files' names, sizes and modification times.
func (f *FileSource) fingerprint() string {
	var parts []string
	for _, p := range f.paths {
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

// FollowStore is a Source that starts from the snapshot in KV (so a pod
// that starts while the controller is down runs the last configuration),
// or the built-in defaults when there has never been one or it does not
// compile, and follows every new snapshot until ctx ends. report is told
// of every revision: applied, or refused with the reason.
func FollowStore(ctx context.Context, store *Store, report func(revision uint64, cfg *Config, err error)) (*Source, error) {
	snap, rev, err := store.Current(ctx)
	if err != nil {
		return nil, err
	}
	if snap == nil {
		snap = &Snapshot{}
	}
	cfg, err := snap.Compile()
	if err != nil {
		report(rev, nil, fmt.Errorf("the configuration in KV does not compile, starting on the built-in defaults: %w", err))
		cfg, _ = (&Snapshot{}).Compile()
		rev = 0
	}
	s := NewSource(cfg, rev)
	go func() {
		err := store.Watch(ctx, func(cfg *Config, rev uint64) {
			if rev <= s.Revision() {
				return
			}
			s.Set(cfg, rev)
			report(rev, cfg, nil)
		}, func(rev uint64, err error) {
			report(rev, nil, err)
		})
		if err != nil && ctx.Err() == nil {
			report(0, nil, fmt.Errorf("watching the configuration stopped: %w", err))
		}
	}()
	return s, nil
}
