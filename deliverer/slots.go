package deliverer

import (
	"context"
	"time"

	"github.com/jetmail/jetmail/policy"
)

// takeSlot takes a session slot for dest: one of MaxPerDest for that
// destination and one of MaxSessions in all. A worker waits for a busy
// destination's slot, but only while fewer than half the workers already
// wait for it: beyond that the destination's backlog waits in the queue,
// not in workers, so one slow domain cannot take every worker from the
// others. It reports false when the attempt should be postponed.
func (d *Deliverer) takeSlot(ctx context.Context, dest string, pol *policy.Delivery) bool {
	d.mu.Lock()
	waiting := false
	for d.perDest[dest] >= pol.MaxPerDest {
		if !waiting {
			if d.destWaiting[dest] >= max(pol.MaxPerDest, d.cfg.MaxInFlight/2) {
				d.mu.Unlock()
				d.metrics.destinationBusy.Inc()
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
	d.metrics.sessionsOpen.WithLabelValues(dest).Set(float64(d.perDest[dest]))
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

// freeSlot gives back the session slot takeSlot took for dest and wakes
// one worker waiting for it.
func (d *Deliverer) freeSlot(dest string) {
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
		d.metrics.sessionsOpen.DeleteLabelValues(dest)
	} else {
		d.metrics.sessionsOpen.WithLabelValues(dest).Set(float64(d.perDest[dest]))
	}
}
