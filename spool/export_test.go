package spool

import (
	"testing"
	"time"
)

// HoldGroupCommit makes writes to the queue stream (state false) or to the
// state bucket (state true) on s queue as if a write were in flight.
// waitQueued returns once n writes are queued; release lets the first of
// them lead, as the end of a write would.
func HoldGroupCommit(t testing.TB, s *Spool, state bool) (waitQueued func(n int), release func()) {
	g := &s.group
	if state {
		g = &s.stateGroup
	}
	g.mu.Lock()
	if g.leading {
		g.mu.Unlock()
		t.Fatal("HoldGroupCommit: a write is in flight")
	}
	g.leading = true
	g.mu.Unlock()
	waitQueued = func(n int) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			g.mu.Lock()
			queued := len(g.queue)
			g.mu.Unlock()
			if queued >= n {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d commits queued after 10s; want %d", queued, n)
			}
			time.Sleep(time.Millisecond)
		}
	}
	release = func() {
		g.mu.Lock()
		defer g.mu.Unlock()
		if len(g.queue) > 0 {
			g.queue[0].done <- true
		} else {
			g.leading = false
		}
	}
	return waitQueued, release
}

// ServerAtLeast is serverAtLeast, for its test.
var ServerAtLeast = serverAtLeast
