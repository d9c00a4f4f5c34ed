package deliverer

import (
	"context"
	"encoding/json"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/internal/natstest"
	"github.com/jetmail/jetmail/spool"
)

func TestMain(m *testing.M) {
	// A waker that died is replaced within seconds here, not 20 s.
	leaseFor, leaseRenew = 3*time.Second, time.Second
	// A sweep looks at states not written for 2 s, not 10 min.
	staleState = 2 * time.Second
	os.Exit(m.Run())
}

// parkAll parks every deferral, however short its wait.
func parkAll() e2eReplicaOpt { return func(c *Config, _ *e2eConn) { c.ParkAfter = time.Nanosecond } }

// greylist answers 451 to the first RCPT of each recipient, and accepts
// it after that.
func greylist() *mxtest.MX {
	var mu sync.Mutex
	seen := map[string]bool{}
	return &mxtest.MX{Rcpt: func(addr string) error {
		mu.Lock()
		defer mu.Unlock()
		if seen[addr] {
			return nil
		}
		seen[addr] = true
		return e2eSMTPError(451, [3]int{4, 7, 1}, "greylisted")
	}}
}

// retryEvery sets a retry schedule of one interval.
func (e *e2eEnv) retryEvery(d time.Duration) {
	e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) { sp.RetryIntervals = []metav1.Duration{{Duration: d}} }, nil, nil)
}

func (e *e2eEnv) stateRevision(qid string) uint64 {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	kv, err := e.sp.JetStream().KeyValue(ctx, spool.StateBucket)
	if err != nil {
		e.t.Fatal(err)
	}
	ent, err := kv.Get(ctx, qid)
	if err != nil {
		e.t.Fatalf("state of %s: %v", qid, err)
	}
	return ent.Revision()
}

func TestParking(t *testing.T) {
	t.Run("a deliverer killed between parking a message and acknowledging it: the next one acknowledges it without a write, and it is delivered once when due", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		const retry = 6 * time.Second
		e.retryEvery(retry)
		mx := e.startMXOf("park.test", greylist())
		stall := natstest.NewStall(t, strings.TrimPrefix(e.url, "nats://"))
		first := e.startDeliverer(e2eVia(stall.URL()), parkAll(), e2eGrace(time.Millisecond))
		// The kill: when the parked state is stored, every byte between
		// the first deliverer and NATS is held, and then dropped with its
		// connection, before the acknowledgement (which follows two round
		// trips later: the store's reply, and the check that the message
		// is still queued) can pass.
		watch := e.connect()
		killed := make(chan struct{})
		var once atomic.Bool
		sub, err := watch.Subscribe("$KV."+spool.StateBucket+".*", func(m *nats.Msg) {
			if m.Header.Get(spool.HeaderParkDest) != "" && once.CompareAndSwap(false, true) {
				stall.Stop()
				close(killed)
			}
		})
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = sub.Unsubscribe() }()
		qid := e.enqueue(e2eSender, "ann@park.test")
		select {
		case <-killed:
		case <-time.After(10 * time.Second):
			t.Fatal("the message was never parked")
		}
		parkedAt := time.Now()
		first.nc.Close()
		stall.Cut()
		first.stop(t)
		st := e.waitState(qid, 5*time.Second, "the parked state", func(st *spool.DeliveryState) bool { return st.Parked() != nil })
		rev := e.stateRevision(qid)
		if p := st.Parked(); st.Attempts != 1 || p.Dest != "park.test" || p.Down || !p.Due.Equal(st.NextAttempt.Truncate(time.Millisecond)) {
			t.Fatalf("parked state: %+v, park %+v", st, p)
		}
		second := e.startDeliverer(e2eOwnConn(), parkAll())
		// The record the first deliverer never acknowledged comes back
		// after the ack wait, before the message is due: the second
		// acknowledges it, and writes nothing.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		mxtest.Within(t, 2*e2eAckWait+2*time.Second, "the unacknowledged record to be acknowledged", func() bool {
			s, err := e.sp.Stats(ctx)
			return err == nil && s.Consumer && s.HandedOut == 0 && s.NotHandedOut == 0 && s.Redelivered == 0
		})
		if since := time.Since(parkedAt); since >= retry {
			t.Fatalf("the check came %s after the park, not before the retry (%s)", since, retry)
		}
		if got := e.stateRevision(qid); got != rev {
			t.Errorf("the state was written again (revision %d, was %d) by the hand-back of a parked message", got, rev)
		}
		if n := mx.DataCount(); n != 0 {
			t.Fatalf("delivered %d times before its retry time", n)
		}
		// The second deliverer takes the waker lease when the killed
		// one's runs out, and wakes the message when it is due.
		e.waitEmpty(retry + leaseFor + 10*time.Second)
		if took := time.Since(parkedAt); took < retry-time.Second {
			t.Errorf("delivered %s after it was parked, before its retry (%s)", took, retry)
		}
		if txns := mx.Transactions(); len(txns) != 1 || mx.RcptCount("ann@park.test") != 2 {
			t.Errorf("MX got %d transactions and %d RCPTs, want 1 and 2 (the greylisted one, the delivery)", len(txns), mx.RcptCount("ann@park.test"))
		}
		if n := e2eCount(t, second.d.metrics.woken.WithLabelValues("due")); n != 1 {
			t.Errorf("the second deliverer woke %v messages, want 1", n)
		}
		second.stop(t)
		mxtest.CheckServersClosed(t, mx.Counter)
	})

	t.Run("a deliverer killed during the attempt of a woken message: its claim runs out, the waker hands the message out again, and one copy arrives", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.retryEvery(time.Second)
		inData, release := make(chan struct{}), make(chan struct{})
		mx := greylist()
		mx.Data = func(n int) error {
			if n > 1 {
				return nil
			}
			close(inData)
			<-release
			return e2eSMTPError(451, [3]int{4, 4, 2}, "client went away")
		}
		e.startMXOf("woken.test", mx)
		first := e.startDeliverer(e2eOwnConn(), parkAll(), e2eGrace(time.Millisecond))
		qid := e.enqueue(e2eSender, "bo@woken.test")
		select {
		case <-inData:
		case <-time.After(15 * time.Second):
			t.Fatal("the woken message never reached DATA")
		}
		if n := e2eCount(t, first.d.metrics.woken.WithLabelValues("due")); n != 1 {
			t.Fatalf("%v messages woken, want 1", n)
		}
		st := e.waitState(qid, 5*time.Second, "the claim", func(st *spool.DeliveryState) bool { return st.Claim != nil })
		if p := st.Parked(); p == nil || p.Due.Before(st.Claim.Until.Truncate(time.Millisecond)) {
			t.Fatalf("the claim of a woken message is not parked until it runs out: park %+v, claim %+v", p, st.Claim)
		}
		// SIGKILL: no state written after the claim.
		first.nc.Close()
		killed := time.Now()
		first.stop(t)
		close(release)
		second := e.startDeliverer(e2eOwnConn(), parkAll())
		e.waitEmpty(leaseFor + 4*e2eAckWait + 10*time.Second)
		t.Logf("delivered %s after the kill", time.Since(killed).Round(time.Millisecond))
		wantOneCopyAfterKill(t, mx)
		second.stop(t)
		mxtest.CheckServersClosed(t, mx.Counter)
	})

	t.Run("the waker lease moves to another deliverer when its holder is killed, and parked mail is still woken", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.retryEvery(4 * time.Second)
		mx := e.startMXOf("lease.test", greylist())
		rs := []*e2eReplica{e.startDeliverer(e2eOwnConn(), parkAll()), e.startDeliverer(e2eOwnConn(), parkAll())}
		leader := func() int {
			n, at := 0, -1
			for i, r := range rs {
				var m dto.Metric
				if err := r.d.metrics.wakerLeader.Write(&m); err != nil {
					t.Fatal(err)
				}
				if m.GetGauge().GetValue() == 1 {
					n, at = n+1, i
				}
			}
			if n > 1 {
				t.Fatalf("%d deliverers hold the waker lease", n)
			}
			return at
		}
		mxtest.Within(t, 10*time.Second, "a waker", func() bool { return leader() >= 0 })
		var qids []string
		for i := range 6 {
			qids = append(qids, e.enqueue(e2eSender, "rcpt"+string(rune('a'+i))+"@lease.test"))
		}
		for _, qid := range qids {
			e.waitState(qid, 10*time.Second, "the first deferral", func(st *spool.DeliveryState) bool { return st.Parked() != nil })
		}
		old := leader()
		killed := time.Now()
		rs[old].nc.Close()
		rs[old].stop(t)
		other := 1 - old
		mxtest.Within(t, leaseFor+2*leaseRenew+5*time.Second, "the other deliverer to take the lease", func() bool { return leader() == other })
		t.Logf("lease taken over %s after the kill", time.Since(killed).Round(time.Millisecond))
		e.waitEmpty(20 * time.Second)
		for _, txn := range mx.Transactions() {
			if len(txn.Rcpts) != 1 {
				t.Errorf("transaction with %v", txn.Rcpts)
			}
		}
		if n := len(mx.Transactions()); n != len(qids) {
			t.Errorf("%d deliveries, want %d", n, len(qids))
		}
		rs[other].stop(t)

		// A clean stop hands the lease over at once.
		third := e.startDeliverer(e2eOwnConn(), parkAll())
		fourth := e.startDeliverer(e2eOwnConn(), parkAll())
		rs = []*e2eReplica{third, fourth}
		mxtest.Within(t, 10*time.Second, "a waker", func() bool { return leader() >= 0 })
		old = leader()
		stopped := time.Now()
		rs[old].stop(t)
		mxtest.Within(t, 2*leaseRenew+2*time.Second, "the lease handed over on a clean stop", func() bool { return leader() == 1-old })
		t.Logf("lease handed over %s after a clean stop", time.Since(stopped).Round(time.Millisecond))
		rs[1-old].stop(t)
		mxtest.CheckServersClosed(t, mx.Counter)
	})

	t.Run("mail parked for a destination that is down gets its delay warning and its expiry bounce on time", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		const warn, lifetime = 3 * time.Second, 6 * time.Second
		e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) {
			sp.DeadDestinationTime = e2eDur(time.Hour)
			sp.DelayWarning = e2eDur(warn)
			sp.QueueLifetime = e2eDur(lifetime)
			sp.RetryIntervals = []metav1.Duration{{Duration: time.Second}}
		}, nil, nil)
		e.dns.Add(t, "gone.test. 60 IN MX 10 mx1.gone.test.", "mx1.gone.test. 60 IN A "+e2eMX1)
		e.down(e2eMX1)
		capture := e.capture()
		r := e.startDeliverer()
		start := time.Now()
		for i := range 4 {
			e.enqueue(e2eSender, "rcpt"+string(rune('a'+i))+"@gone.test")
		}
		// Each message: a delay warning, then a bounce.
		mxtest.Within(t, lifetime+10*time.Second, "8 notices", func() bool { return len(capture.Transactions()) >= 8 })
		e.waitEmpty(5 * time.Second)
		var delayed, failed int
		for _, txn := range capture.Transactions() {
			switch body := string(txn.Body); {
			case strings.Contains(body, "Action: delayed"):
				delayed++
			case strings.Contains(body, "Action: failed") && strings.Contains(body, "Status: 4.4.7"):
				failed++
			default:
				t.Errorf("unexpected notice:\n%s", body)
			}
		}
		if delayed != 4 || failed != 4 {
			t.Errorf("%d delay warnings and %d expiry bounces, want 4 and 4", delayed, failed)
		}
		if took := time.Since(start); took < lifetime {
			t.Errorf("all notices within %s, before the lifetime %s", took, lifetime)
		}
		// At most one of them probed the destination at a time; the
		// others were woken for their deadlines.
		if n := e2eCount(t, r.d.metrics.woken.WithLabelValues("deadline")); n < 4 {
			t.Errorf("%v wakes for a deadline, want at least 4", n)
		}
		r.stop(t)
		mxtest.CheckServersClosed(t, capture.Counter)
	})

	t.Run("hold, release, retry and rm of parked mail", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.retryEvery(time.Hour)
		mx := e.startMXOf("admin.test", greylist())
		r := e.startDeliverer()
		retried := e.enqueue(e2eSender, "retried@admin.test")
		released := e.enqueue(e2eSender, "released@admin.test")
		removed := e.enqueue(e2eSender, "removed@admin.test")
		for _, qid := range []string{retried, released, removed} {
			e.waitState(qid, 10*time.Second, "parked for an hour", func(st *spool.DeliveryState) bool { return st.Parked() != nil })
		}
		// Parked mail is acknowledged, and still counted, oldest first.
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer scancel()
		st, err := e.sp.Stats(sctx)
		if err != nil {
			t.Fatal(err)
		}
		if n, a, d, h := st.ByState(); st.HandedOut != 0 || st.Messages() != 3 || n != 0 || a != 0 || d != 3 || h != 0 || st.Oldest != retried {
			t.Errorf("stats of 3 parked messages: %+v; by state %d %d %d %d", st, n, a, d, h)
		}
		e.act("retry", (*spool.Spool).Retry, retried)
		e.act("hold", (*spool.Spool).Hold, released)
		e.act("rm", (*spool.Spool).Remove, removed)
		mxtest.Within(t, 10*time.Second, "the retried message delivered", func() bool { return mx.RcptCount("retried@admin.test") == 2 })
		time.Sleep(e2eAckWait)
		if n := mx.RcptCount("released@admin.test"); n != 1 {
			t.Fatalf("a held message was tried %d times", n)
		}
		e.act("release", (*spool.Spool).Release, released)
		e.waitEmpty(10 * time.Second)
		for _, rcpt := range []string{"retried@admin.test", "released@admin.test"} {
			if n := mx.RcptCount(rcpt); n != 2 {
				t.Errorf("%s: %d RCPTs, want 2", rcpt, n)
			}
		}
		if n := mx.RcptCount("removed@admin.test"); n != 1 {
			t.Errorf("the removed message was tried %d times after its removal", n-1)
		}
		if n := len(mx.Transactions()); n != 2 {
			t.Errorf("%d deliveries, want 2", n)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := e.sp.States(ctx, func(st *spool.DeliveryState) error {
			t.Errorf("state left behind: %+v", st)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		r.stop(t)
		mxtest.CheckServersClosed(t, mx.Counter)
	})
}

// TestStatesOfMailThatLeft: an attempt ends a message by completing its
// record and then removing its state, two writes. A deliverer killed
// between the two leaves a state that no attempt would ever remove; the
// waker finds and removes it.
func TestStatesOfMailThatLeft(t *testing.T) {
	noState := func(e *e2eEnv, qid string) func() bool {
		return func() bool {
			st, err := e.sp.LoadState(context.Background(), qid)
			if err != nil {
				t.Fatal(err)
			}
			return st == nil
		}
	}
	complete := func(e *e2eEnv, qid string) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := e.sp.Complete(ctx, e.find(qid)); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("parked: removed when it is woken, and nothing is attempted", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.retryEvery(2 * time.Second)
		mx := e.startMXOf("left.test", &mxtest.MX{Rcpt: func(string) error {
			return e2eSMTPError(451, [3]int{4, 2, 1}, "come back later")
		}})
		e.startDeliverer(parkAll())
		qid := e.enqueue(e2eSender, "ann@left.test")
		st := e.waitState(qid, 10*time.Second, "the parked state", func(st *spool.DeliveryState) bool { return st.Parked() != nil })
		// What a deliverer killed between the two writes leaves.
		complete(e, qid)
		mxtest.Within(t, st.Parked().Due.Sub(time.Now())+10*time.Second, "the state of the completed message to be removed", noState(e, qid))
		if n := mx.RcptCount("ann@left.test"); n != 1 {
			t.Errorf("%d RCPTs for the recipient, want 1 (the attempt before the completion)", n)
		}
	})

	t.Run("not parked, and markers of mail no longer held: removed by the waker's sweep, while those of mail still queued or held stay", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		// Two messages queued before any deliverer runs, each with a
		// state as an attempt of a consumer's delivery writes it (not
		// parked); the first then left the queue, the second is held (its
		// record replaced, so that no deliverer attempts it).
		gone, held := e.enqueue(e2eSender, "bob@left.test"), e.enqueue(e2eSender, "cy@left.test")
		for _, qid := range []string{gone, held} {
			st := &spool.DeliveryState{QueueID: qid, Attempts: 1, Rcpts: []spool.RcptState{{Addr: "x@left.test", Status: spool.RcptDeferred}}}
			st.SetRecord(e.find(qid).Subject)
			if err := e.sp.SaveState(ctx, st); err != nil {
				t.Fatal(err)
			}
		}
		complete(e, gone)
		e.act("hold", (*spool.Spool).Hold, held)
		// Two more held and then released, and removed: each with the
		// marker a process killed between the two writes of the release
		// (or the removal) leaves.
		released, removed := e.enqueue(e2eSender, "dee@left.test"), e.enqueue(e2eSender, "eve@left.test")
		subjects := map[string]string{released: e.find(released).Subject, removed: e.find(removed).Subject}
		e.act("hold", (*spool.Spool).Hold, released)
		e.act("hold", (*spool.Spool).Hold, removed)
		e.act("release", (*spool.Spool).Release, released)
		e.act("remove", (*spool.Spool).Remove, removed)
		for qid, subject := range subjects {
			b, _ := json.Marshal(spool.HeldMarker{QueueID: qid, Subject: subject, Since: time.Now()})
			if _, err := e.sp.State().Put(ctx, "held."+qid, b); err != nil {
				t.Fatal(err)
			}
		}
		if st, err := e.sp.Stats(ctx); err != nil || st.Held != 3 {
			t.Fatalf("held markers before the sweep: %+v, %v", st, err)
		}
		time.Sleep(staleState + time.Second)
		var logs *observer.ObservedLogs
		e.startDeliverer(observed(&logs))
		mxtest.Within(t, 10*time.Second, "the state of the message that left to be removed", noState(e, gone))
		defer func() {
			if t.Failed() {
				for _, l := range logs.All() {
					t.Logf("%s %v", l.Message, l.ContextMap())
				}
			}
		}()
		mxtest.Within(t, 5*time.Second, "the sweep to end", func() bool {
			return logs.FilterMessage("swept the delivery states of mail not parked and the markers of held mail").
				FilterField(zap.Int64("looked_up", 5)).FilterField(zap.Int64("removed", 1)).FilterField(zap.Int64("held_markers_removed", 2)).Len() == 1
		})
		if st, err := e.sp.LoadState(ctx, held); err != nil || st == nil || st.Attempts != 1 {
			t.Fatalf("the state of the held message: %+v, %v", st, err)
		}
		if st, err := e.sp.Stats(ctx); err != nil || st.Held != 1 {
			t.Fatalf("held markers after the sweep: %+v, %v; want the held message's only", st, err)
		}
	})
}
