package deliverer

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/spool"
)

// writeCounter counts the JetStream writes the streams of the spool take
// from its start: every stored record (envelope, tombstone, state, claim,
// marker) advances its stream's last sequence. The state bucket's
// writes are followed one by one to find the waker's lease renewals (a
// write every few seconds whatever the traffic), which are left out. The
// message states are counted from the sequences, not from what the follow
// saw: a state purged a moment after it was written (the message left) can
// be gone before the follow reads it.
type writeCounter struct {
	e      *e2eEnv
	queue0 uint64
	state0 uint64
	cc     jetstream.ConsumeContext
	mu     sync.Mutex
	leases uint64 // lease writes seen
	last   uint64 // the last state bucket sequence seen
}

func (e *e2eEnv) countWrites() *writeCounter {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	w := &writeCounter{e: e, queue0: e.lastSeq(spool.QueueStream), state0: e.lastSeq("KV_" + spool.StateBucket)}
	w.last = w.state0
	ks, err := e.sp.JetStream().Stream(ctx, "KV_"+spool.StateBucket)
	if err != nil {
		e.t.Fatal(err)
	}
	oc, err := ks.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverNewPolicy, HeadersOnly: true})
	if err != nil {
		e.t.Fatal(err)
	}
	w.cc, err = oc.Consume(func(m jetstream.Msg) {
		md, err := m.Metadata()
		if err != nil {
			return
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		w.last = md.Sequence.Stream
		if strings.HasPrefix(m.Subject(), "$KV."+spool.StateBucket+".lease.") {
			w.leases++
		}
	})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(w.cc.Stop)
	return w
}

// stateRecords is the number of message states in the bucket's stream
// (leases and other keys with a dot aside), markers included.
func (e *e2eEnv) stateRecords() int {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ks, err := e.sp.JetStream().Stream(ctx, "KV_"+spool.StateBucket)
	if err != nil {
		e.t.Fatal(err)
	}
	info, err := ks.Info(ctx, jetstream.WithSubjectFilter("$KV."+spool.StateBucket+".>"))
	if err != nil {
		e.t.Fatal(err)
	}
	n := 0
	for subj, c := range info.State.Subjects {
		if !strings.Contains(strings.TrimPrefix(subj, "$KV."+spool.StateBucket+"."), ".") {
			n += int(c)
		}
	}
	return n
}

func (e *e2eEnv) lastSeq(stream string) uint64 {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := e.sp.JetStream().Stream(ctx, stream)
	if err != nil {
		e.t.Fatal(err)
	}
	return s.CachedInfo().State.LastSeq
}

// writes is what was counted so far, once every state write stored has
// been seen.
func (w *writeCounter) writes() (queue, state uint64) {
	w.e.t.Helper()
	end := w.e.lastSeq("KV_" + spool.StateBucket)
	mxtest.Within(w.e.t, 5*time.Second, "the state writes seen", func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.last >= end
	})
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.e.lastSeq(spool.QueueStream) - w.queue0, end - w.state0 - w.leases
}

// TestWritesPerMessage counts the JetStream writes (each one fsynced with
// the server's default) of a message from its arrival to its final
// acknowledgement: delivered at once, and deferred n times first. The
// figures are in README ("Writes per message"); the test pins them, so a
// change that adds a write per message shows here.
func TestWritesPerMessage(t *testing.T) {
	for _, parking := range []bool{false, true} {
		for _, deferrals := range []int{0, 1, 3} {
			e := newE2E(t)
			var calls atomic.Int64
			e.startMXOf("w.test", &mxtest.MX{Rcpt: func(string) error {
				if calls.Add(1) <= int64(deferrals) {
					return e2eSMTPError(451, [3]int{4, 7, 1}, "greylisted")
				}
				return nil
			}})
			w := e.countWrites()
			// A long ack wait: an attempt that ran past a quarter of it (a
			// slow machine) would claim or extend its claim, a write more.
			// Parking off: every deferral (a second's retry here) waits in
			// the consumer; on: every one is parked.
			parkAfter := -time.Duration(1)
			if parking {
				parkAfter = time.Nanosecond
			}
			r := e.startDeliverer(e2eAckWaitOf(time.Minute), func(c *Config, _ *e2eConn) { c.ParkAfter = parkAfter })
			e.enqueue(e2eSender, "x@w.test")
			e.waitEmpty(20 * time.Second)
			r.stop(t)
			q, s := w.writes()
			t.Logf("parking %v, deferred %d times: %d queue writes, %d state writes", parking, deferrals, q, s)
			// The envelope and the tombstone. Each deferral: its state
			// (parked or not); each attempt after it: a claim. A parked
			// message costs the same: its park is its state, and the
			// deliverer the waker hands it to claims it. When the message
			// leaves, its state is purged from the stream: a removal, not
			// a record (the server writes a tombstone of its own if the
			// record is not in the last block), and nothing is left.
			wantQueue, wantState := uint64(2), uint64(2*deferrals)
			if left := e.stateRecords(); left != 0 {
				t.Errorf("parking %v, deferred %d times: %d state records left after delivery", parking, deferrals, left)
			}
			if q != wantQueue || s != wantState {
				t.Errorf("parking %v, deferred %d times: %d queue and %d state writes, want %d and %d", parking, deferrals, q, s, wantQueue, wantState)
			}
		}
	}
}
