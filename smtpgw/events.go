package smtpgw

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/emersion/go-smtp"

	"github.com/jetmail/jetmail/events"
)

// Event log records of the gateway: one per queued message, duplicate
// suppressed and refusal, with the class of the refusal. The log batches
// them (package events): no write per message.

// Stages of a refusal, for its class.
const (
	stageConnect = "connect"
	stageMail    = "mail"
	stageRcpt    = "rcpt"
	stageData    = "data"
	stageAuth    = "auth"
)

// reasonOf classifies a refusal by where it happened and its reply.
func reasonOf(stage string, e *smtp.SMTPError) string {
	ec := e.EnhancedCode
	switch {
	case stage == stageAuth:
		return events.ReasonAuth
	case e.Code == 421 && ec == smtp.EnhancedCode{4, 3, 2}:
		return events.ReasonShutdown
	case ec[1] == 3 && ec[2] == 0:
		return events.ReasonTempfail
	case ec[1] == 7 && ec[2] == 1 && stage == stageRcpt:
		return events.ReasonRelay
	case ec[1] == 1 && ec[2] == 1:
		return events.ReasonUnknownUser
	case ec[1] == 3 && ec[2] == 4:
		return events.ReasonSize
	case ec[1] == 5 && ec[2] == 3, ec[1] == 7 && ec[2] == 0, e.Code == 421:
		return events.ReasonLimit
	case ec[1] == 7 && ec[2] == 8:
		return events.ReasonAuth
	case ec[1] == 1, ec[1] == 5, ec[1] == 6:
		return events.ReasonSyntax
	}
	return events.ReasonPolicy
}

// rejected records a refusal of this session's client.
func (s *session) rejected(stage, from, rcpt string, e *smtp.SMTPError) {
	if s.g.cfg.Events == nil {
		return
	}
	ev := s.event(events.Rejected)
	ev.From, ev.Rcpt = from, rcpt
	if rcpt != "" {
		ev.Domain = events.DomainOf(rcpt)
	}
	ev.Reason, ev.Code, ev.Reply = reasonOf(stage, e), e.Code, e.Message
	ev.Enhanced = enhanced(e.EnhancedCode)
	s.g.cfg.Events.Emit(ev)
}

// event is an event about this session's client.
func (s *session) event(k events.Kind) events.Event {
	return events.Event{Kind: k, Client: s.ip.String(), Helo: s.helo, User: s.authUser}
}

func enhanced(ec smtp.EnhancedCode) string {
	if ec == smtp.NoEnhancedCode || ec == (smtp.EnhancedCode{}) {
		return ""
	}
	return fmt.Sprintf("%d.%d.%d", ec[0], ec[1], ec[2])
}

// refused records a connection refused at admission.
func (g *Gateway) refused(ip netip.Addr, reason, enhanced, text string) {
	g.cfg.Events.Emit(events.Event{Kind: events.Rejected, Client: ip.String(), Reason: reason, Code: 421, Enhanced: enhanced, Reply: text})
}

// limitReply is the reply of the limit err says was hit.
func limitReply(err error) *smtp.SMTPError {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se
	}
	return errDataIdle
}

// transactionEvent records how a transaction that reached DATA ended:
// queued (received), a duplicate suppressed (qid is the original's), or
// refused. An abort (the client went away, or a limit, recorded where it
// was hit) records nothing here.
func (s *session) transactionEvent(qid string, n int64, result string, reply *smtp.SMTPError) {
	if s.g.cfg.Events == nil {
		return
	}
	switch result {
	case "queued", "duplicate":
		ev := s.event(events.Received)
		if result == "duplicate" {
			ev.Kind = events.Duplicate
		}
		ev.QueueID, ev.From, ev.Rcpts, ev.Size = qid, events.Sender(s.from), len(s.rcpts), n
		if len(s.rcpts) == 1 {
			ev.Rcpt, ev.Domain = s.rcpts[0].Addr, events.DomainOf(s.rcpts[0].Addr)
		}
		s.g.cfg.Events.Emit(ev)
	case "rejected", "tempfail":
		if reply != nil {
			s.rejected(stageData, events.Sender(s.from), "", reply)
		}
	}
}

// authRefused records a failed or refused AUTH as user.
func (s *session) authRefused(user string, code int, enhanced, text string) {
	ev := s.event(events.Rejected)
	ev.User, ev.Reason, ev.Code, ev.Enhanced, ev.Reply = user, events.ReasonAuth, code, enhanced, text
	s.g.cfg.Events.Emit(ev)
}
