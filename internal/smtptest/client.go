// Package smtptest scripts SMTP sessions over real TCP, line by line and
// byte by byte, for the tests of every package that talks to a gateway. It
// is a raw client on purpose: the tests check exact replies, and send what
// a well-behaved client library never would.
package smtptest

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"
)

// ReplyTimeout bounds the wait for one reply unless a test asks otherwise.
const ReplyTimeout = 15 * time.Second

// Client is one SMTP session. Conn and R are exported for tests that need
// to write raw bytes or read single lines.
type Client struct {
	T    testing.TB
	Conn net.Conn
	R    *bufio.Reader
}

// Dial connects to addr; the connection is closed when the test ends.
func Dial(t testing.TB, addr string) *Client {
	t.Helper()
	return DialFrom(t, addr, "")
}

// DialFrom connects from the local address local ("" for any). Linux routes
// all of 127.0.0.0/8 to lo, so a test can be several clients at once.
func DialFrom(t testing.TB, addr, local string) *Client {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if local != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(local)}
	}
	nc, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return &Client{T: t, Conn: nc, R: bufio.NewReader(nc)}
}

// DialReady connects, checks the 220 greeting and says EHLO.
func DialReady(t testing.TB, addr string) *Client {
	t.Helper()
	c := Dial(t, addr)
	c.Expect(220)
	c.Cmd("EHLO client.test", 250)
	return c
}

// ReplyLines reads one whole (possibly multi-line) reply within timeout
// and returns its lines without line ends.
func (c *Client) ReplyLines(timeout time.Duration) ([]string, error) {
	_ = c.Conn.SetReadDeadline(time.Now().Add(timeout))
	var lines []string
	for {
		line, err := c.R.ReadString('\n')
		if err != nil {
			return lines, fmt.Errorf("%w (read so far %q)", err, append(lines, line))
		}
		line = strings.TrimRight(line, "\r\n")
		if len(line) < 4 {
			return lines, fmt.Errorf("short reply line %q", line)
		}
		lines = append(lines, line)
		if line[3] == ' ' {
			return lines, nil
		}
	}
}

// ReadReply reads one reply and returns its code and last line.
func (c *Client) ReadReply() (int, string, error) {
	lines, err := c.ReplyLines(ReplyTimeout)
	if err != nil {
		return 0, strings.Join(lines, "\n"), err
	}
	last := lines[len(lines)-1]
	var code int
	if _, err := fmt.Sscanf(last[:3], "%d", &code); err != nil {
		return 0, last, err
	}
	return code, last, nil
}

// Expect reads a reply and fails the test unless its code is want. It
// returns the last line.
func (c *Client) Expect(want int) string {
	c.T.Helper()
	code, text, err := c.ReadReply()
	if err != nil {
		c.T.Fatalf("reading reply (want %d): %v (got %q)", want, err, text)
	}
	if code != want {
		c.T.Fatalf("got %q, want code %d", text, want)
	}
	return text
}

// Send writes raw bytes.
func (c *Client) Send(s string) {
	c.T.Helper()
	_ = c.Conn.SetWriteDeadline(time.Now().Add(ReplyTimeout))
	if _, err := c.Conn.Write([]byte(s)); err != nil {
		c.T.Fatalf("write: %v", err)
	}
}

// Cmd sends a command line and expects a reply code; it returns the reply.
func (c *Client) Cmd(line string, want int) string {
	c.T.Helper()
	c.Send(line + "\r\n")
	return c.Expect(want)
}

// Mail runs one whole transaction and returns the final reply line.
func (c *Client) Mail(from string, to []string, data string, want int) string {
	c.T.Helper()
	c.Cmd("MAIL FROM:<"+from+">", 250)
	for _, r := range to {
		c.Cmd("RCPT TO:<"+r+">", 250)
	}
	c.Cmd("DATA", 354)
	c.Send(data + ".\r\n")
	return c.Expect(want)
}

// Close ends the connection now rather than when the test ends (for
// sessions opened in a polling loop).
func (c *Client) Close() { c.Conn.Close() }

// ExpectClosed checks that the server closed the connection.
func (c *Client) ExpectClosed() {
	c.T.Helper()
	_ = c.Conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if line, err := c.R.ReadString('\n'); err == nil {
		c.T.Fatalf("connection still open, got %q", line)
	}
}

// UpgradeTLS continues the session over TLS once STARTTLS got its 220,
// without checking the server's certificate (tests look at it themselves).
func (c *Client) UpgradeTLS(serverName string) *tls.Conn {
	c.T.Helper()
	tc := tls.Client(c.Conn, &tls.Config{ServerName: serverName, InsecureSkipVerify: true})
	_ = tc.SetDeadline(time.Now().Add(ReplyTimeout))
	if err := tc.Handshake(); err != nil {
		c.T.Fatalf("TLS handshake: %v", err)
	}
	_ = tc.SetDeadline(time.Time{})
	c.Conn, c.R = tc, bufio.NewReader(tc)
	return tc
}
