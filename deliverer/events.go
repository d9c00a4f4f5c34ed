package deliverer

import (
	"github.com/jetmail/jetmail/deliverer/outbound"
	"github.com/jetmail/jetmail/events"
	"github.com/jetmail/jetmail/spool"
)

// resultEvent records one recipient's result of an attempt in the event
// log (Config.Events): delivered, deferred, bounced, or expired when the
// queue lifetime ran out. The log batches them: no write per result.
func (a *attempt) resultEvent(r spool.Rcpt, res outbound.RcptResult, rs *spool.RcptState) {
	if a.d.cfg.Events == nil {
		return
	}
	env := &a.m.Envelope
	ev := events.Event{QueueID: env.QueueID, From: events.Sender(env.From), Rcpt: r.Addr, Domain: events.DomainOf(r.Addr),
		Size: env.Body.Size, Delay: a.d.cfg.Now().Sub(env.Received), Attempt: rs.Attempts, Relay: res.Hop.Host,
		Code: rs.Code, Enhanced: rs.Enhanced, Reply: rs.Text}
	switch {
	case rs.Status == spool.RcptDelivered:
		ev.Kind = events.Delivered
	case rs.Status == spool.RcptDeferred:
		ev.Kind = events.Deferred
	case a.expiring:
		ev.Kind = events.Expired
	default:
		ev.Kind = events.Bounced
	}
	if ev.Relay == "" {
		ev.Relay = rs.RemoteMTA
	}
	a.d.cfg.Events.Emit(ev)
}
