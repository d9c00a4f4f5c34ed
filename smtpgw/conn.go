package smtpgw

import (
	"bytes"
	"crypto/tls"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
)

// conn wraps every accepted connection underneath go-smtp (and underneath
// TLS, once STARTTLS has run). It is where the limits that go-smtp has no
// hook for are enforced:
//
//   - hard deadlines: every read deadline go-smtp or the session sets is
//     clamped to the session's wall-clock deadline (and, during DATA, to the
//     data deadline), so no amount of trickling keeps a connection past it;
//   - connection limits, checked when go-smtp writes the greeting, so a
//     refused client gets 421 4.7.0 instead of a silent close;
//   - the error budget and reply accounting, on plaintext replies;
//   - bare CR or LF during DATA, refused at the first such byte (plaintext
//     only; see checkEOL).
type conn struct {
	net.Conn
	g *Gateway

	mu            sync.Mutex
	ip            netip.Addr
	registered    bool
	closed        bool
	sessionEnd    time.Time // hard wall-clock deadline of the connection
	dataEnd       time.Time // hard deadline of the DATA phase, zero outside it
	data          dataLimits
	dataStart     time.Time
	dataBytes     int64
	clamped       bool // the last read deadline was cut by a hard deadline
	inTransaction bool
	draining      bool
	tlsStarted    bool
	failure       error // the last limit a read failed on (a final reply)
	errors        int
	maxErrors     int
	prevCR        bool  // the last byte read in the DATA phase was CR
	dotState      uint8 // progress through CRLF "." CR, see scanEOL
	badEOL        bool  // a line-ending violation was seen in this DATA phase
	eolDone       bool  // CRLF.CRLF was seen: what follows is not data
}

func newConn(c net.Conn, g *Gateway, sessionTimeout time.Duration, maxErrors int) *conn {
	now := time.Now()
	return &conn{Conn: c, g: g, sessionEnd: now.Add(sessionTimeout), maxErrors: maxErrors}
}

// unwrapConn finds our conn under whatever go-smtp hands a session.
func unwrapConn(nc net.Conn) *conn {
	if tc, ok := nc.(*tls.Conn); ok {
		nc = tc.NetConn()
	}
	c, _ := nc.(*conn)
	return c
}

// hardDeadline is the earliest of the wall-clock deadlines in force.
// Lock must be held.
func (c *conn) hardDeadline() time.Time {
	d := c.sessionEnd
	if !c.dataEnd.IsZero() && c.dataEnd.Before(d) {
		d = c.dataEnd
	}
	return d
}

// SetReadDeadline clamps t to the hard deadline.
func (c *conn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	hd := c.hardDeadline()
	c.clamped = t.IsZero() || hd.Before(t)
	if c.clamped {
		t = hd
	}
	c.mu.Unlock()
	return c.Conn.SetReadDeadline(t)
}

// SetDeadline clamps the read half like SetReadDeadline.
func (c *conn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.Conn.SetWriteDeadline(t)
}

// dataLimits bound one DATA or BDAT transfer.
type dataLimits struct {
	total   time.Duration // wall clock for the transfer
	idle    time.Duration // longest wait for the next bytes
	minRate int64         // bytes per second, averaged from the start; 0: off
	grace   time.Duration // before minRate applies
	// strictEOL refuses a bare CR or LF as soon as it arrives (plaintext
	// only: under TLS these bytes are ciphertext).
	strictEOL bool
}

// startData enters the DATA phase. From here every read gets the idle
// deadline (go-smtp's DATA reader blocks in one Read until its buffer is
// full, so a deadline set by a reader above would bound the whole buffer,
// not the wait for the next bytes), and the average rate is checked.
func (c *conn) startData(l dataLimits) {
	c.mu.Lock()
	now := time.Now()
	c.data, c.dataStart, c.dataBytes = l, now, 0
	// DATA starts at the beginning of a line.
	c.prevCR, c.dotState, c.badEOL, c.eolDone = false, dotLineStart, false, false
	c.dataEnd = now.Add(l.total)
	c.mu.Unlock()
}

func (c *conn) endData() {
	c.mu.Lock()
	c.dataEnd = time.Time{}
	c.mu.Unlock()
}

// setTransaction notes a transaction starting or ending. One ending while
// the gateway shuts down ends the session too: its reply goes out, and the
// next read finds the deadline passed, so the client gets 421 at once
// instead of the session waiting for the rest of the grace period.
func (c *conn) setTransaction(on bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.inTransaction = on
	if !on && c.draining {
		if now := time.Now(); now.Before(c.sessionEnd) {
			c.sessionEnd = now
		}
	}
}

// Read passes bytes through, watching plaintext for CR LF "." CR followed by
// anything but LF. go-smtp's DATA reader drops such a ".\r" silently, so the
// bare CR would never reach the session's checks; counting it here lets the
// session refuse the transaction like any other bare CR.
func (c *conn) Read(b []byte) (int, error) {
	c.mu.Lock()
	inData := !c.dataEnd.IsZero()
	if inData {
		d := time.Now().Add(c.data.idle)
		hd := c.hardDeadline()
		c.clamped = !d.Before(hd)
		if c.clamped {
			d = hd
		}
		_ = c.Conn.SetReadDeadline(d)
	}
	c.mu.Unlock()
	n, err := c.Conn.Read(b)
	if err != nil && isTimeout(err) {
		err = c.timeoutReply(err, inData)
	}
	if n > 0 {
		c.g.metrics.receivedBytes.Add(float64(n))
		c.mu.Lock()
		if inData && !c.tlsStarted && !c.eolDone {
			if c.scanEOL(b[:n]) && c.data.strictEOL && err == nil {
				err = errBareLineEnding
			}
		}
		if inData {
			c.dataBytes += int64(n)
			if el := time.Since(c.dataStart); c.data.minRate > 0 && el > c.data.grace &&
				float64(c.dataBytes) < float64(c.data.minRate)*el.Seconds() && err == nil {
				c.g.metrics.deadlineKills.WithLabelValues("min_data_rate").Inc()
				c.failure = errTooSlow
				err = errTooSlow
			}
		}
		c.mu.Unlock()
	}
	return n, err
}

// Final replies for a read that failed on one of our limits. conn.Read
// returns them as errors; go-smtp (third_party/go-smtp) sends an
// *smtp.SMTPError from a failed read as the last reply and closes the
// connection, whether the read was for a command, an AUTH exchange or a
// BDAT chunk, and whatever layer (plaintext or TLS) the reply goes out on;
// the session does the same for DATA.
var (
	errTooSlow       = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "Data rate below the minimum, closing connection"}
	errDataIdle      = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "Timeout waiting for data, closing connection"}
	errDataDeadline  = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "Time limit for this transfer exceeded, closing connection"}
	errSessionLimit  = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "Session time limit exceeded, closing connection"}
	errDrainComplete = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "Service shutting down, try again later"}
)

// timeoutReply turns a read timeout into the reply that says why: the
// shutdown, the session's or the transfer's hard deadline, or idleness in
// the middle of a transfer. A plain idle wait for a command stays a
// timeout, which go-smtp answers with its own 421 4.4.2.
// The reply is also kept as the connection's failure (lastFailure).
func (c *conn) timeoutReply(err error, inData bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	hard := c.clamped && !time.Now().Before(c.hardDeadline())
	var reply error
	switch {
	case c.draining && hard:
		reply = errDrainComplete
	case hard && inData && !c.dataEnd.After(c.sessionEnd):
		c.g.metrics.deadlineKills.WithLabelValues("deadline").Inc()
		reply = errDataDeadline
	case hard:
		c.g.metrics.deadlineKills.WithLabelValues("deadline").Inc()
		reply = errSessionLimit
	case inData:
		c.g.metrics.deadlineKills.WithLabelValues("idle").Inc()
		reply = errDataIdle
	default:
		return err
	}
	c.failure = reply
	return reply
}

// States of scanEOL's watch for CRLF "." CR.
const (
	dotNone      uint8 = iota
	dotLineStart       // just after CRLF
	dotDot             // CRLF "."
	dotDotCR           // CRLF "." CR
)

// scanEOL watches raw plaintext DATA bytes and reports whether this read
// broke the line-ending rules. The session's data reader checks what
// go-smtp passes up, but that is not enough on its own:
//
//   - go-smtp silently drops "." CR after a CRLF when no LF follows, so
//     that bare CR never reaches the session (refused in every mode);
//   - go-smtp passes data up only when its buffer is full or the data has
//     ended, and after a bare CR it can miss the real CRLF.CRLF: in strict
//     mode the read fails at the first offending byte instead of waiting.
//
// Lock must be held.
func (c *conn) scanEOL(b []byte) bool {
	bad := false
	for _, ch := range b {
		if c.data.strictEOL && ((c.prevCR && ch != '\n') || (ch == '\n' && !c.prevCR)) {
			bad = true
		}
		switch c.dotState {
		case dotLineStart:
			c.dotState = dotNone
			if ch == '.' {
				c.dotState = dotDot
			}
		case dotDot:
			c.dotState = dotNone
			if ch == '\r' {
				c.dotState = dotDotCR
			}
		case dotDotCR:
			c.dotState = dotNone
			if ch != '\n' {
				bad = true
			} else {
				// CRLF.CRLF: the data is over; what follows in this read
				// is the client's next command.
				c.eolDone = true
				c.badEOL = c.badEOL || bad
				return bad
			}
		}
		if c.prevCR && ch == '\n' {
			c.dotState = dotLineStart
		}
		c.prevCR = ch == '\r'
	}
	c.badEOL = c.badEOL || bad
	return bad
}

// lastFailure is the limit the connection's last failed read hit, if any:
// a BDAT transfer's Data only sees the transfer aborted, and this says why.
func (c *conn) lastFailure() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.failure
}

// eolViolation reports whether the DATA phase broke the line-ending rules.
func (c *conn) eolViolation() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.badEOL
}

// Write inspects plaintext replies on their way out: the greeting runs the
// connection limits, every reply code is counted, a 421 closes the
// connection, and more than maxErrors error replies end the session.
func (c *conn) Write(b []byte) (int, error) {
	c.mu.Lock()
	plain := !c.tlsStarted
	first := !c.registered
	c.mu.Unlock()
	if first {
		if refusal := c.register(); refusal != "" {
			c.Conn.Write([]byte(refusal))
			c.Close()
			return 0, net.ErrClosed
		}
	}
	if !plain || len(b) < 4 {
		return c.Conn.Write(b)
	}
	code := string(b[:3])
	if bytes.HasPrefix(b, []byte("220 2.0.0 Ready to start TLS")) {
		c.mu.Lock()
		c.tlsStarted = true
		c.mu.Unlock()
	}
	n, err := c.Conn.Write(b)
	if err != nil {
		return n, err
	}
	switch {
	case code == "421":
		c.Close()
	case b[0] == '4' || b[0] == '5':
		if c.countError() {
			c.Conn.Write([]byte("421 4.7.0 Too many errors, closing connection\r\n"))
			c.Close()
		}
	}
	return n, err
}

// countError adds one error reply and reports whether the budget is spent.
func (c *conn) countError() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.errors++
	return c.errors > c.maxErrors
}

// register runs the connection limits when the greeting is about to go
// out. It returns the refusal to send instead, or "".
func (c *conn) register() string {
	c.mu.Lock()
	c.registered = true
	c.mu.Unlock()
	ip := addrIP(c.RemoteAddr())
	c.mu.Lock()
	c.ip = ip
	c.mu.Unlock()
	if refusal := c.g.admit(c, ip); refusal != "" {
		return refusal
	}
	return ""
}

// Close closes once and releases the connection's slot.
func (c *conn) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	registered := c.registered
	c.mu.Unlock()
	err := c.Conn.Close()
	if registered {
		c.g.release(c)
	}
	return err
}

// drain asks the connection to finish: an idle one is woken at once (its
// pending read fails and go-smtp answers 421), one inside a transaction may
// finish it until grace runs out.
func (c *conn) drain(grace time.Duration) {
	c.mu.Lock()
	c.draining = true
	end := time.Now()
	if c.inTransaction {
		end = end.Add(grace)
	}
	if end.Before(c.sessionEnd) {
		c.sessionEnd = end
	}
	hd := c.hardDeadline()
	c.clamped = true
	c.mu.Unlock()
	c.Conn.SetReadDeadline(hd)
}

func (c *conn) isDraining() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.draining
}

func addrIP(a net.Addr) netip.Addr {
	if ta, ok := a.(*net.TCPAddr); ok {
		ip, _ := netip.AddrFromSlice(ta.IP)
		return ip.Unmap()
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}
