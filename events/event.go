package events

import (
	"strings"
	"time"
)

// Kind says what happened.
type Kind string

// The kinds of events.
const (
	// Received: a message was queued by a gateway (QueueID, From, Rcpts,
	// Size, Client, Helo).
	Received Kind = "received"
	// Rejected: a gateway refused a connection, a command or a message
	// (Reason, Code, Enhanced, Reply; From and Rcpt when known).
	Rejected Kind = "rejected"
	// Duplicate: a retransmission was answered with the original's queue
	// ID (QueueID) instead of being queued again.
	Duplicate Kind = "duplicate"
	// Delivered: a recipient's delivery was accepted by the next hop
	// (Relay, Reply, Delay, Size).
	Delivered Kind = "delivered"
	// Deferred: a recipient's attempt failed temporarily; it will be tried
	// again (Relay, Code, Enhanced, Reply).
	Deferred Kind = "deferred"
	// Bounced: a recipient failed permanently.
	Bounced Kind = "bounced"
	// Expired: a recipient failed because the message's queue lifetime
	// ran out.
	Expired Kind = "expired"
	// DSN: a delivery status notification was queued (QueueID is the
	// notice's, Orig the message it reports on, Notice its kind: failed,
	// delayed or success; Rcpt its recipient).
	DSN Kind = "dsn"

	// Administrator actions (the queue tools).
	Held     Kind = "held"
	Released Kind = "released"
	Removed  Kind = "removed"
	Retried  Kind = "retried"
)

// Kinds lists every kind, in the order reports show them.
var Kinds = []Kind{Received, Rejected, Duplicate, Delivered, Deferred, Bounced, Expired, DSN, Held, Released, Removed, Retried}

// Reasons of rejections: a class, so that reports can add them up.
const (
	ReasonRelay       = "relay"        // relay access denied
	ReasonUnknownUser = "unknown-user" // no such recipient
	ReasonPolicy      = "policy"       // sender refused, mail loop, policy refusal
	ReasonSize        = "size"         // message too large
	ReasonLimit       = "limit"        // connection, recipient or rate limit, deadline
	ReasonSyntax      = "syntax"       // bad address, bad line endings, too long a line, bad sequence
	ReasonAuth        = "auth"         // failed or locked-out SMTP AUTH
	ReasonTempfail    = "tempfail"     // the queue could not store the message (451)
	ReasonShutdown    = "shutdown"     // the gateway was shutting down
)

// Event is one thing that happened. JSON field names are short, and empty
// fields are left out: a batch of a thousand events is small before it is
// even compressed.
type Event struct {
	Time time.Time `json:"t"`
	Kind Kind      `json:"k"`
	// Pod is the host name of the process that emitted the event.
	Pod     string `json:"pod,omitempty"`
	QueueID string `json:"q,omitempty"`
	// Orig is the queue ID of the message a notice reports on.
	Orig string `json:"orig,omitempty"`
	// From is the envelope sender; "<>" is the null reverse path.
	From string `json:"f,omitempty"`
	// Rcpt is the recipient of a per-recipient event; Domain is its
	// domain, lower case.
	Rcpt   string `json:"r,omitempty"`
	Domain string `json:"d,omitempty"`
	// Rcpts is the number of recipients of a received message.
	Rcpts int `json:"n,omitempty"`
	// Client is the SMTP client's address, Helo its EHLO/HELO name, User
	// its AUTH identity (or the administrator of an admin action).
	Client string `json:"ip,omitempty"`
	Helo   string `json:"helo,omitempty"`
	User   string `json:"u,omitempty"`
	// Size is the message size in octets.
	Size int64 `json:"sz,omitempty"`
	// Delay is the time from reception to this event (delivery results),
	// in nanoseconds.
	Delay time.Duration `json:"dl,omitempty"`
	// Attempt is the recipient's attempt number (delivery results).
	Attempt int `json:"a,omitempty"`
	// Relay is the next hop's host name.
	Relay string `json:"relay,omitempty"`
	// Code, Enhanced and Reply are the SMTP reply: ours for a rejection,
	// the remote's (or our diagnosis) for a delivery result.
	Code     int    `json:"c,omitempty"`
	Enhanced string `json:"e,omitempty"`
	Reply    string `json:"x,omitempty"`
	// Reason is the class of a rejection (the Reason constants).
	Reason string `json:"why,omitempty"`
	// Notice is the kind of a DSN: failed, delayed or success.
	Notice string `json:"dsn,omitempty"`
}

// Sender is e.From as reports show it: "<>" for the null reverse path.
func Sender(from string) string {
	if from == "" {
		return "<>"
	}
	return from
}

// DomainOf is the lower-case domain of addr.
func DomainOf(addr string) string {
	return strings.ToLower(addr[strings.LastIndexByte(addr, '@')+1:])
}

// Admin reports whether k is an administrator action.
func (k Kind) Admin() bool {
	switch k {
	case Held, Released, Removed, Retried:
		return true
	}
	return false
}

// maxText bounds the free-text fields of one event, so that no event can
// make a batch too large to publish.
const maxText = 512

func clip(s string) string {
	if len(s) > maxText {
		return s[:maxText]
	}
	return s
}

// clipped returns e with its free-text fields bounded.
func (e Event) clipped() Event {
	e.Reply, e.Helo, e.From, e.Rcpt = clip(e.Reply), clip(e.Helo), clip(e.From), clip(e.Rcpt)
	return e
}
