package natstest

import (
	"net"
	"sync"
	"testing"
)

// Stall is a TCP relay in front of a server that can stop passing bytes in
// both directions and start again, as a server that was SIGSTOPped and
// SIGCONTed looks to its clients: requests sent meanwhile reach the server
// late, and replies come back late, after their callers have given up. Or
// the stall ends with every connection cut, and what was held is lost, as
// when the server died or the stream leader moved away: clients reconnect.
// Connect clients to URL.
type Stall struct {
	l      net.Listener
	target string

	mu      sync.Mutex
	stalled bool
	resumed *sync.Cond
	conns   map[net.Conn]bool
}

// NewStall relays to target (a server's client address, host:port) until
// the test ends.
func NewStall(t testing.TB, target string) *Stall {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Stall{l: l, target: target, conns: map[net.Conn]bool{}}
	p.resumed = sync.NewCond(&p.mu)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

// URL is the address clients connect to.
func (p *Stall) URL() string { return "nats://" + p.l.Addr().String() }

// Stop holds every byte in both directions until Resume.
func (p *Stall) Stop() {
	p.mu.Lock()
	p.stalled = true
	p.mu.Unlock()
}

// Resume passes the held bytes on, in order, and what follows.
func (p *Stall) Resume() {
	p.mu.Lock()
	p.stalled = false
	p.resumed.Broadcast()
	p.mu.Unlock()
}

// Cut closes every connection, dropping what was held, and lets new ones
// through.
func (p *Stall) Cut() {
	p.mu.Lock()
	for c := range p.conns {
		c.Close()
		delete(p.conns, c)
	}
	p.stalled = false
	p.resumed.Broadcast()
	p.mu.Unlock()
}

func (p *Stall) accept() {
	for {
		c, err := p.l.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns[c], p.conns[s] = true, true
		p.mu.Unlock()
		go p.pipe(s, c)
		go p.pipe(c, s)
	}
}

// pipe copies src to dst, waiting before each write while stalled.
func (p *Stall) pipe(dst, src net.Conn) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			for p.stalled {
				p.resumed.Wait()
			}
			p.mu.Unlock()
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *Stall) close() {
	p.l.Close()
	p.Cut()
}
