package outbound

// Connections: dialing, the greeting, STARTTLS, AUTH, the hard session
// deadline, and the pool that keeps connections for reuse. go-smtp reads
// through a replayConn that first yields a stand-in for the greeting we
// consumed (see the package documentation).

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/netip"
	"net/textproto"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/jetmail/jetmail/deliverer/failure"
	"github.com/jetmail/jetmail/deliverer/resolve"
	"github.com/jetmail/jetmail/policy"
)

const (
	// quitTimeout bounds the QUIT of a connection we are done with.
	quitTimeout = 2 * time.Second
	// probeTimeout bounds the NOOP that checks a pooled connection and the
	// RSET before pooling (capped by OutboundTimeouts.Mail).
	probeTimeout = 10 * time.Second
	// watchdogMargin is how long after the session deadline the watchdog
	// closes a connection that is somehow still busy. Deadlines normally
	// end the session first.
	watchdogMargin = 250 * time.Millisecond
)

// poolKey says which connections are interchangeable. The host name is part
// of it as well as the address: under policy.TLSVerify it is what the
// certificate was checked against.
type poolKey struct {
	host string
	addr netip.AddrPort
	pol  policy.TLSPolicy
	auth string // HostSecurity.poolAuth: the TLSA records and names under DANE
	user string
}

// connPool holds idle connections. Its zero value is ready to use.
type connPool struct {
	mu       sync.Mutex
	idle     map[poolKey][]*smtpConn
	closed   bool
	quitting sync.WaitGroup // QUITs of expired connections in flight

	open atomic.Int64 // connections open, pooled or in use
}

// smtpConn is one SMTP connection to a hop, after EHLO (and STARTTLS and
// AUTH when they apply), ready for MAIL FROM.
type smtpConn struct {
	key poolKey
	hop resolve.Hop
	dc  *deadlineConn // the TCP connection
	nc  net.Conn      // what go-smtp speaks over: dc, or TLS over it
	br  *bufio.Reader // reads nc beneath go-smtp
	sc  *smtp.Client
	tls bool
	sec HostSecurity
	// tlsResult is the TLS-RPT result of securing the session, set while
	// it is opened.
	tlsResult string

	// From the EHLO reply.
	maxSize int64 // RFC 1870 SIZE; 0 = none announced or no limit
	dsn     bool  // RFC 3461
	utf8    bool  // RFC 6531

	uses int // transactions started

	// State of the current use.
	ctx     context.Context
	unwatch func() bool
	session time.Duration
	broken  bool // unusable: close without QUIT
	retire  bool // usable but not to be reused: QUIT

	idleTimer *time.Timer
}

// checkout returns a connection to hop ready for MAIL FROM: a pooled one that
// answers NOOP, or a new one. reached says whether a TCP connection was made
// (for RcptResult.Hop when the hop is then passed over).
func (c *Client) checkout(ctx context.Context, qid string, hop resolve.Hop, sec HostSecurity, auth *policy.Credentials, to policy.OutboundTimeouts, limit time.Time) (*smtpConn, *failure.Error, bool) {
	key := poolKey{host: hop.Host, addr: hop.Addr, pol: sec.Level, auth: sec.poolAuth()}
	if auth != nil {
		key.user = auth.Username
	}
	for {
		cn := c.pool.take(key, c.idleTime())
		if cn == nil {
			break
		}
		cn.arm(ctx, limit, to.Session)
		cn.sc.CommandTimeout = min(to.Mail, probeTimeout)
		err := cn.sc.Noop()
		if err == nil {
			// The key holds the level and the DANE records; which policy
			// asked for them (for logs) is this delivery's.
			cn.sec = sec
			return cn, nil, true
		}
		cn.disarm()
		cn.dc.Close()
		if ctx.Err() != nil {
			return nil, canceledError(ctx, hop, stepConnect), false
		}
	}
	cn, err, fallback, reached := c.connect(ctx, qid, key, hop, sec, auth, to, limit)
	if fallback {
		// RFC 7435 opportunistic security: a failed handshake means
		// plaintext, on a new connection since the old one is spoiled.
		plain := sec
		plain.Level, plain.Testing = policy.TLSNone, false
		cn, err, _, _ = c.connect(ctx, qid, key, hop, plain, auth, to, limit)
	}
	return cn, err, reached
}

// checkin ends a use of cn: back to the pool when it is healthy and has
// carried fewer than perConn messages, else QUIT or close.
func (c *Client) checkin(cn *smtpConn, to policy.OutboundTimeouts, perConn int) {
	reuse := !cn.broken && !cn.retire && cn.uses < perConn
	if reuse {
		// Leave no transaction open on a pooled connection, and find out
		// now whether the server still talks to us.
		if _, _, err := cn.command(min(to.Mail, probeTimeout), "RSET", 250); err != nil {
			reuse = false
			cn.broken = true
		}
	}
	if !cn.disarm() {
		cn.broken = true
	}
	switch {
	case cn.broken:
		cn.dc.abort()
	case !reuse || !c.pool.put(cn, c.idleTime(), func() { c.pool.expire(cn) }):
		cn.quit()
	}
}

// connect dials hop and brings a new connection to the point of MAIL FROM.
// fallback is set when an opportunistic STARTTLS failed in a way that
// spoiled the connection, so a plaintext one should be tried.
func (c *Client) connect(ctx context.Context, qid string, key poolKey, hop resolve.Hop, sec HostSecurity, auth *policy.Credentials, to policy.OutboundTimeouts, limit time.Time) (cn *smtpConn, err *failure.Error, fallback, reached bool) {
	host := hopName(hop)
	if !time.Now().Before(limit) {
		return nil, failure.Temporary(451, "4.4.2", "session deadline exceeded (%s) before connecting to %s", to.Session, host).WithReason(failure.DeadlineKill), false, false
	}
	dctx, cancel := context.WithDeadline(ctx, earliest(time.Now().Add(to.Connect), limit))
	raw, derr := c.dial(dctx, hop.Addr.String())
	cancel()
	if derr != nil {
		switch {
		case ctx.Err() != nil:
			return nil, canceledError(ctx, hop, stepConnect), false, false
		case isTimeout(derr) || errors.Is(derr, context.DeadlineExceeded):
			return nil, failure.Temporary(451, "4.4.1", "no answer from %s [%s]: connect timed out", host, hop.Addr), false, false
		default:
			return nil, failure.Temporary(451, "4.4.1", "cannot connect to %s [%s]: %v", host, hop.Addr, unwrapOp(derr)), false, false
		}
	}
	c.pool.open.Add(1)
	dc := &deadlineConn{Conn: raw, onClose: func() { c.pool.open.Add(-1) }}
	cn = &smtpConn{key: key, hop: hop, dc: dc, nc: dc, sec: sec}
	cn.arm(ctx, limit, to.Session)
	err, fallback = cn.open(c, sec.Level, auth, to)
	if cn.tlsResult != "" && ctx.Err() == nil {
		c.report(qid, cn, err)
	}
	if err != nil {
		cn.disarm()
		if cn.broken {
			dc.abort()
		} else {
			dc.Close()
		}
		return nil, err, fallback && sec.Level == policy.TLSOpportunistic && ctx.Err() == nil, true
	}
	return cn, nil, false, true
}

func (c *Client) dial(ctx context.Context, addr string) (net.Conn, error) {
	if c.Dial != nil {
		return c.Dial(ctx, "tcp", addr)
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", addr)
}

// open runs greeting, EHLO, STARTTLS and AUTH on a new connection.
func (cn *smtpConn) open(c *Client, pol policy.TLSPolicy, auth *policy.Credentials, to policy.OutboundTimeouts) (*failure.Error, bool) {
	cn.br = bufio.NewReader(cn.dc)
	cn.dc.SetDeadline(time.Now().Add(to.Greeting))
	if _, _, err := textproto.NewReader(cn.br).ReadResponse(220); err != nil {
		return cn.fail(stepGreeting, err), false
	}
	cn.dc.SetDeadline(time.Time{})
	cn.sc = newSMTPClient(cn.dc, cn.br)
	cn.sc.CommandTimeout = to.Ehlo
	if err := cn.sc.Hello(c.hostname()); err != nil {
		return cn.fail(stepEhlo, err), false
	}
	if pol != policy.TLSNone {
		if err, fallback := cn.startTLS(c, to); err != nil {
			return err, fallback
		}
	}
	if auth != nil {
		if err := cn.auth(c, auth, to); err != nil {
			return err, false
		}
	}
	if n, ok := cn.sc.MaxMessageSize(); ok {
		cn.maxSize = int64(n)
	}
	cn.dsn, _ = cn.sc.Extension("DSN")
	cn.utf8, _ = cn.sc.Extension("SMTPUTF8")
	return nil, false
}

// startTLS upgrades the connection as cn.sec says (RFC 3207). A nil error
// with cn.tls unset means opportunistic TLS went on in plaintext on this
// connection. It sets cn.tlsResult.
func (cn *smtpConn) startTLS(c *Client, to policy.OutboundTimeouts) (*failure.Error, bool) {
	host, sec := hopName(cn.hop), cn.sec
	pol := sec.Level
	if ok, _ := cn.sc.Extension("STARTTLS"); !ok {
		cn.tlsResult = ResultStartTLSNotSupported
		if pol == policy.TLSOpportunistic {
			return nil, false
		}
		return failure.Temporary(451, "4.7.4", "TLS is required%s, but %s does not offer STARTTLS", sec.by(), host), false
	}
	_, _, err := cn.command(to.StartTLS, "STARTTLS", 220)
	if err != nil {
		var te *textproto.Error
		if !errors.As(err, &te) {
			return cn.fail(stepStartTLS, err), true
		}
		cn.tlsResult = ResultStartTLSNotSupported
		if pol == policy.TLSOpportunistic {
			return nil, false // refused: the session goes on in plaintext
		}
		return failure.Temporary(451, "4.7.4", "TLS is required%s, but %s refused STARTTLS: %d %s", sec.by(), host, te.Code, oneLine(te.Msg)), false
	}
	if cn.br.Buffered() > 0 {
		// Anything sent before the handshake would be taken as if it came
		// over TLS (the STARTTLS injection of CVE-2011-0411).
		cn.broken = true
		cn.tlsResult = ResultValidationFailure
		return failure.Temporary(451, "4.7.5", "%s sent data after its reply to STARTTLS", host), true
	}
	cfg := &tls.Config{
		// SNI: the host name, which is the TLSA base domain under DANE
		// (RFC 7672 §8.1).
		ServerName:         strings.TrimSuffix(cn.hop.Host, "."),
		RootCAs:            c.RootCAs,
		InsecureSkipVerify: pol != policy.TLSVerify, // RFC 7435: encryption without authentication
	}
	if pol == policy.TLSVerify && cfg.ServerName == "" {
		cn.tlsResult = ResultHostMismatch
		return failure.Temporary(451, "4.7.5", "no host name to verify the certificate of %s against", host), false
	}
	var verifyErr error
	switch {
	case pol == policy.TLSDANE:
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			res, err := verifyDANE(cs.PeerCertificates, sec.TLSA, sec.Names, time.Now())
			if err != nil {
				cn.tlsResult, verifyErr = res, err
			}
			return err
		}
	case sec.Testing:
		// MTA-STS testing: what enforce would have checked, reported and
		// not enforced.
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			if err := verifyPKIX(cs, cfg.ServerName, c.RootCAs); err != nil {
				cn.tlsResult, verifyErr = certResult(err), err
			}
			return nil
		}
	}
	tc := tls.Client(cn.dc, cfg)
	cn.dc.SetDeadline(time.Now().Add(to.StartTLS))
	if err := tc.HandshakeContext(cn.ctx); err != nil {
		cn.broken = true
		if cn.ctx.Err() != nil || cn.dc.sessionOver() {
			return cn.localError(stepStartTLS, err), false
		}
		if cn.tlsResult == "" {
			cn.tlsResult = certResult(err)
		}
		if verifyErr != nil && pol == policy.TLSDANE {
			return failure.Temporary(451, "4.7.5", "DANE: the certificate of %s does not match its TLSA records: %v", host, verifyErr), false
		}
		return failure.Temporary(451, "4.7.5", "TLS handshake with %s failed%s: %v", host, sec.by(), unwrapOp(err)), pol == policy.TLSOpportunistic
	}
	if cn.tlsResult == "" {
		cn.tlsResult = ResultSuccess
	}
	cn.dc.SetDeadline(time.Time{})
	cn.nc, cn.br, cn.tls = tc, bufio.NewReader(tc), true
	cn.sc = newSMTPClient(tc, cn.br)
	cn.sc.CommandTimeout = to.Ehlo
	if err := cn.sc.Hello(c.hostname()); err != nil {
		return cn.fail(stepEhlo, err), false
	}
	return nil, false
}

// verifyPKIX checks the server's certificate as a certificate authority
// would have it: chained to roots (nil: the system's), valid now and for
// name.
func verifyPKIX(cs tls.ConnectionState, name string, roots *x509.CertPool) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("the server sent no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{DNSName: name, Roots: roots, Intermediates: inter})
	return err
}

// auth authenticates with PLAIN, or LOGIN when only LOGIN is offered
// (RFC 4954). Credentials configured for a route mean the hop needs them, so
// a hop that does not offer AUTH is passed over rather than sent mail it
// would likely refuse as relaying.
func (cn *smtpConn) auth(c *Client, auth *policy.Credentials, to policy.OutboundTimeouts) *failure.Error {
	host := hopName(cn.hop)
	if !cn.tls && !c.AllowInsecureAuth {
		return failure.Temporary(451, "4.7.10", "not sending credentials to %s over an unencrypted connection", host)
	}
	var mech sasl.Client
	switch {
	case cn.sc.SupportsAuth("PLAIN"):
		mech = sasl.NewPlainClient("", auth.Username, auth.Password)
	case cn.sc.SupportsAuth("LOGIN"):
		mech = sasl.NewLoginClient(auth.Username, auth.Password)
	default:
		return failure.Temporary(451, "4.7.0", "%s offers no AUTH mechanism we use (PLAIN, LOGIN)", host)
	}
	cn.sc.CommandTimeout = to.Auth
	if err := cn.sc.Auth(mech); err != nil {
		return cn.fail(stepAuth, err)
	}
	return nil
}

// newSMTPClient returns a go-smtp client over nc, reading through br, that
// believes it has yet to read the greeting.
func newSMTPClient(nc net.Conn, br *bufio.Reader) *smtp.Client {
	return smtp.NewClient(&replayConn{Conn: nc, r: io.MultiReader(strings.NewReader("220 greeting already read\r\n"), br)})
}

// command sends one command ourselves and reads its reply beneath go-smtp,
// whose buffer is empty between commands.
func (cn *smtpConn) command(timeout time.Duration, cmd string, expect int) (int, string, error) {
	cn.nc.SetDeadline(time.Now().Add(timeout))
	defer cn.nc.SetDeadline(time.Time{})
	if _, err := io.WriteString(cn.nc, cmd+"\r\n"); err != nil {
		return 0, "", err
	}
	return textproto.NewReader(cn.br).ReadResponse(expect)
}

// fail converts an error from a protocol step into an *Error: a remote
// reply as the remote said it, anything else as a local failure that
// leaves the connection unusable.
func (cn *smtpConn) fail(step string, err error) *failure.Error {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return replyError(hopName(cn.hop), se.Code, se.EnhancedCode, se.Message)
	}
	var te *textproto.Error
	if errors.As(err, &te) {
		ec, text := parseEnhanced(te.Msg)
		return replyError(hopName(cn.hop), te.Code, ec, text)
	}
	cn.broken = true
	return cn.localError(step, err)
}

// localError classifies a failure that is not a remote reply. Such
// failures are all temporary (RFC 3463 4.4.x network and routing status).
func (cn *smtpConn) localError(step string, err error) *failure.Error {
	host := hopName(cn.hop)
	switch {
	case cn.ctx.Err() != nil:
		return canceledError(cn.ctx, cn.hop, step)
	case cn.dc.sessionOver():
		return failure.Temporary(451, "4.4.2", "session deadline exceeded (%s) during %s with %s", cn.session, step, host).WithReason(failure.DeadlineKill)
	case isTimeout(err):
		return failure.Temporary(451, "4.4.2", "timeout during %s with %s", step, host)
	default:
		return failure.Temporary(451, "4.4.2", "connection to %s lost during %s: %v", host, step, unwrapOp(err))
	}
}

// arm starts a use of cn: deadlines are clamped to limit, and the watchdog
// closes the connection shortly after limit or when ctx ends.
func (cn *smtpConn) arm(ctx context.Context, limit time.Time, session time.Duration) {
	cn.ctx, cn.session = ctx, session
	cn.broken, cn.retire = false, false
	cn.dc.setLimit(limit)
	wctx, cancel := context.WithDeadline(ctx, limit.Add(watchdogMargin))
	stop := context.AfterFunc(wctx, func() {
		cn.dc.expired.Store(true)
		cn.dc.abort()
	})
	cn.unwatch = func() bool {
		ok := stop()
		cancel()
		return ok
	}
}

// disarm ends a use of cn. It reports false when the watchdog has closed
// the connection.
func (cn *smtpConn) disarm() bool {
	ok := cn.unwatch()
	cn.ctx = nil
	return ok
}

// quit says QUIT, bounded by quitTimeout and the session deadline if one is
// set, and closes the connection whatever the answer.
func (cn *smtpConn) quit() {
	cn.dc.setLimitBefore(time.Now().Add(quitTimeout))
	cn.sc.CommandTimeout = quitTimeout
	_ = cn.sc.Quit()
	cn.dc.Close()
}

// take returns an idle connection for key, or nil.
func (p *connPool) take(key poolKey, idle time.Duration) *smtpConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		list := p.idle[key]
		if len(list) == 0 {
			return nil
		}
		cn := list[len(list)-1]
		list[len(list)-1] = nil
		p.idle[key] = list[:len(list)-1]
		if len(list) == 1 {
			delete(p.idle, key)
		}
		cn.idleTimer.Stop()
		// The timer normally expires connections; this catches a timer
		// that is late because the process was busy.
		if time.Since(cn.dc.idleSince) > idle {
			cn.dc.Close()
			continue
		}
		return cn
	}
}

// put adds cn to the pool; false means the pool is closed. expire is called
// when cn has been idle too long.
func (p *connPool) put(cn *smtpConn, idle time.Duration, expire func()) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	if p.idle == nil {
		p.idle = make(map[poolKey][]*smtpConn)
	}
	cn.dc.setLimit(time.Time{})
	cn.dc.idleSince = time.Now()
	cn.idleTimer = time.AfterFunc(idle, expire)
	p.idle[cn.key] = append(p.idle[cn.key], cn)
	return true
}

// expire removes cn from the pool if it is still there and QUITs it.
func (p *connPool) expire(cn *smtpConn) {
	p.mu.Lock()
	found := p.remove(cn)
	if found {
		p.quitting.Add(1)
	}
	p.mu.Unlock()
	if found {
		defer p.quitting.Done()
		cn.quit()
	}
}

func (p *connPool) remove(cn *smtpConn) bool {
	list := p.idle[cn.key]
	for i, x := range list {
		if x == cn {
			list = append(list[:i], list[i+1:]...)
			if len(list) == 0 {
				delete(p.idle, cn.key)
			} else {
				p.idle[cn.key] = list
			}
			return true
		}
	}
	return false
}

// close QUITs every pooled connection, in parallel, and refuses new ones.
func (p *connPool) close() {
	p.mu.Lock()
	p.closed = true
	var all []*smtpConn
	for _, list := range p.idle {
		for _, cn := range list {
			cn.idleTimer.Stop()
			all = append(all, cn)
		}
	}
	p.idle = nil
	p.mu.Unlock()
	var wg sync.WaitGroup
	for _, cn := range all {
		wg.Go(cn.quit)
	}
	wg.Wait()
	p.quitting.Wait()
}
