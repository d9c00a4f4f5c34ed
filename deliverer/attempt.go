package deliverer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/jetmail/jetmail/deliverer/dsn"
	"github.com/jetmail/jetmail/deliverer/failure"
	"github.com/jetmail/jetmail/deliverer/outbound"
	"github.com/jetmail/jetmail/deliverer/resolve"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// recordTry bounds one try at recording an attempt's outcome; keep tries
// again until it lands. A variable for the tests.
var recordTry = 10 * time.Second

// attempt is one pass over a message's pending recipients.
type attempt struct {
	d   *Deliverer
	msg queueMsg
	m   *spool.Message
	st  *spool.DeliveryState
	pol *policy.Delivery
	now time.Time
	log *zap.Logger

	// recorded counts the results of this attempt, whatever they were.
	recorded int
	// Results of this attempt, for notifications.
	reports []dsn.Recipient
	// Recipients whose delivery asks for a success notice.
	successes []dsn.Recipient
	// saved is set when run saved the state before finish (a destination
	// delivered while others were still in session).
	saved bool
	// expiring is set while expire records its failures.
	expiring bool
	// down lists the recipient domains found down in this attempt.
	down map[string]bool
	// woken is set for parked mail the waker handed out (wokenMsg): it
	// is not in the consumer, so a deferral always parks it again.
	woken bool
}

func (a *attempt) rcptState(addr string) *spool.RcptState {
	for i := range a.st.Rcpts {
		if a.st.Rcpts[i].Addr == addr {
			return &a.st.Rcpts[i]
		}
	}
	a.st.Rcpts = append(a.st.Rcpts, spool.RcptState{Addr: addr, Status: spool.RcptQueued})
	return &a.st.Rcpts[len(a.st.Rcpts)-1]
}

// pending lists the recipients not delivered or failed yet.
func (a *attempt) pending() []spool.Rcpt {
	var out []spool.Rcpt
	for _, r := range a.m.Envelope.Rcpts {
		switch a.rcptState(r.Addr).Status {
		case spool.RcptQueued, spool.RcptDeferred:
			out = append(out, r)
		}
	}
	return out
}

// due lists the pending recipients whose retry time has come: each
// recipient follows the retry schedule by its own attempt count, so one
// that was deferred for the first time is not kept waiting as long as
// another that has been failing for a day.
func (a *attempt) due() []spool.Rcpt {
	var out []spool.Rcpt
	for _, r := range a.pending() {
		rs := a.rcptState(r.Addr)
		if !rs.NextAttempt.After(a.now) || a.m.RetryAsked(*rs) {
			// Due, or an administrator asked for a retry since its last
			// attempt (jetmail queue retry, release).
			out = append(out, r)
		}
	}
	return out
}

// expire fails every pending recipient: the queue lifetime is over,
// whatever state the message was in.
func (a *attempt) expire() {
	age := a.now.Sub(a.m.Envelope.Received).Round(time.Second)
	a.expiring = true
	defer func() { a.expiring = false }()
	for _, r := range a.pending() {
		rs := a.rcptState(r.Addr)
		last := rs.Text
		e := failure.Permanent(554, "4.4.7", "message expired after %s in the queue", age)
		if last != "" {
			e.Text += "; last error: " + last
		}
		a.record(r, outbound.RcptResult{Rcpt: r, Status: spool.RcptFailed, Err: e}, 0)
	}
	a.d.metrics.expired.Inc()
}

// run attempts delivery to every pending recipient, one session per
// destination, destinations in parallel.
func (a *attempt) run(ctx context.Context) {
	// Each destination that gets as far as a session slot opens the body
	// and sends it as it is read, a chunk at a time (queuedBody): mail for
	// a destination that is down or busy is deferred without reading it,
	// and a large body is never held whole.
	groups := map[string][]spool.Rcpt{}
	var domains []string
	for _, r := range a.due() {
		dom := rcptDomain(r.Addr)
		if _, ok := groups[dom]; !ok {
			domains = append(domains, dom)
		}
		groups[dom] = append(groups[dom], r)
	}
	sort.Strings(domains)

	out := make([]groupResult, len(domains))
	var (
		wg sync.WaitGroup
		// mu guards the state while groups record early; saving holds
		// the saves in order, so a later one always includes an earlier.
		mu, saving sync.Mutex
		left       = len(domains)
	)
	for i, dom := range domains {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			res, skipped := a.deliverDomain(ctx, dom, groups[dom])
			g := groupResult{dom: dom, rcpts: groups[dom], results: res, elapsed: time.Since(start), skipped: skipped, cut: ctx.Err() != nil}
			mu.Lock()
			left--
			early := left > 0 && !g.skipped && !g.cut && g.delivered()
			if early {
				// Other destinations are still in session: record these
				// deliveries now rather than after the slowest, so that a
				// deliverer killed meanwhile does not send them again.
				a.recordGroup(g)
				g.recorded = true
			}
			out[i] = g
			mu.Unlock()
			if early {
				saving.Lock()
				mu.Lock()
				snap := a.st.Clone()
				mu.Unlock()
				if err := a.keep(ctx, "state", func(c context.Context) error { return a.d.cfg.Spool.SaveState(c, snap) }); err == nil {
					mu.Lock()
					a.saved = true
					mu.Unlock()
				}
				saving.Unlock()
			}
		}()
	}
	wg.Wait()
	for _, g := range out {
		if !g.recorded {
			a.recordGroup(g)
		}
		if g.down() {
			if a.down == nil {
				a.down = map[string]bool{}
			}
			a.down[g.dom] = true
		}
	}
}

func rcptDomain(addr string) string {
	return strings.ToLower(addr[strings.LastIndexByte(addr, '@')+1:])
}

// groupResult is what one destination's session gave.
type groupResult struct {
	dom     string
	rcpts   []spool.Rcpt
	results []outbound.RcptResult
	elapsed time.Duration
	skipped bool
	// cut is set when the attempt's context had ended by the time the
	// session returned: a shutdown past its grace.
	cut bool
	// recorded is set when the group was recorded as soon as it ended.
	recorded bool
}

// down tells whether the destination was down: every next hop failed, or
// it was left alone as down (suspended).
func (g groupResult) down() bool {
	if g.skipped || g.cut || len(g.results) == 0 {
		return false
	}
	r := g.results[0]
	return r.PassedOver || (r.Err != nil && r.Err.Reason == failure.Suspended)
}

func (g groupResult) delivered() bool {
	for _, r := range g.results {
		if r.Status == spool.RcptDelivered {
			return true
		}
	}
	return false
}

// recordGroup applies one destination's results to the state.
func (a *attempt) recordGroup(g groupResult) {
	if g.skipped {
		// Busy destination: not an attempt for these recipients; their
		// retry time stays as it was, and finish brings the message back
		// soon.
		return
	}
	killed := false
	for i, r := range g.rcpts {
		res := g.results[i]
		a.record(r, res, g.elapsed)
		killed = killed || deadlineKill(res.Err)
		if g.cut && res.Status == spool.RcptDeferred && (res.Err == nil || res.Err.Remote == "") {
			// Cut short by our shutdown, not by the remote: not an
			// attempt, and another replica may try again at once.
			rs := a.rcptState(r.Addr)
			rs.Attempts--
			rs.NextAttempt = a.now
		}
	}
	if killed {
		// Once per session, not per recipient.
		a.d.metrics.deadlineKills.Inc()
	}
}

// deliverDomain routes and delivers one domain's recipients. skipped is
// true when the destination had no free session slot.
func (a *attempt) deliverDomain(ctx context.Context, domain string, rcpts []spool.Rcpt) ([]outbound.RcptResult, bool) {
	d := a.d
	all := func(e *failure.Error) []outbound.RcptResult {
		st := spool.RcptDeferred
		if e.Permanent {
			st = spool.RcptFailed
		}
		out := make([]outbound.RcptResult, len(rcpts))
		for i, r := range rcpts {
			out[i] = outbound.RcptResult{Rcpt: r, Status: st, Err: e}
		}
		return out
	}
	var (
		hops  []resolve.Hop
		tlsp  = policy.TLSOpportunistic
		creds *policy.Credentials
		to    = a.pol.Timeouts
		dest  = domain
		err   error
	)
	route := a.pol.Route(domain)
	if route != nil {
		dest = route.Name
	}
	suspended, probe := d.checkDead(dest, a.now)
	if suspended != nil {
		d.metrics.suspended.Add(float64(len(rcpts)))
		return all(suspended), false
	}
	if probe {
		defer d.endProbe(dest)
	}
	dane, sts := a.pol.DANE, a.pol.MTASTS
	if route != nil {
		tlsp, creds, to = route.TLS, route.Auth, route.Timeouts
		dane, sts = route.DANE, route.MTASTS
		hops, err = d.routeHops(ctx, route)
	} else {
		hops, err = d.cfg.Resolver.Lookup(ctx, domain)
		for i := range hops {
			hops[i].Addr = netip.AddrPortFrom(hops[i].Addr.Addr(), a.pol.Port)
		}
	}
	if err != nil {
		return all(failure.Classify(err)), false
	}
	hops, sec, refused := a.secure(ctx, domain, hops, tlsp, dane, sts, route == nil)
	if refused != nil {
		return all(refused), false
	}
	if !d.takeSlot(ctx, dest, a.pol) {
		return nil, true
	}
	defer d.freeSlot(dest)
	body, err := a.d.cfg.Spool.OpenBody(ctx, a.m)
	if err != nil {
		a.log.Error("reading the message body", zap.Error(err))
		return all(failure.Temporary(451, "4.3.0", "queue read error")), false
	}
	t := &outbound.Transfer{QueueID: a.m.Envelope.QueueID, From: a.m.Envelope.From, Mail: a.m.Envelope.Mail, Rcpts: rcpts,
		Header: a.m.Envelope.Headers, Body: &queuedBody{r: body}}
	// The same snapshot decides whether the connection may carry another
	// message after this one: messagesPerConnection applies without a
	// restart, like every other setting.
	res := d.cfg.Client.Deliver(ctx, hops, sec, creds, to, a.pol.PerConnection, t)
	if ctx.Err() == nil {
		// A session cut short by a shutdown says nothing about dest.
		d.noteDest(dest, res, a.pol)
	}
	return res, false
}

// routeHops resolves a static route's next hops, in order: A/AAAA only.
func (d *Deliverer) routeHops(ctx context.Context, r *policy.Route) ([]resolve.Hop, error) {
	var hops []resolve.Hop
	var lastErr error
	for _, h := range r.Hops {
		hs, err := d.cfg.Resolver.ResolveHost(ctx, h.Host, h.Port)
		if err != nil {
			lastErr = err
			continue
		}
		hops = append(hops, hs...)
	}
	if len(hops) == 0 {
		if lastErr == nil {
			lastErr = failure.Temporary(451, "4.4.4", "%s: no usable next hop", r.Name)
		}
		return nil, lastErr
	}
	return hops, nil
}

// record applies one recipient's result to the state and logs it, one
// line per recipient per attempt, like Postfix's status= lines.
func (a *attempt) record(r spool.Rcpt, res outbound.RcptResult, elapsed time.Duration) {
	rs := a.rcptState(r.Addr)
	rs.Remember()
	a.recorded++
	rs.Attempts++
	rs.LastAttempt = a.now
	fields := []zap.Field{
		zap.String("rcpt", r.Addr),
		zap.Duration("delay", a.now.Sub(a.m.Envelope.Received).Round(time.Millisecond)),
		zap.Duration("duration", elapsed.Round(time.Millisecond)),
	}
	if res.Hop.Host != "" {
		fields = append(fields, zap.String("relay", res.Hop.Host), zap.String("relay_addr", res.Hop.Addr.String()), zap.Bool("tls", res.TLS))
		if res.TLSPolicy != "" {
			fields = append(fields, zap.String("tls_policy", res.TLSPolicy))
		}
	}
	report := dsn.Recipient{Rcpt: r, LastAttempt: a.now, RemoteMTA: res.Hop.Host}
	switch res.Status {
	case spool.RcptDelivered:
		rs.Status, rs.Code, rs.Enhanced, rs.Text, rs.NextAttempt = spool.RcptDelivered, 250, "2.0.0", res.Reply, time.Time{}
		rs.RemoteMTA = res.Hop.Host
		fields = append(fields, zap.String("reply", res.Reply))
		a.d.metrics.latency.Observe(a.d.cfg.Now().Sub(a.m.Envelope.Received).Seconds())
		// NOTIFY=SUCCESS: a next hop that took our DSN parameters will
		// report delivery itself; otherwise we say "relayed" (RFC 3461 §5.2.2).
		if dsn.WantsNotice(r, dsn.ActionRelayed) && !res.DSNPassed {
			report.Action, report.Status, report.Diagnostic = dsn.ActionRelayed, "2.0.0", res.Reply
			a.successes = append(a.successes, report)
		}
	default:
		e := res.Err
		if e == nil {
			e = failure.Temporary(451, "4.4.0", "no result")
		}
		rs.Code, rs.Enhanced, rs.Text, rs.RemoteMTA = e.Code, e.Enhanced, e.Text, e.Remote
		report.Status, report.Diagnostic = e.Enhanced, fmt.Sprintf("%d %s %s", e.Code, e.Enhanced, e.Text)
		if res.Status == spool.RcptFailed || e.Permanent {
			rs.Status, report.Action = spool.RcptFailed, dsn.ActionFailed
			rs.NextAttempt = time.Time{}
		} else {
			rs.Status, report.Action = spool.RcptDeferred, dsn.ActionDelayed
			rs.NextAttempt = a.now.Add(a.pol.RetryDelay(rs.Attempts))
			a.d.metrics.deferrals.WithLabelValues(deferralClass(e)).Inc()
		}
		fields = append(fields, zap.Int("code", e.Code), zap.String("dsn", e.Enhanced), zap.String("reply", e.Text))
		a.reports = append(a.reports, report)
	}
	a.d.metrics.attempts.WithLabelValues(string(rs.Status)).Inc()
	a.resultEvent(r, res, rs)
	fields = append(fields, zap.String("status", string(rs.Status)))
	if rs.Status == spool.RcptDelivered {
		a.log.Info("delivery", fields...)
	} else {
		a.log.Warn("delivery", fields...)
	}
}

// finish records the outcome, queues notifications and acknowledges or
// schedules the message. The delivered recipients are recorded before the
// acknowledgement, so a redelivered message never reaches them twice.
//
// ctx is the attempt's context. Recording the outcome goes on until it
// lands (keep), even after ctx has ended, since a recipient that got the
// message must never get it again.
func (a *attempt) finish(ctx context.Context, hadState bool) {
	interrupted := ctx.Err() != nil
	sp := a.d.cfg.Spool
	// The claim ends with the attempt: every state written from here on
	// replaces it.
	a.st.Claim = nil
	hadState = hadState || a.saved
	a.st.Attempts++
	a.st.LastAttempt = a.now
	// Every failed recipient not bounced yet, including those of an
	// earlier attempt whose notice could not be queued then.
	var failed []dsn.Recipient
	for _, rs := range a.st.Rcpts {
		if rs.Status == spool.RcptFailed && !slices.Contains(a.st.Bounced, rs.Addr) {
			failed = append(failed, a.failedReport(rs))
		}
	}
	done := len(a.pending()) == 0

	if len(failed) > 0 {
		// Record first: the notice is queued idempotently (its guard is
		// derived from the queue ID and recipients), then remembered.
		if err := a.keep(ctx, "state", func(c context.Context) error { return sp.SaveState(c, a.st) }); err != nil {
			a.retryLater(err)
			return
		}
		nctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recordTry)
		defer cancel()
		// A notice that cannot be queued now is queued at the next
		// attempt: the failures it reports are recorded.
		if err := a.notify(nctx, failed, "failed"); err != nil {
			a.retryLater(err)
			return
		}
		for _, r := range failed {
			a.st.Bounced = append(a.st.Bounced, r.Rcpt.Addr)
		}
		hadState = true
	}
	if len(a.successes) > 0 {
		nctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recordTry)
		defer cancel()
		if err := a.notify(nctx, a.successes, "success"); err != nil {
			a.log.Warn("queueing a success notice", zap.Error(err))
		}
	}
	if done {
		err := a.keep(ctx, "completion", func(c context.Context) error { return sp.Complete(c, a.m) })
		switch {
		case errors.Is(err, spool.ErrRemoved):
			a.log.Warn("the message was removed from the queue (jetmail queue rm) during its delivery attempt; this attempt's outcome is only logged")
		case errors.Is(err, spool.ErrNotQueued):
			a.log.Warn("the message left the queue during its delivery attempt; its outcome is only logged")
		case err != nil:
			// Shutting down with NATS away: whoever gets the message
			// next must know who has it, if that can still be written.
			if serr := sp.SaveState(context.WithoutCancel(ctx), a.st); serr != nil {
				a.log.Error("saving the delivery state", zap.Error(serr))
			}
			a.retryLater(err)
			return
		}
		if hadState {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recordTry)
			defer cancel()
			if err := sp.ClearState(cctx, a.m.Envelope.QueueID); err != nil {
				a.log.Warn("clearing delivery state", zap.Error(err))
			}
			if a.st.Parked() != nil {
				// Woken mail left: the waker may be waiting for this probe.
				_ = sp.JetStream().Conn().Publish(spool.GoneSubject, []byte(a.m.Envelope.QueueID))
			}
		}
		_ = a.msg.Ack()
		return
	}

	expires := a.m.Envelope.Received.Add(a.pol.QueueLifetime)
	if !a.anyAttempted() {
		// Every destination was busy (or nothing was due): not an attempt.
		a.st.Attempts--
	}
	// The message comes back when its first pending recipient is due.
	var next time.Time
	for _, r := range a.pending() {
		rs := a.rcptState(r.Addr)
		t := rs.NextAttempt
		if !t.After(a.now) && !interrupted {
			// Due but not attempted: its destination was busy. Its
			// recipients wait in the queue, not in a worker, and come
			// back soon. (After a shutdown they may come back at once.)
			t = a.now.Add(time.Second + time.Duration(rand.Int64N(int64(2*time.Second))))
		}
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	if next.After(expires) {
		next = expires
	}
	a.st.NextAttempt = next
	if w := a.pol.DelayWarning; w > 0 && !a.st.DelayWarned && a.now.Sub(a.m.Envelope.Received) >= w {
		var delayed []dsn.Recipient
		for _, r := range a.reports {
			if r.Action == dsn.ActionDelayed {
				r.WillRetryUntil = expires
				delayed = append(delayed, r)
			}
		}
		if len(delayed) > 0 {
			nctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recordTry)
			defer cancel()
			if err := a.notify(nctx, delayed, "delayed"); err != nil {
				a.log.Warn("queueing a delay warning", zap.Error(err))
			} else {
				a.st.DelayWarned = true
			}
		}
	}
	if !a.anyAttempted() && !hadState {
		// Nothing happened to this message: no need to write anything,
		// the schedule travels with the negative acknowledgement.
		_ = a.msg.NakWithDelay(next.Sub(a.d.cfg.Now()))
		return
	}
	deadline := expires
	if w := a.pol.DelayWarning; w > 0 && !a.st.DelayWarned && a.m.Envelope.Received.Add(w).Before(deadline) {
		deadline = a.m.Envelope.Received.Add(w)
	}
	park := a.parking(next, deadline)
	save := func(c context.Context) error {
		if park != nil {
			return sp.ParkState(c, a.st, park)
		}
		return sp.SaveState(c, a.st)
	}
	if err := a.keep(ctx, "state", save); err != nil {
		a.retryLater(err)
		return
	}
	a.dropIfRemoved(ctx)
	if park != nil {
		// Stored parked: the waker hands it out again when it is due.
		a.d.metrics.parked.Inc()
		_ = a.msg.Ack()
		return
	}
	_ = a.msg.NakWithDelay(next.Sub(a.d.cfg.Now()))
}

// parking says how the message is parked until next (see spool/park.go),
// or nil when it waits in the consumer instead: a short wait (under
// ParkAfter) costs nothing there. It waits for the destination of its
// earliest due pending recipient.
func (a *attempt) parking(next, deadline time.Time) *spool.Park {
	if a.d.cfg.ParkAfter < 0 && !a.woken {
		return nil
	}
	var first *spool.RcptState
	dom := ""
	for _, r := range a.pending() {
		if rs := a.rcptState(r.Addr); first == nil || rs.NextAttempt.Before(first.NextAttempt) {
			first, dom = rs, rcptDomain(r.Addr)
		}
	}
	if first == nil {
		return nil
	}
	down := a.down[dom]
	if !down && !a.woken && next.Sub(a.d.cfg.Now()) < a.d.cfg.ParkAfter {
		return nil
	}
	return &spool.Park{QueueID: a.m.Envelope.QueueID, Dest: dom, Due: next, Deadline: deadline, Down: down,
		Subject: a.m.Subject, Seq: a.m.Sequence}
}

// dropIfRemoved clears the state just saved if the message left the queue
// during the attempt (jetmail queue rm clears the state it finds, and this
// attempt may have saved its own after that), so that no state outlives
// its mail. Removal writes the tombstone before it clears the state, so
// one of the two always sees the other.
func (a *attempt) dropIfRemoved(ctx context.Context) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recordTry)
	defer cancel()
	sp := a.d.cfg.Spool
	queued, removed, err := sp.StillQueued(cctx, a.m)
	if err != nil || queued {
		return
	}
	if removed {
		a.log.Warn("the message was removed from the queue (jetmail queue rm) during its delivery attempt; this attempt's outcome is only logged")
	}
	if err := sp.ClearState(cctx, a.m.Envelope.QueueID); err != nil {
		a.log.Warn("clearing the delivery state of a message that left the queue", zap.Error(err))
	}
}

// keep runs write, a record of this attempt's outcome, until it lands. A
// remote's 250 that is not recorded becomes a second copy when the message
// comes back, so while the process lives the outcome is never given up: a
// NATS server that stalls or a stream leader that changes only delays it,
// and the message stays ours meanwhile (handle's in-progress signals). Only
// a shutdown past its grace (ctx ended) stops trying, after a second try.
func (a *attempt) keep(ctx context.Context, what string, write func(context.Context) error) error {
	backoff := 100 * time.Millisecond
	for try := 1; ; try++ {
		tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recordTry)
		err := write(tctx)
		cancel()
		if err == nil || errors.Is(err, spool.ErrNotQueued) {
			if try > 1 {
				a.log.Info("delivery outcome recorded", zap.String("record", what), zap.Int("tries", try))
			}
			return err
		}
		if ctx.Err() != nil && try >= 2 {
			return err
		}
		a.d.metrics.recordRetries.Inc()
		a.log.Warn("recording the delivery outcome failed; trying again", zap.String("record", what),
			zap.Int("try", try), zap.Duration("retry_in", backoff), zap.Error(err))
		time.Sleep(backoff)
		backoff = min(2*backoff, 5*time.Second)
	}
}

// anyAttempted tells whether any recipient got a result in this attempt:
// a delivery too, which must be recorded before the message comes back.
func (a *attempt) anyAttempted() bool { return a.recorded > 0 }

// retryLater gives the message back when an outcome could not be recorded
// (only a failure notice, or anything during a shutdown past its grace).
func (a *attempt) retryLater(err error) {
	a.log.Error("recording the delivery outcome failed; the message will be tried again", zap.Error(err))
	_ = a.msg.NakWithDelay(30 * time.Second)
}

// deadlineKill tells whether e is the client cutting a session off at its
// hard deadline or for a too slow data rate (package outbound),
// as opposed to an ordinary timeout or a lost connection, which are 4.4.2
// as well.
func deadlineKill(e *failure.Error) bool {
	return e != nil && e.Reason == failure.DeadlineKill
}

// queuedBody is a Transfer's body read from the spool. It is opened before
// the session, so a body that is not there defers its recipients without a
// connection, and is read while it is sent. Deliver opens a body at most
// once (only the hop that accepted MAIL FROM gets a DATA).
type queuedBody struct {
	r      *spool.BodyReader
	opened bool
}

func (b *queuedBody) Size() int64 { return b.r.Size() }

func (b *queuedBody) Open() (io.Reader, error) {
	if b.opened {
		return nil, errors.New("the message body was already sent once in this attempt")
	}
	b.opened = true
	return b.r, nil
}
