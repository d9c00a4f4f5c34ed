package deliverer

// End-to-end tests that the DeliveryPolicy rows of README's configuration
// table not covered by e2e_config_test.go apply to a running deliverer at
// its next attempt: delayWarning, deadDestinationTime, maxSessions,
// maxSessionsPerDestination, localHosts and postmaster. Each test starts
// the deliverer under one value, changes it through the Source and
// observes the new value's effect, which the old one would not have.

import (
	"strings"
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/spool"
)

// Off at start: the mail is retried without a warning. Turned on, the
// next attempt warns.
func TestDelivererAppliesDelayWarningWithoutRestart(t *testing.T) {
	t.Parallel()
	e := newE2E(t)
	mx := e.startMXOf("busy.test", &mxtest.MX{Rcpt: func(string) error {
		return e2eSMTPError(451, [3]int{4, 2, 1}, "mailbox busy, try later")
	}})
	capture := e.capture()
	r := e.startDeliverer()
	qid := e.enqueue(e2eSender, "mia@busy.test")
	e.waitState(qid, 10*time.Second, "three deferrals", func(st *spool.DeliveryState) bool { return st.Attempts >= 3 })
	if n := e2eCount(t, r.d.metrics.notifications.WithLabelValues("delayed")); n != 0 {
		t.Fatalf("%v delay warnings with delayWarning off", n)
	}

	e.setPolicy(func(s *v1alpha1.DeliveryPolicySpec) { s.DelayWarning = e2eDur(time.Second) }, nil, nil)
	b := waitBounce(t, capture, 1, 10*time.Second)
	b.wantRcpt(t, map[string]string{"Action": "delayed", "Final-Recipient": "rfc822; mia@busy.test"})
	r.stop(t)
	mxtest.CheckServersClosed(t, mx.Counter, capture.Counter)
}

// A destination whose every next hop is down is probed every second under
// a 1s deadDestinationTime. Raised to an hour, the next failed probe
// leaves it alone for the hour: its mail is deferred without connecting.
func TestDelivererAppliesDeadDestinationTimeWithoutRestart(t *testing.T) {
	t.Parallel()
	e := newE2E(t)
	e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) { sp.DeadDestinationTime = e2eDur(time.Second) }, nil, nil)
	e.dns.Add(t, "dead.test. 60 IN MX 10 mx1.dead.test.", "mx1.dead.test. 60 IN A "+e2eMX1)
	e.down(e2eMX1)
	var dials atomic.Int64
	r := e.startDeliverer(e2eCountDials(&dials))
	qid := e.enqueue(e2eSender, "a@dead.test")
	mxtest.Within(t, 15*time.Second, "three probes a second apart", func() bool { return dials.Load() >= 3 })

	e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) { sp.DeadDestinationTime = e2eDur(time.Hour) }, nil, nil)
	tried := dials.Load()
	// At most one probe was already due; the next attempts, a second
	// apart, are deferred without connecting.
	st := e.waitState(qid, 10*time.Second, "an attempt", func(*spool.DeliveryState) bool { return true })
	e.waitState(qid, 15*time.Second, "four more attempts", func(s *spool.DeliveryState) bool { return s.Attempts >= st.Attempts+4 })
	if n := dials.Load() - tried; n > 1 {
		t.Errorf("%d connections tried after deadDestinationTime was raised to an hour, want at most the one probe due", n)
	}
	r.stop(t)
}

// setSessionLimit puts in force the session limit set sets, with sessions
// a tarpit holds for a minute and retries an hour apart: only the limit
// decides whether a message gets a session.
func (e *e2eEnv) setSessionLimit(set func(*v1alpha1.DeliveryPolicySpec)) {
	e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) {
		sp.RetryIntervals = []metav1.Duration{{Duration: time.Hour}}
		sp.Timeouts.Greeting = e2eDur(time.Minute)
		sp.Timeouts.Session = e2eDur(time.Minute)
		set(sp)
	}, nil, nil)
}

// One session per destination at start: a second message for a
// destination held by a tarpit waits. Raised to two, the next message
// gets a session of its own.
func TestDelivererAppliesMaxSessionsPerDestinationWithoutRestart(t *testing.T) {
	t.Parallel()
	e := newE2E(t)
	perDest := func(n int32) {
		e.setSessionLimit(func(sp *v1alpha1.DeliveryPolicySpec) { sp.MaxSessionsPerDestination = &n })
	}
	perDest(1)
	e.dns.Add(t, "slow.test. 60 IN MX 10 mx1.slow.test.", "mx1.slow.test. 60 IN A "+e2eMX1)
	tp := e.startTarpit(e2eMX1)
	r := e.startDeliverer()
	e.holdSlot(tp)
	e.enqueue(e2eSender, "waiting@slow.test")
	r.waitSlots(t, "a worker to wait for slow.test", func(d *Deliverer) bool { return d.destWaiting["slow.test"] == 1 })
	if n := tp.Accepted.Load(); n != 1 {
		t.Fatalf("the tarpit has %d sessions under maxSessionsPerDestination 1", n)
	}

	perDest(2)
	e.enqueue(e2eSender, "second@slow.test")
	mxtest.Within(t, 10*time.Second, "a second session to slow.test", func() bool { return tp.Accepted.Load() == 2 })
	r.stop(t)
}

// One session in all at start: mail for a fast destination waits while a
// tarpit holds the only session. Raised to two, the next message for it
// is delivered.
func TestDelivererAppliesMaxSessionsWithoutRestart(t *testing.T) {
	t.Parallel()
	e := newE2E(t)
	sessions := func(n int32) { e.setSessionLimit(func(sp *v1alpha1.DeliveryPolicySpec) { sp.MaxSessions = &n }) }
	sessions(1)
	e.dns.Add(t,
		"slow.test. 60 IN MX 10 mx1.slow.test.", "mx1.slow.test. 60 IN A "+e2eMX1,
		"fast.test. 60 IN MX 10 mx1.fast.test.", "mx1.fast.test. 60 IN A "+e2eMX2)
	tp := e.startTarpit(e2eMX1)
	fast := e.startMX(e2eMX2, &mxtest.MX{})
	r := e.startDeliverer()
	e.holdSlot(tp)
	e.enqueue(e2eSender, "waiting@fast.test")
	r.waitSlots(t, "fast.test's mail to wait for a session", func(d *Deliverer) bool {
		return d.perDest["fast.test"] == 1 && d.sessions == 1
	})
	if n := fast.Accepted.Load(); n != 0 {
		t.Fatalf("fast.test got %d connections under maxSessions 1", n)
	}

	sessions(2)
	e.enqueue(e2eSender, "next@fast.test")
	mxtest.Within(t, 10*time.Second, "the next message for fast.test to be delivered", func() bool {
		return fast.RcptCount("next@fast.test") == 1
	})
	r.stop(t)
	mxtest.CheckServersClosed(t, fast.Counter)
}

// An MX host named in localHosts is this cluster: mail for its domain
// would loop, so it fails with 5.4.6 instead of being sent there. The
// name added to a running deliverer applies to the next message.
func TestDelivererAppliesLocalHostsWithoutRestart(t *testing.T) {
	t.Parallel()
	e := newE2E(t)
	mx := e.startMXOf("loop.test", &mxtest.MX{})
	capture := e.capture()
	r := e.startDeliverer()
	e.enqueue(e2eSender, "before@loop.test")
	e.waitEmpty(10 * time.Second)

	e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) { sp.LocalHosts = []string{"mx1.loop.test"} }, nil, nil)
	e.enqueue(e2eSender, "after@loop.test")
	b := waitBounce(t, capture, 1, 10*time.Second)
	b.wantRcpt(t, map[string]string{"Action": "failed", "Status": "5.4.6", "Final-Recipient": "rfc822; after@loop.test"})
	if d := b.rcpts[0]["Diagnostic-Code"]; !strings.Contains(d, "loops back to myself") {
		t.Errorf("Diagnostic-Code %q, want the mail loop", d)
	}
	e.waitEmpty(10 * time.Second)
	if n, m := mx.RcptCount("before@loop.test"), mx.RcptCount("after@loop.test"); n != 1 || m != 0 {
		t.Errorf("the MX got before@ %d times and after@ %d times, want 1 and 0", n, m)
	}
	r.stop(t)
	mxtest.CheckServersClosed(t, mx.Counter, capture.Counter)
}

// Without a postmaster, a failed bounce (null sender) is dropped; with one
// set on a running deliverer, the next is reported to it.
func TestDelivererAppliesPostmasterWithoutRestart(t *testing.T) {
	t.Parallel()
	e := newE2E(t)
	mx := e.startMXOf("bad.test", &mxtest.MX{Rcpt: e2eNoSuchUser})
	capture := e.capture()
	r := e.startDeliverer()
	e.enqueue("", "one@bad.test")
	e.waitEmpty(10 * time.Second)
	if n := len(capture.Transactions()); n != 0 {
		t.Fatalf("%d notices without a postmaster", n)
	}

	e.setPolicy(func(s *v1alpha1.DeliveryPolicySpec) { s.Postmaster = "postmaster@sender.test" }, nil, nil)
	e.enqueue("", "two@bad.test")
	b := waitBounce(t, capture, 1, 10*time.Second)
	if strings.Join(b.txn.Rcpts, ",") != "postmaster@sender.test" {
		t.Errorf("notice went to %v, want the postmaster", b.txn.Rcpts)
	}
	b.wantRcpt(t, map[string]string{"Action": "failed", "Status": "5.1.1", "Final-Recipient": "rfc822; two@bad.test"})
	r.stop(t)
	mxtest.CheckServersClosed(t, mx.Counter, capture.Counter)
}
