package smtpgw

import (
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Standby holds the SMTP port open while the gateway cannot take mail yet
// (JetStream does not answer at start): every connection is told
// "421 4.3.2" and closed, so clients try again later or try another MX,
// instead of finding the port refused or a session that hangs. Ready hands
// the port over: from then on connections go to Listener's Accept.
type Standby struct {
	l        net.Listener
	hostname string
	ready    atomic.Bool
	conns    chan net.Conn
	done     chan struct{}
	err      error // Accept's error, set before done closes
	closed   chan struct{}
	once     sync.Once
}

// NewStandby starts turning connections on l away until Ready.
func NewStandby(l net.Listener, hostname string) *Standby {
	s := &Standby{l: l, hostname: hostname, conns: make(chan net.Conn), done: make(chan struct{}), closed: make(chan struct{})}
	go s.accept()
	return s
}

// Ready sends every later connection to Listener.
func (s *Standby) Ready() { s.ready.Store(true) }

// Listener is the port as the gateway serves it once Ready: Serve it.
func (s *Standby) Listener() net.Listener { return standbyListener{s} }

func (s *Standby) accept() {
	for {
		c, err := s.l.Accept()
		if err != nil {
			s.err = err
			close(s.done)
			return
		}
		if !s.ready.Load() {
			go s.refuse(c)
			continue
		}
		select {
		case s.conns <- c:
		case <-s.closed:
			c.Close()
		}
	}
}

// refuse answers as RFC 5321 §3.8 lets a server that cannot serve now.
func (s *Standby) refuse(c net.Conn) {
	defer c.Close()
	_ = c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "421 4.3.2 %s Service not available yet, try again later\r\n", s.hostname)
}

type standbyListener struct{ s *Standby }

func (l standbyListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.s.conns:
		return c, nil
	case <-l.s.done:
		return nil, l.s.err
	}
}

func (l standbyListener) Close() error {
	var err error
	l.s.once.Do(func() {
		close(l.s.closed)
		err = l.s.l.Close()
	})
	return err
}

func (l standbyListener) Addr() net.Addr { return l.s.l.Addr() }
