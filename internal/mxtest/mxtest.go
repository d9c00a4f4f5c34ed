// Package mxtest runs the SMTP servers the outbound client and the
// deliverer deliver to in tests: the remote MX hosts.
//
//   - MX is a go-smtp server with hooks per command (Mail, Rcpt, Data) that
//     records every transaction it completes (Transactions) and every RCPT
//     it is given, and logs the whole conversation (Traffic).
//   - Script is a raw-TCP server for peers that break the protocol in ways
//     go-smtp cannot (a greeting that never ends, a STARTTLS that stalls, a
//     reply dribbled a byte at a time); StartScripted and ServeScripted run
//     it, or any handler, per connection.
//   - Every server counts its connections as it sees them (Counter), so a
//     test can check that the client closed each one (CheckNoConnLeak,
//     CheckServersClosed).
//
// Start and StartScripted listen on a random loopback port as mx.test;
// Serve and ServeScripted take a listener (Count wraps one), for tests
// that need a given address.
package mxtest

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
	"github.com/miekg/dns"

	"github.com/jetmail/jetmail/deliverer/resolve"
)

// Counter counts a test server's connections as the server sees them.
type Counter struct {
	Accepted atomic.Int64
	Open     atomic.Int64
}

type countedConn struct {
	net.Conn
	once sync.Once
	cnt  *Counter
}

func (c *countedConn) Close() error {
	c.once.Do(func() { c.cnt.Open.Add(-1) })
	return c.Conn.Close()
}

// Listener is a listener whose connections are counted.
type Listener struct {
	net.Listener
	*Counter
	// shrink sets a small receive buffer on accepted connections, so that a
	// server that stops reading stops the sender soon.
	shrink bool
}

// Count counts the connections ln accepts.
func Count(ln net.Listener) *Listener {
	return &Listener{Listener: ln, Counter: &Counter{}}
}

// Listen listens on a random loopback port.
func Listen(t *testing.T, shrink bool) *Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cl := Count(ln)
	cl.shrink = shrink
	return cl
}

func (l *Listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if tc, ok := c.(*net.TCPConn); ok && l.shrink {
		_ = tc.SetReadBuffer(8 << 10)
	}
	l.Counter.Accepted.Add(1)
	l.Counter.Open.Add(1)
	return &countedConn{Conn: c, cnt: l.Counter}, nil
}

// Throttled is a listener whose connections read at about a given rate:
// a slow remote, which makes a client's transfer last long enough to be
// broken in the middle. Its connections' receive buffers are small, so
// the sender is held back as soon as the reader is.
type Throttled struct {
	net.Listener
	rate int
	// Read counts the bytes its connections have read.
	Read atomic.Int64
}

// Throttle makes ln's connections read about rate bytes per second.
func Throttle(ln net.Listener, rate int) *Throttled { return &Throttled{Listener: ln, rate: rate} }

func (l *Throttled) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetReadBuffer(128 << 10)
	}
	return &slowConn{Conn: c, l: l, start: time.Now()}, nil
}

type slowConn struct {
	net.Conn
	l     *Throttled
	start time.Time
	read  int64
}

// Read waits, after each read, until the bytes read so far are due at the
// rate: the pace holds whatever the reads' sizes.
func (c *slowConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p[:min(len(p), 16<<10)])
	if n > 0 {
		c.l.Read.Add(int64(n))
		c.read += int64(n)
		time.Sleep(time.Until(c.start.Add(time.Duration(c.read) * time.Second / time.Duration(c.l.rate))))
	}
	return n, err
}

// Hop is the listener's address as a next hop named host.
func (l *Listener) Hop(host string) resolve.Hop {
	return resolve.Hop{Host: host, Addr: netip.MustParseAddrPort(l.Addr().String())}
}

// MX is a go-smtp server playing a remote MX. Hooks run on every call
// and may answer with an error; the server records what it gets.
type MX struct {
	Mail  func(from string) error
	Rcpt  func(to string) error
	Data  func(n int) error // n: the DATA call, from 1
	Users map[string]string // AUTH PLAIN accounts; nil: no AUTH
	// RequireAuth refuses MAIL before AUTH.
	RequireAuth bool

	// Set by Serve.
	*Counter
	Hop     resolve.Hop
	Traffic *TrafficLog

	mu        sync.Mutex
	txns      []Txn
	rcptCalls []rcptCall
	dataCalls int
}

// Txn is one transaction an MX completed.
type Txn struct {
	From     string
	MailOpts smtp.MailOptions
	Rcpts    []string
	RcptOpts []smtp.RcptOptions
	Body     []byte
	User     string // the AUTH identity; "" without AUTH
	TLS      bool
}

// rcptCall is one RCPT TO an MX got, accepted or not.
type rcptCall struct {
	to   string
	opts smtp.RcptOptions
}

func (m *MX) NewSession(c *smtp.Conn) (smtp.Session, error) {
	_, isTLS := c.TLSConnectionState()
	return &mxSession{mx: m, tls: isTLS}, nil
}

// Transactions returns the transactions completed so far, in order.
func (m *MX) Transactions() []Txn {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Txn(nil), m.txns...)
}

// RcptCount returns how many times addr was given in RCPT TO.
func (m *MX) RcptCount(addr string) int {
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

// RcptNotify returns the NOTIFY values of the last RCPT TO for addr.
func (m *MX) RcptNotify(addr string) []smtp.DSNNotify {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := len(m.rcptCalls) - 1; i >= 0; i-- {
		if m.rcptCalls[i].to == addr {
			return m.rcptCalls[i].opts.Notify
		}
	}
	return nil
}

// DataCount returns how many DATA commands the MX got, accepted or not.
func (m *MX) DataCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.dataCalls
}

type mxSession struct {
	mx   *MX
	tls  bool
	user string
	cur  Txn
}

var (
	_ smtp.Session     = (*mxSession)(nil)
	_ smtp.AuthSession = (*mxSession)(nil)
)

func (s *mxSession) AuthMechanisms() []string {
	if s.mx.Users == nil {
		return nil
	}
	return []string{sasl.Plain}
}

func (s *mxSession) Auth(string) (sasl.Server, error) {
	return sasl.NewPlainServer(func(_, user, pass string) error {
		if p, ok := s.mx.Users[user]; ok && p == pass {
			s.user = user
			return nil
		}
		return smtp.ErrAuthFailed
	}), nil
}

func (s *mxSession) Mail(from string, opts *smtp.MailOptions) error {
	if s.mx.RequireAuth && s.user == "" {
		return smtp.ErrAuthRequired
	}
	if s.mx.Mail != nil {
		if err := s.mx.Mail(from); err != nil {
			return err
		}
	}
	s.cur = Txn{From: from, User: s.user, TLS: s.tls}
	if opts != nil {
		s.cur.MailOpts = *opts
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
	if s.mx.Rcpt != nil {
		if err := s.mx.Rcpt(to); err != nil {
			return err
		}
	}
	s.cur.Rcpts = append(s.cur.Rcpts, to)
	s.cur.RcptOpts = append(s.cur.RcptOpts, o)
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
	if s.mx.Data != nil {
		if err := s.mx.Data(n); err != nil {
			return err
		}
	}
	s.cur.Body = body
	s.mx.mu.Lock()
	s.mx.txns = append(s.mx.txns, s.cur)
	s.mx.mu.Unlock()
	return nil
}

func (s *mxSession) Reset()        { s.cur = Txn{} }
func (s *mxSession) Logout() error { return nil }

// TrafficLog records an SMTP server's whole conversation.
type TrafficLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *TrafficLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// Count returns how many times s occurs in the conversation so far.
func (l *TrafficLog) Count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.b.String(), s)
}

// Start serves m on a random loopback port as mx.test.
func Start(t *testing.T, m *MX, mut ...func(*smtp.Server)) *MX {
	t.Helper()
	return Serve(t, Listen(t, false), "mx.test", m, mut...)
}

// Serve serves m on ln as domain until the test ends. mut changes the
// server's settings before it starts.
func Serve(t *testing.T, ln *Listener, domain string, m *MX, mut ...func(*smtp.Server)) *MX {
	t.Helper()
	m.Counter, m.Hop, m.Traffic = ln.Counter, ln.Hop(domain), &TrafficLog{}
	s := smtp.NewServer(m)
	s.Domain = domain
	s.AllowInsecureAuth = true
	s.ReadTimeout = 10 * time.Second
	s.WriteTimeout = 10 * time.Second
	s.MaxMessageBytes = 50 << 20
	s.MaxRecipients = 100
	s.ErrorLog = log.New(io.Discard, "", 0)
	s.Debug = m.Traffic
	for _, f := range mut {
		f(s)
	}
	go s.Serve(ln)
	t.Cleanup(func() { s.Close() })
	return m
}

// Scripted runs a scripted handler per connection, for servers that
// misbehave in ways go-smtp cannot. After the handler returns, the server
// reads until the client closes, so Open counts what the client has not
// closed yet.
type Scripted struct {
	*Counter
	Hop resolve.Hop
}

// StartScripted serves handle on a random loopback port as mx.test.
func StartScripted(t *testing.T, shrink bool, handle func(c net.Conn, r *bufio.Reader)) *Scripted {
	t.Helper()
	ln := Listen(t, shrink)
	ServeScripted(t, ln, handle)
	return &Scripted{Counter: ln.Counter, Hop: ln.Hop("mx.test")}
}

// ServeScripted runs handle for every connection ln accepts until the test
// ends, then closes every connection and waits for the handlers.
func ServeScripted(t *testing.T, ln *Listener, handle func(c net.Conn, r *bufio.Reader)) {
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

// Script is a minimal SMTP server for StartScripted. Hooks replace
// the default handling of one command; returning false ends the session.
type Script struct {
	Greeting string   // "" is "220 raw.test ESMTP"; not 220 ends the session
	Exts     []string // the EHLO keywords
	Ehlo     func(c net.Conn) bool
	StartTLS func(c net.Conn, r *bufio.Reader) bool
	Auth     func(c net.Conn, r *bufio.Reader, line string) bool
	Data     func(c net.Conn, r *bufio.Reader) bool
	Txns     atomic.Int64 // messages taken by the default DATA handling
}

// Handle runs the script on one connection (for StartScripted).
func (s *Script) Handle(c net.Conn, r *bufio.Reader) {
	say := func(lines ...string) bool {
		_, err := io.WriteString(c, strings.Join(lines, "\r\n")+"\r\n")
		return err == nil
	}
	greeting := s.Greeting
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
			if s.Ehlo != nil {
				ok = s.Ehlo(c)
				break
			}
			lines := []string{"250-raw.test"}
			for _, e := range s.Exts {
				lines = append(lines, "250-"+e)
			}
			lines[len(lines)-1] = "250 " + strings.TrimPrefix(lines[len(lines)-1], "250-")
			ok = say(lines...)
		case "HELO", "MAIL", "RCPT", "RSET", "NOOP":
			ok = say("250 2.0.0 ok")
		case "STARTTLS":
			ok = s.StartTLS(c, r)
		case "AUTH":
			ok = s.Auth(c, r, line)
		case "DATA":
			if s.Data != nil {
				ok = s.Data(c, r)
				break
			}
			if !say("354 go ahead") || ReadToDot(r) != nil {
				return
			}
			s.Txns.Add(1)
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

// ReadToDot reads message data up to and including the final dot.
func ReadToDot(r *bufio.Reader) error {
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

// Dribble writes s one byte per interval, over and over, until the client
// goes.
func Dribble(c net.Conn, s string, interval time.Duration) {
	for {
		for i := 0; i < len(s); i++ {
			if _, err := c.Write([]byte{s[i]}); err != nil {
				return
			}
			time.Sleep(interval)
		}
	}
}

// Within polls cond every 20 ms until it holds, failing the test when d
// has passed.
func Within(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Client is an SMTP client that keeps connections open: an outbound.Client.
type Client interface {
	Close()
	OpenConns() int
}

// CheckNoConnLeak closes the client and checks that no connection is left
// open, on either side.
func CheckNoConnLeak(t *testing.T, c Client, servers ...*Counter) {
	t.Helper()
	c.Close()
	if n := c.OpenConns(); n != 0 {
		t.Errorf("client: %d connections open after Close", n)
	}
	CheckServersClosed(t, servers...)
}

// CheckServersClosed checks that the servers saw every connection closed.
func CheckServersClosed(t *testing.T, servers ...*Counter) {
	t.Helper()
	for i, s := range servers {
		Within(t, 5*time.Second, fmt.Sprintf("server %d to see its connections closed", i), func() bool { return s.Open.Load() == 0 })
	}
}

// SelfSignedCert returns a self-signed server certificate for name and a pool
// that trusts it.
func SelfSignedCert(t *testing.T, name string) (tls.Certificate, *x509.CertPool) {
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

// CA is a test certificate authority: a root that issues server
// certificates, sent with the root in their chain as servers send their
// intermediates.
type CA struct {
	Cert *x509.Certificate
	key  *ecdsa.PrivateKey
	// Pool trusts the root.
	Pool *x509.CertPool
}

// NewCA makes a root certificate valid for a day either side of now.
func NewCA(t *testing.T, name string) *CA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-24 * time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &CA{Cert: cert, key: key, Pool: pool}
}

// Issue returns a server certificate for names, valid until notAfter
// (zero: an hour from now), with the root after it in the chain.
func (ca *CA) Issue(t *testing.T, notAfter time.Time, names ...string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if notAfter.IsZero() {
		notAfter = time.Now().Add(time.Hour)
	}
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: names[0]}, DNSNames: names,
		NotBefore: time.Now().Add(-2 * time.Hour), NotAfter: notAfter,
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.Cert.Raw}, PrivateKey: key, Leaf: leaf}
}

// TLSA is a TLSA record in zone file syntax for cert at
// _port._tcp.host: usage 3 (DANE-EE) or 2 (DANE-TA), selector 1 (SPKI) or
// 0 (whole certificate), matching 1 (SHA-256), 2 (SHA-512) or 0 (full).
func TLSA(t *testing.T, host string, port uint16, usage, selector, matching uint8, cert *x509.Certificate) string {
	t.Helper()
	data, err := dns.CertificateToDANE(selector, matching, cert)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("_%d._tcp.%s. 60 IN TLSA %d %d %d %s", port, strings.TrimSuffix(host, "."), usage, selector, matching, data)
}
