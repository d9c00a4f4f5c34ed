package deliverer

import (
	"context"
	"math/rand/v2"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/jetmail/jetmail/spool"
)

// watchQueue exports the queue depth and the age of the oldest message.
func (d *Deliverer) watchQueue(ctx context.Context, cons jetstream.Consumer) {
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	for {
		if info, err := cons.Info(ctx); err == nil {
			d.metrics.queueMessages.Set(float64(info.NumPending + uint64(info.NumAckPending)))
			if info.NumAckPending+int(info.NumPending) == 0 {
				d.metrics.queueOldestAge.Set(0)
			} else if qid := d.oldest(ctx, info.AckFloor.Stream+1, info.Delivered.Stream); qid != "" {
				if ts, ok := spool.QueueIDTime(qid); ok {
					d.metrics.queueOldestAge.Set(d.cfg.Now().Sub(ts).Seconds())
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
