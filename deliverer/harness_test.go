package deliverer

// The servers the deliverer's tests deliver to, shared by the client tests
// and the end-to-end tests: a scriptable go-smtp MX, a raw-TCP server for
// peers that break the protocol in ways go-smtp cannot, connection counting
// on every one of them, and the checks that no connection leaked.

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"github.com/jetmail/jetmail/deliverer/resolve"
)

// connCounter counts a test server's connections as the server sees them.
type connCounter struct {
	accepted atomic.Int64
	open     atomic.Int64
}

type countedConn struct {
	net.Conn
	once sync.Once
	cnt  *connCounter
}

func (c *countedConn) Close() error {
	c.once.Do(func() { c.cnt.open.Add(-1) })
	return c.Conn.Close()
}

type countingListener struct {
	net.Listener
	cnt *connCounter
	// shrink sets a small receive buffer on accepted connections, so that a
	// server that stops reading stops the sender soon.
	shrink bool
}

// countConns counts the connections ln accepts.
func countConns(ln net.Listener) *countingListener {
	return &countingListener{Listener: ln, cnt: &connCounter{}}
}

// listenCounting listens on a random loopback port.
func listenCounting(t *testing.T, shrink bool) *countingListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cl := countConns(ln)
	cl.shrink = shrink
	return cl
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if tc, ok := c.(*net.TCPConn); ok && l.shrink {
		_ = tc.SetReadBuffer(8 << 10)
	}
	l.cnt.accepted.Add(1)
	l.cnt.open.Add(1)
	return &countedConn{Conn: c, cnt: l.cnt}, nil
}

// hop is the listener's address as a next hop named host.
func (l *countingListener) hop(host string) resolve.Hop {
	return resolve.Hop{Host: host, Addr: netip.MustParseAddrPort(l.Addr().String())}
}

// testMX is a go-smtp server playing a remote MX. Hooks run on every call
// and may answer with an error; the server records what it gets.
type testMX struct {
	mail  func(from string) error
	rcpt  func(to string) error
	data  func(n int) error // n: the DATA call, from 1
	users map[string]string // AUTH PLAIN accounts; nil: no AUTH
	// requireAuth refuses MAIL before AUTH.
	requireAuth bool

	// Set by serveMX.
	*connCounter
	hop     resolve.Hop
	traffic *trafficLog

	mu        sync.Mutex
	txns      []mxTxn
	rcptCalls []rcptCall
	dataCalls int
}

// mxTxn is one transaction a testMX completed.
type mxTxn struct {
	from     string
	mailOpts smtp.MailOptions
	rcpts    []string
	rcptOpts []smtp.RcptOptions
	body     []byte
	user     string
	tls      bool
}

// rcptCall is one RCPT TO a testMX got, accepted or not.
type rcptCall struct {
	to   string
	opts smtp.RcptOptions
}

func (m *testMX) NewSession(c *smtp.Conn) (smtp.Session, error) {
	_, isTLS := c.TLSConnectionState()
	return &mxSession{mx: m, tls: isTLS}, nil
}

func (m *testMX) transactions() []mxTxn {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]mxTxn(nil), m.txns...)
}

// rcptCount returns how many times addr was given in RCPT TO.
func (m *testMX) rcptCount(addr string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, c := range m.rcptCalls {
		if c.to == addr {
			n++
		}
	}
	return n
}

// rcptNotify returns the NOTIFY values of the last RCPT TO for addr.
func (m *testMX) rcptNotify(addr string) []smtp.DSNNotify {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := len(m.rcptCalls) - 1; i >= 0; i-- {
		if m.rcptCalls[i].to == addr {
			return m.rcptCalls[i].opts.Notify
		}
	}
	return nil
}

func (m *testMX) dataCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.dataCalls
}

type mxSession struct {
	mx   *testMX
	tls  bool
	user string
	cur  mxTxn
}

var (
	_ smtp.Session     = (*mxSession)(nil)
	_ smtp.AuthSession = (*mxSession)(nil)
)

func (s *mxSession) AuthMechanisms() []string {
	if s.mx.users == nil {
		return nil
	}
	return []string{sasl.Plain}
}

func (s *mxSession) Auth(string) (sasl.Server, error) {
	return sasl.NewPlainServer(func(_, user, pass string) error {
		if p, ok := s.mx.users[user]; ok && p == pass {
			s.user = user
			return nil
		}
		return smtp.ErrAuthFailed
	}), nil
}

func (s *mxSession) Mail(from string, opts *smtp.MailOptions) error {
	if s.mx.requireAuth && s.user == "" {
		return smtp.ErrAuthRequired
	}
	if s.mx.mail != nil {
		if err := s.mx.mail(from); err != nil {
			return err
		}
	}
	s.cur = mxTxn{from: from, user: s.user, tls: s.tls}
	if opts != nil {
		s.cur.mailOpts = *opts
	}
	return nil
}

func (s *mxSession) Rcpt(to string, opts *smtp.RcptOptions) error {
	var o smtp.RcptOptions
	if opts != nil {
		o = *opts
	}
	s.mx.mu.Lock()
	s.mx.rcptCalls = append(s.mx.rcptCalls, rcptCall{to: to, opts: o})
	s.mx.mu.Unlock()
	if s.mx.rcpt != nil {
		if err := s.mx.rcpt(to); err != nil {
			return err
		}
	}
	s.cur.rcpts = append(s.cur.rcpts, to)
	s.cur.rcptOpts = append(s.cur.rcptOpts, o)
	return nil
}

func (s *mxSession) Data(r io.Reader) error {
	body, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s.mx.mu.Lock()
	s.mx.dataCalls++
	n := s.mx.dataCalls
	s.mx.mu.Unlock()
	if s.mx.data != nil {
		if err := s.mx.data(n); err != nil {
			return err
		}
	}
	s.cur.body = body
	s.mx.mu.Lock()
	s.mx.txns = append(s.mx.txns, s.cur)
	s.mx.mu.Unlock()
	return nil
}

func (s *mxSession) Reset()        { s.cur = mxTxn{} }
func (s *mxSession) Logout() error { return nil }

// trafficLog records an SMTP server's whole conversation.
type trafficLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *trafficLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *trafficLog) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.b.String(), s)
}

// startMX serves m on a random loopback port as mx.test.
func startMX(t *testing.T, m *testMX, mut ...func(*smtp.Server)) *testMX {
	t.Helper()
	return serveMX(t, listenCounting(t, false), "mx.test", m, mut...)
}

// serveMX serves m on ln as domain until the test ends. mut changes the
// server's settings before it starts.
func serveMX(t *testing.T, ln *countingListener, domain string, m *testMX, mut ...func(*smtp.Server)) *testMX {
	t.Helper()
	m.connCounter, m.hop, m.traffic = ln.cnt, ln.hop(domain), &trafficLog{}
	s := smtp.NewServer(m)
	s.Domain = domain
	s.AllowInsecureAuth = true
	s.ReadTimeout = 10 * time.Second
	s.WriteTimeout = 10 * time.Second
	s.MaxMessageBytes = 50 << 20
	s.MaxRecipients = 100
	s.ErrorLog = log.New(io.Discard, "", 0)
	s.Debug = m.traffic
	for _, f := range mut {
		f(s)
	}
	go s.Serve(ln)
	t.Cleanup(func() { s.Close() })
	return m
}

// scriptedServer runs a scripted handler per connection, for servers that
// misbehave in ways go-smtp cannot. After the handler returns, the server
// reads until the client closes, so open counts what the client has not
// closed yet.
type scriptedServer struct {
	*connCounter
	hop resolve.Hop
}

// startScripted serves handle on a random loopback port as mx.test.
func startScripted(t *testing.T, shrink bool, handle func(c net.Conn, r *bufio.Reader)) *scriptedServer {
	t.Helper()
	ln := listenCounting(t, shrink)
	serveScripted(t, ln, handle)
	return &scriptedServer{connCounter: ln.cnt, hop: ln.hop("mx.test")}
}

// serveScripted runs handle for every connection ln accepts until the test
// ends, then closes every connection and waits for the handlers.
func serveScripted(t *testing.T, ln *countingListener, handle func(c net.Conn, r *bufio.Reader)) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() {
				defer c.Close()
				handle(c, bufio.NewReader(c))
				_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
				_, _ = io.Copy(io.Discard, c)
			})
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
}

// remoteScript is a minimal SMTP server for startScripted. Hooks replace
// the default handling of one command; returning false ends the session.
type remoteScript struct {
	greeting string
	exts     []string
	ehlo     func(c net.Conn) bool
	startTLS func(c net.Conn, r *bufio.Reader) bool
	auth     func(c net.Conn, r *bufio.Reader, line string) bool
	data     func(c net.Conn, r *bufio.Reader) bool
	txns     atomic.Int64
}

func (s *remoteScript) handle(c net.Conn, r *bufio.Reader) {
	say := func(lines ...string) bool {
		_, err := io.WriteString(c, strings.Join(lines, "\r\n")+"\r\n")
		return err == nil
	}
	greeting := s.greeting
	if greeting == "" {
		greeting = "220 raw.test ESMTP"
	}
	if !say(greeting) || !strings.HasPrefix(greeting, "220") {
		return
	}
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		verb, _, _ := strings.Cut(strings.ToUpper(strings.TrimSpace(line)), " ")
		ok := true
		switch verb {
		case "EHLO":
			if s.ehlo != nil {
				ok = s.ehlo(c)
				break
			}
			lines := []string{"250-raw.test"}
			for _, e := range s.exts {
				lines = append(lines, "250-"+e)
			}
			lines[len(lines)-1] = "250 " + strings.TrimPrefix(lines[len(lines)-1], "250-")
			ok = say(lines...)
		case "HELO", "MAIL", "RCPT", "RSET", "NOOP":
			ok = say("250 2.0.0 ok")
		case "STARTTLS":
			ok = s.startTLS(c, r)
		case "AUTH":
			ok = s.auth(c, r, line)
		case "DATA":
			if s.data != nil {
				ok = s.data(c, r)
				break
			}
			if !say("354 go ahead") || readToDot(r) != nil {
				return
			}
			s.txns.Add(1)
			ok = say("250 2.0.0 queued")
		case "QUIT":
			say("221 2.0.0 bye")
			return
		default:
			ok = say("502 5.5.1 unknown command")
		}
		if !ok {
			return
		}
	}
}

func readToDot(r *bufio.Reader) error {
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return err
		}
		if line == ".\r\n" {
			return nil
		}
	}
}

// dribble writes s one byte per interval, over and over, until the client
// goes.
func dribble(c net.Conn, s string, interval time.Duration) {
	for {
		for i := 0; i < len(s); i++ {
			if _, err := c.Write([]byte{s[i]}); err != nil {
				return
			}
			time.Sleep(interval)
		}
	}
}

// within polls cond every 20 ms until it holds, failing the test when d
// has passed.
func within(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkNoConnLeak closes the client and checks that no connection is left
// open, on either side.
func checkNoConnLeak(t *testing.T, c *Client, servers ...*connCounter) {
	t.Helper()
	c.Close()
	if n := c.OpenConns(); n != 0 {
		t.Errorf("client: %d connections open after Close", n)
	}
	checkServersClosed(t, servers...)
}

// checkServersClosed checks that the servers saw every connection closed.
func checkServersClosed(t *testing.T, servers ...*connCounter) {
	t.Helper()
	for i, s := range servers {
		within(t, 5*time.Second, fmt.Sprintf("server %d to see its connections closed", i), func() bool { return s.open.Load() == 0 })
	}
}

// selfSignedCert returns a self-signed server certificate for name and a pool
// that trusts it.
func selfSignedCert(t *testing.T, name string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}
