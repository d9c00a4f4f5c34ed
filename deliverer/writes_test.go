package deliverer

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/spool"
)

// writes is the number of JetStream writes the streams of the spool have
// taken: every stored record (envelope, tombstone, state, claim, purge
// marker) advances its stream's last sequence.
func (e *e2eEnv) writes() (queue, state uint64) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, name := range []string{spool.QueueStream, "KV_" + spool.StateBucket} {
		s, err := e.sp.JetStream().Stream(ctx, name)
		if err != nil {
			e.t.Fatal(err)
		}
		if name == spool.QueueStream {
			queue = s.CachedInfo().State.LastSeq
		} else {
			state = s.CachedInfo().State.LastSeq
		}
	}
	return queue, state
}

// TestWritesPerMessage counts the JetStream writes (each one fsynced with
// the server's default) of a message from its arrival to its final
// acknowledgement: delivered at once, and deferred n times first. The
// figures are in README ("Writes per message"); the test pins them, so a
// change that adds a write per message shows here.
func TestWritesPerMessage(t *testing.T) {
	for _, deferrals := range []int{0, 1, 3} {
		e := newE2E(t)
		var calls atomic.Int64
		e.startMXOf("w.test", &mxtest.MX{Rcpt: func(string) error {
			if calls.Add(1) <= int64(deferrals) {
				return e2eSMTPError(451, [3]int{4, 7, 1}, "greylisted")
			}
			return nil
		}})
		q0, s0 := e.writes()
		// A long ack wait: an attempt that ran past a quarter of it (a
		// slow machine) would claim or extend its claim, a write more.
		r := e.startDeliverer(e2eAckWaitOf(time.Minute))
		e.enqueue(e2eSender, "x@w.test")
		e.waitEmpty(20 * time.Second)
		r.stop(t)
		q1, s1 := e.writes()
		q, s := q1-q0, s1-s0
		t.Logf("deferred %d times: %d queue writes (envelope, tombstone), %d state writes", deferrals, q, s)
		// The envelope and the tombstone. Each deferral: its state; each
		// redelivery after it: a claim. The last one: a purge of the
		// state when the message leaves.
		wantState := uint64(0)
		if deferrals > 0 {
			wantState = uint64(2*deferrals) + 1
		}
		if q != 2 || s != wantState {
			t.Errorf("deferred %d times: %d queue and %d state writes, want 2 and %d", deferrals, q, s, wantState)
		}
	}
}
