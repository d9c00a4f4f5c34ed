package dsn

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"mime/multipart"
	"mime/quotedprintable"
	"net/textproto"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jetmail/jetmail/spool"
)

// Action is the Action field of a per-recipient DSN block (RFC 3464 §2.3.3).
type Action string

// Actions a DSN can report (RFC 3464 §2.3.3). Expanded is not used: jetmail
// does not expand lists.
const (
	ActionFailed    Action = "failed"
	ActionDelayed   Action = "delayed"
	ActionDelivered Action = "delivered"
	ActionRelayed   Action = "relayed"
)

// MaxReturnedBody is the largest original returned whole for RET=FULL;
// a larger one is returned as headers only.
const MaxReturnedBody = 10 << 20

// maxLine is the SMTP line limit without CRLF (RFC 5321 §4.5.3.1.6).
const maxLine = 998

// foldAt is the preferred line length (RFC 5322 §2.1.1 "SHOULD be no more
// than 78").
const foldAt = 78

// Errors from Build the caller handles by logging and dropping the notice.
var (
	// ErrNullSender means the original had a null reverse path: it was
	// itself a notification, and bouncing it could loop (RFC 3461 §6.2).
	ErrNullSender = errors.New("original sender is the null path")
	// ErrNothingToReport means no recipient is left that asked for this
	// kind of notice.
	ErrNothingToReport = errors.New("no recipient to report on")
)

// Recipient reports on one recipient.
type Recipient struct {
	// Rcpt is the recipient as queued: address, NOTIFY and ORCPT.
	Rcpt spool.Rcpt
	// Action is what happened to the recipient.
	Action Action
	// Status is the RFC 3463 code, e.g. "5.1.1". Empty or malformed is
	// reported as the generic code for Action (5.0.0, 4.0.0 or 2.0.0).
	Status string
	// RemoteMTA is the host name of the remote MTA that answered, "" if none.
	RemoteMTA string
	// Diagnostic is the remote's reply, e.g. "550 5.1.1 user unknown", ""
	// if none. It is reported as "smtp; <text>".
	Diagnostic string
	// LastAttempt is when delivery was last tried, zero if never.
	LastAttempt time.Time
	// WillRetryUntil is when a delayed recipient will be given up on; it is
	// reported for ActionDelayed only, and only if not zero.
	WillRetryUntil time.Time
}

// Report is a notification about one queued message.
type Report struct {
	// ReportingMTA is our host name: it names us in Reporting-MTA, From and
	// Message-ID.
	ReportingMTA string
	// Envelope is the original message's envelope.
	Envelope *spool.Envelope
	// Original is the original message as stored (headers and body, CRLF),
	// or, when the notice does not return it whole (ReturnsWhole), at
	// least its header section. It may be nil when the body could not be
	// read; the notice then says so.
	Original []byte
	// OriginalSize is the size of the whole original; 0 means
	// len(Original).
	OriginalSize int64
	// Recipients are the recipients to report on, in the order to list them.
	// Build leaves out those that did not ask for their Action (WantsNotice).
	Recipients []Recipient
	// Now is the notice's Date; zero means time.Now().
	Now time.Time
}

// ReturnsWhole reports whether a notice about env returns the original
// message whole: its sender asked for it (RET=FULL) and it is no larger than
// MaxReturnedBody. Otherwise the notice needs only its header section.
func ReturnsWhole(env *spool.Envelope) bool {
	return strings.EqualFold(env.Mail.Ret, "FULL") && env.Body.Size <= MaxReturnedBody
}

// WantsNotice reports whether rcpt asked to be told about action (RFC 3461
// §4.1): NOTIFY=NEVER means never; an explicit list means only those
// (FAILURE for failed, DELAY for delayed, SUCCESS for delivered and relayed);
// no NOTIFY means failed and delayed only.
func WantsNotice(rcpt spool.Rcpt, action Action) bool {
	var want string
	switch action {
	case ActionFailed:
		want = "FAILURE"
	case ActionDelayed:
		want = "DELAY"
	case ActionDelivered, ActionRelayed:
		want = "SUCCESS"
	default:
		return false
	}
	given, found := false, false
	for _, list := range rcpt.Notify {
		// Tolerate "SUCCESS,FAILURE" stored as one item.
		for _, n := range strings.Split(list, ",") {
			n = strings.TrimSpace(n)
			if n == "" {
				continue
			}
			given = true
			if strings.EqualFold(n, "NEVER") {
				// NEVER with anything else is a syntax error (RFC 3461
				// §4.1); the safe reading is the one that sends nothing.
				return false
			}
			if strings.EqualFold(n, want) {
				found = true
			}
		}
	}
	if !given {
		return action == ActionFailed || action == ActionDelayed
	}
	return found
}

func (a Action) known() bool {
	switch a {
	case ActionFailed, ActionDelayed, ActionDelivered, ActionRelayed:
		return true
	}
	return false
}

// severity orders actions for the subject: the worst news leads.
func (a Action) severity() int {
	switch a {
	case ActionFailed:
		return 3
	case ActionDelayed:
		return 2
	}
	return 1
}

// Build renders the notification as an RFC 5322 message with CRLF line
// endings, ready to queue with a null reverse path to d.Envelope.From.
// Recipients that did not ask for their action are left out. It returns
// ErrNullSender if the original sender is the null path (never bounce a
// bounce), ErrNothingToReport if no recipient is left, and another error
// for input it cannot render (no envelope, no or unusable ReportingMTA or
// sender, an unknown action).
func (d *Report) Build() ([]byte, error) {
	env := d.Envelope
	if env == nil {
		return nil, errors.New("dsn: no envelope")
	}
	if env.From == "" {
		return nil, fmt.Errorf("dsn for %s: %w", env.QueueID, ErrNullSender)
	}
	if strings.ContainsAny(env.From, "<>") || hasControlOrSpace(env.From) {
		return nil, fmt.Errorf("dsn for %s: unusable sender %q", env.QueueID, env.From)
	}
	host := d.ReportingMTA
	if host == "" || strings.ContainsAny(host, "<>@") || hasControlOrSpace(host) || !isASCII(host) {
		return nil, fmt.Errorf("dsn for %s: unusable reporting MTA %q", env.QueueID, host)
	}

	var rcpts []Recipient
	worst := Action("")
	for _, r := range d.Recipients {
		if !r.Action.known() {
			return nil, fmt.Errorf("dsn for %s: recipient %s: unknown action %q", env.QueueID, r.Rcpt.Addr, r.Action)
		}
		if !WantsNotice(r.Rcpt, r.Action) {
			continue
		}
		rcpts = append(rcpts, r)
		if worst == "" || r.Action.severity() > worst.severity() {
			worst = r.Action
		}
	}
	if len(rcpts) == 0 {
		return nil, fmt.Errorf("dsn for %s: %w", env.QueueID, ErrNothingToReport)
	}

	now := d.Now
	if now.IsZero() {
		now = time.Now()
	}
	ret := d.returned()

	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	// A preamble for readers that do not speak MIME; the CRLF before the
	// first boundary belongs to the delimiter.
	body.WriteString("This is a MIME-formatted delivery status notification.\r\n")

	text, textCTE := d.humanText(host, rcpts, worst, ret)
	pw, err := mw.CreatePart(textproto.MIMEHeader{
		"Content-Type":              {"text/plain; charset=utf-8"},
		"Content-Transfer-Encoding": {textCTE},
		"Content-Description":       {"Notification"},
	})
	if err != nil {
		return nil, err
	}
	pw.Write(text)

	pw, err = mw.CreatePart(textproto.MIMEHeader{
		"Content-Type":        {"message/delivery-status"},
		"Content-Description": {"Delivery report"},
	})
	if err != nil {
		return nil, err
	}
	pw.Write(d.statusFields(host, rcpts))

	retCTE := "7bit"
	if ret.eightBit {
		retCTE = "8bit"
	}
	pw, err = mw.CreatePart(textproto.MIMEHeader{
		"Content-Type":              {ret.contentType},
		"Content-Transfer-Encoding": {retCTE},
		"Content-Description":       {ret.description},
	})
	if err != nil {
		return nil, err
	}
	pw.Write(ret.content)
	if err := mw.Close(); err != nil {
		return nil, err
	}

	var msg bytes.Buffer
	msg.Grow(body.Len() + 1024)
	writeField(&msg, "From", "Mail Delivery System <MAILER-DAEMON@"+host+">")
	writeField(&msg, "To", "<"+env.From+">")
	writeField(&msg, "Subject", subjectFor(worst))
	writeField(&msg, "Date", formatDate(now))
	writeField(&msg, "Message-ID", "<"+rand.Text()+"@"+host+">")
	writeField(&msg, "MIME-Version", "1.0")
	// RFC 3834 §5: an automatic response, so vacation responders and the
	// like stay quiet.
	writeField(&msg, "Auto-Submitted", "auto-replied")
	writeField(&msg, "Content-Type", "multipart/report; report-type=delivery-status; boundary=\""+mw.Boundary()+"\"")
	if ret.eightBit {
		// A multipart's encoding must not claim less than its parts hold
		// (RFC 2045 §6.4).
		writeField(&msg, "Content-Transfer-Encoding", "8bit")
	}
	msg.WriteString("\r\n")
	msg.Write(body.Bytes())
	return msg.Bytes(), nil
}

func subjectFor(worst Action) string {
	switch worst {
	case ActionFailed:
		return "Undelivered Mail Returned to Sender"
	case ActionDelayed:
		return "Delayed Mail (still being retried)"
	}
	return "Successful Mail Delivery Report"
}

// returnedPart is the third part: the original or its header section.
type returnedPart struct {
	contentType string
	description string
	content     []byte
	eightBit    bool
	// note explains in the human part why less than asked was returned;
	// empty when nothing needs explaining.
	note string
	full bool
}

func (d *Report) returned() returnedPart {
	orig := d.Original
	if len(orig) == 0 {
		return returnedPart{
			contentType: "text/rfc822-headers",
			description: "Undelivered message headers",
			note:        "The original message could not be read, so it is not included.",
		}
	}
	size := max(int64(len(orig)), d.OriginalSize)
	var note string
	if strings.EqualFold(d.Envelope.Mail.Ret, "FULL") {
		switch {
		case size > MaxReturnedBody:
			note = fmt.Sprintf("Your message was %d bytes, more than the %d MiB we return, so only its headers are included below.",
				size, MaxReturnedBody>>20)
		case !lineSafe(orig):
			note = "Your message could not be included unchanged, so only its headers are included below."
		default:
			return returnedPart{
				contentType: "message/rfc822",
				description: "Undelivered message",
				content:     orig,
				eightBit:    has8Bit(orig),
				full:        true,
			}
		}
	}
	hdr := makeLineSafe(headerSection(orig))
	return returnedPart{
		contentType: "text/rfc822-headers",
		description: "Undelivered message headers",
		content:     hdr,
		eightBit:    has8Bit(hdr),
		note:        note,
	}
}

// statusFields renders the message/delivery-status body (RFC 3464 §2.2,
// §2.3): the per-message block, then one block per recipient, blocks
// separated by a blank line.
func (d *Report) statusFields(host string, rcpts []Recipient) []byte {
	env := d.Envelope
	var b bytes.Buffer
	writeField(&b, "Reporting-MTA", "dns; "+host)
	if env.Mail.EnvID != "" {
		writeField(&b, "Original-Envelope-Id", cleanText(env.Mail.EnvID))
	}
	if env.QueueID != "" {
		writeField(&b, "X-Jetmail-Queue-ID", cleanText(env.QueueID))
	}
	if !env.Received.IsZero() {
		writeField(&b, "Arrival-Date", formatDate(env.Received))
	}
	for _, r := range rcpts {
		b.WriteString("\r\n")
		if r.Rcpt.ORcpt != "" {
			writeField(&b, "Original-Recipient", originalRecipient(r.Rcpt.ORcpt))
		}
		writeField(&b, "Final-Recipient", typedAddress("rfc822", r.Rcpt.Addr, "; "))
		writeField(&b, "Action", string(r.Action))
		writeField(&b, "Status", statusCode(r.Status, r.Action))
		if r.RemoteMTA != "" {
			writeField(&b, "Remote-MTA", "dns; "+cleanText(r.RemoteMTA))
		}
		if r.Diagnostic != "" {
			writeField(&b, "Diagnostic-Code", "smtp; "+cleanText(r.Diagnostic))
		}
		if !r.LastAttempt.IsZero() {
			writeField(&b, "Last-Attempt-Date", formatDate(r.LastAttempt))
		}
		if r.Action == ActionDelayed && !r.WillRetryUntil.IsZero() {
			writeField(&b, "Will-Retry-Until", formatDate(r.WillRetryUntil))
		}
	}
	return b.Bytes()
}

// humanText renders the first part and returns it with its
// Content-Transfer-Encoding.
func (d *Report) humanText(host string, rcpts []Recipient, worst Action, ret returnedPart) ([]byte, string) {
	env := d.Envelope
	var t strings.Builder
	para := func(s string) {
		wrapText(&t, s, "", "")
		t.WriteString("\n")
	}
	para("This is the mail delivery system at " + host + ".")
	switch worst {
	case ActionFailed:
		para("Your message could not be delivered to one or more of its recipients.")
	case ActionDelayed:
		para("Your message has not yet been delivered to one or more of its recipients. Delivery is still being retried; you do not need to send it again.")
	default:
		para("This is a report on the delivery of your message, which you asked for.")
	}

	sections := []struct {
		action Action
		intro  string
	}{
		{ActionFailed, "Delivery to these recipients failed permanently; it will not be retried:"},
		{ActionDelayed, "Delivery to these recipients is delayed; it will be retried until the time shown, and you will be told if it finally fails:"},
		{ActionDelivered, "Your message was delivered to these recipients:"},
		{ActionRelayed, "Your message was passed on to these recipients' mail systems, which may not send further reports:"},
	}
	for _, s := range sections {
		started := false
		for _, r := range rcpts {
			if r.Action != s.action {
				continue
			}
			if !started {
				para(s.intro)
				started = true
			}
			wrapText(&t, "<"+r.Rcpt.Addr+">", "  ", "  ")
			detail := func(label, value string) {
				wrapText(&t, label+": "+value, "    ", "      ")
			}
			detail("Status", statusCode(r.Status, r.Action))
			if r.RemoteMTA != "" {
				detail("Remote server", r.RemoteMTA)
			}
			if r.Diagnostic != "" {
				detail("Reply", r.Diagnostic)
			}
			if !r.LastAttempt.IsZero() {
				detail("Last attempt", formatDate(r.LastAttempt))
			}
			if r.Action == ActionDelayed && !r.WillRetryUntil.IsZero() {
				detail("Will retry until", formatDate(r.WillRetryUntil))
			}
			t.WriteString("\n")
		}
	}

	wrapText(&t, "Queue ID: "+env.QueueID, "", "  ")
	if !env.Received.IsZero() {
		wrapText(&t, "Arrived: "+formatDate(env.Received), "", "  ")
	}
	wrapText(&t, "Sender: <"+env.From+">", "", "  ")
	t.WriteString("\n")
	if ret.note != "" {
		para(ret.note)
	} else if ret.full {
		para("Your message is included below.")
	} else {
		para("The headers of your message are included below.")
	}

	// One CRLF ends the text; the delimiter brings its own.
	text := strings.ToValidUTF8(strings.TrimSuffix(t.String(), "\n"), "\uFFFD")
	if isASCII(text) {
		return []byte(strings.ReplaceAll(text, "\n", "\r\n")), "7bit"
	}
	var qp bytes.Buffer
	w := quotedprintable.NewWriter(&qp)
	w.Write([]byte(text))
	w.Close()
	return qp.Bytes(), "quoted-printable"
}

// wrapText writes s as lines of at most foldAt-2 characters, breaking at
// spaces, the first line prefixed by first and the rest by rest. Control
// characters in s become spaces; a word longer than a line is split.
func wrapText(t *strings.Builder, s, first, rest string) {
	const width = foldAt - 2
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	prefix := first
	line := []rune(nil)
	flush := func() {
		t.WriteString(prefix)
		t.WriteString(string(line))
		t.WriteString("\n")
		prefix = rest
		line = line[:0]
	}
	for _, word := range strings.Fields(s) {
		w := []rune(word)
		for len(w) > 0 {
			room := width - utf8.RuneCountInString(prefix)
			if len(line) > 0 && len(line)+1+len(w) > room {
				flush()
				room = width - utf8.RuneCountInString(prefix)
			}
			if len(line) > 0 {
				line = append(line, ' ')
			}
			// A word longer than a whole line (a long address or token)
			// stands on its own lines, split only where it must be.
			n := len(w)
			if limit := maxLine/4 - len(prefix); len(line) == 0 && n > limit {
				n = limit
			}
			line = append(line, w[:n]...)
			w = w[n:]
			if len(w) > 0 {
				flush()
			}
		}
	}
	if len(line) > 0 || prefix == first {
		flush()
	}
}
