package deliverer

import (
	"time"

	"go.uber.org/zap"

	"github.com/jetmail/jetmail/deliverer/failure"
	"github.com/jetmail/jetmail/deliverer/outbound"
	"github.com/jetmail/jetmail/policy"
)

// deadDest is a destination left alone for a while: its mail is deferred
// without a connection until until, then one attempt (the probe) tries it.
type deadDest struct {
	until   time.Time
	err     *failure.Error
	probing bool
}

// checkDead tells whether dest is left alone for now, with the error its
// mail is deferred with. Once the time is up, one caller gets probe=true
// and tries the destination; the others stay deferred until it reports
// (noteDest), and must call endProbe when done.
func (d *Deliverer) checkDead(dest string, now time.Time) (suspended *failure.Error, probe bool) {
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
func (d *Deliverer) noteDest(dest string, res []outbound.RcptResult, pol *policy.Delivery) {
	if len(res) == 0 {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if !res[0].PassedOver {
		if d.dead[dest] != nil {
			delete(d.dead, dest)
			d.metrics.destinationsDown.Set(float64(len(d.dead)))
			d.log.Info("destination back", zap.String("destination", dest))
		}
		return
	}
	e := *res[0].Err
	if e.Reason != failure.Suspended {
		e.Text = "delivery temporarily suspended: " + e.Text
		e.Reason = failure.Suspended
	}
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
	d.metrics.destinationsDown.Set(float64(len(d.dead)))
}
