package smtpgw

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"
	proxyproto "github.com/pires/go-proxyproto"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/jetmail/jetmail/events"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// Config is the part of the gateway's configuration that is fixed for the
// life of the process. The relay policy is separate: it comes from a
// policy.Source and can change at any time.
type Config struct {
	// Hostname is the name in the greeting, EHLO reply and Received: header.
	Hostname string
	// TLS, when set, enables STARTTLS.
	TLS *tls.Config
	// ProxyProtocol requires a PROXY protocol (v1 or v2) header on every
	// connection, as sent by a Kubernetes load balancer, so the policy sees
	// the real client address.
	ProxyProtocol bool
	// MaxLineLength bounds any input line, command or data. Longer lines
	// get 500 and the connection is closed. Default 64 KiB: far above the
	// RFC 5321 limits (512 for commands, 1000 for text lines), which are
	// always accepted, because real mail often has longer lines.
	MaxLineLength int
	// ShutdownGrace is how long transactions in flight may take to finish
	// after Shutdown. Default 30s.
	ShutdownGrace time.Duration
	// Auth bounds password guessing; zero fields take their defaults.
	Auth AuthLimits
	// Events receives an event per queued message, duplicate suppressed
	// and refusal; nil: none.
	Events *events.Log
}

// Gateway is the SMTP ingress.
type Gateway struct {
	cfg     Config
	spool   *spool.Spool
	log     *zap.Logger
	metrics *metrics
	auth    *authGuard
	src     *policy.Source
	front   atomic.Pointer[front]

	mu        sync.Mutex
	conns     map[*conn]struct{}
	perIP     map[netip.Addr]int
	listeners []net.Listener
	draining  bool
	idle      chan struct{} // closed when draining and the last conn is gone
}

// New creates a gateway that queues into sp under the relay policy of src
// in force: it is read when a connection is accepted (its limits, deadlines
// and error budget) and at every EHLO (the session's policy), so a change
// applies to the next connection and the next session; sessions already
// open keep theirs. A change to a setting go-smtp holds for its connections
// (maxMessageBytes, auth.allowInsecure, timeouts.command) starts a new
// go-smtp front for new connections (src.Subscribe).
func New(cfg Config, sp *spool.Spool, src *policy.Source, log *zap.Logger, reg prometheus.Registerer) *Gateway {
	if cfg.Hostname == "" {
		cfg.Hostname = "localhost"
	}
	if cfg.MaxLineLength == 0 {
		cfg.MaxLineLength = 64 << 10
	}
	if cfg.ShutdownGrace == 0 {
		cfg.ShutdownGrace = 30 * time.Second
	}
	g := &Gateway{cfg: cfg, spool: sp, src: src, log: log, metrics: newMetrics(reg), auth: newAuthGuard(cfg.Auth),
		conns: map[*conn]struct{}{}, perIP: map[netip.Addr]int{}}
	// Subscribed before the first front is built, so no change between
	// the two is missed.
	src.Subscribe(func(c *policy.Config) { g.refront(c.Relay) })
	g.refront(src.Relay())
	return g
}

// front is one go-smtp server. go-smtp reads a few settings from its
// Server struct on every connection (the SIZE it advertises and enforces,
// whether AUTH is offered before TLS, the idle timeout), and they must not
// change under it. So a policy that changes them gets a new front: new
// connections are handed to it, connections already open finish on the old
// one.
type front struct {
	srv *smtp.Server
	in  *handoff
	key frontKey
}

// frontKey is what a front takes from the policy.
type frontKey struct {
	maxMessageBytes int64
	insecureAuth    bool
	idle            time.Duration
}

func keyOf(p *policy.Relay) frontKey {
	return frontKey{p.MaxMessageBytes, p.AllowInsecureAuth, p.CommandTimeout}
}

func (g *Gateway) newFront(pol *policy.Relay) *front {
	s := smtp.NewServer(smtp.BackendFunc(g.newSession))
	s.Domain = g.cfg.Hostname
	s.TLSConfig = g.cfg.TLS
	s.MaxLineLength = g.cfg.MaxLineLength
	// SIZE is advertised from here; the data reader enforces the policy in
	// force for each session. go-smtp refuses a message of exactly this
	// size (it checks its budget before reading the final dot), so the
	// limit is exclusive throughout: MAIL FROM SIZE= and the data reader
	// refuse maxMessageBytes octets too, and the advertised number stays
	// the configured one.
	s.MaxMessageBytes = pol.MaxMessageBytes
	// Recipients are counted by the session, per policy.
	s.MaxRecipients = 0
	s.AllowInsecureAuth = pol.AllowInsecureAuth
	s.ReadTimeout = pol.CommandTimeout
	s.WriteTimeout = time.Minute
	s.EnableSMTPUTF8 = true
	s.EnableDSN = true
	s.ErrorLog = zapPrintf{g.log}
	f := &front{srv: s, in: &handoff{ch: make(chan net.Conn), done: make(chan struct{})}, key: keyOf(pol)}
	go func() { _ = s.Serve(f.in) }()
	return f
}

// handoff is the listener a front's go-smtp server accepts from.
type handoff struct {
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func (h *handoff) Accept() (net.Conn, error) {
	select {
	case c := <-h.ch:
		return c, nil
	case <-h.done:
		return nil, net.ErrClosed
	}
}

func (h *handoff) Close() error   { h.once.Do(func() { close(h.done) }); return nil }
func (h *handoff) Addr() net.Addr { return &net.TCPAddr{} }

// hand gives an accepted connection to the current front.
func (g *Gateway) hand(c net.Conn) {
	for {
		f := g.front.Load()
		select {
		case f.in.ch <- c:
			return
		case <-f.in.done:
			// Replaced meanwhile: try the new one.
			if g.front.Load() == f {
				c.Close()
				return
			}
		}
	}
}

// refront starts a new front when p changes what the current one was
// built with; the old one finishes the connections it has.
func (g *Gateway) refront(p *policy.Relay) {
	g.mu.Lock()
	defer g.mu.Unlock()
	old := g.front.Load()
	if old == nil {
		g.front.Store(g.newFront(p))
		return
	}
	if old.key != keyOf(p) && !g.draining {
		g.front.Store(g.newFront(p))
		old.in.Close()
	}
}

// Serve accepts SMTP connections on l until Shutdown.
func (g *Gateway) Serve(l net.Listener) error {
	if g.cfg.ProxyProtocol {
		l = &proxyproto.Listener{Listener: l, ReadHeaderTimeout: 10 * time.Second,
			ConnPolicy: func(proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) { return proxyproto.REQUIRE, nil }}
	}
	wl := &listener{Listener: l, g: g}
	g.mu.Lock()
	if g.draining {
		g.mu.Unlock()
		return errors.New("smtpgw: shutting down")
	}
	g.listeners = append(g.listeners, wl)
	g.mu.Unlock()
	var err error
	var backoff time.Duration
	for {
		c, aerr := wl.Accept()
		if aerr != nil {
			var ne net.Error
			if errors.As(aerr, &ne) && ne.Timeout() {
				// Out of file descriptors and the like: wait and go on.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				time.Sleep(backoff)
				continue
			}
			err = aerr
			break
		}
		backoff = 0
		g.hand(c)
	}
	g.mu.Lock()
	draining := g.draining
	g.mu.Unlock()
	if draining {
		return nil
	}
	return err
}

// listener wraps accepted connections in our conn.
type listener struct {
	net.Listener
	g *Gateway
}

func (l *listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	pol := l.g.src.Relay()
	return newConn(c, l.g, pol.SessionTimeout, pol.MaxErrors), nil
}

// admit applies the connection limits. It returns the refusal to send, or "".
func (g *Gateway) admit(c *conn, ip netip.Addr) string {
	pol := g.src.Relay()
	g.mu.Lock()
	defer g.mu.Unlock()
	switch {
	case g.draining:
		g.metrics.connections.WithLabelValues("shutting_down").Inc()
		g.refused(ip, events.ReasonShutdown, "4.3.2", "Service shutting down, try again later")
		return "421 4.3.2 Service shutting down, try again later\r\n"
	case len(g.conns) >= pol.MaxConnections:
		g.metrics.connections.WithLabelValues("max_connections").Inc()
		g.log.Warn("connection refused: too many connections", zap.Stringer("client", ip))
		g.refused(ip, events.ReasonLimit, "4.7.0", "Too many connections, try again later")
		return "421 4.7.0 Too many connections, try again later\r\n"
	case g.perIP[ip] >= pol.MaxConnectionsPerIP:
		g.metrics.connections.WithLabelValues("max_connections_per_ip").Inc()
		g.log.Warn("connection refused: too many connections from one address", zap.Stringer("client", ip))
		g.refused(ip, events.ReasonLimit, "4.7.0", "Too many connections from your address, try again later")
		return "421 4.7.0 Too many connections from your address, try again later\r\n"
	}
	g.conns[c] = struct{}{}
	g.perIP[ip]++
	g.metrics.connections.WithLabelValues("accepted").Inc()
	g.metrics.connectionsOpen.Inc()
	return ""
}

func (g *Gateway) release(c *conn) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, ok := g.conns[c]; !ok {
		return
	}
	delete(g.conns, c)
	if g.perIP[c.ip]--; g.perIP[c.ip] <= 0 {
		delete(g.perIP, c.ip)
	}
	g.metrics.connectionsOpen.Dec()
	if g.draining && len(g.conns) == 0 && g.idle != nil {
		close(g.idle)
		g.idle = nil
	}
}

// newSession is go-smtp's Backend: called at EHLO/HELO (again after
// STARTTLS).
func (g *Gateway) newSession(c *smtp.Conn) (smtp.Session, error) {
	helo := c.Hostname()
	if len(helo) > policy.MaxDomain+2 {
		return nil, &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 5, 4}, Message: "HELO argument too long"}
	}
	tc := unwrapConn(c.Conn())
	var ip netip.Addr
	if tc != nil {
		ip = tc.ip
	} else {
		ip = addrIP(c.Conn().RemoteAddr())
	}
	pol := g.src.Relay()
	_, isTLS := c.TLSConnectionState()
	s := &session{
		g: g, c: c, tc: tc, pol: pol, ip: ip, helo: helo, tls: isTLS,
		mayRelay: pol.MayRelay(ip, false),
		log:      g.log.With(zap.Stringer("client", ip), zap.String("helo", helo)),
	}
	return s, nil
}

// Shutdown stops accepting connections, answers 421 to idle sessions and to
// anything new, lets transactions in flight finish within the grace period,
// then closes what is left.
func (g *Gateway) Shutdown(ctx context.Context) error {
	g.mu.Lock()
	g.draining = true
	for _, l := range g.listeners {
		l.Close()
	}
	g.front.Load().in.Close()
	conns := make([]*conn, 0, len(g.conns))
	for c := range g.conns {
		conns = append(conns, c)
	}
	var idle chan struct{}
	if len(g.conns) > 0 {
		idle = make(chan struct{})
		g.idle = idle
	}
	g.mu.Unlock()
	for _, c := range conns {
		c.drain(g.cfg.ShutdownGrace)
	}
	if idle == nil {
		return nil
	}
	timer := time.NewTimer(g.cfg.ShutdownGrace + 5*time.Second)
	defer timer.Stop()
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
	case <-timer.C:
	}
	g.mu.Lock()
	for c := range g.conns {
		c.Conn.Close()
	}
	g.mu.Unlock()
	return ctx.Err()
}

// OpenConnections is the number of connections holding a slot.
func (g *Gateway) OpenConnections() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.conns)
}

// zapPrintf adapts zap to go-smtp's Logger.
type zapPrintf struct{ l *zap.Logger }

func (z zapPrintf) Printf(format string, v ...interface{}) { z.l.Sugar().Debugf(format, v...) }
func (z zapPrintf) Println(v ...interface{})               { z.l.Sugar().Debug(v...) }
