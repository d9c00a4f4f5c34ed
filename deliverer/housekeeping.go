package deliverer

import (
	"context"
	"math/rand/v2"
	"time"

	"go.uber.org/zap"

	"github.com/jetmail/jetmail/spool"
)

// watchQueue exports the queue depth and the age of the oldest message,
// parked mail included (spool.QueueStats).
func (d *Deliverer) watchQueue(ctx context.Context) {
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	for {
		if st, err := d.cfg.Spool.Stats(ctx); err == nil {
			d.metrics.queueMessages.Set(float64(st.Messages()))
			age := 0.0
			if ts, ok := spool.QueueIDTime(st.Oldest); ok {
				age = max(0, d.cfg.Now().Sub(ts).Seconds())
			}
			d.metrics.queueOldestAge.Set(age)
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
