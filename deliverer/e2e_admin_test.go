package deliverer

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/spool"
)

// What an administrator does to queued mail (jetmail queue hold, release,
// retry, rm), against a running deliverer and a real MX.

// find reads qid's current record.
func (e *e2eEnv) find(qid string) *spool.Message {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m, err := e.sp.Find(ctx, qid)
	if err != nil {
		e.t.Fatalf("find %s: %v", qid, err)
	}
	return m
}

func (e *e2eEnv) act(what string, do func(*spool.Spool, context.Context, *spool.Message, time.Time) error, qid string) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := do(e.sp, ctx, e.find(qid), time.Now()); err != nil {
		e.t.Fatalf("%s %s: %v", what, qid, err)
	}
}

// observed gives a replica a logger whose lines the test reads.
func observed(logs **observer.ObservedLogs) e2eReplicaOpt {
	return func(c *Config, _ *e2eConn) {
		core, l := observer.New(zap.InfoLevel)
		c.Log, *logs = zap.New(core), l
	}
}

func logged(logs *observer.ObservedLogs, text string) bool {
	for _, e := range logs.All() {
		if strings.Contains(e.Message, text) {
			return true
		}
	}
	return false
}

// gatedMX serves the MX of domain whose DATA calls for which gate says
// so wait until the test opens it, then answer answer(n).
type gatedMX struct {
	*mxtest.MX
	inData chan struct{} // one value per gated DATA call
	open   chan struct{}
}

func (e *e2eEnv) gatedMX(domain string, gate func(n int) bool, answer func(n int) error) *gatedMX {
	g := &gatedMX{inData: make(chan struct{}, 1), open: make(chan struct{})}
	g.MX = e.startMXOf(domain, &mxtest.MX{Data: func(n int) error {
		if gate(n) {
			g.inData <- struct{}{}
			<-g.open
		}
		return answer(n)
	}})
	return g
}

func firstOnly(n int) bool { return n == 1 }
func every(int) bool       { return true }
func accept(int) error     { return nil }

// tryAgain defers the first DATA and accepts the others.
func tryAgain(n int) error {
	if n == 1 {
		return e2eSMTPError(451, [3]int{4, 3, 0}, "try again")
	}
	return nil
}

func TestAdministratorActions(t *testing.T) {
	t.Run("a held message is not attempted until released, and then at once", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		mx := e.startMXOf("hold.test", &mxtest.MX{})
		qid := e.enqueue(e2eSender, "bob@hold.test")
		e.act("hold", (*spool.Spool).Hold, qid)
		var logs *observer.ObservedLogs
		r := e.startDeliverer(observed(&logs))
		mxtest.Within(t, 10*time.Second, "the deliverer to find the message held", func() bool {
			return logged(logs, "on hold")
		})
		// Longer than the ack wait: a held message is handed back, not
		// left to time out and come back.
		time.Sleep(2 * e2eAckWait)
		if n := mx.DataCount(); n != 0 {
			t.Fatalf("a held message reached the MX %d times", n)
		}
		if m := e.find(qid); m.Held.IsZero() {
			t.Fatalf("record of %s lost its hold: %+v", qid, m)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		stats, err := e.sp.Stats(ctx)
		if err != nil || stats.Held != 1 {
			t.Fatalf("stats: held %v, %v; want 1", stats, err)
		}
		released := time.Now()
		e.act("release", (*spool.Spool).Release, qid)
		// The hand-back was for an hour (heldRecheck): the release
		// replaced the record, so the message goes now.
		e.waitEmpty(10 * time.Second)
		if n := mx.DataCount(); n != 1 {
			t.Fatalf("the released message reached the MX %d times, want 1", n)
		}
		t.Logf("delivered %s after the release", time.Since(released).Round(time.Millisecond))
		if stats, err := e.sp.Stats(ctx); err != nil || stats.Held != 0 || stats.HandedOut != 0 {
			t.Errorf("stats after the release: %+v, %v", stats, err)
		}
		r.stop(t)
	})

	t.Run("retry makes a deferred recipient due now, once", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) {
			sp.RetryIntervals = []metav1.Duration{{Duration: time.Hour}}
		}, nil, nil)
		var greylist atomic.Bool
		greylist.Store(true)
		mx := e.startMXOf("grey.test", &mxtest.MX{Rcpt: func(string) error {
			if greylist.Load() {
				return e2eSMTPError(451, [3]int{4, 7, 1}, "greylisted, come back later")
			}
			return nil
		}})
		r := e.startDeliverer()
		qid := e.enqueue(e2eSender, "carol@grey.test", "dave@grey.test")
		st := e.waitState(qid, 10*time.Second, "the first deferral", func(st *spool.DeliveryState) bool { return st.Attempts == 1 })
		if d := time.Until(st.NextAttempt); d < time.Minute {
			t.Fatalf("next attempt in %s; the test needs a retry far off", d)
		}
		greylist.Store(false)
		e.act("retry", (*spool.Spool).Retry, qid)
		e.waitEmpty(10 * time.Second)
		txns := mx.Transactions()
		if len(txns) != 1 || len(txns[0].Rcpts) != 2 {
			t.Fatalf("after the retry the MX got %+v", txns)
		}
		if st, _ := e.sp.LoadState(context.Background(), qid); st != nil {
			t.Errorf("delivered mail kept its state %+v", st)
		}
		r.stop(t)
	})

	t.Run("retry while the attempt it would repeat is still running does not run a second one beside it", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		mx := e.gatedMX("slow.test", firstOnly, tryAgain)
		r := e.startDeliverer()
		qid := e.enqueue(e2eSender, "erin@slow.test")
		<-mx.inData
		// A retry (and a hold-release) replaces the record the attempt
		// holds: the new record is claimed before its attempt, and waits.
		e.act("retry", (*spool.Spool).Retry, qid)
		time.Sleep(time.Second)
		if n := mx.DataCount(); n != 1 {
			t.Fatalf("a second attempt ran beside the first: %d DATA", n)
		}
		close(mx.open)
		e.waitEmpty(15 * time.Second)
		if n := len(mx.Transactions()); n != 1 {
			t.Fatalf("delivered %d times, want once", n)
		}
		r.stop(t)
	})

	t.Run("rm during a slow delivery that succeeds: no crash, no second copy, the log says so", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		mx := e.gatedMX("slow.test", every, accept)
		var logs *observer.ObservedLogs
		r := e.startDeliverer(observed(&logs))
		qid := e.enqueue(e2eSender, "frank@slow.test")
		<-mx.inData
		m := e.find(qid)
		e.act("rm", (*spool.Spool).Remove, qid)
		close(mx.open)
		mxtest.Within(t, 10*time.Second, "the attempt to log the removal", func() bool {
			return logged(logs, "removed from the queue")
		})
		time.Sleep(2 * e2eAckWait)
		if n := len(mx.Transactions()); n != 1 {
			t.Fatalf("the MX got %d copies, want the one in flight", n)
		}
		if ids := e.queued(); len(ids) != 0 {
			t.Fatalf("queue after rm: %v", ids)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		last, err := e.sp.Get(ctx, m.Subject)
		if err != nil || !last.Tombstone || !last.Removed {
			t.Fatalf("record after rm: %+v, %v; want a removal tombstone", last, err)
		}
		if st, _ := e.sp.LoadState(ctx, qid); st != nil {
			t.Errorf("state of removed mail: %+v", st)
		}
		r.stop(t)
	})

	t.Run("rm during a slow delivery that is deferred: its state does not outlive it and it never comes back", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		mx := e.gatedMX("slow.test", every, func(int) error { return e2eSMTPError(451, [3]int{4, 3, 0}, "try again") })
		var logs *observer.ObservedLogs
		r := e.startDeliverer(observed(&logs))
		qid := e.enqueue(e2eSender, "grace@slow.test")
		<-mx.inData
		e.act("rm", (*spool.Spool).Remove, qid)
		close(mx.open)
		mxtest.Within(t, 10*time.Second, "the attempt to log the removal", func() bool {
			return logged(logs, "removed from the queue")
		})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if st, err := e.sp.LoadState(ctx, qid); st != nil || err != nil {
			t.Errorf("state of removed mail: %+v, %v", st, err)
		}
		time.Sleep(2 * e2eAckWait)
		if n := mx.DataCount(); n != 1 {
			t.Fatalf("removed mail was attempted again: %d DATA", n)
		}
		if _, err := e.sp.Find(ctx, qid); !errors.Is(err, spool.ErrNoSuchMessage) {
			t.Fatalf("find removed mail: %v", err)
		}
		r.stop(t)
	})

	t.Run("hold during an attempt that delivers: delivered once, and no hold is left behind", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		mx := e.gatedMX("slow.test", every, accept)
		r := e.startDeliverer()
		qid := e.enqueue(e2eSender, "judy@slow.test")
		<-mx.inData
		e.act("hold", (*spool.Spool).Hold, qid)
		close(mx.open)
		e.waitEmpty(10 * time.Second)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if stats, err := e.sp.Stats(ctx); err != nil || stats.Held != 0 {
			t.Errorf("held count after the held message was delivered: %+v, %v", stats, err)
		}
		if n := len(mx.Transactions()); n != 1 {
			t.Fatalf("delivered %d times, want once", n)
		}
		r.stop(t)
	})

	t.Run("hold during an attempt that defers: the message then waits for its release", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		mx := e.gatedMX("slow.test", firstOnly, tryAgain)
		r := e.startDeliverer()
		qid := e.enqueue(e2eSender, "heidi@slow.test")
		<-mx.inData
		e.act("hold", (*spool.Spool).Hold, qid)
		close(mx.open)
		e.waitState(qid, 10*time.Second, "the deferral", func(st *spool.DeliveryState) bool { return st.Attempts == 1 && st.Claim == nil })
		time.Sleep(2 * e2eAckWait)
		if n := mx.DataCount(); n != 1 {
			t.Fatalf("held mail attempted again: %d DATA", n)
		}
		if m := e.find(qid); m.Held.IsZero() {
			t.Fatal("the hold was lost")
		}
		e.act("release", (*spool.Spool).Release, qid)
		e.waitEmpty(10 * time.Second)
		if n := len(mx.Transactions()); n != 1 {
			t.Fatalf("delivered %d times after the release, want once", n)
		}
		r.stop(t)
	})
}

// The queue tools show each recipient's earlier attempts: the state keeps
// them, at no write of their own.
func TestRecipientHistory(t *testing.T) {
	e := newE2E(t)
	var calls atomic.Int64
	e.startMXOf("grey.test", &mxtest.MX{Rcpt: func(string) error {
		if calls.Add(1) <= 3 {
			return e2eSMTPError(451, [3]int{4, 7, 1}, "greylisted, come back later")
		}
		return e2eSMTPError(452, [3]int{4, 2, 2}, "mailbox full")
	}})
	r := e.startDeliverer()
	qid := e.enqueue(e2eSender, "ivan@grey.test")
	st := e.waitState(qid, 20*time.Second, "four attempts", func(st *spool.DeliveryState) bool { return st.Attempts >= 4 })
	r.stop(t)
	rs := e2eRcptState(st, "ivan@grey.test")
	if rs.Code != 452 || len(rs.History) != 3 {
		t.Fatalf("recipient state after 4 attempts: %+v", rs)
	}
	for i, h := range rs.History {
		if h.Code != 451 || h.Enhanced != "4.7.1" || h.Status != spool.RcptDeferred || h.Relay == "" || h.At.IsZero() ||
			(i > 0 && !h.At.After(rs.History[i-1].At)) {
			t.Errorf("history[%d] = %+v", i, h)
		}
	}
}

// TestAdministratorActionsUnderLoad throws random holds, releases, retries
// and removals at messages a deliverer is working on, against an MX that
// defers a third of its transactions after a random pause, then releases
// everything and checks: no recipient got a message twice, every message
// not removed was delivered, and no state or hold marker was left behind.
func TestAdministratorActionsUnderLoad(t *testing.T) {
	e := newE2E(t)
	var calls atomic.Int64
	mx := e.startMXOf("chaos.test", &mxtest.MX{Data: func(int) error {
		n := calls.Add(1)
		time.Sleep(time.Duration(n%7) * 40 * time.Millisecond)
		if n%3 != 0 {
			return e2eSMTPError(451, [3]int{4, 3, 0}, "try again")
		}
		return nil
	}})
	r := e.startDeliverer()
	const n = 40
	var qids []string
	for i := range n {
		qids = append(qids, e.enqueue(e2eSender, fmt.Sprintf("u%d@chaos.test", i)))
	}
	removed := map[string]bool{}
	// A new seed each run, logged; JETMAIL_CHAOS_SEED replays one.
	seed := uint64(time.Now().UnixNano())
	if v, err := strconv.ParseUint(os.Getenv("JETMAIL_CHAOS_SEED"), 10, 64); err == nil {
		seed = v
	}
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	deadline := time.Now().Add(8 * time.Second)
	actions := map[string]int{}
	for time.Now().Before(deadline) {
		qid := qids[rng.IntN(n)]
		m, err := e.sp.Find(ctx, qid)
		if errors.Is(err, spool.ErrNoSuchMessage) {
			continue // delivered, or removed
		}
		if err != nil {
			t.Fatal(err)
		}
		var do func(*spool.Spool, context.Context, *spool.Message, time.Time) error
		kind := ""
		switch p := rng.IntN(40); {
		case p == 0:
			do, kind = (*spool.Spool).Remove, "rm"
		case p < 16 && m.Held.IsZero():
			do, kind = (*spool.Spool).Hold, "hold"
		case p < 28 && !m.Held.IsZero():
			do, kind = (*spool.Spool).Release, "release"
		default:
			do, kind = (*spool.Spool).Retry, "retry"
		}
		err = do(e.sp, ctx, m, time.Now())
		switch {
		case errors.Is(err, spool.ErrChanged):
		case err != nil:
			t.Fatalf("action on %s: %v", qid, err)
		default:
			actions[kind]++
			if kind == "rm" {
				removed[qid] = true
			}
		}
		time.Sleep(time.Duration(rng.IntN(60)) * time.Millisecond)
	}
	// Release what is still held, until nothing is.
	mxtest.Within(t, 45*time.Second, "every message to leave the queue", func() bool {
		left := 0
		_ = e.sp.Scan(ctx, func(m *spool.Message) error {
			left++
			if !m.Held.IsZero() {
				_ = e.sp.Release(ctx, m, time.Now())
			}
			return nil
		})
		return left == 0
	})
	r.stop(t)
	got := map[string]int{}
	for _, txn := range mx.Transactions() {
		for _, rc := range txn.Rcpts {
			got[rc]++
		}
	}
	for i, qid := range qids {
		rcpt := fmt.Sprintf("u%d@chaos.test", i)
		switch {
		case got[rcpt] > 1:
			t.Errorf("%s (%s) was delivered %d times", qid, rcpt, got[rcpt])
		case got[rcpt] == 0 && !removed[qid]:
			t.Errorf("%s (%s) was never delivered, and not removed", qid, rcpt)
		}
	}
	states := 0
	if err := e.sp.States(ctx, func(*spool.DeliveryState) error { states++; return nil }); err != nil {
		t.Fatal(err)
	}
	stats, err := e.sp.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if states != 0 || stats.Held != 0 || stats.HandedOut != 0 {
		t.Errorf("left behind: %d states, %+v", states, stats)
	}
	t.Logf("actions %v, %d messages removed, %d MX transactions, %d DATA calls", actions, len(removed), len(mx.Transactions()), calls.Load())
}
