package outbound

// The session's connection under hard deadlines: deadlineConn clamps
// every deadline to the session's and enforces a minimum data rate.

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// deadlineConn is the TCP connection of a session. It clamps every
// deadline to the session's hard deadline, and while message data is
// written it sets each write's deadline itself: DataBlock from now, or
// sooner if the average rate since the data began would fall below
// MinDataRate.
type deadlineConn struct {
	net.Conn
	onClose   func()
	closeOnce sync.Once
	expired   atomic.Bool // the watchdog closed the connection
	idleSince time.Time   // guarded by connPool.mu

	mu    sync.Mutex
	limit time.Time // hard deadline; zero while idle in the pool

	// While writing message data.
	data      bool
	dataStart time.Time
	written   int64
	block     time.Duration
	rate      int64
	grace     time.Duration
	rateBound bool // the current write's deadline comes from the rate
	slow      bool // a write failed at a deadline set by the rate
}

func (d *deadlineConn) setLimit(t time.Time) {
	d.mu.Lock()
	d.limit = t
	d.mu.Unlock()
}

// setLimitBefore moves the hard deadline to t unless it is already sooner.
func (d *deadlineConn) setLimitBefore(t time.Time) {
	d.mu.Lock()
	if d.limit.IsZero() || t.Before(d.limit) {
		d.limit = t
	}
	d.mu.Unlock()
}

// sessionOver reports whether the hard deadline has passed.
func (d *deadlineConn) sessionOver() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.expired.Load() || (!d.limit.IsZero() && !time.Now().Before(d.limit))
}

func (d *deadlineConn) clamp(t time.Time) time.Time {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.limit.IsZero() {
		return t
	}
	if t.IsZero() || t.After(d.limit) {
		return d.limit
	}
	return t
}

func (d *deadlineConn) SetDeadline(t time.Time) error {
	return d.Conn.SetDeadline(d.clamp(t))
}

func (d *deadlineConn) SetReadDeadline(t time.Time) error {
	return d.Conn.SetReadDeadline(d.clamp(t))
}

func (d *deadlineConn) SetWriteDeadline(t time.Time) error {
	return d.Conn.SetWriteDeadline(d.clamp(t))
}

func (d *deadlineConn) startData(block time.Duration, rate int64, grace time.Duration) {
	d.mu.Lock()
	d.data, d.dataStart, d.written = true, time.Now(), 0
	d.block, d.rate, d.grace, d.rateBound, d.slow = block, rate, grace, false, false
	d.mu.Unlock()
}

// excuse takes d off the time the minimum rate is measured over: time
// spent reading the message from our own store, which is not the
// server's doing.
func (d *deadlineConn) excuse(t time.Duration) {
	d.mu.Lock()
	if d.data {
		d.dataStart = d.dataStart.Add(t)
	}
	d.mu.Unlock()
}

// endData leaves data mode; it reports whether a write timed out at a
// deadline set by the minimum rate, to name the cause of the failure.
func (d *deadlineConn) endData() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.data = false
	return d.slow
}

func (d *deadlineConn) Write(p []byte) (int, error) {
	d.mu.Lock()
	if d.data {
		now := time.Now()
		dl := now.Add(d.block)
		d.rateBound = false
		if d.rate > 0 {
			// By when the bytes written so far plus p must be out to keep
			// the average at the minimum rate.
			due := time.Duration(float64(d.written+int64(len(p))) / float64(d.rate) * float64(time.Second))
			if t := d.dataStart.Add(max(d.grace, due)); t.Before(dl) {
				dl, d.rateBound = t, true
			}
		}
		if !d.limit.IsZero() && dl.After(d.limit) {
			dl, d.rateBound = d.limit, false
		}
		d.Conn.SetWriteDeadline(dl)
	}
	d.mu.Unlock()
	n, err := d.Conn.Write(p)
	d.mu.Lock()
	d.written += int64(n)
	if err != nil && d.data && d.rateBound && isTimeout(err) {
		d.slow = true
	}
	d.mu.Unlock()
	return n, err
}

// Close closes the connection once and counts it closed.
func (d *deadlineConn) Close() error {
	err := net.ErrClosed
	d.closeOnce.Do(func() {
		err = d.Conn.Close()
		if d.onClose != nil {
			d.onClose()
		}
	})
	return err
}

// abort closes the connection and drops what the kernel has not sent yet
// (SO_LINGER 0, so the peer gets a reset): a server that stopped reading
// must not keep an orphaned socket and its send buffer alive in our kernel
// either.
func (d *deadlineConn) abort() {
	if lc, ok := d.Conn.(interface{ SetLinger(int) error }); ok {
		_ = lc.SetLinger(0)
	}
	d.Close()
}

// replayConn is a connection whose reads come from r.
type replayConn struct {
	net.Conn
	r io.Reader
}

func (c *replayConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func earliest(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// unwrapOp drops the "dial tcp 127.0.0.1:1234->..." prefix of a net.OpError,
// which the error text already says better.
func unwrapOp(err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		return oe.Err
	}
	return err
}
