package deliverer

import (
	"context"
	"fmt"

	"go.uber.org/zap"

	"github.com/jetmail/jetmail/deliverer/dsn"
	"github.com/jetmail/jetmail/events"
	"github.com/jetmail/jetmail/spool"
)

// failedReport is the notice entry for a failed recipient: this
// attempt's report, or one rebuilt from the state when it failed in an
// earlier attempt.
func (a *attempt) failedReport(rs spool.RcptState) dsn.Recipient {
	for _, r := range a.reports {
		if r.Rcpt.Addr == rs.Addr && r.Action == dsn.ActionFailed {
			return r
		}
	}
	rcpt := spool.Rcpt{Addr: rs.Addr}
	for _, r := range a.m.Envelope.Rcpts {
		if r.Addr == rs.Addr {
			rcpt = r
		}
	}
	r := dsn.Recipient{Rcpt: rcpt, Action: dsn.ActionFailed, Status: rs.Enhanced, RemoteMTA: rs.RemoteMTA, LastAttempt: rs.LastAttempt}
	if rs.Code != 0 {
		r.Diagnostic = fmt.Sprintf("%d %s %s", rs.Code, rs.Enhanced, rs.Text)
	}
	return r
}

// maxNoticeHead bounds what is read of a message for a notice that returns
// its headers only: a header section longer than this is cut there.
const maxNoticeHead = 1 << 20

// notify queues a DSN about rcpts to the sender (or, for a message with a
// null sender, to the postmaster if one is configured; a bounce is never
// bounced).
func (a *attempt) notify(ctx context.Context, rcpts []dsn.Recipient, kind string) error {
	var wanted []dsn.Recipient
	for _, r := range rcpts {
		if dsn.WantsNotice(r.Rcpt, r.Action) {
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
	// Only a notice that returns the whole message reads it whole; the
	// others need its headers, the first piece of a large body.
	var original []byte
	var err error
	if dsn.ReturnsWhole(&env) {
		original, err = a.d.cfg.Spool.ReadBody(ctx, a.m)
	} else {
		original, err = a.d.cfg.Spool.ReadHead(ctx, a.m, maxNoticeHead)
	}
	if err != nil {
		return err
	}
	report := &dsn.Report{ReportingMTA: a.d.cfg.Hostname, Envelope: &env, Original: original, OriginalSize: env.Body.Size,
		Recipients: wanted, Now: a.d.cfg.Now()}
	body, err := report.Build()
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
	a.d.metrics.notifications.WithLabelValues(kind).Inc()
	if !res.Duplicate {
		a.d.cfg.Events.Emit(events.Event{Kind: events.DSN, QueueID: res.QueueID, Orig: env.QueueID, Notice: kind,
			From: "<>", Rcpt: to, Domain: events.DomainOf(to), Rcpts: len(wanted), Size: benv.Body.Size})
	}
	a.log.Info("notification queued", zap.String("kind", kind), zap.String("dsn_queue_id", res.QueueID), zap.String("to", to), zap.Bool("duplicate", res.Duplicate))
	return nil
}
