package outbound

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/jetmail/jetmail/deliverer/resolve"
	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// refusingHop is an address where nothing listens.
func refusingHop(t *testing.T) resolve.Hop {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	return resolve.Hop{Host: "down.test", Addr: addr}
}

func newTestClient(t *testing.T) *Client {
	c := &Client{Hostname: "client.test"}
	t.Cleanup(c.Close)
	return c
}

// shortTimeouts are short enough for tests, long enough for a busy machine.
func shortTimeouts() policy.OutboundTimeouts {
	return policy.OutboundTimeouts{
		Connect: 2 * time.Second, Greeting: 5 * time.Second, Ehlo: 5 * time.Second,
		StartTLS: 5 * time.Second, Auth: 5 * time.Second, Mail: 5 * time.Second,
		Rcpt: 5 * time.Second, DataInit: 5 * time.Second, DataBlock: 5 * time.Second,
		DataDone: 5 * time.Second, Session: 20 * time.Second, DataRateGrace: time.Second,
	}
}

const transferBody = "From: sender@example.org\r\nTo: rcpt@example.com\r\nSubject: test\r\n\r\nHello.\r\n.leading dot\r\n"

func testTransfer(rcpts ...string) *Transfer {
	t := &Transfer{QueueID: "Q1", From: "sender@example.org", Body: Bytes(transferBody)}
	for _, r := range rcpts {
		t.Rcpts = append(t.Rcpts, spool.Rcpt{Addr: r})
	}
	return t
}

func wantStatuses(t *testing.T, res []RcptResult, want ...spool.RcptStatus) {
	t.Helper()
	if len(res) != len(want) {
		t.Fatalf("%d results, want %d", len(res), len(want))
	}
	for i, r := range res {
		if r.Status != want[i] {
			t.Errorf("rcpt %d (%s): status %s (%v), want %s", i, r.Rcpt.Addr, r.Status, r.Err, want[i])
		}
		if (r.Status == spool.RcptDelivered) != (r.Err == nil) {
			t.Errorf("rcpt %d: status %s with Err %v", i, r.Status, r.Err)
		}
		if r.Status == spool.RcptDeferred && r.Err.Permanent {
			t.Errorf("rcpt %d: deferred with a permanent error %v", i, r.Err)
		}
		if r.Status == spool.RcptFailed && !r.Err.Permanent {
			t.Errorf("rcpt %d: failed with a temporary error %v", i, r.Err)
		}
		if r.Reply == "" {
			t.Errorf("rcpt %d: empty Reply", i)
		}
	}
}

func wantRcptErr(t *testing.T, r RcptResult, code int, enhanced, text string) {
	t.Helper()
	if r.Err == nil {
		t.Fatalf("rcpt %s: no error, want %d %s", r.Rcpt.Addr, code, enhanced)
	}
	if r.Err.Code != code || r.Err.Enhanced != enhanced || !strings.Contains(r.Err.Text, text) {
		t.Errorf("rcpt %s: error %d %s %q, want %d %s containing %q", r.Rcpt.Addr, r.Err.Code, r.Err.Enhanced, r.Err.Text, code, enhanced, text)
	}
}

func TestDeliverFailover(t *testing.T) {
	t.Run("a primary that refuses connections hands the message to the secondary", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{})
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{refusingHop(t), srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDelivered)
		if res[0].Hop != srv.Hop || res[0].TLS {
			t.Errorf("result from hop %+v TLS %v, want %+v in plaintext", res[0].Hop, res[0].TLS, srv.Hop)
		}
		txns := srv.Transactions()
		if len(txns) != 1 || txns[0].From != "sender@example.org" || !bytes.Equal(txns[0].Body, []byte(transferBody)) {
			t.Errorf("server got %+v", txns)
		}
		if !strings.HasPrefix(res[0].Reply, "250 ") {
			t.Errorf("reply %q", res[0].Reply)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("a 421 greeting passes the hop over", func(t *testing.T) {
		busy := mxtest.StartScripted(t, false, (&mxtest.Script{Greeting: "421 4.3.2 too busy"}).Handle)
		srv := mxtest.Start(t, &mxtest.MX{})
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{busy.Hop, srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDelivered)
		if busy.Accepted.Load() != 1 || len(srv.Transactions()) != 1 {
			t.Errorf("busy hop saw %d connections, good hop %d transactions", busy.Accepted.Load(), len(srv.Transactions()))
		}
		mxtest.CheckNoConnLeak(t, c, busy.Counter, srv.Counter)
	})

	t.Run("all hops down defers every recipient with 4.4.1", func(t *testing.T) {
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{refusingHop(t), refusingHop(t)}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("a@example.com", "b@example.com"))
		wantStatuses(t, res, spool.RcptDeferred, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.4.1", "refused")
		if res[1].Hop != (resolve.Hop{}) {
			t.Errorf("hop %+v for an unreached hop, want zero", res[1].Hop)
		}
		mxtest.CheckNoConnLeak(t, c)
	})

	t.Run("a 421 greeting on the last hop defers with the remote's reply", func(t *testing.T) {
		busy := mxtest.StartScripted(t, false, (&mxtest.Script{Greeting: "421 4.3.2 too busy"}).Handle)
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{refusingHop(t), busy.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 421, "4.3.2", "too busy")
		if res[0].Err.Remote != "mx.test" || res[0].Hop != busy.Hop {
			t.Errorf("remote %q hop %+v", res[0].Err.Remote, res[0].Hop)
		}
		mxtest.CheckNoConnLeak(t, c, busy.Counter)
	})

	t.Run("no hops defers with 4.4.4", func(t *testing.T) {
		c := newTestClient(t)
		res := c.Deliver(context.Background(), nil, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.4.4", "")
		mxtest.CheckNoConnLeak(t, c)
	})

	t.Run("a 4xx to MAIL FROM passes the hop over", func(t *testing.T) {
		first := mxtest.Start(t, &mxtest.MX{Mail: func(string) error {
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try later"}
		}})
		second := mxtest.Start(t, &mxtest.MX{})
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{first.Hop, second.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDelivered)
		if res[0].Hop != second.Hop || len(second.Transactions()) != 1 {
			t.Errorf("delivered via %+v, second hop has %d transactions", res[0].Hop, len(second.Transactions()))
		}
		mxtest.CheckNoConnLeak(t, c, first.Counter, second.Counter)
	})

	t.Run("a 5xx to MAIL FROM fails every recipient and tries no other hop", func(t *testing.T) {
		first := mxtest.Start(t, &mxtest.MX{Mail: func(string) error {
			return &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "sender rejected"}
		}})
		second := mxtest.Start(t, &mxtest.MX{})
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{first.Hop, second.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("a@example.com", "b@example.com"))
		wantStatuses(t, res, spool.RcptFailed, spool.RcptFailed)
		wantRcptErr(t, res[1], 553, "5.7.1", "sender rejected")
		if second.Accepted.Load() != 0 {
			t.Errorf("second hop saw %d connections, want 0", second.Accepted.Load())
		}
		mxtest.CheckNoConnLeak(t, c, first.Counter, second.Counter)
	})
}

func TestDeliverReplies(t *testing.T) {
	t.Run("a 4xx on one RCPT and 250 on another delivers one and defers the other", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{Rcpt: func(to string) error {
			if to == "full@example.com" {
				return &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 2, 2}, Message: "mailbox full"}
			}
			return nil
		}})
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("full@example.com", "ok@example.com"))
		wantStatuses(t, res, spool.RcptDeferred, spool.RcptDelivered)
		wantRcptErr(t, res[0], 452, "4.2.2", "mailbox full")
		if txns := srv.Transactions(); len(txns) != 1 || strings.Join(txns[0].Rcpts, ",") != "ok@example.com" {
			t.Errorf("server got %+v", txns)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("a 5xx on RCPT fails the recipient with the remote's code, enhanced code and text", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{Rcpt: func(to string) error {
			if to == "nobody@example.com" {
				return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
			}
			return nil
		}})
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("ok@example.com", "nobody@example.com"))
		wantStatuses(t, res, spool.RcptDelivered, spool.RcptFailed)
		wantRcptErr(t, res[1], 550, "5.1.1", "no such user")
		if res[1].Err.Remote != "mx.test" || res[1].Reply != "550 5.1.1 no such user" {
			t.Errorf("remote %q reply %q", res[1].Err.Remote, res[1].Reply)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("a reply without an enhanced code gets one from its class", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{Rcpt: func(string) error {
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.NoEnhancedCode, Message: "go away"}
		}})
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptFailed)
		wantRcptErr(t, res[0], 550, "5.0.0", "go away")
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("no accepted recipient means no DATA", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{Rcpt: func(string) error {
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
		}})
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("a@example.com", "b@example.com"))
		wantStatuses(t, res, spool.RcptFailed, spool.RcptFailed)
		if n := srv.DataCount(); n != 0 {
			t.Errorf("server got DATA %d times", n)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("a 451 to the data defers the accepted recipients", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{Data: func(int) error {
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "queue full"}
		}})
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("a@example.com", "b@example.com"))
		wantStatuses(t, res, spool.RcptDeferred, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.3.0", "queue full")
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("a 554 to the data fails the accepted recipients", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{Data: func(int) error {
			return &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "spam"}
		}})
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptFailed)
		wantRcptErr(t, res[0], 554, "5.7.1", "spam")
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})
}

func TestDeliverExtensions(t *testing.T) {
	t.Run("a message over the announced SIZE fails with 5.3.4 without DATA", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{}, func(s *smtp.Server) { s.MaxMessageBytes = 20 })
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptFailed)
		wantRcptErr(t, res[0], 552, "5.3.4", "exceeds")
		if n := srv.DataCount(); n != 0 || srv.Traffic.Count("MAIL FROM") != 0 {
			t.Errorf("server got DATA %d times, MAIL %d times", n, srv.Traffic.Count("MAIL FROM"))
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("SIZE is declared as the body length", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{})
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDelivered)
		if txns := srv.Transactions(); len(txns) != 1 || txns[0].MailOpts.Size != int64(len(transferBody)) || txns[0].MailOpts.Body != smtp.Body8BitMIME {
			t.Errorf("server got MAIL options %+v", txns[0].MailOpts)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("an SMTPUTF8 message to a server without SMTPUTF8 fails with 5.6.7", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{})
		c := newTestClient(t)
		tr := testTransfer("jörg@example.com")
		tr.Mail.SMTPUTF8 = true
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, tr)
		wantStatuses(t, res, spool.RcptFailed)
		wantRcptErr(t, res[0], 553, "5.6.7", "SMTPUTF8")
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("an SMTPUTF8 message to a server with SMTPUTF8 is delivered with SMTPUTF8", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{}, func(s *smtp.Server) { s.EnableSMTPUTF8 = true })
		c := newTestClient(t)
		tr := testTransfer("jörg@example.com")
		tr.Mail.SMTPUTF8 = true
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, tr)
		wantStatuses(t, res, spool.RcptDelivered)
		if txns := srv.Transactions(); len(txns) != 1 || !txns[0].MailOpts.UTF8 || txns[0].Rcpts[0] != "jörg@example.com" {
			t.Errorf("server got %+v", txns)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	dsnTransfer := func() *Transfer {
		tr := testTransfer()
		tr.Mail.Ret, tr.Mail.EnvID = "HDRS", "env+id-1"
		tr.Rcpts = []spool.Rcpt{
			{Addr: "a@example.com", Notify: []string{"SUCCESS", "FAILURE"}, ORcpt: "rfc822;orig@example.org"},
			{Addr: "b@example.com", Notify: []string{"NEVER"}},
		}
		return tr
	}

	t.Run("DSN parameters reach a server that offers DSN", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{}, func(s *smtp.Server) { s.EnableDSN = true })
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, dsnTransfer())
		wantStatuses(t, res, spool.RcptDelivered, spool.RcptDelivered)
		if !res[0].DSNPassed || !res[1].DSNPassed {
			t.Errorf("DSNPassed %v %v, want true", res[0].DSNPassed, res[1].DSNPassed)
		}
		txns := srv.Transactions()
		if len(txns) != 1 {
			t.Fatalf("server got %d transactions", len(txns))
		}
		tx := txns[0]
		if tx.MailOpts.Return != smtp.DSNReturnHeaders || tx.MailOpts.EnvelopeID != "env+id-1" {
			t.Errorf("MAIL options RET=%q ENVID=%q", tx.MailOpts.Return, tx.MailOpts.EnvelopeID)
		}
		a, b := tx.RcptOpts[0], tx.RcptOpts[1]
		if len(a.Notify) != 2 || a.Notify[0] != smtp.DSNNotifySuccess || a.Notify[1] != smtp.DSNNotifyFailure ||
			a.OriginalRecipientType != smtp.DSNAddressTypeRFC822 || a.OriginalRecipient != "orig@example.org" {
			t.Errorf("first RCPT options %+v", a)
		}
		if len(b.Notify) != 1 || b.Notify[0] != smtp.DSNNotifyNever || b.OriginalRecipient != "" {
			t.Errorf("second RCPT options %+v", b)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("DSN parameters are left out for a server without DSN", func(t *testing.T) {
		// go-smtp's server refuses NOTIFY, RET and ENVID unless it offers
		// DSN, so a delivery proves they were not sent.
		srv := mxtest.Start(t, &mxtest.MX{})
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, dsnTransfer())
		wantStatuses(t, res, spool.RcptDelivered, spool.RcptDelivered)
		if res[0].DSNPassed {
			t.Error("DSNPassed for a server without DSN")
		}
		if srv.Traffic.Count("NOTIFY=") != 0 || srv.Traffic.Count("ENVID=") != 0 {
			t.Error("DSN parameters sent to a server without DSN")
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})
}

// brokenTLSScript offers STARTTLS, says 220, and answers the ClientHello with
// garbage; a plaintext session on a new connection works.
func brokenTLSScript() *mxtest.Script {
	return &mxtest.Script{
		Exts: []string{"STARTTLS", "8BITMIME"},
		StartTLS: func(c net.Conn, r *bufio.Reader) bool {
			io.WriteString(c, "220 2.0.0 ready\r\n")
			buf := make([]byte, 1)
			if _, err := r.Read(buf); err != nil {
				return false
			}
			io.WriteString(c, "this is not TLS at all\r\n")
			return false
		},
	}
}

func TestDeliverTLS(t *testing.T) {
	t.Run("opportunistic TLS falls back to plaintext on the same hop after a broken handshake", func(t *testing.T) {
		sc := brokenTLSScript()
		srv := mxtest.StartScripted(t, false, sc.Handle)
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSOpportunistic}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDelivered)
		if res[0].TLS {
			t.Error("TLS reported for a plaintext delivery")
		}
		if srv.Accepted.Load() != 2 || sc.Txns.Load() != 1 {
			t.Errorf("server saw %d connections and %d transactions, want 2 and 1", srv.Accepted.Load(), sc.Txns.Load())
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("opportunistic TLS goes on in plaintext when STARTTLS is refused", func(t *testing.T) {
		sc := &mxtest.Script{Exts: []string{"STARTTLS"}, StartTLS: func(c net.Conn, r *bufio.Reader) bool {
			_, err := io.WriteString(c, "454 4.7.0 TLS not available\r\n")
			return err == nil
		}}
		srv := mxtest.StartScripted(t, false, sc.Handle)
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSOpportunistic}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDelivered)
		if res[0].TLS || srv.Accepted.Load() != 1 || sc.Txns.Load() != 1 {
			t.Errorf("TLS %v; server saw %d connections and %d transactions, want 1 and 1", res[0].TLS, srv.Accepted.Load(), sc.Txns.Load())
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("required TLS defers when STARTTLS is refused", func(t *testing.T) {
		sc := &mxtest.Script{Exts: []string{"STARTTLS"}, StartTLS: func(c net.Conn, r *bufio.Reader) bool {
			_, err := io.WriteString(c, "454 4.7.0 TLS not available\r\n")
			return err == nil
		}}
		srv := mxtest.StartScripted(t, false, sc.Handle)
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSRequired}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.7.4", "454 4.7.0 TLS not available")
		if sc.Txns.Load() != 0 {
			t.Error("message sent in plaintext under TLSRequired")
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("required TLS defers after a broken handshake", func(t *testing.T) {
		sc := brokenTLSScript()
		srv := mxtest.StartScripted(t, false, sc.Handle)
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSRequired}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.7.5", "handshake")
		if srv.Accepted.Load() != 1 || sc.Txns.Load() != 0 {
			t.Errorf("server saw %d connections and %d transactions, want 1 and 0", srv.Accepted.Load(), sc.Txns.Load())
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("required TLS defers when STARTTLS is not offered", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{})
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSRequired}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.7.4", "STARTTLS")
		if len(srv.Transactions()) != 0 {
			t.Error("message sent in plaintext under TLSRequired")
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("required TLS accepts a certificate it cannot verify", func(t *testing.T) {
		cert, _ := mxtest.SelfSignedCert(t, "mx.right.test")
		srv := mxtest.Start(t, &mxtest.MX{}, func(s *smtp.Server) { s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}} })
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSRequired}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDelivered)
		if txns := srv.Transactions(); !res[0].TLS || len(txns) != 1 || !txns[0].TLS {
			t.Errorf("TLS %v, server transactions %+v", res[0].TLS, txns)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("verify defers a certificate for another name", func(t *testing.T) {
		cert, roots := mxtest.SelfSignedCert(t, "mx.right.test")
		srv := mxtest.Start(t, &mxtest.MX{}, func(s *smtp.Server) { s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}} })
		c := newTestClient(t)
		c.RootCAs = roots
		hop := srv.Hop
		hop.Host = "mx.wrong.test"
		res := c.Deliver(context.Background(), []resolve.Hop{hop}, Security{Level: policy.TLSVerify}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.7.5", "mx.wrong.test")
		if len(srv.Transactions()) != 0 {
			t.Error("message sent to a server whose certificate did not verify")
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("verify delivers over TLS to the right name", func(t *testing.T) {
		cert, roots := mxtest.SelfSignedCert(t, "mx.right.test")
		srv := mxtest.Start(t, &mxtest.MX{}, func(s *smtp.Server) { s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}} })
		c := newTestClient(t)
		c.RootCAs = roots
		hop := srv.Hop
		hop.Host = "mx.right.test"
		res := c.Deliver(context.Background(), []resolve.Hop{hop}, Security{Level: policy.TLSVerify}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDelivered)
		if txns := srv.Transactions(); !res[0].TLS || len(txns) != 1 || !txns[0].TLS {
			t.Errorf("TLS %v, server transactions %+v", res[0].TLS, txns)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})
}

func TestDeliverAuth(t *testing.T) {
	authServer := func(t *testing.T) *mxtest.MX {
		return mxtest.Start(t, &mxtest.MX{Users: map[string]string{"relay": "s3cret"}, RequireAuth: true})
	}

	t.Run("AUTH PLAIN to a relay that requires it", func(t *testing.T) {
		srv := authServer(t)
		c := newTestClient(t)
		c.AllowInsecureAuth = true
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, &policy.Credentials{Username: "relay", Password: "s3cret"}, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDelivered)
		if txns := srv.Transactions(); len(txns) != 1 || txns[0].User != "relay" {
			t.Errorf("server got %+v", txns)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("AUTH LOGIN when the server offers only LOGIN", func(t *testing.T) {
		var got []string
		sc := &mxtest.Script{Exts: []string{"AUTH LOGIN"}, Auth: func(c net.Conn, r *bufio.Reader, line string) bool {
			got = append(got, strings.TrimSpace(line))
			prompts := []string{"VXNlcm5hbWU6", "UGFzc3dvcmQ6"} // "Username:", "Password:"
			if len(strings.Fields(line)) == 3 {
				prompts = prompts[1:] // the user name came as initial response
			}
			for _, prompt := range prompts {
				io.WriteString(c, "334 "+prompt+"\r\n")
				l, err := r.ReadString('\n')
				if err != nil {
					return false
				}
				got = append(got, strings.TrimSpace(l))
			}
			_, err := io.WriteString(c, "235 2.7.0 ok\r\n")
			return err == nil
		}}
		srv := mxtest.StartScripted(t, false, sc.Handle)
		c := newTestClient(t)
		c.AllowInsecureAuth = true
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, &policy.Credentials{Username: "relay", Password: "s3cret"}, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDelivered)
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
		// "relay" and "s3cret" in base64.
		if strings.Join(got, " ") != "AUTH LOGIN cmVsYXk= czNjcmV0" {
			t.Errorf("server got %q", got)
		}
	})

	t.Run("a hop that refuses the credentials is passed over for the next", func(t *testing.T) {
		refusing := mxtest.Start(t, &mxtest.MX{Users: map[string]string{"relay": "other"}, RequireAuth: true})
		srv := authServer(t)
		c := newTestClient(t)
		c.AllowInsecureAuth = true
		res := c.Deliver(context.Background(), []resolve.Hop{refusing.Hop, srv.Hop}, Security{Level: policy.TLSNone}, &policy.Credentials{Username: "relay", Password: "s3cret"}, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDelivered)
		if res[0].Hop != srv.Hop {
			t.Errorf("delivered via %+v", res[0].Hop)
		}
		mxtest.CheckNoConnLeak(t, c, refusing.Counter, srv.Counter)
	})

	t.Run("refused credentials on the last hop defer with the remote's 535", func(t *testing.T) {
		srv := authServer(t)
		c := newTestClient(t)
		c.AllowInsecureAuth = true
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, &policy.Credentials{Username: "relay", Password: "wrong"}, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 535, "5.7.8", "Authentication failed")
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("credentials are not sent in plaintext without AllowInsecureAuth", func(t *testing.T) {
		srv := authServer(t)
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, &policy.Credentials{Username: "relay", Password: "s3cret"}, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.7.10", "unencrypted")
		if srv.Traffic.Count("AUTH PLAIN ") != 0 {
			t.Error("credentials sent in plaintext")
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("AUTH PLAIN over STARTTLS without AllowInsecureAuth", func(t *testing.T) {
		cert, _ := mxtest.SelfSignedCert(t, "mx.test")
		srv := mxtest.Start(t, &mxtest.MX{Users: map[string]string{"relay": "s3cret"}, RequireAuth: true}, func(s *smtp.Server) {
			s.AllowInsecureAuth = false
			s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
		})
		c := newTestClient(t)
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSRequired}, &policy.Credentials{Username: "relay", Password: "s3cret"}, shortTimeouts(), 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDelivered)
		if txns := srv.Transactions(); len(txns) != 1 || txns[0].User != "relay" || !txns[0].TLS {
			t.Errorf("server got %+v", txns)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})
}

func TestDeliverDeadlines(t *testing.T) {
	t.Run("a server dribbling its EHLO reply forever loses the session at the deadline", func(t *testing.T) {
		srv := mxtest.StartScripted(t, false, (&mxtest.Script{Ehlo: func(c net.Conn) bool {
			mxtest.Dribble(c, "250-DRIBBLE\r\n", 200*time.Millisecond)
			return false
		}}).Handle)
		c := newTestClient(t)
		to := shortTimeouts()
		to.Greeting, to.Ehlo, to.Session = time.Minute, time.Minute, 2*time.Second
		start := time.Now()
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, to, 0, testTransfer("a@example.com"))
		took := time.Since(start)
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.4.2", "session deadline exceeded")
		if took < 1900*time.Millisecond || took > 2600*time.Millisecond {
			t.Errorf("attempt took %s, want about 2s", took)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("a server dribbling its reply to the final dot loses the session at the deadline", func(t *testing.T) {
		srv := mxtest.StartScripted(t, false, (&mxtest.Script{Data: func(c net.Conn, r *bufio.Reader) bool {
			io.WriteString(c, "354 go ahead\r\n")
			if mxtest.ReadToDot(r) != nil {
				return false
			}
			mxtest.Dribble(c, "250-still thinking\r\n", 200*time.Millisecond)
			return false
		}}).Handle)
		c := newTestClient(t)
		to := shortTimeouts()
		to.DataDone, to.Session = time.Minute, 2*time.Second
		start := time.Now()
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, to, 0, testTransfer("a@example.com", "b@example.com"))
		took := time.Since(start)
		wantStatuses(t, res, spool.RcptDeferred, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.4.2", "session deadline exceeded")
		if !strings.Contains(res[0].Err.Text, stepDataDone) || res[0].Hop != srv.Hop {
			t.Errorf("error %v from hop %+v", res[0].Err, res[0].Hop)
		}
		if took > 2600*time.Millisecond {
			t.Errorf("attempt took %s, want about 2s", took)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	bigBody := func(n int) []byte {
		line := strings.Repeat("x", 76) + "\r\n"
		return []byte("Subject: big\r\n\r\n" + strings.Repeat(line, n/len(line)))
	}

	t.Run("a server that stops reading the data is cut off", func(t *testing.T) {
		release := make(chan struct{})
		srv := mxtest.StartScripted(t, true, (&mxtest.Script{Data: func(c net.Conn, r *bufio.Reader) bool {
			io.WriteString(c, "354 go ahead\r\n")
			io.ReadFull(r, make([]byte, 1024))
			<-release
			return false
		}}).Handle)
		c := newTestClient(t)
		to := shortTimeouts()
		to.DataBlock, to.Session = time.Second, 3*time.Second
		tr := testTransfer("a@example.com")
		tr.Body = Bytes(bigBody(16 << 20))
		start := time.Now()
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, to, 0, tr)
		took := time.Since(start)
		close(release)
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.4.2", stepBody)
		if took > 3500*time.Millisecond {
			t.Errorf("attempt took %s, want at most the 3s session", took)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("a server that reads the data below the minimum rate is cut off", func(t *testing.T) {
		srv := mxtest.StartScripted(t, true, (&mxtest.Script{Data: func(c net.Conn, r *bufio.Reader) bool {
			io.WriteString(c, "354 go ahead\r\n")
			buf := make([]byte, 1024)
			for {
				if _, err := io.ReadFull(r, buf); err != nil {
					return false
				}
				time.Sleep(10 * time.Millisecond) // about 100 KB/s
			}
		}}).Handle)
		c := newTestClient(t)
		to := shortTimeouts()
		to.DataBlock, to.Session = 10*time.Second, 10*time.Second
		to.MinDataRate, to.DataRateGrace = 20<<20, 300*time.Millisecond
		tr := testTransfer("a@example.com")
		tr.Body = Bytes(bigBody(16 << 20))
		start := time.Now()
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, to, 0, tr)
		took := time.Since(start)
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.4.2", "slower than")
		if took > 5*time.Second {
			t.Errorf("attempt took %s, want well under the 10s data block timeout", took)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("a body that fails while it is sent ends the session without the final dot", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{})
		c := newTestClient(t)
		tr := testTransfer("a@example.com")
		good := bigBody(4 << 20)
		tr.Body = &failingBody{data: good[:1<<20], size: int64(len(good)), err: errors.New("chunk 4 is gone")}
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, tr)
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.3.0", "chunk 4 is gone")
		if n := srv.Traffic.Count("DATA\r\n"); n != 1 || len(srv.Transactions()) != 0 {
			t.Fatalf("server got %d DATA commands and %d completed transactions; want the DATA and nothing stored", n, len(srv.Transactions()))
		}
		// The connection is not reused: the next message gets a new one
		// and arrives whole.
		tr = testTransfer("b@example.com")
		tr.Body = Bytes(good)
		res = c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, tr)
		wantStatuses(t, res, spool.RcptDelivered)
		if txns := srv.Transactions(); len(txns) != 1 || !bytes.Equal(txns[0].Body, good) || srv.Accepted.Load() != 2 {
			t.Fatalf("after the failed body: %d transactions over %d connections; want the good body over a second connection", len(txns), srv.Accepted.Load())
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("time spent reading the body from the store does not count against the server's rate", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{})
		c := newTestClient(t)
		to := shortTimeouts()
		// 1 MB/s: far below what loopback takes even on a loaded
		// machine, so only the stall can break it.
		to.MinDataRate, to.DataRateGrace = 1<<20, 300*time.Millisecond
		tr := testTransfer("a@example.com")
		good := bigBody(2 << 20)
		// The store answers slowly (a leader change, say): 3 s before the
		// second half, when the first MiB was due within one.
		tr.Body = &stallingBody{data: good, stall: 3 * time.Second}
		res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, to, 0, tr)
		wantStatuses(t, res, spool.RcptDelivered)
		if txns := srv.Transactions(); len(txns) != 1 || !bytes.Equal(txns[0].Body, good) {
			t.Fatalf("server got %d transactions; want the body whole", len(txns))
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("cancelling the context aborts the session promptly and defers", func(t *testing.T) {
		srv := mxtest.StartScripted(t, false, (&mxtest.Script{Ehlo: func(c net.Conn) bool {
			mxtest.Dribble(c, "250-DRIBBLE\r\n", 200*time.Millisecond)
			return false
		}}).Handle)
		c := newTestClient(t)
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		res := c.Deliver(ctx, []resolve.Hop{srv.Hop, refusingHop(t)}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("a@example.com"))
		took := time.Since(start)
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.4.0", "interrupted")
		if took > time.Second {
			t.Errorf("Deliver took %s after a 300ms context", took)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("a connect timeout passes the hop over", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{})
		c := newTestClient(t)
		blackhole := resolve.Hop{Host: "blackhole.test", Addr: netip.MustParseAddrPort("192.0.2.1:25")}
		c.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			if addr == blackhole.Addr.String() {
				<-ctx.Done()
				return nil, ctx.Err()
			}
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		}
		to := shortTimeouts()
		to.Connect = 200 * time.Millisecond
		res := c.Deliver(context.Background(), []resolve.Hop{blackhole, srv.Hop}, Security{Level: policy.TLSNone}, nil, to, 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDelivered)
		res = c.Deliver(context.Background(), []resolve.Hop{blackhole}, Security{Level: policy.TLSNone}, nil, to, 0, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDeferred)
		wantRcptErr(t, res[0], 451, "4.4.1", "timed out")
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})
}

// deliverLimited delivers n messages to hop, one at a time, with the
// messagesPerConnection limit perConn.
func deliverLimited(t *testing.T, c *Client, hop resolve.Hop, n, perConn int) {
	t.Helper()
	for i := 0; i < n; i++ {
		res := c.Deliver(context.Background(), []resolve.Hop{hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), perConn, testTransfer("a@example.com"))
		wantStatuses(t, res, spool.RcptDelivered)
	}
}

func TestClientReuse(t *testing.T) {
	// deliverN delivers n messages, one at a time, under the default
	// messagesPerConnection.
	deliverN := func(t *testing.T, c *Client, hop resolve.Hop, n int) {
		t.Helper()
		deliverLimited(t, c, hop, n, 0)
	}

	t.Run("three messages to one hop share one connection and one EHLO", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{})
		c := newTestClient(t)
		deliverN(t, c, srv.Hop, 3)
		if a, n, e := srv.Accepted.Load(), len(srv.Transactions()), srv.Traffic.Count("EHLO client.test"); a != 1 || n != 3 || e != 1 {
			t.Errorf("server saw %d connections, %d transactions, %d EHLO; want 1, 3, 1", a, n, e)
		}
		if n := c.OpenConns(); n != 1 {
			t.Errorf("%d open connections between messages, want 1", n)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
		if srv.Traffic.Count("QUIT") != 1 {
			t.Errorf("QUIT sent %d times on Close, want 1", srv.Traffic.Count("QUIT"))
		}
	})

	t.Run("a connection that has carried messagesPerConnection messages is replaced", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{})
		c := newTestClient(t)
		deliverLimited(t, c, srv.Hop, 3, 2)
		if a, n := srv.Accepted.Load(), len(srv.Transactions()); a != 2 || n != 3 {
			t.Errorf("server saw %d connections and %d transactions, want 2 and 3", a, n)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("the per-connection limit of each call decides, so a changed limit applies to pooled connections", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{})
		c := newTestClient(t)
		// Limit 1: nothing is pooled, every message dials.
		deliverLimited(t, c, srv.Hop, 2, 1)
		if a := srv.Accepted.Load(); a != 2 || c.OpenConns() != 0 {
			t.Fatalf("limit 1: %d connections, %d left open; want 2 and 0", a, c.OpenConns())
		}
		// Limit 100: one connection carries the next three.
		deliverLimited(t, c, srv.Hop, 3, 100)
		if a := srv.Accepted.Load(); a != 3 || c.OpenConns() != 1 {
			t.Fatalf("limit 100: %d connections, %d open; want 3 and 1", a, c.OpenConns())
		}
		// Limit 2 for a connection that has carried 3: it carries this
		// message, then goes.
		deliverLimited(t, c, srv.Hop, 1, 2)
		if a := srv.Accepted.Load(); a != 3 || c.OpenConns() != 0 {
			t.Fatalf("limit lowered to 2: %d connections, %d open; want the pooled one used once more, then closed", a, c.OpenConns())
		}
		if n := len(srv.Transactions()); n != 6 {
			t.Errorf("server got %d transactions, want 6", n)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("an idle connection is closed after IdleTime and the next message dials anew", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{})
		c := newTestClient(t)
		c.IdleTime = 200 * time.Millisecond
		deliverN(t, c, srv.Hop, 1)
		mxtest.Within(t, 5*time.Second, "the idle connection to be closed", func() bool { return c.OpenConns() == 0 && srv.Open.Load() == 0 })
		if srv.Traffic.Count("QUIT") != 1 {
			t.Error("idle connection closed without QUIT")
		}
		deliverN(t, c, srv.Hop, 1)
		if a := srv.Accepted.Load(); a != 2 {
			t.Errorf("server saw %d connections, want 2", a)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("a pooled connection the server closed is replaced transparently", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{}, func(s *smtp.Server) { s.ReadTimeout = 300 * time.Millisecond })
		c := newTestClient(t)
		deliverN(t, c, srv.Hop, 1)
		mxtest.Within(t, 5*time.Second, "the server to close the idle connection", func() bool { return srv.Open.Load() == 0 })
		if c.OpenConns() != 1 {
			t.Fatalf("%d client connections, want the dead one still pooled", c.OpenConns())
		}
		deliverN(t, c, srv.Hop, 1)
		if a, n := srv.Accepted.Load(), len(srv.Transactions()); a != 2 || n != 2 {
			t.Errorf("server saw %d connections and %d transactions, want 2 and 2", a, n)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("connections differ by TLS policy and user", func(t *testing.T) {
		srv := mxtest.Start(t, &mxtest.MX{Users: map[string]string{"u1": "p", "u2": "p"}})
		c := newTestClient(t)
		c.AllowInsecureAuth = true
		for _, a := range []*policy.Credentials{nil, {Username: "u1", Password: "p"}, {Username: "u2", Password: "p"}, {Username: "u1", Password: "p"}} {
			res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, a, shortTimeouts(), 0, testTransfer("a@example.com"))
			wantStatuses(t, res, spool.RcptDelivered)
		}
		if a := srv.Accepted.Load(); a != 3 {
			t.Errorf("server saw %d connections, want 3 (none, u1, u2)", a)
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})

	t.Run("concurrent deliveries never share a connection", func(t *testing.T) {
		var inData, maxInData atomic.Int64
		srv := mxtest.Start(t, &mxtest.MX{Data: func(int) error {
			n := inData.Add(1)
			for {
				m := maxInData.Load()
				if n <= m || maxInData.CompareAndSwap(m, n) {
					break
				}
			}
			time.Sleep(20 * time.Millisecond) // hold the transaction open so they overlap
			inData.Add(-1)
			return nil
		}})
		c := newTestClient(t)
		var wg sync.WaitGroup
		var failed atomic.Int64
		for i := 0; i < 8; i++ {
			wg.Go(func() {
				for j := 0; j < 5; j++ {
					res := c.Deliver(context.Background(), []resolve.Hop{srv.Hop}, Security{Level: policy.TLSNone}, nil, shortTimeouts(), 0, testTransfer("a@example.com", "b@example.com"))
					for _, r := range res {
						if r.Status != spool.RcptDelivered {
							failed.Add(1)
						}
					}
				}
			})
		}
		wg.Wait()
		if failed.Load() != 0 {
			t.Errorf("%d recipients not delivered", failed.Load())
		}
		if n := len(srv.Transactions()); n != 40 {
			t.Errorf("server got %d transactions, want 40", n)
		}
		if a := srv.Accepted.Load(); a > 8 || maxInData.Load() < 2 {
			t.Errorf("server saw %d connections (want at most 8) and at most %d concurrent transactions", a, maxInData.Load())
		}
		mxtest.CheckNoConnLeak(t, c, srv.Counter)
	})
}

func TestDeliverErrorMapping(t *testing.T) {
	for name, tc := range map[string]struct {
		code     int
		enhanced smtp.EnhancedCode
		want     string
		perm     bool
	}{
		"a 4xx reply with an enhanced code keeps it":    {451, smtp.EnhancedCode{4, 7, 1}, "4.7.1", false},
		"a 4xx reply without an enhanced code is 4.0.0": {421, smtp.EnhancedCode{}, "4.0.0", false},
		"a 5xx reply without an enhanced code is 5.0.0": {554, smtp.NoEnhancedCode, "5.0.0", true},
	} {
		t.Run(name, func(t *testing.T) {
			e := replyError("mx.test", tc.code, tc.enhanced, "text")
			if e.Enhanced != tc.want || e.Permanent != tc.perm || e.Remote != "mx.test" || e.Code != tc.code {
				t.Errorf("got %+v", e)
			}
		})
	}
	if ec, text := parseEnhanced("4.3.2 too\n4.3.2 busy"); ec != (smtp.EnhancedCode{4, 3, 2}) || text != "too\nbusy" {
		t.Errorf("parseEnhanced: %v %q", ec, text)
	}
	if _, text := parseEnhanced("not.an.code here"); text != "not.an.code here" {
		t.Errorf("parseEnhanced kept %q", text)
	}
}

// failingBody reads data, then fails with err: a body whose chunk went
// missing while it was sent.
type failingBody struct {
	data []byte
	size int64
	err  error
}

func (b *failingBody) Size() int64 { return b.size }

func (b *failingBody) Open() (io.Reader, error) {
	return io.MultiReader(bytes.NewReader(b.data), iotest.ErrReader(b.err)), nil
}

// stallingBody reads the first half of data, waits stall, then reads the
// rest.
type stallingBody struct {
	data  []byte
	stall time.Duration
}

func (b *stallingBody) Size() int64 { return int64(len(b.data)) }

func (b *stallingBody) Open() (io.Reader, error) {
	half := len(b.data) / 2
	return io.MultiReader(bytes.NewReader(b.data[:half]), &sleepReader{d: b.stall, r: bytes.NewReader(b.data[half:])}), nil
}

// sleepReader sleeps d before its first read.
type sleepReader struct {
	d     time.Duration
	slept bool
	r     io.Reader
}

func (s *sleepReader) Read(p []byte) (int, error) {
	if !s.slept {
		s.slept = true
		time.Sleep(s.d)
	}
	return s.r.Read(p)
}
