package deliverer

// End-to-end tests that the deliverer applies the outbound configuration
// in force, as compiled by policy: messagesPerConnection changed on a
// running deliverer, and the timeouts of a route. Same world as
// e2e_test.go: in-process NATS JetStream, the real spool, DNS and SMTP
// servers on loopback.

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/spool"
)

func TestDelivererAppliesMessagesPerConnectionWithoutRestart(t *testing.T) {
	t.Parallel()
	e := newE2E(t)
	e.dns.Add(t, "reuse.test. 60 IN MX 10 mx1.reuse.test.", "mx1.reuse.test. 60 IN A "+e2eMX1)
	perConn := func(n int32) {
		e.setPolicy(func(s *v1alpha1.DeliveryPolicySpec) { s.MessagesPerConnection = &n }, nil, nil)
	}
	perConn(1)
	mx := e.startMX(e2eMX1, &mxtest.MX{})
	// Idle connections stay pooled for the whole test: only the limit
	// decides whether a connection is reused.
	r := e.startDeliverer(func(c *Config, _ *e2eConn) { c.Client.IdleTime = time.Minute })
	sent := 0
	// send queues n messages one after the other, each once the one
	// before has left the queue, that is once its session is over and its
	// connection pooled or closed.
	send := func(n int) {
		t.Helper()
		for range n {
			sent++
			e.enqueue(e2eSender, fmt.Sprintf("m%d@reuse.test", sent))
			e.waitEmpty(10 * time.Second)
		}
		if got := len(mx.Transactions()); got != sent {
			t.Fatalf("MX got %d messages, want %d", got, sent)
		}
	}
	check := func(phase string, conns int64, open int) {
		t.Helper()
		if a, o := mx.Accepted.Load(), r.client.OpenConns(); a != conns || o != open {
			t.Fatalf("%s: the MX has seen %d connections and the client has %d open; want %d and %d", phase, a, o, conns, open)
		}
	}

	send(3)
	check("messagesPerConnection 1", 3, 0)

	perConn(100)
	send(3)
	check("messagesPerConnection raised to 100", 4, 1) // one more connection, carrying all three

	perConn(1)
	// The pooled connection carries one more message, then goes; every
	// message after it has a connection of its own again.
	send(3)
	check("messagesPerConnection lowered to 1", 6, 0)

	if n := mx.Traffic.Count("EHLO " + e2eHost); n != 6 {
		t.Errorf("%d EHLO, want one per connection (6)", n)
	}
	r.stop(t)
	mxtest.CheckServersClosed(t, mx.Counter)
}

// A route's timeouts are the ones its sessions run under: its own
// greeting timeout, and for the steps the API has no field for (EHLO,
// STARTTLS, AUTH) the policy defaults of minutes, not the greeting
// timeout. Each next hop here stalls at one step; the route's session
// deadline, far shorter than those defaults and than the DeliveryPolicy's,
// is what ends the sessions that do not hit the route's greeting timeout.
func TestDelivererUsesTheRouteTimeouts(t *testing.T) {
	const session = 3 * time.Second
	stall := func(net.Conn, *bufio.Reader) bool { return false } // say nothing; the server then waits for the client to go
	for _, tc := range []struct {
		name   string
		tls    v1alpha1.TLSPolicy
		auth   bool
		script *mxtest.Script // nil: never greets
		want   string
	}{
		{"a silent greeting times out at the route's greeting timeout", v1alpha1.TLSNone, false,
			nil, "timeout during greeting"},
		{"a stalled EHLO runs into the session deadline, not the greeting timeout", v1alpha1.TLSNone, false,
			&mxtest.Script{Ehlo: func(net.Conn) bool { return false }}, "session deadline exceeded (3s) during EHLO"},
		{"a stalled STARTTLS runs into the session deadline, not the greeting timeout", v1alpha1.TLSRequired, false,
			&mxtest.Script{Exts: []string{"STARTTLS"}, StartTLS: stall}, "session deadline exceeded (3s) during STARTTLS"},
		{"a stalled AUTH runs into the session deadline, not the greeting timeout", v1alpha1.TLSNone, true,
			&mxtest.Script{Exts: []string{"AUTH PLAIN"}, Auth: func(net.Conn, *bufio.Reader, string) bool { return false }},
			"session deadline exceeded (3s) during AUTH"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newE2E(t)
			route := v1alpha1.MailRoute{
				ObjectMeta: metav1.ObjectMeta{Name: "timed", Namespace: "mail"},
				Spec: v1alpha1.MailRouteSpec{
					Domains: []string{"timed.test"}, NextHops: []string{e.hop(e2eMX1)}, TLS: tc.tls,
					Timeouts: &v1alpha1.OutboundTimeouts{Greeting: e2eDur(time.Second), Session: e2eDur(session)},
				},
			}
			var secrets func(ns, name, key string) ([]byte, error)
			if tc.auth {
				route.Spec.Auth = &v1alpha1.RouteAuth{SecretRef: &v1alpha1.SecretRef{Name: "login"}}
				secrets = func(_, _, key string) ([]byte, error) { return []byte(key + "-value"), nil }
			}
			// The DeliveryPolicy's own greeting and session are long: only
			// the route's values can end these sessions within seconds.
			e.setPolicy(func(s *v1alpha1.DeliveryPolicySpec) {
				s.RetryIntervals = []metav1.Duration{{Duration: time.Hour}}
				s.Timeouts.Greeting = e2eDur(time.Minute)
				s.Timeouts.Session = e2eDur(time.Minute)
			}, []v1alpha1.MailRoute{route}, secrets)
			handle := func(net.Conn, *bufio.Reader) {}
			if tc.script != nil {
				handle = tc.script.Handle
			}
			ln := mxtest.Count(e.listener(e2eMX1))
			mxtest.ServeScripted(t, ln, handle)
			r := e.startDeliverer(func(c *Config, _ *e2eConn) { c.Client.AllowInsecureAuth = true })
			start := time.Now()
			qid := e.enqueue(e2eSender, "olga@timed.test")
			st := e.waitState(qid, 15*time.Second, "the deferral", func(st *spool.DeliveryState) bool { return st.Attempts >= 1 })
			took := time.Since(start)
			rs := e2eRcptState(st, "olga@timed.test")
			if rs.Status != spool.RcptDeferred || rs.Enhanced != "4.4.2" || !strings.Contains(rs.Text, tc.want) {
				t.Errorf("recipient state %+v, want deferred 4.4.2 with %q", rs, tc.want)
			}
			if took > 10*time.Second {
				t.Errorf("deferred after %s, want within the route's %s session", took, session)
			}
			if n := ln.Counter.Accepted.Load(); n != 1 {
				t.Errorf("the next hop saw %d connections, want 1", n)
			}
			r.stop(t)
			mxtest.CheckServersClosed(t, ln.Counter)
		})
	}
}

// The retry schedule and the queue lifetime in force are the ones a
// running deliverer applies at its next attempt: no restart, and no
// message keeps a schedule the policy no longer has.
func TestDelivererAppliesRetryIntervalsAndQueueLifetimeWithoutRestart(t *testing.T) {
	t.Parallel()
	e := newE2E(t)
	e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) {
		sp.RetryIntervals = []metav1.Duration{{Duration: time.Hour}}
		sp.DeadDestinationTime = e2eDur(time.Hour)
	}, nil, nil)
	e.dns.Add(t, "later.test. 60 IN MX 10 mx1.later.test.", "mx1.later.test. 60 IN A "+e2eMX1)
	e.startMX(e2eMX1, &mxtest.MX{Mail: func(string) error {
		return e2eSMTPError(451, [3]int{4, 3, 0}, "try later")
	}})
	r := e.startDeliverer()

	first := e.enqueue(e2eSender, "a@later.test")
	st := e.waitState(first, 10*time.Second, "the first deferral", func(st *spool.DeliveryState) bool { return st.Attempts >= 1 })
	if wait := time.Until(st.Rcpts[0].NextAttempt); wait < 30*time.Minute {
		t.Fatalf("retry in %s under a 1h schedule", wait)
	}

	// A shorter schedule applies to the next deferral of a running deliverer.
	e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) {
		sp.RetryIntervals = []metav1.Duration{{Duration: time.Second}}
		sp.DeadDestinationTime = e2eDur(time.Hour)
	}, nil, nil)
	second := e.enqueue(e2eSender, "b@later.test")
	e.waitState(second, 15*time.Second, "retries a second apart", func(st *spool.DeliveryState) bool { return st.Attempts >= 3 })

	// A queue lifetime shorter than the message's age ends it at its next
	// attempt: the recipient fails with 4.4.7.
	e.setPolicy(func(sp *v1alpha1.DeliveryPolicySpec) {
		sp.RetryIntervals = []metav1.Duration{{Duration: time.Second}}
		sp.DeadDestinationTime = e2eDur(time.Hour)
		sp.QueueLifetime = e2eDur(2 * time.Second)
	}, nil, nil)
	mxtest.Within(t, 15*time.Second, "the second message to expire", func() bool { return e2eCount(t, r.d.metrics.expired) >= 1 })
	r.stop(t)
}
