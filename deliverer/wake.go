package deliverer

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/jetmail/jetmail/spool"
)

// wakeQueue is the queue group of the deliverers on spool.WakeSubject: each
// woken message goes to one of them.
const wakeQueue = "jetmail-deliverer"

// wakeSlotWait is how long a deliverer waits for a free slot for a woken
// message before it answers busy (the waker then asks again).
const wakeSlotWait = 2 * time.Second

// wokenMsg is a parked message handed to this deliverer by the waker: its
// queue record as read from the stream, attempted as if the consumer had
// handed it out again. It is not in the consumer, so there is nothing to
// acknowledge: the attempt ends by parking it again or completing it, and
// what it could not do is left parked for the waker.
type wokenMsg struct {
	subject string
	hdr     nats.Header
	data    []byte
	md      jetstream.MsgMetadata
}

func (w *wokenMsg) Metadata() (*jetstream.MsgMetadata, error) { return &w.md, nil }
func (w *wokenMsg) Subject() string                           { return w.subject }
func (w *wokenMsg) Headers() nats.Header                      { return w.hdr }
func (w *wokenMsg) Data() []byte                              { return w.data }
func (w *wokenMsg) Ack() error                                { return nil }
func (w *wokenMsg) NakWithDelay(time.Duration) error          { return nil }
func (w *wokenMsg) InProgress() error                         { return nil }
func (w *wokenMsg) Term() error                               { return nil }

func isWoken(msg queueMsg) bool {
	_, ok := msg.(*wokenMsg)
	return ok
}

// serveWakes takes woken messages from the waker (whichever deliverer it
// runs in) until ctx ends, with at most MaxInFlight of them in attempts
// at once (beside as many from the consumer). Attempts run on work, like
// the consumer's, and are counted in wg. The returned stop ends the
// subscription; after it no attempt is added to wg, so Run calls it
// before it waits for wg.
func (d *Deliverer) serveWakes(ctx, work context.Context, wg *sync.WaitGroup) (stop func(), err error) {
	nc := d.cfg.Spool.JetStream().Conn()
	slots := make(chan struct{}, d.cfg.MaxInFlight)
	var (
		mu     sync.Mutex
		closed bool
	)
	sub, err := nc.QueueSubscribe(spool.WakeSubject, wakeQueue, func(req *nats.Msg) {
		mu.Lock()
		defer mu.Unlock()
		if closed {
			_ = req.Respond([]byte(spool.WakeBusy))
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			d.takeWoken(ctx, work, req, slots)
		}()
	})
	if err != nil {
		return nil, err
	}
	return func() {
		_ = sub.Unsubscribe()
		mu.Lock()
		closed = true
		mu.Unlock()
	}, nil
}

func (d *Deliverer) takeWoken(ctx, work context.Context, req *nats.Msg, slots chan struct{}) {
	answer := func(s string) { _ = req.Respond([]byte(s)) }
	var p spool.Park
	if err := json.Unmarshal(req.Data, &p); err != nil || p.Subject == "" {
		answer(spool.WakeChanged)
		return
	}
	t := time.NewTimer(wakeSlotWait)
	defer t.Stop()
	select {
	case slots <- struct{}{}:
	case <-t.C:
		answer(spool.WakeBusy)
		return
	case <-ctx.Done():
		answer(spool.WakeBusy)
		return
	}
	defer func() { <-slots }()
	rctx, cancel := context.WithTimeout(ctx, recordTry)
	hdr, data, stored, err := d.cfg.Spool.ParkedRecord(rctx, &p)
	cancel()
	switch {
	case errors.Is(err, spool.ErrChanged):
		answer(spool.WakeChanged)
		d.clearIfLeft(ctx, p.QueueID, p.Subject)
		return
	case err != nil:
		d.log.Warn("reading a woken message", zap.String("queue_id", p.QueueID), zap.Error(err))
		answer(spool.WakeBusy)
		return
	}
	answer(spool.WakeTaken)
	// Handed out again, as far as the attempt is concerned: it claims the
	// message first.
	d.handle(work, &wokenMsg{subject: p.Subject, hdr: hdr, data: data,
		md: jetstream.MsgMetadata{Sequence: jetstream.SequencePair{Stream: p.Seq}, NumDelivered: 2, Timestamp: stored}})
}

// clearIfLeft removes the delivery state of qid if its mail left the queue
// (spool.ClearIfLeft): the state of a message whose attempt was killed
// between completing it and removing its state.
func (d *Deliverer) clearIfLeft(ctx context.Context, qid, subject string) bool {
	return d.mend(ctx, qid, "the delivery state of mail that left the queue", func(c context.Context) (bool, error) {
		return d.cfg.Spool.ClearIfLeft(c, qid, subject)
	})
}

// clearHeldIfReleased removes the marker of held mail qid if the mail is
// not held any more (spool.ClearHeldIfReleased).
func (d *Deliverer) clearHeldIfReleased(ctx context.Context, qid string) bool {
	return d.mend(ctx, qid, "the marker of mail no longer held", func(c context.Context) (bool, error) {
		return d.cfg.Spool.ClearHeldIfReleased(c, qid)
	})
}

// mend runs remove, which removes what about qid (a record a process
// killed between two writes left behind) if it is stale, logs what it did,
// and says whether it removed it.
func (d *Deliverer) mend(ctx context.Context, qid, what string, remove func(context.Context) (bool, error)) bool {
	cctx, cancel := context.WithTimeout(ctx, recordTry)
	defer cancel()
	removed, err := remove(cctx)
	switch {
	case err != nil:
		d.log.Warn("removing "+what, zap.String("queue_id", qid), zap.Error(err))
	case removed:
		d.log.Info("removed "+what, zap.String("queue_id", qid))
	}
	return removed && err == nil
}
