package deliverer

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/jetmail/jetmail/deliverer/mtasts"
	"github.com/jetmail/jetmail/spool"
)

const (
	// maxFetch is the most messages asked for in one pull.
	maxFetch = 64
	// fetchWait is how long one pull waits for messages; it bounds how
	// long Run takes to notice that its context ended.
	fetchWait = 2 * time.Second
)

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
	sc := d.cfg.Spool.Config()
	if d.sts.KV, err = mtasts.OpenBucket(ctx, d.cfg.Spool.JetStream(), sc.Replicas, sc.Storage); err != nil {
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
	go d.watchQueue(ctx)
	// The waker runs even if this deliverer parks nothing (ParkAfter < 0):
	// mail parked before must still be handed out.
	wakerDone := make(chan struct{})
	go func() {
		defer close(wakerDone)
		d.runWaker(ctx)
	}()
	defer func() { <-wakerDone }()
	if d.cfg.SweepEvery > 0 {
		go d.sweepBodies(ctx)
	}

	sem := make(chan struct{}, d.cfg.MaxInFlight)
	var wg sync.WaitGroup
	defer wg.Wait()
	stopWakes, err := d.serveWakes(ctx, work, &wg)
	if err != nil {
		return err
	}
	defer stopWakes() // before wg.Wait: no attempt is added after it
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

// heldRecheck is how long a held message is handed back for. Releasing
// it does not wait for this: the release replaces the record.
const heldRecheck = time.Hour

// retryAsked tells whether an administrator asked for a retry (or a
// release) that a pending recipient of m has not had yet.
func retryAsked(m *spool.Message, st *spool.DeliveryState) bool {
	return slices.ContainsFunc(st.Rcpts, m.RetryAsked)
}

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
	// A replacement (release, retry) is dated by the NATS server that
	// stored it, not by the clock of the tool that asked for it.
	if !m.Requeued.IsZero() {
		m.Requeued = md.Timestamp
	}
	if !m.RetryAt.IsZero() {
		m.RetryAt = md.Timestamp
	}
	if !m.Held.IsZero() {
		// On hold (jetmail queue hold): not attempted, and not expired,
		// until released. The release replaces this record, and the
		// consumer drops this hand-back with it.
		log.Info("message on hold; not attempted until released", zap.Time("held_since", m.Held))
		_ = msg.NakWithDelay(heldRecheck)
		return
	}
	pol := d.cfg.Source.Delivery()
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
	st.SetRecord(msg.Subject())
	if st.Claim.Held("", now) {
		// Another attempt holds it: JetStream handed it out again early
		// (a consumer leader change). That attempt finishes it, or its
		// claim runs out and the message comes back.
		log.Info("message held by another attempt; left to it", zap.String("holder", st.Claim.Holder), zap.Time("until", st.Claim.Until))
		_ = msg.NakWithDelay(st.Claim.Until.Sub(now) + time.Second)
		return
	}
	expires := env.Received.Add(pol.QueueLifetime)
	// A woken message is due: the waker says so (at its retry time, or
	// at its deadline while its destination is down).
	if !isWoken(msg) && !st.NextAttempt.IsZero() && st.NextAttempt.After(now) && now.Before(expires) && !retryAsked(m, st) {
		// Handed back early (a replica died, or the schedule changed):
		// wait for the time that was set, never past the expiry.
		if p := st.Parked(); p != nil && p.Seq == md.Sequence.Stream {
			// Parked already: the deliverer that parked it died before
			// its acknowledgement. The waker has it.
			_ = msg.Ack()
			return
		}
		_ = msg.NakWithDelay(min(st.NextAttempt.Sub(now), expires.Sub(now)))
		return
	}

	if !isWoken(msg) {
		// Handed out by the consumer: whatever it was parked as before
		// (an administrator replaced the record since), it is not now.
		st.Unpark()
	}

	requeued := !m.Requeued.IsZero()
	if requeued && !hadState {
		// An administrator replaced the record (release, retry) of a
		// message that may be in its first attempt, which is not claimed
		// until it has run for a quarter of the ack wait (the ticker
		// below). Wait until such an attempt has claimed it or ended.
		if wait := m.Requeued.Add(d.cfg.AckWait / 2).Sub(now); wait > 0 {
			_ = msg.NakWithDelay(wait)
			return
		}
	}

	var claim *claimKeeper
	if md.NumDelivered > 1 || requeued {
		// A redelivery, or a record an administrator replaced (hold,
		// release, retry) while an attempt of the one before it may still
		// be running: claimed, so that two attempts never overlap.
		claim, err = d.claim(ctx, st)
		if errors.Is(err, spool.ErrClaimed) {
			// Another attempt got there first; the next delivery sees
			// its claim or its result.
			_ = msg.NakWithDelay(fetchWait)
			return
		}
		if err != nil {
			log.Warn("claiming a redelivered message, retrying shortly", zap.Error(err))
			_ = msg.NakWithDelay(5 * time.Second)
			return
		}
		hadState = true // the claim is stored; finish must replace it
	}
	a := &attempt{d: d, msg: msg, m: m, st: st, pol: pol, now: now, log: log, woken: isWoken(msg)}
	// Keep the message ours while sessions run and their outcome is
	// recorded.
	stop := make(chan struct{})
	defer close(stop)
	// A first attempt that runs past the first tick claims the message
	// then (late), so that a record an administrator put in its place
	// meanwhile waits for it. lateMu keeps that claim and finish apart.
	var (
		lateMu   sync.Mutex
		late     *claimKeeper
		finished bool
	)
	go func() {
		t := time.NewTicker(d.cfg.AckWait / 4)
		defer t.Stop()
		tried := false
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				_ = msg.InProgress()
				if claim != nil {
					claim.extend(ctx)
					continue
				}
				lateMu.Lock()
				switch {
				case late != nil:
					late.extend(ctx)
				case !tried && !finished:
					tried = true
					if k, err := d.lateClaim(ctx, env.QueueID, msg.Subject()); err == nil {
						late = k
					} else {
						log.Info("claiming a long first attempt", zap.Error(err))
					}
				}
				lateMu.Unlock()
			}
		}
	}()
	if !now.Before(expires) {
		a.expire()
	} else {
		a.run(ctx)
	}
	lateMu.Lock()
	finished = true
	// A late claim is a stored state that finish must replace or clear.
	hadState = hadState || late != nil
	lateMu.Unlock()
	a.finish(ctx, hadState)
}
