package smtpgw

import (
	"context"
	"net/netip"
	"runtime"
	"sync"
	"time"
)

// AuthLimits bound password guessing against SMTP AUTH, the job Postfix
// leaves to anvil and fail2ban. They are per gateway process: a client
// spread over several gateways gets each gateway's budget (see README).
type AuthLimits struct {
	// Failures is how many failed AUTH attempts one client address may
	// make within Window; after that every AUTH from it gets 421 4.7.0
	// and the connection is closed, without a password check, until
	// Window has passed since its last failure. Default 10.
	Failures int
	// Window is how long failures are remembered. Default 15 minutes.
	Window time.Duration
	// Delay is the wait before the reply to a client's second failure;
	// it doubles with every further failure up to MaxDelay. The first
	// failure (a typo) is answered at once. Default 500ms.
	Delay time.Duration
	// MaxDelay caps the delay. Default 8s.
	MaxDelay time.Duration
	// Checks is how many password checks (bcrypt, ~100 ms of CPU each)
	// may run at once, so a flood of AUTH cannot starve mail intake.
	// Default half the CPUs, at least 1.
	Checks int
	// CheckWait is how long an AUTH waits for a check slot before it gets
	// 454 4.7.0. Default 10s.
	CheckWait time.Duration
}

func (l *AuthLimits) setDefaults() {
	if l.Failures == 0 {
		l.Failures = 10
	}
	if l.Window == 0 {
		l.Window = 15 * time.Minute
	}
	if l.Delay == 0 {
		l.Delay = 500 * time.Millisecond
	}
	if l.MaxDelay == 0 {
		l.MaxDelay = 8 * time.Second
	}
	if l.Checks == 0 {
		l.Checks = max(1, runtime.GOMAXPROCS(0)/2)
	}
	if l.CheckWait == 0 {
		l.CheckWait = 10 * time.Second
	}
}

// authGuard keeps the AUTH failures per client address and the password
// check slots.
type authGuard struct {
	lim   AuthLimits
	slots chan struct{}

	mu    sync.Mutex
	fails map[netip.Addr]*authFailures
	swept time.Time
}

type authFailures struct {
	n    int
	last time.Time
}

func newAuthGuard(lim AuthLimits) *authGuard {
	lim.setDefaults()
	return &authGuard{lim: lim, slots: make(chan struct{}, lim.Checks), fails: map[netip.Addr]*authFailures{}}
}

// locked reports whether ip has used up its failures.
func (a *authGuard) locked(ip netip.Addr) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	f := a.current(ip, time.Now())
	return f != nil && f.n >= a.lim.Failures
}

// failed records a failure from ip and returns how long to wait before
// answering it.
func (a *authGuard) failed(ip netip.Addr) time.Duration {
	now := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.sweep(now)
	f := a.current(ip, now)
	if f == nil {
		f = &authFailures{}
		a.fails[ip] = f
	}
	f.n++
	f.last = now
	if f.n < 2 {
		return 0
	}
	d := a.lim.Delay
	for i := 2; i < f.n && d < a.lim.MaxDelay; i++ {
		d *= 2
	}
	return min(d, a.lim.MaxDelay)
}

// current is ip's record if it is still within the window. Lock held.
func (a *authGuard) current(ip netip.Addr, now time.Time) *authFailures {
	f := a.fails[ip]
	if f != nil && now.Sub(f.last) >= a.lim.Window {
		delete(a.fails, ip)
		return nil
	}
	return f
}

// sweep forgets expired records, at most once a minute, so the map stays
// the size of the addresses that failed within the window. Lock held.
func (a *authGuard) sweep(now time.Time) {
	if now.Sub(a.swept) < time.Minute {
		return
	}
	a.swept = now
	for ip, f := range a.fails {
		if now.Sub(f.last) >= a.lim.Window {
			delete(a.fails, ip)
		}
	}
}

// check runs fn in a password check slot. It reports false if no slot
// came free within CheckWait.
func (a *authGuard) check(fn func()) bool {
	ctx, cancel := context.WithTimeout(context.Background(), a.lim.CheckWait)
	defer cancel()
	select {
	case a.slots <- struct{}{}:
	case <-ctx.Done():
		return false
	}
	defer func() { <-a.slots }()
	fn()
	return true
}
