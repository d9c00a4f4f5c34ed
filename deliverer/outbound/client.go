package outbound

// The outbound SMTP client: one Deliver call hands one message to the first
// hop that takes the transaction and reports a result per recipient. The
// connection handling (dialing, STARTTLS, AUTH, hard deadlines, reuse) is in
// pool.go.

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/jetmail/jetmail/deliverer/failure"
	"github.com/jetmail/jetmail/deliverer/resolve"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// Transfer is one message to hand over.
type Transfer struct {
	// QueueID names the message in errors and logs.
	QueueID string
	// From is the reverse path; "" is the null reverse path of a bounce.
	From string
	// Mail holds the original MAIL FROM parameters. SIZE is sent as
	// Header and Body together; SMTPUTF8 is required of the server; RET and ENVID are
	// passed on when the server offers DSN. BODY=8BITMIME is sent whenever
	// the server offers 8BITMIME (go-smtp does so for every message, which
	// is harmless for 7-bit content); to a server without 8BITMIME an
	// 8-bit message is still sent as is, as Postfix and qmail do, rather
	// than converted or bounced (RFC 6152 §3 leaves that to the relay).
	Mail spool.MailParams
	// Rcpts are the recipients; NOTIFY and ORCPT are passed on when the
	// server offers DSN.
	Rcpts []spool.Rcpt
	// Header is sent in front of Body: header fields ending in CRLF (the
	// DKIM signatures made at acceptance), kept apart so the stored body
	// is sent as it was read, without a copy.
	Header string
	// Body is the message with CRLF line ends, not dot-stuffed. It is
	// opened when a server has accepted DATA (at most once per Deliver)
	// and copied to it as it is read.
	Body Body
}

// Body is a message body to send.
type Body interface {
	// Size is the number of octets Open reads.
	Size() int64
	// Open starts reading the body. An error from the reader before
	// io.EOF ends the session without the final dot, so the server
	// discards what it got, and defers the recipients.
	Open() (io.Reader, error)
}

// Bytes is a Body held in memory.
type Bytes []byte

// Size implements Body.
func (b Bytes) Size() int64 { return int64(len(b)) }

// Open implements Body.
func (b Bytes) Open() (io.Reader, error) { return bytes.NewReader(b), nil }

// size is the octets sent as the message.
func (t *Transfer) size() int64 { return int64(len(t.Header)) + t.Body.Size() }

// RcptResult is the outcome for one recipient of a Transfer.
type RcptResult struct {
	// Rcpt is the recipient, as given in the Transfer.
	Rcpt spool.Rcpt
	// Status says whether the recipient was delivered, deferred or failed.
	Status spool.RcptStatus
	// Err is the remote reply or local failure; nil when delivered. A
	// deferred recipient's Err is never Permanent, even when it carries a
	// remote 5xx that was about the hop rather than the message (a 554
	// greeting, a 535 to AUTH).
	Err *failure.Error
	// Reply is the final reply for this recipient ("250 2.0.0 Ok ..."),
	// for logs.
	Reply string
	// Hop is the hop that gave the result; zero if no hop was reached.
	Hop resolve.Hop
	// TLS tells whether the session that gave the result was encrypted.
	TLS bool
	// TLSPolicy names what secured that session: "DANE", "MTA-STS",
	// "MTA-STS testing", or "" for the route's or the default TLS policy.
	TLSPolicy string
	// DSNPassed is set when the next hop offered DSN and accepted the
	// recipient, so it has taken over delivery status notification
	// (RFC 3461 §4.2): no "relayed" notice is due from us.
	DSNPassed bool
	// PassedOver is set when no hop took the transaction because every
	// one was unreachable or refused the session (greeting, EHLO, TLS,
	// AUTH). It says the destination is down, not that anything is wrong
	// with this message; a 4xx to MAIL FROM does not set it.
	PassedOver bool
}

// Client delivers over SMTP and keeps connections open for reuse. Its
// exported fields must be set before the first Deliver; a Client is then
// safe for concurrent use, and concurrent Deliver calls never share a
// connection at the same time.
type Client struct {
	// Hostname is our EHLO name; "" sends "localhost".
	Hostname string
	// RootCAs verifies certificates under policy.TLSVerify; nil means the
	// system roots.
	RootCAs *x509.CertPool
	// IdleTime is how long an idle connection is kept for reuse; 0 means 5 s.
	IdleTime time.Duration
	// AllowInsecureAuth allows AUTH over a plaintext connection.
	AllowInsecureAuth bool
	// Dial opens TCP connections; nil means a net.Dialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Report, when set, is told how each new session's TLS went, under
	// the policy that applied (TLSReport): the counts a TLS-RPT report
	// (RFC 8460) is made of. Not called for sessions under policy.TLSNone.
	Report func(TLSReport)

	pool connPool
}

// Deliver tries hops in order until one takes the transaction, and returns
// one result per recipient, in the order of t.Rcpts.
//
// The settings are those of the configuration in force for this delivery
// (the caller's policy.Delivery): pol and auth come from the route (auth
// nil: no AUTH; credentials go only over TLS unless AllowInsecureAuth is
// set); to bounds the session, a zero field taking the policy default
// (policy.OutboundTimeouts.WithDefaults); perConn is the
// messagesPerConnection limit, 0 or less meaning
// policy.DefaultPerConnection. The connection used goes back to the pool
// only if it has carried fewer than perConn messages, this one included:
// the limit is read at each use, so a changed limit applies to pooled
// connections at their next use.
//
// A hop is passed over (RFC 5321 §5.1) when it cannot be reached, its
// greeting is not 220, EHLO/HELO fails, STARTTLS fails under
// policy.TLSRequired or policy.TLSVerify, AUTH fails, or it answers MAIL
// FROM with 4xx. Once a hop has accepted MAIL FROM its replies are final
// for this call: per RCPT, 2xx is delivered after a successful DATA, 4xx
// deferred, 5xx failed. A 5xx to MAIL FROM fails every recipient. When
// every hop was passed over, every recipient is deferred with the last
// hop's error; with no hops at all, with 4.4.4. Cancelling ctx closes the
// connection in use and defers what is not decided yet.
func (c *Client) Deliver(ctx context.Context, hops []resolve.Hop, sec Security, auth *policy.Credentials, to policy.OutboundTimeouts, perConn int, t *Transfer) []RcptResult {
	to = to.WithDefaults()
	if perConn <= 0 {
		perConn = policy.DefaultPerConnection
	}
	res := make([]RcptResult, len(t.Rcpts))
	for i, r := range t.Rcpts {
		res[i].Rcpt = r
	}
	if len(t.Rcpts) == 0 {
		return res
	}
	if len(hops) == 0 {
		deferAll(res, failure.Temporary(451, "4.4.4", "no host to deliver %s to", t.QueueID), resolve.Hop{})
		return res
	}
	var (
		last            *failure.Error
		lastHop         resolve.Hop
		sessionsRefused = true
	)
	for _, hop := range hops {
		if ctx.Err() != nil {
			last, lastHop = canceledError(ctx, hop, "connect"), resolve.Hop{}
			break
		}
		final, err, reached, session := c.tryHop(ctx, hop, sec.For(hop), auth, to, perConn, t, res)
		if final {
			return res
		}
		last, lastHop = err, resolve.Hop{}
		if reached {
			lastHop = hop
		}
		// A hop that got as far as MAIL FROM and answered it with 4xx
		// (greylisting, a sender's rate limit) is up: that was about the
		// message.
		sessionsRefused = sessionsRefused && !session
	}
	deferAll(res, last, lastHop)
	if ctx.Err() == nil && sessionsRefused {
		for i := range res {
			res[i].PassedOver = true
		}
	}
	return res
}

// Close closes every pooled connection, with a QUIT bounded by a short
// timeout. Connections in use are closed when their Deliver call ends.
// Close is idempotent; Deliver keeps working afterwards, without reuse.
func (c *Client) Close() {
	c.pool.close()
}

// OpenConns is the number of connections open right now, pooled or in use.
func (c *Client) OpenConns() int {
	return int(c.pool.open.Load())
}

// tryHop runs one hop. final says the hop took the transaction and res is
// filled; otherwise err says why the hop was passed over, reached whether
// a connection was made and session whether the session got as far as MAIL
// FROM.
func (c *Client) tryHop(ctx context.Context, hop resolve.Hop, sec HostSecurity, auth *policy.Credentials, to policy.OutboundTimeouts, perConn int, t *Transfer, res []RcptResult) (final bool, err *failure.Error, reached, session bool) {
	limit := time.Now().Add(to.Session)
	cn, err, reached := c.checkout(ctx, t.QueueID, hop, sec, auth, to, limit)
	if err != nil {
		return false, err, reached, false
	}
	final, err = cn.transact(t, to, res)
	c.checkin(cn, to, perConn)
	return final, err, true, true
}

// report tells Report how securing cn's session went; err is why it was
// not opened, if it was not.
func (c *Client) report(qid string, cn *smtpConn, err *failure.Error) {
	if c.Report == nil {
		return
	}
	r := TLSReport{QueueID: qid, Hop: cn.hop, Policy: cn.sec.Policy, Testing: cn.sec.Testing, Result: cn.tlsResult}
	if r.Result != ResultSuccess {
		r.Err = err
		if r.Err == nil {
			r.Err = failure.Temporary(451, "4.7.5", "%s: %s%s, not enforced", hopName(cn.hop), r.Result, cn.sec.by())
		}
	}
	c.Report(r)
}

func (c *Client) hostname() string {
	if c.Hostname == "" {
		return "localhost"
	}
	return c.Hostname
}

func (c *Client) idleTime() time.Duration {
	if c.IdleTime <= 0 {
		return 5 * time.Second
	}
	return c.IdleTime
}

// Names of the protocol steps, for error texts.
const (
	stepConnect  = "connect"
	stepGreeting = "greeting"
	stepEhlo     = "EHLO"
	stepStartTLS = "STARTTLS"
	stepAuth     = "AUTH"
	stepMail     = "MAIL FROM"
	stepRcpt     = "RCPT TO"
	stepData     = "DATA"
	stepBody     = "message transfer"
	stepDataDone = "end of data"
)

// transact runs one mail transaction on cn. It reports whether the hop took
// the transaction, in which case res is filled; otherwise err says why the
// next hop should be tried.
func (cn *smtpConn) transact(t *Transfer, to policy.OutboundTimeouts, res []RcptResult) (bool, *failure.Error) {
	host := hopName(cn.hop)
	for i := range res {
		res[i].Hop, res[i].TLS, res[i].TLSPolicy = cn.hop, cn.tls, cn.sec.label()
	}
	// Checks that need no round trip. None starts a transaction, so the
	// connection stays reusable.
	if cn.maxSize > 0 && t.size() > cn.maxSize {
		// RFC 1870 §6.1: do not send what the server announced it refuses.
		finishAll(res, spool.RcptFailed, failure.Permanent(552, "5.3.4", "message size %d exceeds the limit %d of %s", t.size(), cn.maxSize, host))
		return true, nil
	}
	if t.Mail.SMTPUTF8 && !cn.utf8 {
		// RFC 6531 §3.2: no downgrade, the message is returned.
		finishAll(res, spool.RcptFailed, failure.Permanent(553, "5.6.7", "%s does not support SMTPUTF8 (RFC 6531)", host))
		return true, nil
	}
	if strings.ContainsAny(t.From, "\r\n") {
		finishAll(res, spool.RcptFailed, failure.Permanent(553, "5.1.7", "sender address contains a line break"))
		return true, nil
	}

	cn.uses++
	cn.sc.CommandTimeout = to.Mail
	if err := cn.sc.Mail(t.From, cn.mailOptions(t)); err != nil {
		e := cn.fail(stepMail, err)
		if e.Permanent {
			finishAll(res, spool.RcptFailed, e)
			return true, nil
		}
		// A 4xx to MAIL may mean "not now on this connection": do not
		// reuse it.
		cn.retire = true
		return false, e
	}

	var accepted []int
	for i, r := range t.Rcpts {
		if strings.ContainsAny(r.Addr, "\r\n") {
			finish(&res[i], spool.RcptFailed, failure.Permanent(553, "5.1.3", "recipient address contains a line break"))
			continue
		}
		cn.sc.CommandTimeout = to.Rcpt
		err := cn.sc.Rcpt(r.Addr, cn.rcptOptions(r))
		if err == nil {
			accepted = append(accepted, i)
			continue
		}
		e := cn.fail(stepRcpt, err)
		if cn.broken {
			// The connection is gone: what is not decided is deferred.
			for _, j := range accepted {
				finish(&res[j], spool.RcptDeferred, e)
			}
			for j := i; j < len(res); j++ {
				finish(&res[j], spool.RcptDeferred, e)
			}
			return true, nil
		}
		finish(&res[i], statusOf(e), e)
	}
	if len(accepted) == 0 {
		return true, nil
	}

	finishAccepted := func(status spool.RcptStatus, e *failure.Error) {
		for _, i := range accepted {
			finish(&res[i], status, e)
		}
	}
	cn.sc.CommandTimeout = to.DataInit
	w, err := cn.sc.Data()
	if err != nil {
		e := cn.fail(stepData, err)
		finishAccepted(statusOf(e), e)
		return true, nil
	}
	// go-smtp dot-stuffs through a 4 KiB buffer; each of its writes to
	// the network gets a deadline from deadlineConn (DataBlock, the rate).
	cn.dc.startData(to.DataBlock, to.MinDataRate, to.DataRateGrace)
	step := stepBody
	_, err = io.WriteString(w, t.Header)
	var body io.Reader
	if err == nil {
		body, err = t.Body.Open()
		if err != nil {
			err = &readError{err}
		}
	}
	if err == nil {
		// Only the reader's own errors are readErrors: a failed write to
		// the server stays a network error.
		// A buffer the size of the body, up to 32 KiB: io.Copy's own
		// would be 32 KiB for every message, thirty times a 1 KB one.
		buf := make([]byte, min(32<<10, max(512, t.Body.Size())))
		_, err = io.CopyBuffer(w, readErrors{r: body, dc: cn.dc}, buf)
	}
	if re := (*readError)(nil); errors.As(err, &re) {
		// Our side failed (a chunk missing, a body that does not match its
		// digest): close without the final dot, so the server keeps
		// nothing of it.
		cn.dc.endData()
		cn.broken = true
		e := failure.Temporary(451, "4.3.0", "queue read error: %v", re.err)
		finishAccepted(spool.RcptDeferred, e)
		return true, nil
	}
	var resp *smtp.DataResponse
	if err == nil {
		step = stepDataDone
		cn.sc.SubmissionTimeout = to.DataDone
		resp, err = w.CloseWithResponse()
	}
	slow := cn.dc.endData()
	if err != nil {
		var e *failure.Error
		if slow && !cn.dc.sessionOver() {
			cn.broken = true
			e = failure.Temporary(451, "4.4.2", "%s took message data slower than %d B/s", host, to.MinDataRate).WithReason(failure.DeadlineKill)
		} else {
			e = cn.fail(step, err)
		}
		finishAccepted(statusOf(e), e)
		return true, nil
	}
	reply := "250 " + oneLine(resp.StatusText)
	for _, i := range accepted {
		res[i].Status, res[i].Err, res[i].Reply, res[i].DSNPassed = spool.RcptDelivered, nil, reply, cn.dsn
	}
	return true, nil
}

// mailOptions are the MAIL FROM parameters for t on this server.
func (cn *smtpConn) mailOptions(t *Transfer) *smtp.MailOptions {
	opts := &smtp.MailOptions{Size: t.size(), UTF8: t.Mail.SMTPUTF8}
	if !cn.dsn {
		return opts
	}
	switch strings.ToUpper(t.Mail.Ret) {
	case "FULL":
		opts.Return = smtp.DSNReturnFull
	case "HDRS":
		opts.Return = smtp.DSNReturnHeaders
	}
	// RFC 3461 §4.4: ENVID is printable ASCII; go-smtp xtext-encodes it.
	if t.Mail.EnvID != "" && printableASCII(t.Mail.EnvID) {
		opts.EnvelopeID = t.Mail.EnvID
	}
	return opts
}

// rcptOptions are the RCPT TO parameters for r on this server: NOTIFY and
// ORCPT when it offers DSN. A malformed value is left out rather than
// failing the recipient (go-smtp would refuse to send it).
func (cn *smtpConn) rcptOptions(r spool.Rcpt) *smtp.RcptOptions {
	if !cn.dsn {
		return nil
	}
	opts := &smtp.RcptOptions{}
	if notify, ok := notifySet(r.Notify); ok {
		opts.Notify = notify
	}
	if typ, addr, ok := strings.Cut(r.ORcpt, ";"); ok && addr != "" {
		switch strings.ToUpper(strings.TrimSpace(typ)) {
		case "RFC822":
			if printableASCII(addr) {
				opts.OriginalRecipientType, opts.OriginalRecipient = smtp.DSNAddressTypeRFC822, addr
			}
		case "UTF-8":
			opts.OriginalRecipientType, opts.OriginalRecipient = smtp.DSNAddressTypeUTF8, addr
		}
	}
	return opts
}

// notifySet converts NOTIFY values and checks them as RFC 3461 §4.1 does:
// NEVER alone, or some of SUCCESS, FAILURE, DELAY, each once.
func notifySet(vals []string) ([]smtp.DSNNotify, bool) {
	if len(vals) == 0 {
		return nil, false
	}
	seen := map[smtp.DSNNotify]bool{}
	out := make([]smtp.DSNNotify, 0, len(vals))
	for _, v := range vals {
		n := smtp.DSNNotify(strings.ToUpper(strings.TrimSpace(v)))
		switch n {
		case smtp.DSNNotifyNever, smtp.DSNNotifySuccess, smtp.DSNNotifyFailure, smtp.DSNNotifyDelayed:
		default:
			return nil, false
		}
		if seen[n] {
			return nil, false
		}
		seen[n] = true
		out = append(out, n)
	}
	if seen[smtp.DSNNotifyNever] && len(out) > 1 {
		return nil, false
	}
	return out, true
}

func printableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < ' ' || s[i] > '~' {
			return false
		}
	}
	return true
}

// replyError converts a remote reply into an *Error with Remote set. The
// enhanced code is taken from the reply (RFC 2034) when the server gave one,
// else derived from the basic code: 4xx is 4.0.0, 5xx is 5.0.0.
func replyError(host string, code int, enhanced smtp.EnhancedCode, text string) *failure.Error {
	e := &failure.Error{Permanent: code/100 == 5, Code: code, Text: oneLine(text), Remote: host}
	if k := enhanced[0]; (k == 2 || k == 4 || k == 5) && enhanced[1] >= 0 && enhanced[2] >= 0 {
		e.Enhanced = fmt.Sprintf("%d.%d.%d", enhanced[0], enhanced[1], enhanced[2])
	} else if e.Permanent {
		e.Enhanced = "5.0.0"
	} else {
		e.Enhanced = "4.0.0"
	}
	return e
}

// parseEnhanced splits an RFC 2034 enhanced status code off a reply text
// that go-smtp did not parse (a reply we read ourselves).
func parseEnhanced(msg string) (smtp.EnhancedCode, string) {
	first, rest, _ := strings.Cut(msg, " ")
	parts := strings.Split(first, ".")
	if len(parts) != 3 {
		return smtp.EnhancedCode{}, msg
	}
	var ec smtp.EnhancedCode
	for i, p := range parts {
		n := 0
		if p == "" || len(p) > 3 {
			return smtp.EnhancedCode{}, msg
		}
		for _, d := range p {
			if d < '0' || d > '9' {
				return smtp.EnhancedCode{}, msg
			}
			n = n*10 + int(d-'0')
		}
		ec[i] = n
	}
	return ec, strings.ReplaceAll(rest, "\n"+first+" ", "\n")
}

func oneLine(s string) string {
	return strings.ReplaceAll(strings.TrimSpace(s), "\n", " / ")
}

func statusOf(e *failure.Error) spool.RcptStatus {
	if e.Permanent {
		return spool.RcptFailed
	}
	return spool.RcptDeferred
}

func finish(r *RcptResult, status spool.RcptStatus, e *failure.Error) {
	r.Status, r.Err, r.Reply, r.DSNPassed = status, e, errReply(e), false
}

func finishAll(res []RcptResult, status spool.RcptStatus, e *failure.Error) {
	for i := range res {
		finish(&res[i], status, e)
	}
}

// deferAll defers every recipient with e, made temporary: a hop that was
// passed over said nothing final about the message.
func deferAll(res []RcptResult, e *failure.Error, hop resolve.Hop) {
	if e == nil {
		e = failure.Temporary(451, "4.4.0", "delivery not attempted")
	}
	if e.Permanent {
		tmp := *e
		tmp.Permanent = false
		e = &tmp
	}
	for i := range res {
		finish(&res[i], spool.RcptDeferred, e)
		res[i].Hop, res[i].TLS = hop, false
	}
}

// errReply renders e as an SMTP reply line for logs.
func errReply(e *failure.Error) string {
	return fmt.Sprintf("%d %s %s", e.Code, e.Enhanced, e.Text)
}

func canceledError(ctx context.Context, hop resolve.Hop, step string) *failure.Error {
	return failure.Temporary(451, "4.4.0", "delivery to %s interrupted during %s: %v", hopName(hop), step, context.Cause(ctx))
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// hopName is how a hop is named in error texts and in Error.Remote.
func hopName(h resolve.Hop) string {
	if h.Host != "" {
		return h.Host
	}
	return h.Addr.String()
}

// readError marks an error of the body's reader, as opposed to one of the
// connection it is copied to.
type readError struct{ err error }

func (e *readError) Error() string { return e.err.Error() }
func (e *readError) Unwrap() error { return e.err }

// readErrors wraps a body's reader so that io.Copy's error says which side
// failed, and so that the time its reads take (a chunk fetched from the
// store) does not count against the server's minimum data rate.
type readErrors struct {
	r  io.Reader
	dc *deadlineConn
}

func (r readErrors) Read(p []byte) (int, error) {
	start := time.Now()
	n, err := r.r.Read(p)
	r.dc.excuse(time.Since(start))
	if err != nil && err != io.EOF {
		err = &readError{err}
	}
	return n, err
}
