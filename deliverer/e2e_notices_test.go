package deliverer

// End-to-end tests of the notices the Deliverer sends (delay warnings,
// success notices, NOTIFY=NEVER) and of chunked bodies, on the environment of
// e2e_test.go.

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/nats-io/nats.go/jetstream"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/spool"
)

// enqueueMail queues body from `from` to rcpts (with their DSN
// parameters) and returns its queue ID.
func (e *e2eEnv) enqueueMail(from string, rcpts []spool.Rcpt, body []byte) string {
	e.t.Helper()
	now := time.Now()
	qid := spool.NewQueueID(now)
	env := &spool.Envelope{QueueID: qid, Received: now.UTC(), Gateway: "gw.e2e.test", ClientIP: "192.0.2.10",
		Helo: "client.e2e.test", From: from, Rcpts: rcpts}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := e.sp.Enqueue(ctx, env, body, ""); err != nil {
		e.t.Fatal(err)
	}
	return qid
}

// message returns qid as stored in the queue.
func (e *e2eEnv) message(qid string) *spool.Message {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var m *spool.Message
	if err := e.sp.Scan(ctx, func(x *spool.Message) error {
		if x.Envelope.QueueID == qid {
			m = x
		}
		return nil
	}); err != nil {
		e.t.Fatal(err)
	}
	if m == nil {
		e.t.Fatalf("%s not found in the queue", qid)
	}
	return m
}

func e2eRcpt(addr string, notify ...string) spool.Rcpt { return spool.Rcpt{Addr: addr, Notify: notify} }

// bodyChunks counts the messages stored for a body in JETMAIL_BODY.
func (e *e2eEnv) bodyChunks(id string) uint64 {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	js, err := jetstream.New(e.connect())
	if err != nil {
		e.t.Fatal(err)
	}
	st, err := js.Stream(ctx, spool.BodyStream)
	if err != nil {
		e.t.Fatal(err)
	}
	info, err := st.Info(ctx, jetstream.WithSubjectFilter("jetmail.body."+id+".>"))
	if err != nil {
		e.t.Fatal(err)
	}
	var n uint64
	for _, c := range info.State.Subjects {
		n += c
	}
	return n
}

func TestDelivererEndToEndNotices(t *testing.T) {
	t.Run("a mail deferred past delayWarning gets one delay warning, however many retries follow", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.setPolicy(func(s *v1alpha1.DeliveryPolicySpec) {
			s.DelayWarning = e2eDur(time.Second)
			s.RetryIntervals = []metav1.Duration{{Duration: time.Second}}
		}, nil, nil)
		e.dns.Add(t, "busy.test. 60 IN MX 10 mx1.busy.test.", "mx1.busy.test. 60 IN A "+e2eMX1)
		mx := e.startMX(e2eMX1, &mxtest.MX{Rcpt: func(string) error {
			return e2eSMTPError(451, [3]int{4, 2, 1}, "mailbox busy, try later")
		}})
		capture := e.capture()
		r := e.startDeliverer()
		start := time.Now()
		qid := e.enqueueMail(e2eSender, []spool.Rcpt{e2eRcpt("mia@busy.test")}, []byte(e2eBody("x", e2eSender, []string{"mia@busy.test"})))
		b := waitBounce(t, capture, 1, 10*time.Second)
		if took := time.Since(start); took < time.Second {
			t.Errorf("delay warning after %s, before the 1s delayWarning", took)
		}
		if strings.Join(b.txn.Rcpts, ",") != e2eSender {
			t.Errorf("delay warning went to %v", b.txn.Rcpts)
		}
		b.wantRcpt(t, map[string]string{
			"Action": "delayed", "Status": "4.2.1", "Final-Recipient": "rfc822; mia@busy.test",
			"Remote-MTA": "dns; mx1.busy.test", "Diagnostic-Code": "smtp; 451 4.2.1 mailbox busy, try later",
			"Will-Retry-Until": "*",
		})
		if !strings.HasPrefix(b.rcpts[0]["Status"], "4.") || b.rcpts[0]["Will-Retry-Until"] == "" {
			t.Errorf("delay warning fields %v", b.rcpts[0])
		}
		if subj := b.parsed.Header.Get("Subject"); !strings.Contains(subj, "Delayed") {
			t.Errorf("Subject %q", subj)
		}
		warnedAt := e.waitState(qid, 5*time.Second, "DelayWarned", func(st *spool.DeliveryState) bool { return st.DelayWarned }).Attempts
		// Three more deferred attempts: still the one warning.
		st := e.waitState(qid, 10*time.Second, "three more attempts", func(st *spool.DeliveryState) bool { return st.Attempts >= warnedAt+3 })
		if !st.DelayWarned {
			t.Errorf("state lost DelayWarned: %+v", st)
		}
		if rs := e2eRcptState(st, "mia@busy.test"); rs.Status != spool.RcptDeferred {
			t.Errorf("recipient state %+v, want deferred", rs)
		}
		r.stop(t)
		if n := len(capture.Transactions()); n != 1 {
			t.Errorf("the sender got %d notices, want exactly 1 delay warning", n)
		}
		if n := e2eCount(t, r.d.metrics.notifications.WithLabelValues("delayed")); n != 1 {
			t.Errorf("%v delay warnings queued, want 1", n)
		}
		if n := mx.RcptCount("mia@busy.test"); n < warnedAt+3 {
			t.Errorf("MX tried %d times, want at least %d", n, warnedAt+3)
		}
		mxtest.CheckServersClosed(t, mx.Counter, capture.Counter)
	})

	t.Run("NOTIFY=SUCCESS to a next hop without DSN is reported as relayed", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.dns.Add(t, "nodsn.test. 60 IN MX 10 mx1.nodsn.test.", "mx1.nodsn.test. 60 IN A "+e2eMX1)
		mx := e.startMX(e2eMX1, &mxtest.MX{})
		capture := e.capture()
		r := e.startDeliverer()
		e.enqueueMail(e2eSender, []spool.Rcpt{e2eRcpt("nina@nodsn.test", "SUCCESS", "FAILURE")},
			[]byte(e2eBody("x", e2eSender, []string{"nina@nodsn.test"})))
		b := waitBounce(t, capture, 1, 10*time.Second)
		if strings.Join(b.txn.Rcpts, ",") != e2eSender {
			t.Errorf("success notice went to %v", b.txn.Rcpts)
		}
		b.wantRcpt(t, map[string]string{
			"Action": "relayed", "Status": "2.0.0", "Final-Recipient": "rfc822; nina@nodsn.test",
			"Remote-MTA": "dns; mx1.nodsn.test",
		})
		e.waitEmpty(10 * time.Second)
		if txns := mx.Transactions(); len(txns) != 1 || strings.Join(txns[0].Rcpts, ",") != "nina@nodsn.test" {
			t.Errorf("MX got %+v", txns)
		}
		if n := mx.RcptNotify("nina@nodsn.test"); len(n) != 0 {
			t.Errorf("NOTIFY %v sent to a server that does not offer DSN", n)
		}
		r.stop(t)
		if n := len(capture.Transactions()); n != 1 {
			t.Errorf("the sender got %d notices, want 1", n)
		}
		mxtest.CheckServersClosed(t, mx.Counter, capture.Counter)
	})

	t.Run("NOTIFY=SUCCESS to a next hop with DSN is passed on and not reported by us", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.dns.Add(t, "dsn.test. 60 IN MX 10 mx1.dsn.test.", "mx1.dsn.test. 60 IN A "+e2eMX1)
		mx := e.startMX(e2eMX1, &mxtest.MX{}, func(s *smtp.Server) { s.EnableDSN = true })
		capture := e.capture()
		r := e.startDeliverer()
		e.enqueueMail(e2eSender, []spool.Rcpt{e2eRcpt("olga@dsn.test", "SUCCESS")},
			[]byte(e2eBody("x", e2eSender, []string{"olga@dsn.test"})))
		// A notice would be queued before the mail leaves the queue, and
		// delivered before the queue is empty.
		e.waitEmpty(10 * time.Second)
		if txns := mx.Transactions(); len(txns) != 1 || strings.Join(txns[0].Rcpts, ",") != "olga@dsn.test" {
			t.Errorf("MX got %+v", txns)
		}
		if n := mx.RcptNotify("olga@dsn.test"); len(n) != 1 || n[0] != smtp.DSNNotifySuccess {
			t.Errorf("the next hop saw NOTIFY %v, want SUCCESS", n)
		}
		r.stop(t)
		if n := len(capture.Transactions()); n != 0 {
			t.Errorf("the sender got %d notices, want none (the next hop reports)", n)
		}
		if n := e2eCount(t, r.d.metrics.notifications.WithLabelValues("success")); n != 0 {
			t.Errorf("%v success notices queued", n)
		}
		mxtest.CheckServersClosed(t, mx.Counter, capture.Counter)
	})

	t.Run("NOTIFY=NEVER suppresses the bounce of a 5xx, NOTIFY=FAILURE gets it", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.dns.Add(t, "gone.test. 60 IN MX 10 mx1.gone.test.", "mx1.gone.test. 60 IN A "+e2eMX1)
		mx := e.startMX(e2eMX1, &mxtest.MX{Rcpt: func(string) error {
			return e2eSMTPError(550, [3]int{5, 1, 1}, "no such user here")
		}})
		capture := e.capture()
		r := e.startDeliverer()
		quiet := e.enqueueMail(e2eSender, []spool.Rcpt{e2eRcpt("quiet@gone.test", "NEVER")},
			[]byte(e2eBody("q", e2eSender, []string{"quiet@gone.test"})))
		e.enqueueMail(e2eSender, []spool.Rcpt{e2eRcpt("never@gone.test", "NEVER"), e2eRcpt("loud@gone.test", "FAILURE")},
			[]byte(e2eBody("l", e2eSender, []string{"never@gone.test", "loud@gone.test"})))
		b := waitBounce(t, capture, 1, 10*time.Second)
		// Only the FAILURE recipient is reported on.
		b.wantRcpt(t, map[string]string{"Action": "failed", "Status": "5.1.1", "Final-Recipient": "rfc822; loud@gone.test"})
		e.waitEmpty(10 * time.Second)
		for _, a := range []string{"quiet@gone.test", "never@gone.test", "loud@gone.test"} {
			if n := mx.RcptCount(a); n != 1 {
				t.Errorf("%s tried %d times, want once", a, n)
			}
		}
		if st, _ := e.sp.LoadState(context.Background(), quiet); st != nil {
			t.Errorf("state left behind for a finished mail: %+v", st)
		}
		r.stop(t)
		if n := len(capture.Transactions()); n != 1 {
			t.Errorf("the sender got %d notices, want 1 (none for NOTIFY=NEVER)", n)
		}
		if n := e2eCount(t, r.d.metrics.notifications.WithLabelValues("failed")); n != 1 {
			t.Errorf("%v bounces queued, want 1", n)
		}
		mxtest.CheckServersClosed(t, mx.Counter, capture.Counter)
	})

	t.Run("a chunked body arrives intact and its chunks are purged", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.dns.Add(t, "big.test. 60 IN MX 10 mx1.big.test.", "mx1.big.test. 60 IN A "+e2eMX1)
		mx := e.startMX(e2eMX1, &mxtest.MX{})
		var body bytes.Buffer
		body.WriteString("From: <" + e2eSender + ">\r\nTo: <pat@big.test>\r\nSubject: big\r\n\r\n")
		for i := 0; body.Len() < 3<<20; i++ {
			if i%50 == 0 {
				// Lines the SMTP client must dot-stuff.
				body.WriteString(".a line that starts with a dot\r\n")
			}
			fmt.Fprintf(&body, "%08d %s\r\n", i, strings.Repeat(string(rune('a'+i%26)), 66))
		}
		if body.Len() <= e.sp.InlineMax() {
			t.Fatalf("body of %d bytes fits inline (%d)", body.Len(), e.sp.InlineMax())
		}
		// Queued before the deliverer starts, so it is still there to read.
		m := e.message(e.enqueueMail(e2eSender, []spool.Rcpt{e2eRcpt("pat@big.test")}, body.Bytes()))
		id := m.Envelope.Body.ID
		if m.Envelope.Body.Chunks < 2 {
			t.Fatalf("body stored in %d chunks", m.Envelope.Body.Chunks)
		}
		if n := e.bodyChunks(id); n != uint64(m.Envelope.Body.Chunks) {
			t.Fatalf("%d chunk messages stored, envelope says %d", n, m.Envelope.Body.Chunks)
		}
		r := e.startDeliverer()
		e.waitEmpty(15 * time.Second)
		txns := mx.Transactions()
		if len(txns) != 1 {
			t.Fatalf("MX got %d messages", len(txns))
		}
		if !bytes.Equal(txns[0].Body, body.Bytes()) {
			t.Errorf("MX got %d bytes that differ from the %d queued", len(txns[0].Body), body.Len())
		}
		if n := e.bodyChunks(id); n != 0 {
			t.Errorf("%d chunks left in %s after delivery", n, spool.BodyStream)
		}
		r.stop(t)
		mxtest.CheckServersClosed(t, mx.Counter)
	})

	t.Run("a chunked body that is not the one stored is never delivered", func(t *testing.T) {
		t.Parallel()
		e := newE2E(t)
		e.dns.Add(t, "big.test. 60 IN MX 10 mx1.big.test.", "mx1.big.test. 60 IN A "+e2eMX1)
		mx := e.startMX(e2eMX1, &mxtest.MX{})
		body := []byte("Subject: big\r\n\r\n" + strings.Repeat(strings.Repeat("x", 78)+"\r\n", 3<<20/80))
		m := e.message(e.enqueueMail(e2eSender, []spool.Rcpt{e2eRcpt("pat@big.test")}, body))
		if m.Envelope.Body.Chunks < 4 {
			t.Fatalf("body stored in %d chunks", m.Envelope.Body.Chunks)
		}
		// One octet of the last chunk changed: the deliverer sends all of
		// it before the digest can tell, and must then withhold the dot.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		subj := fmt.Sprintf("jetmail.body.%s.%d", m.Envelope.Body.ID, m.Envelope.Body.Chunks-1)
		last, err := e.sp.JetStream().Stream(ctx, spool.BodyStream)
		if err != nil {
			t.Fatal(err)
		}
		raw, err := last.GetLastMsgForSubject(ctx, subj)
		if err != nil {
			t.Fatal(err)
		}
		bad := append([]byte(nil), raw.Data...)
		bad[len(bad)/2] = 'y'
		if _, err := e.sp.JetStream().Publish(ctx, subj, bad); err != nil {
			t.Fatal(err)
		}
		r := e.startDeliverer()
		var st *spool.DeliveryState
		mxtest.Within(t, 15*time.Second, "the attempt to be recorded", func() bool {
			st, err = e.sp.LoadState(ctx, m.Envelope.QueueID)
			return err == nil && st != nil && st.Attempts > 0
		})
		r.stop(t)
		if rs := st.Rcpts[0]; rs.Status != spool.RcptDeferred || rs.Enhanced != "4.3.0" {
			t.Errorf("recipient after the attempt: %+v; want deferred with 4.3.0", rs)
		}
		// Each attempt (the test environment retries within a second)
		// sends a DATA and never its end.
		if n := mx.Traffic.Count("DATA\r\n"); n < 1 || len(mx.Transactions()) != 0 {
			t.Errorf("MX got %d DATA commands and stored %d messages; want DATA and nothing stored", n, len(mx.Transactions()))
		}
		mxtest.CheckServersClosed(t, mx.Counter)
	})
}
