package deliverer

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/jetmail/jetmail/spool"
)

// The waker hands parked mail out again (spool/park.go). One deliverer at
// a time runs it, the holder of the "waker" lease. It keeps no list of
// parked mail, only a line per destination: the earliest due time it has
// seen, and whether the destination is down. It learns of parks by
// following the state bucket's writes (headers only); when something is
// due it walks the parked states (headers only again) and hands what is
// due to the deliverers (deliverer/wake.go), each to one with a free slot.
//
// A destination that is down costs nothing while it waits: at its due time
// one message is woken, the probe; only when the probe leaves (delivered,
// bounced) or is parked as not down are the others woken.
const leaseName = "waker"

// The waker lease lasts leaseFor and is renewed every leaseRenew: a waker
// that died is replaced within leaseFor (a clean stop hands it over at
// once). Variables for the tests.
var (
	leaseFor   = 20 * time.Second
	leaseRenew = 5 * time.Second
)

const (
	wakeTick = time.Second
	// wakeWorkers is how many wakes are in flight at once; each waits for
	// a deliverer's free slot.
	wakeWorkers = 64
	// fullPassEvery is how often the waker walks every parked state even
	// when it expects nothing to be due: what it missed (a follow that
	// broke) is found then.
	fullPassEvery = 10 * time.Minute
)

// staleState is how long ago a state that is not parked must have been
// written for a sweep to look its mail up (a variable for the tests).
var staleState = fullPassEvery

// destLine is what the waker knows of one destination.
type destLine struct {
	// next is the earliest due time seen since the last pass; deadNext the
	// earliest deadline (a queue lifetime's end, a delay warning).
	next, deadNext time.Time
	down           bool
	// candidate is a parked message to probe the destination with.
	candidate *spool.Park
	// probe is the queue ID of the probe in flight, woken at probeAt.
	probe   string
	probeAt time.Time
}

type waker struct {
	d   *Deliverer
	log *zap.Logger

	mu     sync.Mutex
	dests  map[string]*destLine
	probes map[string]string // queue ID of a probe -> destination
	// passing is set while a pass runs; fresh until the first pass ends.
	passing, fresh bool
	lastPass       time.Time
	retryPass      time.Time
	// lastSweep is when a pass last looked for states whose mail left
	// the queue (see pass).
	lastSweep time.Time
}

// runWaker takes the waker lease whenever it is free and wakes parked mail
// while it holds it.
func (d *Deliverer) runWaker(ctx context.Context) {
	token := make([]byte, 6)
	_, _ = rand.Read(token)
	holder := d.cfg.Hostname + "/" + hex.EncodeToString(token)
	for ctx.Err() == nil {
		now := d.cfg.Now()
		ok, err := d.cfg.Spool.TakeLease(ctx, leaseName, holder, now, now.Add(leaseFor))
		if err != nil && ctx.Err() == nil {
			d.log.Warn("taking the waker lease", zap.Error(err))
		}
		if ok {
			d.lead(ctx, holder)
			if ctx.Err() != nil {
				// A clean stop: the next deliverer need not wait for
				// the lease to run out.
				rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
				if err := d.cfg.Spool.ReleaseLease(rctx, leaseName, holder); err != nil {
					d.log.Warn("releasing the waker lease", zap.Error(err))
				}
				cancel()
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(leaseRenew):
		}
	}
}

// lead wakes parked mail until the lease is lost or ctx ends.
func (d *Deliverer) lead(ctx context.Context, holder string) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	d.log.Info("waker lease taken: this deliverer wakes parked mail")
	d.metrics.wakerLeader.Set(1)
	defer d.metrics.wakerLeader.Set(0)
	w := &waker{d: d, log: d.log.Named("waker"), dests: map[string]*destLine{}, probes: map[string]string{}, fresh: true}
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(2)
	go func() {
		// Renew; a lease not renewed within its time is someone else's.
		defer wg.Done()
		defer cancel()
		last := d.cfg.Now()
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(leaseRenew):
			}
			now := d.cfg.Now()
			ok, err := d.cfg.Spool.TakeLease(ctx, leaseName, holder, now, now.Add(leaseFor))
			if ok {
				last = now
				continue
			}
			if err == nil || now.Sub(last) > leaseFor-leaseRenew {
				d.log.Warn("waker lease lost", zap.Error(err))
				return
			}
		}
	}()
	// The first pass waits until the follow has started: a park written
	// after the pass read the states and before the follow began would
	// be seen by neither. After a broken follow, likewise, the walk that
	// makes up for what it missed starts once the new one has.
	following := make(chan struct{})
	go func() {
		defer wg.Done()
		first := true
		started := func() {
			w.mu.Lock()
			w.retryPass = d.cfg.Now()
			w.mu.Unlock()
			if first {
				first = false
				close(following)
			}
		}
		for ctx.Err() == nil {
			err := d.cfg.Spool.FollowParks(ctx, started, w.note)
			if ctx.Err() != nil {
				return
			}
			// Writes were missed: walk everything again once the
			// follow is back.
			d.log.Warn("following parked mail; walking it again", zap.Error(err))
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}()
	// Parked mail that left the queue is purged without a marker the
	// follow would see; deliverers say so on spool.GoneSubject.
	gone, err := d.cfg.Spool.JetStream().Conn().Subscribe(spool.GoneSubject, func(m *nats.Msg) {
		w.note(spool.ParkEvent{QueueID: string(m.Data), Gone: true})
	})
	if err != nil {
		d.log.Warn("listening for parked mail that left; probes will wait for their ack wait", zap.Error(err))
	} else {
		defer gone.Unsubscribe()
	}
	select {
	case <-following:
	case <-ctx.Done():
		return
	case <-time.After(10 * time.Second):
		// Not following yet (NATS away?): walk anyway, and again once
		// it is (the follow's restart asks for that).
		d.log.Warn("following parked mail has not started; walking without it")
	}
	t := time.NewTicker(wakeTick)
	defer t.Stop()
	w.tick(ctx, &wg)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			w.tick(ctx, &wg)
		}
	}
}

func (w *waker) line(dest string) *destLine {
	l := w.dests[dest]
	if l == nil {
		l = &destLine{}
		w.dests[dest] = l
	}
	return l
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || (!b.IsZero() && b.Before(a)) {
		return b
	}
	return a
}

// note takes in one write to the state bucket.
func (w *waker) note(ev spool.ParkEvent) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if p := ev.Park; p != nil && p.Claimed {
		// A woken message in its attempt (its claim, or a save during
		// it): its end says what became of it. If the attempt dies, the
		// message is due when its claim runs out.
		if !p.Down {
			l := w.line(p.Dest)
			l.next = earliest(l.next, p.Due)
		}
		return
	}
	if dest, ok := w.probes[ev.QueueID]; ok && (ev.Gone || ev.Park != nil) {
		delete(w.probes, ev.QueueID)
		l := w.line(dest)
		if l.probe == ev.QueueID {
			l.probe = ""
		}
		if ev.Gone || !ev.Park.Down {
			// The probe left the queue, or waits for something else
			// than its destination being down: the destination is back.
			w.log.Info("destination back; waking its parked mail", zap.String("destination", dest))
			l.down = false
			l.next = w.d.cfg.Now()
		}
	}
	p := ev.Park
	if p == nil {
		return
	}
	l := w.line(p.Dest)
	l.down = p.Down
	if p.Down {
		l.candidate = p
	}
	l.next = earliest(l.next, p.Due)
	l.deadNext = earliest(l.deadNext, p.Deadline)
}

// tick probes destinations that are down and starts a pass when mail is
// due.
func (w *waker) tick(ctx context.Context, wg *sync.WaitGroup) {
	now := w.d.cfg.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	pass := w.fresh || now.Sub(w.lastPass) >= fullPassEvery || (!w.retryPass.IsZero() && !w.retryPass.After(now))
	var probes []*spool.Park
	for dest, l := range w.dests {
		if !l.down {
			pass = pass || (!l.next.IsZero() && !l.next.After(now))
			continue
		}
		pass = pass || (!l.deadNext.IsZero() && !l.deadNext.After(now))
		if l.probe != "" {
			if now.Sub(l.probeAt) < 2*w.d.cfg.AckWait {
				continue
			}
			// No news of the probe: try another.
			delete(w.probes, l.probe)
			l.probe = ""
		}
		if c := l.candidate; c != nil && !c.Due.After(now) {
			l.candidate, l.probe, l.probeAt = nil, c.QueueID, now
			w.probes[c.QueueID] = dest
			probes = append(probes, c)
		} else if c == nil && !l.next.IsZero() && !l.next.After(now) {
			// Nothing known to probe with (the waker just started, or
			// the candidate left): let the pass pick one.
			pass = true
		}
	}
	for _, p := range probes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := w.wake(ctx, p, "probe"); err != nil {
				w.mu.Lock()
				if l := w.dests[p.Dest]; l != nil && l.probe == p.QueueID {
					l.probe = ""
				}
				delete(w.probes, p.QueueID)
				w.mu.Unlock()
			}
		}()
	}
	sweep := now.Sub(w.lastSweep) >= fullPassEvery
	pass = pass || sweep
	if pass && !w.passing {
		w.passing, w.retryPass = true, time.Time{}
		if sweep {
			w.lastSweep = now
		}
		for _, l := range w.dests {
			// The pass finds them again; the follow adds what is parked
			// meanwhile.
			l.next, l.deadNext = time.Time{}, time.Time{}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.pass(ctx, sweep)
		}()
	}
}

// pass walks every parked state and wakes what is due. A sweep also
// looks at the states that are not parked and were last written more than
// fullPassEvery ago (an attempt in progress writes its state more often):
// the mail of each is looked up, and a state whose mail left the queue is
// removed. Parked mail that left is found when it is woken. The markers of
// held mail as old are looked at too: one whose mail is not held any more
// is removed.
func (w *waker) pass(ctx context.Context, sweep bool) {
	start := w.d.cfg.Now()
	sem := make(chan struct{}, wakeWorkers)
	var wg sync.WaitGroup
	seen, woken := 0, 0
	var looked, removed, heldRemoved atomic.Int64
	err := w.d.cfg.Spool.StateHeads(ctx, func(h spool.StateHead) error {
		p := h.Park
		if p == nil {
			if !sweep || (h.Record == "" && !h.Held) || start.Sub(h.Stored) < staleState {
				return nil
			}
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return ctx.Err()
			}
			looked.Add(1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				switch {
				case h.Held:
					if w.d.clearHeldIfReleased(ctx, h.QueueID) {
						heldRemoved.Add(1)
					}
				case w.d.clearIfLeft(ctx, h.QueueID, h.Record):
					removed.Add(1)
				}
			}()
			return nil
		}
		seen++
		now := w.d.cfg.Now()
		w.mu.Lock()
		l := w.line(p.Dest)
		if w.fresh {
			// Stream order: the latest park of a destination says last.
			l.down = p.Down
		}
		kind := ""
		switch {
		case p.Due.After(now):
		case !l.down:
			kind = "due"
		case !p.Deadline.After(now):
			kind = "deadline"
		}
		if kind == "" {
			l.next = earliest(l.next, p.Due)
			l.deadNext = earliest(l.deadNext, p.Deadline)
			if l.down && l.candidate == nil {
				l.candidate = p
			}
		}
		w.mu.Unlock()
		if kind == "" {
			return nil
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
		woken++
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			_ = w.wake(ctx, p, kind)
		}()
		return nil
	})
	wg.Wait()
	w.d.metrics.wakerPasses.Observe(w.d.cfg.Now().Sub(start).Seconds())
	w.mu.Lock()
	defer w.mu.Unlock()
	w.passing, w.fresh = false, false
	w.lastPass = start
	if err != nil {
		if ctx.Err() == nil {
			w.log.Warn("walking parked mail; again in 5s", zap.Error(err))
			w.retryPass = w.d.cfg.Now().Add(5 * time.Second)
		}
		return
	}
	if woken > 0 {
		// A deliverer that took a message and died before claiming it
		// left it parked and due, and wrote nothing the follow sees:
		// look again once such a claim would have run out.
		w.retryPass = earliest(w.retryPass, w.d.cfg.Now().Add(2*w.d.cfg.AckWait))
	}
	if sweep {
		w.log.Info("swept the delivery states of mail not parked and the markers of held mail", zap.Int64("looked_up", looked.Load()),
			zap.Int64("removed", removed.Load()), zap.Int64("held_markers_removed", heldRemoved.Load()))
	}
	w.log.Debug("pass over parked mail", zap.Int("parked", seen), zap.Int("woken", woken), zap.Duration("took", w.d.cfg.Now().Sub(start)))
}

// wake hands p to a deliverer (spool.WakeSubject), asking again while
// they are all busy: the deliverers' free slots pace the waker.
func (w *waker) wake(ctx context.Context, p *spool.Park, kind string) error {
	req, err := json.Marshal(p)
	if err != nil {
		return err
	}
	nc := w.d.cfg.Spool.JetStream().Conn()
	for {
		rctx, cancel := context.WithTimeout(ctx, wakeSlotWait+recordTry)
		resp, err := nc.RequestWithContext(rctx, spool.WakeSubject, req)
		cancel()
		switch {
		case err == nil && string(resp.Data) == spool.WakeTaken:
			w.d.metrics.woken.WithLabelValues(kind).Inc()
			return nil
		case err == nil && string(resp.Data) == spool.WakeChanged:
			// Gone, or replaced by an administrator: nothing to do.
			return spool.ErrChanged
		case err == nil && string(resp.Data) == spool.WakeBusy && ctx.Err() == nil:
			// No free slot for wakeSlotWait, or the record could not
			// be read: a moment's pause, then again.
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
			continue
		}
		if err == nil {
			err = errors.New("answer " + string(resp.Data))
		}
		if ctx.Err() == nil {
			w.log.Warn("handing parked mail to a deliverer; again in 5s", zap.String("queue_id", p.QueueID), zap.Error(err))
			w.mu.Lock()
			w.retryPass = earliest(w.retryPass, w.d.cfg.Now().Add(5*time.Second))
			w.mu.Unlock()
		}
		return err
	}
}
