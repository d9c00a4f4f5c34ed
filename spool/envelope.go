package spool

import (
	"crypto/sha256"
	"encoding/hex"
	"sort"
	"strings"
	"time"
)

// Envelope is everything jetmail knows about a queued mail besides its body:
// who sent it, from where, to whom, with which SMTP parameters, and where the
// body is.
type Envelope struct {
	// QueueID names the mail in replies, logs and queue tools.
	QueueID string `json:"queueId"`
	// Received is when the gateway accepted the mail.
	Received time.Time `json:"received"`
	// Gateway is the host name of the gateway that accepted the mail.
	Gateway string `json:"gateway,omitempty"`

	// ClientIP is the SMTP client's address (after PROXY protocol).
	ClientIP string `json:"clientIp"`
	// Helo is the name the client gave in HELO/EHLO.
	Helo string `json:"helo"`
	// TLS tells whether the session was encrypted.
	TLS bool `json:"tls,omitempty"`
	// AuthUser is the SMTP AUTH identity, empty when not authenticated.
	AuthUser string `json:"authUser,omitempty"`

	// From is the reverse path without angle brackets; empty for a bounce.
	From string `json:"from"`
	// Mail holds the MAIL FROM parameters.
	Mail MailParams `json:"mail"`
	// Rcpts are the recipients in the order given.
	Rcpts []Rcpt `json:"rcpts"`

	// Body says where the body is and how to check it.
	Body BodyRef `json:"body"`

	// Headers are header fields the deliverer sends in front of the stored
	// body, each ending in CRLF: the DKIM signatures made at acceptance.
	Headers string `json:"headers,omitempty"`
}

// MailParams are the ESMTP parameters of MAIL FROM that matter after
// acceptance.
type MailParams struct {
	// Size is the SIZE= the client declared (RFC 1870), 0 if none.
	Size int64 `json:"size,omitempty"`
	// Body is BODY= (7BIT, 8BITMIME or BINARYMIME), empty if none.
	Body string `json:"body,omitempty"`
	// SMTPUTF8 is set when the client asked for SMTPUTF8 (RFC 6531).
	SMTPUTF8 bool `json:"smtputf8,omitempty"`
	// Ret is the DSN RET= parameter (FULL or HDRS, RFC 3461).
	Ret string `json:"ret,omitempty"`
	// EnvID is the DSN ENVID= parameter, decoded.
	EnvID string `json:"envid,omitempty"`
}

// Rcpt is one recipient with its DSN parameters (RFC 3461).
type Rcpt struct {
	// Addr is the forward path without angle brackets.
	Addr string `json:"addr"`
	// Notify is NOTIFY= (NEVER, or some of SUCCESS, FAILURE, DELAY).
	Notify []string `json:"notify,omitempty"`
	// ORcpt is ORCPT= as addr-type;address, decoded.
	ORcpt string `json:"orcpt,omitempty"`
}

// BodyRef locates a body and carries its digest.
type BodyRef struct {
	// ID names the body's chunks (jetmail.body.<ID>.<n>) and is the
	// Nats-Msg-Id of the envelope: unique per transmission.
	ID string `json:"id"`
	// Size is the stored body size in octets (with our Received: header).
	Size int64 `json:"size"`
	// SHA256 is the hex digest of the stored body, checked on every read.
	SHA256 string `json:"sha256"`
	// Chunks is the number of chunks in JETMAIL_BODY; 0 means the body is
	// inline, in the same stored message as the envelope.
	Chunks int `json:"chunks,omitempty"`
}

// Fingerprint identifies a transmission for the duplicate guard: the
// envelope sender, the set of recipients (case-folded and sorted, so a client
// that reorders RCPT commands on retry still matches) and the digest of the
// message bytes exactly as the client sent them, before we add anything.
//
// Deliberately not part of it: the client IP and HELO (a retry may come from
// another address of the same cluster), the time, and the SMTP session. See
// the README ("What counts as a duplicate") for why the gateway only guards
// mail that carries a Message-ID.
func Fingerprint(from string, rcpts []string, clientBodySHA256 []byte) string {
	sorted := make([]string, len(rcpts))
	for i, r := range rcpts {
		sorted[i] = strings.ToLower(r)
	}
	sort.Strings(sorted)
	h := sha256.New()
	h.Write([]byte(strings.ToLower(from)))
	h.Write([]byte{0})
	for _, r := range sorted {
		h.Write([]byte(r))
		h.Write([]byte{0})
	}
	h.Write(clientBodySHA256)
	// 128 bits are plenty to tell transmissions apart and keep subjects short.
	return hex.EncodeToString(h.Sum(nil)[:16])
}
