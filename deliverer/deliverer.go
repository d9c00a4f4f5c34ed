package deliverer

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

const (
	// maxFetch is the most messages asked for in one pull.
	maxFetch = 64
	// fetchWait is how long one pull waits for messages; it bounds how
	// long Run takes to notice that its context ended.
	fetchWait = 2 * time.Second
	// recordTimeout bounds recording an attempt's outcome, which goes on
	// after Run's context ends: a delivered recipient must be recorded.
	recordTimeout = 30 * time.Second
)

// Config sets up a Deliverer.
type Config struct {
	// Hostname is our name in EHLO, DSNs and logs.
	Hostname string
	Spool    *spool.Spool
	// Policy returns the delivery configuration in force; it is read at
	// every attempt, so route, timeout, retry and messagesPerConnection
	// changes apply to the next attempt without a restart.
	Policy   func() *policy.Delivery
	Resolver *Resolver
	Client   *Client
	Log      *zap.Logger
	// Registerer receives the metrics; nil means none.
	Registerer prometheus.Registerer
	// MaxInFlight bounds the messages this process works on at once
	// (including those waiting for a destination slot). Default 200.
	MaxInFlight int
	// AckWait is how long a message handed to this process stays ours
	// without news; in-progress signals extend it during long sessions, and
	// a process killed mid-delivery gives the message back to another
	// replica when it runs out. Default 5m.
	AckWait time.Duration
	// MaxWaiting bounds the messages waiting for a retry, cluster-wide
	// (the consumer's MaxAckPending). Default 1,000,000.
	MaxWaiting int
	// Grace is how long in-flight attempts may run after Run's context
	// ends. Default 30s.
	Grace time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// SweepEvery is how often orphan message bodies are looked for (see
	// spool.SweepBodies); default 1h, negative: never.
	SweepEvery time.Duration
	// OrphanAge is how old an unreferenced body must be to be deleted; it
	// must exceed the gateways' session deadline. Default 24h.
	OrphanAge time.Duration
}

// Deliverer consumes the queue and delivers.
type Deliverer struct {
	cfg     Config
	log     *zap.Logger
	metrics *metrics

	mu      sync.Mutex
	perDest map[string]int
	// destWaiting counts workers waiting for a slot of a destination,
	// destFree wakes one of them when a slot frees up.
	destWaiting map[string]int
	destFree    map[string]chan struct{}
	sessions    int
	slotFree    chan struct{} // signalled when a session slot frees up
	// dead remembers destinations whose every next hop just failed.
	dead map[string]*deadDest
}

// deadDest is a destination left alone for a while: its mail is deferred
// without a connection until until, then one attempt (the probe) tries it.
type deadDest struct {
	until   time.Time
	err     *Error
	probing bool
}

// New checks cfg and returns a Deliverer.
func New(cfg Config) (*Deliverer, error) {
	if cfg.Spool == nil || cfg.Policy == nil || cfg.Resolver == nil || cfg.Client == nil {
		return nil, errors.New("deliverer: Spool, Policy, Resolver and Client are required")
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 200
	}
	if cfg.AckWait <= 0 {
		cfg.AckWait = 5 * time.Minute
	}
	if cfg.MaxWaiting <= 0 {
		cfg.MaxWaiting = 1_000_000
	}
	if cfg.Grace <= 0 {
		cfg.Grace = 30 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.SweepEvery == 0 {
		cfg.SweepEvery = time.Hour
	}
	if cfg.OrphanAge <= 0 {
		cfg.OrphanAge = 24 * time.Hour
	}
	if cfg.Hostname == "" {
		cfg.Hostname = "localhost"
	}
	if cfg.Resolver.IsLocal == nil {
		cfg.Resolver.IsLocal = func(host string, addr netip.Addr) bool { return cfg.Policy().IsLocal(host, addr) }
	}
	return &Deliverer{cfg: cfg, log: cfg.Log, metrics: newMetrics(cfg.Registerer),
		perDest: map[string]int{}, destWaiting: map[string]int{}, destFree: map[string]chan struct{}{},
		slotFree: make(chan struct{}, 1), dead: map[string]*deadDest{}}, nil
}

// Run consumes the queue until ctx ends, then lets attempts in flight
// finish within Grace. Messages it never finished come back to another
// replica after AckWait; nothing is lost.
//
// It pulls only as many messages as it has free slots for: a message that
// sat in a client-side buffer would have its AckWait running with nobody
// sending in-progress signals for it, and once that ran out another
// replica (or this one) would deliver it a second time.
func (d *Deliverer) Run(ctx context.Context) error {
	cons, err := d.cfg.Spool.DeliveryConsumer(ctx, d.cfg.AckWait, d.cfg.MaxWaiting)
	if err != nil {
		return err
	}
	work, cancelWork := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelWork()
	go func() {
		<-ctx.Done()
		select {
		case <-time.After(d.cfg.Grace):
			cancelWork()
		case <-work.Done():
		}
	}()
	go d.watchQueue(ctx, cons)
	if d.cfg.SweepEvery > 0 {
		go d.sweepBodies(ctx)
	}

	sem := make(chan struct{}, d.cfg.MaxInFlight)
	var wg sync.WaitGroup
	defer wg.Wait()
	backoff := time.Duration(0)
	for {
		// One slot, waiting for it, then every other free one.
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return nil
		}
		if ctx.Err() != nil {
			// Both cases were ready and select chose the slot at random:
			// without this, a shutdown starts another pull (fetchWait)
			// half the time, again and again.
			return nil
		}
		n := 1
	more:
		for n < maxFetch {
			select {
			case sem <- struct{}{}:
				n++
			default:
				break more
			}
		}
		// Not bound to ctx: a pull abandoned mid-way would leave messages
		// the server sent to nobody until AckWait. Its own deadline makes
		// the server end the pull a little before it (FetchContext), and
		// bounds the wait even if the server's end-of-pull never arrives
		// (FetchMaxWait alone was seen to hang for more than 15s).
		fctx, cancelFetch := context.WithTimeout(context.Background(), fetchWait)
		batch, err := cons.Fetch(n, jetstream.FetchContext(fctx))
		got := 0
		if err == nil {
			for msg := range batch.Messages() {
				got++
				if ctx.Err() != nil {
					// Shutting down: give it back. Not at once: it would
					// come straight back into this same pull, again and
					// again until the pull is full. After fetchWait the
					// pull is over and another replica takes it.
					_ = msg.NakWithDelay(fetchWait)
					<-sem
					continue
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					defer func() { <-sem }()
					d.handle(work, msg)
				}()
			}
			err = batch.Error()
		}
		cancelFetch()
		for ; got < n; got++ {
			<-sem
		}
		if err == nil || errors.Is(err, nats.ErrTimeout) || errors.Is(err, jetstream.ErrNoMessages) ||
			errors.Is(err, context.DeadlineExceeded) {
			backoff = 0
			continue
		}
		if ctx.Err() != nil {
			return nil
		}
		// NATS away, consumer gone, ...: do not spin.
		backoff = min(max(2*backoff, 100*time.Millisecond), 5*time.Second)
		d.log.Warn("fetching from the queue", zap.Error(err), zap.Duration("retry_in", backoff))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
	}
}

// queueMsg is the part of a JetStream message the deliverer uses.
type queueMsg interface {
	Metadata() (*jetstream.MsgMetadata, error)
	Subject() string
	Headers() nats.Header
	Data() []byte
	Ack() error
	NakWithDelay(time.Duration) error
	InProgress() error
	Term() error
}

var _ queueMsg = (jetstream.Msg)(nil)

// handle takes one queued message through one attempt.
func (d *Deliverer) handle(ctx context.Context, msg queueMsg) {
	md, err := msg.Metadata()
	if err != nil {
		d.log.Error("queue message without metadata", zap.Error(err))
		_ = msg.Term()
		return
	}
	m, err := spool.Decode(msg.Subject(), md.Sequence.Stream, msg.Headers(), msg.Data())
	if err != nil {
		d.log.Error("undecodable queue message, dropped from the consumer", zap.String("subject", msg.Subject()), zap.Error(err))
		_ = msg.Term()
		return
	}
	if m.Tombstone {
		_ = msg.Ack()
		return
	}
	env := &m.Envelope
	log := d.log.With(zap.String("queue_id", env.QueueID))
	pol := d.cfg.Policy()
	now := d.cfg.Now()

	var st *spool.DeliveryState
	hadState := false
	// Read the state even on a first delivery: a consumer that was
	// recreated starts its counts again, and a recipient already served
	// must never get a second copy. A read costs no fsync.
	st, err = d.cfg.Spool.LoadState(ctx, env.QueueID)
	if err != nil {
		log.Warn("loading delivery state, retrying shortly", zap.Error(err))
		_ = msg.NakWithDelay(30 * time.Second)
		return
	}
	hadState = st != nil
	if st == nil {
		st = &spool.DeliveryState{QueueID: env.QueueID}
		for _, r := range env.Rcpts {
			st.Rcpts = append(st.Rcpts, spool.RcptState{Addr: r.Addr, Status: spool.RcptQueued})
		}
	}
	expires := env.Received.Add(pol.QueueLifetime)
	if !st.NextAttempt.IsZero() && st.NextAttempt.After(now) && now.Before(expires) {
		// Handed back early (a replica died, or the schedule changed):
		// wait for the time that was set, never past the expiry.
		_ = msg.NakWithDelay(min(st.NextAttempt.Sub(now), expires.Sub(now)))
		return
	}

	a := &attempt{d: d, msg: msg, m: m, st: st, pol: pol, now: now, log: log}
	if !now.Before(expires) {
		a.expire()
	} else {
		a.run(ctx)
	}
	a.finish(ctx, hadState)
}

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
	reports []DSNRecipient
	// Recipients whose delivery asks for a success notice.
	successes []DSNRecipient
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
		if !a.rcptState(r.Addr).NextAttempt.After(a.now) {
			out = append(out, r)
		}
	}
	return out
}

// expire fails every pending recipient: the queue lifetime is over,
// whatever state the message was in.
func (a *attempt) expire() {
	age := a.now.Sub(a.m.Envelope.Received).Round(time.Second)
	for _, r := range a.pending() {
		rs := a.rcptState(r.Addr)
		last := rs.Text
		e := Permanent(554, "4.4.7", "message expired after %s in the queue", age)
		if last != "" {
			e.Text += "; last error: " + last
		}
		a.record(r, RcptResult{Rcpt: r, Status: RcptFailed, Err: e}, 0)
	}
	a.d.metrics.expired.Inc()
}

// run attempts delivery to every pending recipient, one session per
// destination, destinations in parallel.
func (a *attempt) run(ctx context.Context) {
	// The body is read once, by the first destination that gets as far as
	// a session slot: mail for a destination that is down or busy is
	// deferred without reading it.
	body := sync.OnceValues(func() ([]byte, error) { return a.d.cfg.Spool.ReadBody(ctx, a.m) })
	groups := map[string][]spool.Rcpt{}
	var domains []string
	for _, r := range a.due() {
		dom := strings.ToLower(r.Addr[strings.LastIndexByte(r.Addr, '@')+1:])
		if _, ok := groups[dom]; !ok {
			domains = append(domains, dom)
		}
		groups[dom] = append(groups[dom], r)
	}
	sort.Strings(domains)

	// Keep the message ours while sessions run.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		t := time.NewTicker(a.d.cfg.AckWait / 4)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				_ = a.msg.InProgress()
			}
		}
	}()

	type groupResult struct {
		rcpts   []spool.Rcpt
		results []RcptResult
		elapsed time.Duration
		skipped bool
		// cut is set when the attempt's context had ended by the time the
		// session returned: a shutdown past its grace.
		cut bool
	}
	out := make([]groupResult, len(domains))
	var wg sync.WaitGroup
	for i, dom := range domains {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			res, skipped := a.deliverDomain(ctx, dom, groups[dom], body)
			out[i] = groupResult{rcpts: groups[dom], results: res, elapsed: time.Since(start), skipped: skipped, cut: ctx.Err() != nil}
		}()
	}
	wg.Wait()
	for _, g := range out {
		if g.skipped {
			// Busy destination: not an attempt for these recipients;
			// their retry time stays as it was, and finish brings the
			// message back soon.
			continue
		}
		killed := false
		for i, r := range g.rcpts {
			res := g.results[i]
			a.record(r, res, g.elapsed)
			killed = killed || deadlineKill(res.Err)
			if g.cut && res.Status == RcptDeferred && (res.Err == nil || res.Err.Remote == "") {
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
}

// deliverDomain routes and delivers one domain's recipients. skipped is
// true when the destination had no free session slot.
func (a *attempt) deliverDomain(ctx context.Context, domain string, rcpts []spool.Rcpt, body func() ([]byte, error)) ([]RcptResult, bool) {
	d := a.d
	all := func(e *Error) []RcptResult {
		st := RcptDeferred
		if e.Permanent {
			st = RcptFailed
		}
		out := make([]RcptResult, len(rcpts))
		for i, r := range rcpts {
			out[i] = RcptResult{Rcpt: r, Status: st, Err: e}
		}
		return out
	}
	var (
		hops  []Hop
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
	if route != nil {
		tlsp, creds, to = route.TLS, route.Auth, route.Timeouts
		hops, err = d.routeHops(ctx, route)
	} else {
		hops, err = d.cfg.Resolver.Lookup(ctx, domain)
		for i := range hops {
			hops[i].Addr = netip.AddrPortFrom(hops[i].Addr.Addr(), a.pol.Port)
		}
	}
	if err != nil {
		return all(Classify(err)), false
	}
	if !d.acquire(ctx, dest, a.pol) {
		return nil, true
	}
	defer d.release(dest)
	data, err := body()
	if err != nil {
		a.log.Error("reading the message body", zap.Error(err))
		return all(Temporary(451, "4.3.0", "queue read error")), false
	}
	t := &Transfer{QueueID: a.m.Envelope.QueueID, From: a.m.Envelope.From, Mail: a.m.Envelope.Mail, Rcpts: rcpts, Body: data}
	// The same snapshot decides whether the connection may carry another
	// message after this one: messagesPerConnection applies without a
	// restart, like every other setting.
	res := d.cfg.Client.Deliver(ctx, hops, tlsp, creds, to, a.pol.PerConnection, t)
	if ctx.Err() == nil {
		// A session cut short by a shutdown says nothing about dest.
		d.noteDest(dest, res, a.pol)
	}
	return res, false
}

// checkDead tells whether dest is left alone for now, with the error its
// mail is deferred with. Once the time is up, one caller gets probe=true
// and tries the destination; the others stay deferred until it reports
// (noteDest), and must call endProbe when done.
func (d *Deliverer) checkDead(dest string, now time.Time) (suspended *Error, probe bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	dd := d.dead[dest]
	if dd == nil {
		return nil, false
	}
	if dd.probing || now.Before(dd.until) {
		return dd.err, false
	}
	dd.probing = true
	return nil, true
}

// endProbe lets another attempt probe dest if this one did not settle it
// (no session slot, a DNS error, a shutdown).
func (d *Deliverer) endProbe(dest string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if dd := d.dead[dest]; dd != nil {
		dd.probing = false
	}
}

// noteDest updates what is known of dest from one delivery: every hop
// failing makes it dead for pol.DeadDestination; any hop taking the
// transaction (whatever its replies to the recipients) brings it back.
func (d *Deliverer) noteDest(dest string, res []RcptResult, pol *policy.Delivery) {
	if len(res) == 0 {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if !res[0].PassedOver {
		if d.dead[dest] != nil {
			delete(d.dead, dest)
			d.metrics.dead.Set(float64(len(d.dead)))
			d.log.Info("destination back", zap.String("destination", dest))
		}
		return
	}
	e := *res[0].Err
	e.Text = "delivery temporarily suspended: " + strings.TrimPrefix(e.Text, "delivery temporarily suspended: ")
	now := d.cfg.Now()
	if d.dead[dest] == nil {
		d.log.Warn("destination down, deferring its mail without trying", zap.String("destination", dest),
			zap.Duration("for", pol.DeadDestination), zap.String("last_error", res[0].Err.Error()))
		// Forget destinations nobody has asked for since well after their
		// time ran out, so the record does not grow forever.
		for k, dd := range d.dead {
			if !dd.probing && now.Sub(dd.until) > 10*pol.DeadDestination {
				delete(d.dead, k)
			}
		}
	}
	d.dead[dest] = &deadDest{until: now.Add(pol.DeadDestination), err: &e}
	d.metrics.dead.Set(float64(len(d.dead)))
}

// routeHops resolves a static route's next hops, in order: A/AAAA only.
func (d *Deliverer) routeHops(ctx context.Context, r *policy.Route) ([]Hop, error) {
	var hops []Hop
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
			lastErr = Temporary(451, "4.4.4", "%s: no usable next hop", r.Name)
		}
		return nil, lastErr
	}
	return hops, nil
}

// record applies one recipient's result to the state and logs it, one
// line per recipient per attempt, like Postfix's status= lines.
func (a *attempt) record(r spool.Rcpt, res RcptResult, elapsed time.Duration) {
	rs := a.rcptState(r.Addr)
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
	}
	report := DSNRecipient{Rcpt: r, LastAttempt: a.now, RemoteMTA: res.Hop.Host}
	var status string
	switch res.Status {
	case RcptDelivered:
		rs.Status, rs.Code, rs.Enhanced, rs.Text, rs.NextAttempt = spool.RcptDelivered, 250, "2.0.0", res.Reply, time.Time{}
		status = "sent"
		fields = append(fields, zap.String("reply", res.Reply))
		a.d.metrics.latency.Observe(a.d.cfg.Now().Sub(a.m.Envelope.Received).Seconds())
		// NOTIFY=SUCCESS: a next hop that took our DSN parameters will
		// report delivery itself; otherwise we say "relayed" (RFC 3461 §5.2.2).
		if WantsNotice(r, ActionRelayed) && !res.DSNPassed {
			report.Action, report.Status, report.Diagnostic = ActionRelayed, "2.0.0", res.Reply
			a.successes = append(a.successes, report)
		}
	default:
		e := res.Err
		if e == nil {
			e = Temporary(451, "4.4.0", "no result")
		}
		rs.Code, rs.Enhanced, rs.Text, rs.RemoteMTA = e.Code, e.Enhanced, e.Text, e.Remote
		report.Status, report.Diagnostic = e.Enhanced, fmt.Sprintf("%d %s %s", e.Code, e.Enhanced, e.Text)
		if res.Status == RcptFailed || e.Permanent {
			rs.Status, status, report.Action = spool.RcptFailed, "bounced", ActionFailed
			rs.NextAttempt = time.Time{}
		} else {
			rs.Status, status, report.Action = spool.RcptDeferred, "deferred", ActionDelayed
			rs.NextAttempt = a.now.Add(a.pol.RetryDelay(rs.Attempts))
		}
		fields = append(fields, zap.Int("code", e.Code), zap.String("dsn", e.Enhanced), zap.String("reply", e.Text))
		a.reports = append(a.reports, report)
	}
	a.d.metrics.attempts.WithLabelValues(status).Inc()
	fields = append(fields, zap.String("status", status))
	if status == "sent" {
		a.log.Info("delivery", fields...)
	} else {
		a.log.Warn("delivery", fields...)
	}
}

// finish records the outcome, queues notifications and acknowledges or
// schedules the message. The delivered recipients are recorded before the
// acknowledgement, so a redelivered message never reaches them twice.
//
// ctx is the attempt's context; the outcome is recorded even when it has
// ended (a shutdown past Grace), since a recipient that got the message
// must never get it again.
func (a *attempt) finish(ctx context.Context, hadState bool) {
	interrupted := ctx.Err() != nil
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recordTimeout)
	defer cancel()
	sp := a.d.cfg.Spool
	a.st.Attempts++
	a.st.LastAttempt = a.now
	// Every failed recipient not bounced yet, including those of an
	// earlier attempt whose notice could not be queued then.
	var failed []DSNRecipient
	for _, rs := range a.st.Rcpts {
		if rs.Status == spool.RcptFailed && !slices.Contains(a.st.Bounced, rs.Addr) {
			failed = append(failed, a.failedReport(rs))
		}
	}
	done := len(a.pending()) == 0

	if len(failed) > 0 {
		// Record first: the notice is queued idempotently (its guard is
		// derived from the queue ID and recipients), then remembered.
		if err := sp.SaveState(ctx, a.st); err != nil {
			a.retryLater(err)
			return
		}
		if err := a.notify(ctx, failed, "failed"); err != nil {
			a.retryLater(err)
			return
		}
		for _, r := range failed {
			a.st.Bounced = append(a.st.Bounced, r.Rcpt.Addr)
		}
		hadState = true
	}
	if len(a.successes) > 0 {
		if err := a.notify(ctx, a.successes, "success"); err != nil {
			a.log.Warn("queueing a success notice", zap.Error(err))
		}
	}
	if done {
		if err := sp.Complete(ctx, a.m); err != nil {
			// Whoever gets the message next must know who has it.
			if serr := sp.SaveState(ctx, a.st); serr != nil {
				a.log.Error("saving the delivery state", zap.Error(serr))
			}
			a.retryLater(err)
			return
		}
		if hadState {
			if err := sp.ClearState(ctx, a.m.Envelope.QueueID); err != nil {
				a.log.Warn("clearing delivery state", zap.Error(err))
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
		var delayed []DSNRecipient
		for _, r := range a.reports {
			if r.Action == ActionDelayed {
				r.WillRetryUntil = expires
				delayed = append(delayed, r)
			}
		}
		if len(delayed) > 0 {
			if err := a.notify(ctx, delayed, "delayed"); err != nil {
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
	if err := sp.SaveState(ctx, a.st); err != nil {
		a.retryLater(err)
		return
	}
	_ = a.msg.NakWithDelay(next.Sub(a.d.cfg.Now()))
}

// failedReport is the notice entry for a failed recipient: this
// attempt's report, or one rebuilt from the state when it failed in an
// earlier attempt.
func (a *attempt) failedReport(rs spool.RcptState) DSNRecipient {
	for _, r := range a.reports {
		if r.Rcpt.Addr == rs.Addr && r.Action == ActionFailed {
			return r
		}
	}
	rcpt := spool.Rcpt{Addr: rs.Addr}
	for _, r := range a.m.Envelope.Rcpts {
		if r.Addr == rs.Addr {
			rcpt = r
		}
	}
	r := DSNRecipient{Rcpt: rcpt, Action: ActionFailed, Status: rs.Enhanced, RemoteMTA: rs.RemoteMTA, LastAttempt: rs.LastAttempt}
	if rs.Code != 0 {
		r.Diagnostic = fmt.Sprintf("%d %s %s", rs.Code, rs.Enhanced, rs.Text)
	}
	return r
}

// anyAttempted tells whether any recipient got a result in this attempt:
// a delivery too, which must be recorded before the message comes back.
func (a *attempt) anyAttempted() bool { return a.recorded > 0 }

// retryLater gives the message back when we could not record an outcome.
func (a *attempt) retryLater(err error) {
	a.log.Error("recording the delivery outcome failed; the message will be tried again", zap.Error(err))
	_ = a.msg.NakWithDelay(30 * time.Second)
}

// notify queues a DSN about rcpts to the sender (or, for a message with a
// null sender, to the postmaster if one is configured; a bounce is never
// bounced).
func (a *attempt) notify(ctx context.Context, rcpts []DSNRecipient, kind string) error {
	var wanted []DSNRecipient
	for _, r := range rcpts {
		if WantsNotice(r.Rcpt, r.Action) {
			wanted = append(wanted, r)
		}
	}
	if len(wanted) == 0 {
		return nil
	}
	env := a.m.Envelope
	to := env.From
	if to == "" {
		if a.pol.Postmaster == "" {
			a.log.Warn("failed message has a null sender: not bounced, dropped", zap.String("kind", kind))
			return nil
		}
		to = a.pol.Postmaster
		env.From = to
	}
	original, err := a.d.cfg.Spool.ReadBody(ctx, a.m)
	if err != nil {
		return err
	}
	dsn := &DSN{ReportingMTA: a.d.cfg.Hostname, Envelope: &env, Original: original, Recipients: wanted, Now: a.d.cfg.Now()}
	body, err := dsn.Build()
	if err != nil {
		return err
	}
	addrs := []string{"dsn", kind, env.QueueID}
	for _, r := range wanted {
		addrs = append(addrs, r.Rcpt.Addr)
	}
	now := a.d.cfg.Now()
	benv := &spool.Envelope{
		QueueID:  spool.NewQueueID(now),
		Received: now.UTC(),
		Gateway:  a.d.cfg.Hostname,
		ClientIP: "127.0.0.1",
		Helo:     a.d.cfg.Hostname,
		From:     "",
		Rcpts:    []spool.Rcpt{{Addr: to}},
	}
	res, err := a.d.cfg.Spool.Enqueue(ctx, benv, body, spool.Fingerprint("<>", addrs, nil))
	if err != nil {
		return err
	}
	a.d.metrics.bounces.WithLabelValues(kind).Inc()
	a.log.Info("notification queued", zap.String("kind", kind), zap.String("dsn_queue_id", res.QueueID), zap.String("to", to), zap.Bool("duplicate", res.Duplicate))
	return nil
}

// acquire takes a session slot for dest: one of MaxPerDest for that
// destination and one of MaxSessions in all. A worker waits for a busy
// destination's slot, but only while fewer than half the workers already
// wait for it: beyond that the destination's backlog waits in the queue,
// not in workers, so one slow domain cannot take every worker from the
// others. It reports false when the attempt should be postponed.
func (d *Deliverer) acquire(ctx context.Context, dest string, pol *policy.Delivery) bool {
	d.mu.Lock()
	waiting := false
	for d.perDest[dest] >= pol.MaxPerDest {
		if !waiting {
			if d.destWaiting[dest] >= max(pol.MaxPerDest, d.cfg.MaxInFlight/2) {
				d.mu.Unlock()
				d.metrics.throttled.Inc()
				return false
			}
			d.destWaiting[dest]++
			waiting = true
		}
		ch := d.destFree[dest]
		if ch == nil {
			ch = make(chan struct{}, 1)
			d.destFree[dest] = ch
		}
		d.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			d.mu.Lock()
			d.unwait(dest)
			d.mu.Unlock()
			return false
		case <-time.After(time.Second):
		}
		d.mu.Lock()
	}
	if waiting {
		d.unwait(dest)
	}
	d.perDest[dest]++
	d.metrics.sessions.WithLabelValues(dest).Set(float64(d.perDest[dest]))
	for d.sessions >= pol.MaxSessions {
		d.mu.Unlock()
		select {
		case <-d.slotFree:
		case <-ctx.Done():
			// Give back the destination slot only: no session slot
			// was taken.
			d.mu.Lock()
			d.dropDest(dest)
			d.mu.Unlock()
			return false
		case <-time.After(time.Second):
		}
		d.mu.Lock()
	}
	d.sessions++
	d.mu.Unlock()
	return true
}

// unwait ends one wait for dest; d.mu is held.
func (d *Deliverer) unwait(dest string) {
	if d.destWaiting[dest]--; d.destWaiting[dest] <= 0 {
		delete(d.destWaiting, dest)
		if d.perDest[dest] == 0 {
			delete(d.destFree, dest)
		}
	}
}

func (d *Deliverer) release(dest string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.dropDest(dest)
	if ch := d.destFree[dest]; ch != nil {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
	if d.sessions > 0 {
		d.sessions--
	}
	select {
	case d.slotFree <- struct{}{}:
	default:
	}
}

// dropDest gives back one of dest's slots; d.mu is held.
func (d *Deliverer) dropDest(dest string) {
	if d.perDest[dest]--; d.perDest[dest] <= 0 {
		delete(d.perDest, dest)
		if d.destWaiting[dest] == 0 {
			delete(d.destFree, dest)
		}
		d.metrics.sessions.DeleteLabelValues(dest)
	} else {
		d.metrics.sessions.WithLabelValues(dest).Set(float64(d.perDest[dest]))
	}
}

// watchQueue exports the queue depth and the age of the oldest message.
func (d *Deliverer) watchQueue(ctx context.Context, cons jetstream.Consumer) {
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	for {
		if info, err := cons.Info(ctx); err == nil {
			d.metrics.depth.Set(float64(info.NumPending + uint64(info.NumAckPending)))
			if info.NumAckPending+int(info.NumPending) == 0 {
				d.metrics.oldest.Set(0)
			} else if qid := d.oldest(ctx, info.AckFloor.Stream+1, info.Delivered.Stream); qid != "" {
				if ts, ok := spool.QueueIDTime(qid); ok {
					d.metrics.oldest.Set(d.cfg.Now().Sub(ts).Seconds())
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sweepBodies deletes orphan message bodies now and then. Every replica
// does; a sweep that finds nothing old enough costs one stream info call.
func (d *Deliverer) sweepBodies(ctx context.Context) {
	wait := rand.N(d.cfg.SweepEvery) // replicas spread out
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = d.cfg.SweepEvery
		n, err := d.cfg.Spool.SweepBodies(ctx, d.cfg.OrphanAge, d.cfg.Now())
		if err != nil {
			d.log.Warn("sweeping orphan message bodies", zap.Error(err))
		}
		if n > 0 {
			d.log.Info("orphan message bodies deleted", zap.Int("bodies", n), zap.Duration("older_than", d.cfg.OrphanAge))
		}
	}
}

// oldest finds the queue ID of the first unacknowledged envelope.
func (d *Deliverer) oldest(ctx context.Context, from, to uint64) string {
	for seq := from; seq <= to && seq < from+20; seq++ {
		if qid := d.cfg.Spool.QueueIDAt(ctx, seq); qid != "" {
			return qid
		}
	}
	return ""
}

// deadlineKill tells whether e is the client cutting a session off at its
// hard deadline or for a too slow data rate (see client.go and pool.go),
// as opposed to an ordinary timeout or a lost connection, which are 4.4.2
// as well.
func deadlineKill(e *Error) bool {
	return e != nil && e.Enhanced == "4.4.2" &&
		(strings.Contains(e.Text, "session deadline exceeded") || strings.Contains(e.Text, "slower than"))
}
