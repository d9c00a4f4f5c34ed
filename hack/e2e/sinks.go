//go:build e2e

package e2e

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/mail"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// The hosts mail is delivered to. Linux routes all of 127.0.0.0/8 to lo,
// so every sink listens on its own address and all on the same port, which
// the DeliveryPolicy's port points the deliverers at.
const (
	hostA       = "127.0.0.11" // normal sinks
	hostB       = "127.0.0.12"
	hostC       = "127.0.0.13"
	hostD       = "127.0.0.14"
	hostMoved   = "127.0.0.15" // where the MailRoute change sends its domain
	hostSenders = "127.0.0.16" // the senders' domain: DSNs arrive here
	hostDown    = "127.0.0.20" // nothing listens: connection refused
	hostTarpit  = "127.0.0.21" // accepts and never says a word
	hostGrey    = "127.0.0.22" // 451 to every RCPT until greyUntil, then accepts
)

// delivery is one message as a sink received it.
type delivery struct {
	sink    string
	helo    string // the deliverer's EHLO name: which deliverer sent it
	from    string // "" for a DSN
	rcpts   []string
	msgID   string // the Message-ID header, without <>
	queueID string // from the gateway's Received: header ("" for a DSN)
	at      time.Time
	raw     []byte // kept for DSNs only
}

// sinks are the SMTP servers (go-smtp, in the test process) that mail is
// delivered to, and what they received.
type sinks struct {
	port int

	mu         sync.Mutex
	deliveries []delivery
	greyUntil  time.Time // hostGrey answers 451 until then
	greyTemp   int       // 451s hostGrey answered
	rejected   int       // 550s for bounce-* recipients
	tarpitted  int       // connections the tarpit swallowed
	conns      map[string]int
}

// startSinks finds a port free on every sink address and serves SMTP
// there, except on hostDown (nothing) and hostTarpit (a silent listener).
func startSinks(t *testing.T) *sinks {
	t.Helper()
	s := &sinks{conns: map[string]int{}, greyUntil: time.Now().Add(24 * time.Hour)}
	serving := []string{hostA, hostB, hostC, hostD, hostMoved, hostSenders, hostGrey}
	var ls []net.Listener
	for try := 0; try < 50 && ls == nil; try++ {
		first, err := net.Listen("tcp", hostA+":0")
		if err != nil {
			t.Fatalf("listen on %s: %v (the test needs all of 127.0.0.0/8 on lo, as Linux has)", hostA, err)
		}
		s.port = first.Addr().(*net.TCPAddr).Port
		ls = []net.Listener{first}
		for _, h := range append(serving[1:], hostTarpit) {
			l, err := net.Listen("tcp", fmt.Sprintf("%s:%d", h, s.port))
			if err != nil {
				for _, l := range ls {
					l.Close()
				}
				ls = nil
				break
			}
			ls = append(ls, l)
		}
	}
	if ls == nil {
		t.Fatal("no port free on every sink address")
	}
	for i, h := range serving {
		srv := smtp.NewServer(&sinkBackend{s: s, host: h})
		srv.Domain = "sink-" + h
		srv.ReadTimeout, srv.WriteTimeout = 60*time.Second, 60*time.Second
		srv.MaxMessageBytes = 64 << 20
		srv.MaxRecipients = 1000
		go srv.Serve(countConns(ls[i], s, h))
		t.Cleanup(func() { srv.Close() })
	}
	tarpit := ls[len(ls)-1]
	go s.tarpit(tarpit)
	t.Cleanup(func() { tarpit.Close() })
	// Nothing may answer on the down host.
	if c, err := net.DialTimeout("tcp", fmt.Sprintf("%s:%d", hostDown, s.port), time.Second); err == nil {
		c.Close()
		t.Fatalf("something listens on %s:%d, the host that must be down", hostDown, s.port)
	}
	return s
}

// tarpit accepts connections and holds them without a word until the
// peer gives up or the test ends: the deliverer's greeting timeout must
// cut it.
func (s *sinks) tarpit(l net.Listener) {
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.tarpitted++
		s.mu.Unlock()
		held = append(held, c)
		// Drain what the peer sends, so it is never blocked writing.
		go io.Copy(io.Discard, c)
	}
}

// setGreyUntil makes hostGrey answer 451 until t.
func (s *sinks) setGreyUntil(t time.Time) {
	s.mu.Lock()
	s.greyUntil = t
	s.mu.Unlock()
}

// snapshot copies what the sinks received so far.
func (s *sinks) snapshot() []delivery {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]delivery(nil), s.deliveries...)
}

// counters are the sinks' figures for the report.
func (s *sinks) counters() (greyTemp, rejected, tarpitted int, conns map[string]int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := map[string]int{}
	for k, v := range s.conns {
		c[k] = v
	}
	return s.greyTemp, s.rejected, s.tarpitted, c
}

type sinkBackend struct {
	s    *sinks
	host string
}

func (b *sinkBackend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	return &sinkSession{b: b, conn: c}, nil
}

// sinkSession takes every recipient except bounce-*@… (550 5.1.1, so that
// the deliverer bounces them), and, on hostGrey, none while greylisting.
type sinkSession struct {
	b     *sinkBackend
	conn  *smtp.Conn
	from  string
	rcpts []string
}

var _ smtp.Session = (*sinkSession)(nil)

func (ss *sinkSession) Mail(from string, _ *smtp.MailOptions) error {
	ss.from, ss.rcpts = from, nil
	return nil
}

func (ss *sinkSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	s := ss.b.s
	if strings.HasPrefix(strings.ToLower(to), "bounce-") {
		s.mu.Lock()
		s.rejected++
		s.mu.Unlock()
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user here"}
	}
	if ss.b.host == hostGrey {
		s.mu.Lock()
		grey := time.Now().Before(s.greyUntil)
		if grey {
			s.greyTemp++
		}
		s.mu.Unlock()
		if grey {
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "greylisted, try again later"}
		}
	}
	ss.rcpts = append(ss.rcpts, strings.ToLower(to))
	return nil
}

// receivedID finds the queue ID in the gateway's Received: header
// ("... by gw-0.e2e.test (jetmail) with ESMTP id 2NAS5B9E54HQAX").
var receivedID = regexp.MustCompile(`\(jetmail\) with [A-Za-z]+ id ([0-9A-Z]{14})`)

func (ss *sinkSession) Data(r io.Reader) error {
	raw, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	d := delivery{sink: ss.b.host, helo: ss.conn.Hostname(), from: ss.from, rcpts: ss.rcpts, at: time.Now()}
	if m, err := mail.ReadMessage(bytes.NewReader(raw)); err == nil {
		d.msgID = strings.Trim(strings.TrimSpace(m.Header.Get("Message-Id")), "<>")
	}
	if m := receivedID.FindSubmatch(headerBlock(raw)); m != nil {
		d.queueID = string(m[1])
	}
	if ss.from == "" {
		d.raw = raw
	}
	s := ss.b.s
	s.mu.Lock()
	s.deliveries = append(s.deliveries, d)
	s.mu.Unlock()
	return nil
}

// headerBlock is the message up to the blank line, with folded lines
// joined.
func headerBlock(raw []byte) []byte {
	if i := bytes.Index(raw, []byte("\r\n\r\n")); i >= 0 {
		raw = raw[:i]
	}
	return bytes.ReplaceAll(bytes.ReplaceAll(raw, []byte("\r\n\t"), []byte(" ")), []byte("\r\n "), []byte(" "))
}

func (ss *sinkSession) Reset()        { ss.from, ss.rcpts = "", nil }
func (ss *sinkSession) Logout() error { return nil }

// countConns counts the connections a sink accepts.
func countConns(l net.Listener, s *sinks, host string) net.Listener {
	return &countingListener{Listener: l, s: s, host: host}
}

type countingListener struct {
	net.Listener
	s    *sinks
	host string
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.s.mu.Lock()
		l.s.conns[l.host]++
		l.s.mu.Unlock()
	}
	return c, err
}
