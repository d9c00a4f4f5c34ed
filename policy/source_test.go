package policy_test

import (
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jetmail/jetmail/policy"
)

func TestFileSourceFollowsItsFilesAndKeepsTheLastGoodConfiguration(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "relay.yaml")
	write := func(maxBytes string) {
		t.Helper()
		doc := "apiVersion: mail.jetmail.io/v1alpha1\nkind: RelayPolicy\nmetadata: {name: r}\nspec:\n  maxMessageBytes: " + maxBytes + "\n"
		if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
		// Modification times can be coarse: make each write visible.
		later := time.Now().Add(time.Duration(len(maxBytes)) * time.Second)
		_ = os.Chtimes(path, later, later)
	}
	write("100000")
	src, err := policy.LoadFileSource([]string{dir}, policy.CompileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := src.Relay().MaxMessageBytes; got != 100000 {
		t.Fatalf("MaxMessageBytes %d, want 100000", got)
	}
	var told atomic.Int64
	src.Subscribe(func(c *policy.Config) { told.Store(c.Relay.MaxMessageBytes) })
	refused := make(chan error, 10)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go src.Watch(ctx, 10*time.Millisecond, func(_ *policy.Config, err error) {
		if err != nil {
			refused <- err
		}
	})

	write("2000000")
	waitFor(t, "the new file to be in force", func() bool { return src.Relay().MaxMessageBytes == 2000000 })
	// Subscribers are told after the configuration is in force: a moment
	// later, on the watcher's goroutine.
	waitFor(t, "the subscriber to be told", func() bool { return told.Load() == 2000000 })
	if told.Load() != 2000000 || src.Revision() != 1 {
		t.Errorf("subscriber told %d, revision %d; want 2000000 and 1", told.Load(), src.Revision())
	}

	write("-5000000") // does not compile
	select {
	case err := <-refused:
		t.Logf("refused as expected: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("a broken file was not reported")
	}
	if src.Relay().MaxMessageBytes != 2000000 || src.Revision() != 1 {
		t.Errorf("after a broken file: MaxMessageBytes %d, revision %d; want the last good 2000000 at 1",
			src.Relay().MaxMessageBytes, src.Revision())
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
