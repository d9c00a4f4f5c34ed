package spool_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/jetmail/jetmail/spool"
)

func TestOpenCreatesStreamsAndBucketWithTheConfiguredLimits(t *testing.T) {
	for name, tc := range map[string]struct {
		storage       jetstream.StorageType
		maxQueueBytes int64
		maxBodyBytes  int64
	}{
		"file storage without caps":     {jetstream.FileStorage, -1, -1},
		"memory storage with byte caps": {jetstream.MemoryStorage, 8 << 20, 32 << 20},
		"file storage with a queue cap": {jetstream.FileStorage, 1 << 20, -1},
	} {
		t.Run(name, func(t *testing.T) {
			cfg := testConfig()
			cfg.Storage = tc.storage
			cfg.MaxQueueBytes = tc.maxQueueBytes
			cfg.MaxBodyBytes = tc.maxBodyBytes
			sp, _, _ := newSpool(t, cfg)
			js := sp.JetStream()
			ctx := ctxT(t)

			for _, want := range []struct {
				stream   string
				maxBytes int64
				subject  string
			}{
				{spool.QueueStream, tc.maxQueueBytes, "jetmail.queue.>"},
				{spool.BodyStream, tc.maxBodyBytes, "jetmail.body.>"},
			} {
				st, err := js.Stream(ctx, want.stream)
				if err != nil {
					t.Fatalf("stream %s: %v", want.stream, err)
				}
				info, err := st.Info(ctx)
				if err != nil {
					t.Fatalf("stream %s info: %v", want.stream, err)
				}
				c := info.Config
				if c.Replicas != 1 || c.Storage != tc.storage || c.MaxBytes != want.maxBytes {
					t.Errorf("%s: replicas %d storage %v max bytes %d; want 1, %v, %d",
						want.stream, c.Replicas, c.Storage, c.MaxBytes, tc.storage, want.maxBytes)
				}
				if c.MaxMsgsPerSubject != 1 || c.Discard != jetstream.DiscardNew {
					t.Errorf("%s: max msgs per subject %d discard %v; want 1 and DiscardNew", want.stream, c.MaxMsgsPerSubject, c.Discard)
				}
				if len(c.Subjects) != 1 || c.Subjects[0] != want.subject {
					t.Errorf("%s: subjects %v; want [%s]", want.stream, c.Subjects, want.subject)
				}
			}
			qi, err := sp.JetStream().Stream(ctx, spool.QueueStream)
			if err != nil {
				t.Fatal(err)
			}
			if !qi.CachedInfo().Config.AllowMsgTTL {
				t.Errorf("%s does not allow per-message TTL; tombstones could never expire", spool.QueueStream)
			}

			kv, err := js.KeyValue(ctx, spool.StateBucket)
			if err != nil {
				t.Fatalf("bucket %s: %v", spool.StateBucket, err)
			}
			if sp.State().Bucket() != spool.StateBucket {
				t.Errorf("State().Bucket() = %q", sp.State().Bucket())
			}
			kst, err := kv.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			kvInfo := kst.(*jetstream.KeyValueBucketStatus).StreamInfo()
			if kvInfo.Config.Replicas != 1 || kvInfo.Config.Storage != tc.storage || kst.History() != 1 {
				t.Errorf("%s: replicas %d storage %v history %d; want 1, %v, 1",
					spool.StateBucket, kvInfo.Config.Replicas, kvInfo.Config.Storage, kst.History(), tc.storage)
			}
			if err := sp.Ping(ctx); err != nil {
				t.Errorf("Ping on a healthy spool: %v", err)
			}
		})
	}
}

func TestOpenTwiceOnTheSameServerKeepsWhatIsQueued(t *testing.T) {
	cfg := testConfig()
	sp, _, nc := newSpool(t, cfg)
	env := newEnvelope(spool.NewQueueID(time.Now()))
	mustCommit(t, sp, env, []byte("Subject: kept\r\n\r\nbody\r\n"), "")

	again := openSpool(t, nc, cfg)
	if got := len(scanAll(t, again)); got != 1 {
		t.Fatalf("after a second Open the queue holds %d mails; want 1", got)
	}

	// A second Open with other limits updates the streams in place.
	cfg.MaxQueueBytes = 4 << 20
	updated := openSpool(t, nc, cfg)
	st, err := updated.JetStream().Stream(ctxT(t), spool.QueueStream)
	if err != nil {
		t.Fatal(err)
	}
	if got := st.CachedInfo().Config.MaxBytes; got != 4<<20 {
		t.Fatalf("after Open with MaxQueueBytes 4 MiB the stream has MaxBytes %d", got)
	}
	if got := len(scanAll(t, updated)); got != 1 {
		t.Fatalf("after an updating Open the queue holds %d mails; want 1", got)
	}
}

func TestOpenFromFourGoroutinesAtOnceSucceedsEverywhere(t *testing.T) {
	s := startNATS(t, t.TempDir(), -1)
	cfg := testConfig()
	var wg sync.WaitGroup
	errs := make([]error, 4)
	spools := make([]*spool.Spool, 4)
	start := make(chan struct{})
	for i := range errs {
		nc := connect(t, s)
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			spools[i], errs[i] = spool.Open(ctx, nc, cfg)
		}()
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("Open #%d of 4 concurrent: %v", i, err)
		}
	}
	// Each handle works on the same queue.
	next := queueIDs()
	for _, sp := range spools {
		mustCommit(t, sp, newEnvelope(next()), []byte("x\r\n"), "")
	}
	for i, sp := range spools {
		if got := len(scanAll(t, sp)); got != 4 {
			t.Fatalf("spool %d sees %d mails; want 4", i, got)
		}
	}
}

func TestOpenRefusesUnusableConfigurations(t *testing.T) {
	s := startNATS(t, t.TempDir(), -1)
	nc := connect(t, s)
	for name, mutate := range map[string]func(*spool.Config){
		"zero replicas are refused":                        func(c *spool.Config) { c.Replicas = 0 },
		"a zero duplicate window is refused":               func(c *spool.Config) { c.DuplicateWindow = 0 },
		"a negative publish timeout is refused":            func(c *spool.Config) { c.PublishTimeout = -time.Second },
		"a zero chunk size is refused":                     func(c *spool.Config) { c.ChunkSize = 0 },
		"three replicas on a single server are an error":   func(c *spool.Config) { c.Replicas = 3 },
		"the zero Config is refused rather than unlimited": func(c *spool.Config) { *c = spool.Config{} },
	} {
		t.Run(name, func(t *testing.T) {
			cfg := testConfig()
			mutate(&cfg)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			sp, err := spool.Open(ctx, nc, cfg)
			if err == nil {
				t.Fatalf("Open(%+v) = %v, nil; want an error", cfg, sp)
			}
		})
	}
}

func TestClusterConfigDiffersFromDefaultOnlyInReplicas(t *testing.T) {
	d, c := spool.DefaultConfig(), spool.ClusterConfig()
	if d.Replicas != 1 || c.Replicas != 3 {
		t.Fatalf("replicas: default %d cluster %d; want 1 and 3", d.Replicas, c.Replicas)
	}
	c.Replicas = d.Replicas
	if c != d {
		t.Fatalf("ClusterConfig %+v differs from DefaultConfig %+v beyond replicas", c, d)
	}
	if d.DuplicateWindow != 24*time.Hour || d.PublishTimeout != 10*time.Second || d.ChunkSize != 256<<10 ||
		d.Storage != jetstream.FileStorage || d.MaxQueueBytes != -1 || d.MaxBodyBytes != -1 {
		t.Fatalf("DefaultConfig %+v does not match its documentation", d)
	}
}
