package deliverer

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

// Delivery status notifications (RFC 3464) are built here and nowhere else.
// A notification is itself mail: the caller queues what Build returns with a
// null reverse path, so a notification about a notification cannot loop.
//
// Encoding choices, so the result travels through any relay:
//   - the human-readable part is 7bit when it is ASCII and quoted-printable
//     (charset utf-8) when it is not, so it is always 7-bit clean;
//   - the message/delivery-status part is always 7-bit: a non-ASCII address
//     is reported with address type "utf-8" in the \x{HHHH} form RFC 6533
//     defines for message/delivery-status;
//   - the returned original (or its headers) is included verbatim, marked
//     8bit when it has 8-bit octets. A FULL original that is over
//     MaxReturnedBody or not line-safe for SMTP (bare CR or LF, a line over
//     998 octets) is returned as headers only, and the text says so.
//
// The message headers are ASCII except To when the original sender's
// address is itself non-ASCII, in which case the notification needs
// SMTPUTF8 to reach it anyway.

// DSNAction is the Action field of a per-recipient DSN block (RFC 3464 §2.3.3).
type DSNAction string

// Actions a DSN can report (RFC 3464 §2.3.3). Expanded is not used: jetmail
// does not expand lists.
const (
	ActionFailed    DSNAction = "failed"
	ActionDelayed   DSNAction = "delayed"
	ActionDelivered DSNAction = "delivered"
	ActionRelayed   DSNAction = "relayed"
)

// MaxReturnedBody is the largest original returned whole for RET=FULL;
// a larger one is returned as headers only.
const MaxReturnedBody = 10 << 20

// dsnMaxLine is the SMTP line limit without CRLF (RFC 5321 §4.5.3.1.6).
const dsnMaxLine = 998

// dsnFoldAt is the preferred line length (RFC 5322 §2.1.1 "SHOULD be no more
// than 78").
const dsnFoldAt = 78

// Errors from Build the caller handles by logging and dropping the notice.
var (
	// ErrDSNNullSender means the original had a null reverse path: it was
	// itself a notification, and bouncing it could loop (RFC 3461 §6.2).
	ErrDSNNullSender = errors.New("original sender is the null path")
	// ErrDSNNothingToReport means no recipient is left that asked for this
	// kind of notice.
	ErrDSNNothingToReport = errors.New("no recipient to report on")
)

// DSNRecipient reports on one recipient.
type DSNRecipient struct {
	// Rcpt is the recipient as queued: address, NOTIFY and ORCPT.
	Rcpt spool.Rcpt
	// Action is what happened to the recipient.
	Action DSNAction
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

// DSN is a notification about one queued message.
type DSN struct {
	// ReportingMTA is our host name: it names us in Reporting-MTA, From and
	// Message-ID.
	ReportingMTA string
	// Envelope is the original message's envelope.
	Envelope *spool.Envelope
	// Original is the original message as stored (headers and body, CRLF).
	// It may be nil when the body could not be read; the notice then says so.
	Original []byte
	// Recipients are the recipients to report on, in the order to list them.
	// Build leaves out those that did not ask for their Action (WantsNotice).
	Recipients []DSNRecipient
	// Now is the notice's Date; zero means time.Now().
	Now time.Time
}

// WantsNotice reports whether rcpt asked to be told about action (RFC 3461
// §4.1): NOTIFY=NEVER means never; an explicit list means only those
// (FAILURE for failed, DELAY for delayed, SUCCESS for delivered and relayed);
// no NOTIFY means failed and delayed only.
func WantsNotice(rcpt spool.Rcpt, action DSNAction) bool {
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

func (a DSNAction) known() bool {
	switch a {
	case ActionFailed, ActionDelayed, ActionDelivered, ActionRelayed:
		return true
	}
	return false
}

// severity orders actions for the subject: the worst news leads.
func (a DSNAction) severity() int {
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
// ErrDSNNullSender if the original sender is the null path (never bounce a
// bounce), ErrDSNNothingToReport if no recipient is left, and another error
// for input it cannot render (no envelope, no or unusable ReportingMTA or
// sender, an unknown action).
func (d *DSN) Build() ([]byte, error) {
	env := d.Envelope
	if env == nil {
		return nil, errors.New("dsn: no envelope")
	}
	if env.From == "" {
		return nil, fmt.Errorf("dsn for %s: %w", env.QueueID, ErrDSNNullSender)
	}
	if strings.ContainsAny(env.From, "<>") || dsnHasControlOrSpace(env.From) {
		return nil, fmt.Errorf("dsn for %s: unusable sender %q", env.QueueID, env.From)
	}
	host := d.ReportingMTA
	if host == "" || strings.ContainsAny(host, "<>@") || dsnHasControlOrSpace(host) || !dsnIsASCII(host) {
		return nil, fmt.Errorf("dsn for %s: unusable reporting MTA %q", env.QueueID, host)
	}

	var rcpts []DSNRecipient
	worst := DSNAction("")
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
		return nil, fmt.Errorf("dsn for %s: %w", env.QueueID, ErrDSNNothingToReport)
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
	dsnWriteField(&msg, "From", "Mail Delivery System <MAILER-DAEMON@"+host+">")
	dsnWriteField(&msg, "To", "<"+env.From+">")
	dsnWriteField(&msg, "Subject", dsnSubject(worst))
	dsnWriteField(&msg, "Date", dsnDate(now))
	dsnWriteField(&msg, "Message-ID", "<"+rand.Text()+"@"+host+">")
	dsnWriteField(&msg, "MIME-Version", "1.0")
	// RFC 3834 §5: an automatic response, so vacation responders and the
	// like stay quiet.
	dsnWriteField(&msg, "Auto-Submitted", "auto-replied")
	dsnWriteField(&msg, "Content-Type", "multipart/report; report-type=delivery-status; boundary=\""+mw.Boundary()+"\"")
	if ret.eightBit {
		// A multipart's encoding must not claim less than its parts hold
		// (RFC 2045 §6.4).
		dsnWriteField(&msg, "Content-Transfer-Encoding", "8bit")
	}
	msg.WriteString("\r\n")
	msg.Write(body.Bytes())
	return msg.Bytes(), nil
}

func dsnSubject(worst DSNAction) string {
	switch worst {
	case ActionFailed:
		return "Undelivered Mail Returned to Sender"
	case ActionDelayed:
		return "Delayed Mail (still being retried)"
	}
	return "Successful Mail Delivery Report"
}

// dsnReturned is the third part: the original or its header section.
type dsnReturned struct {
	contentType string
	description string
	content     []byte
	eightBit    bool
	// note explains in the human part why less than asked was returned;
	// empty when nothing needs explaining.
	note string
	full bool
}

func (d *DSN) returned() dsnReturned {
	orig := d.Original
	if len(orig) == 0 {
		return dsnReturned{
			contentType: "text/rfc822-headers",
			description: "Undelivered message headers",
			note:        "The original message could not be read, so it is not included.",
		}
	}
	var note string
	if strings.EqualFold(d.Envelope.Mail.Ret, "FULL") {
		switch {
		case len(orig) > MaxReturnedBody:
			note = fmt.Sprintf("Your message was %d bytes, more than the %d MiB we return, so only its headers are included below.",
				len(orig), MaxReturnedBody>>20)
		case !dsnLineSafe(orig):
			note = "Your message could not be included unchanged, so only its headers are included below."
		default:
			return dsnReturned{
				contentType: "message/rfc822",
				description: "Undelivered message",
				content:     orig,
				eightBit:    dsnHas8Bit(orig),
				full:        true,
			}
		}
	}
	hdr := dsnMakeLineSafe(dsnHeaderSection(orig))
	return dsnReturned{
		contentType: "text/rfc822-headers",
		description: "Undelivered message headers",
		content:     hdr,
		eightBit:    dsnHas8Bit(hdr),
		note:        note,
	}
}

// statusFields renders the message/delivery-status body (RFC 3464 §2.2,
// §2.3): the per-message block, then one block per recipient, blocks
// separated by a blank line.
func (d *DSN) statusFields(host string, rcpts []DSNRecipient) []byte {
	env := d.Envelope
	var b bytes.Buffer
	dsnWriteField(&b, "Reporting-MTA", "dns; "+host)
	if env.Mail.EnvID != "" {
		dsnWriteField(&b, "Original-Envelope-Id", dsnClean(env.Mail.EnvID))
	}
	if env.QueueID != "" {
		dsnWriteField(&b, "X-Jetmail-Queue-ID", dsnClean(env.QueueID))
	}
	if !env.Received.IsZero() {
		dsnWriteField(&b, "Arrival-Date", dsnDate(env.Received))
	}
	for _, r := range rcpts {
		b.WriteString("\r\n")
		if r.Rcpt.ORcpt != "" {
			dsnWriteField(&b, "Original-Recipient", dsnOriginalRecipient(r.Rcpt.ORcpt))
		}
		dsnWriteField(&b, "Final-Recipient", dsnTypedAddress("rfc822", r.Rcpt.Addr, "; "))
		dsnWriteField(&b, "Action", string(r.Action))
		dsnWriteField(&b, "Status", dsnStatus(r.Status, r.Action))
		if r.RemoteMTA != "" {
			dsnWriteField(&b, "Remote-MTA", "dns; "+dsnClean(r.RemoteMTA))
		}
		if r.Diagnostic != "" {
			dsnWriteField(&b, "Diagnostic-Code", "smtp; "+dsnClean(r.Diagnostic))
		}
		if !r.LastAttempt.IsZero() {
			dsnWriteField(&b, "Last-Attempt-Date", dsnDate(r.LastAttempt))
		}
		if r.Action == ActionDelayed && !r.WillRetryUntil.IsZero() {
			dsnWriteField(&b, "Will-Retry-Until", dsnDate(r.WillRetryUntil))
		}
	}
	return b.Bytes()
}

// dsnOriginalRecipient renders a stored ORCPT ("addr-type;address", already
// xtext-decoded) for Original-Recipient.
func dsnOriginalRecipient(orcpt string) string {
	typ, addr, ok := strings.Cut(orcpt, ";")
	if !ok {
		typ, addr = "rfc822", orcpt
	}
	typ = strings.TrimSpace(typ)
	if typ == "" || !dsnIsASCII(typ) || dsnHasControlOrSpace(typ) {
		typ = "rfc822"
	}
	return dsnTypedAddress(typ, strings.TrimSpace(addr), ";")
}

// dsnTypedAddress renders "type<sep>address" 7-bit clean: an ASCII address
// keeps its type, a non-ASCII one becomes type utf-8 in the
// utf-8-addr-xtext form (RFC 6533 §3).
func dsnTypedAddress(typ, addr, sep string) string {
	if dsnIsASCII(addr) {
		return typ + sep + dsnClean(addr)
	}
	return "utf-8" + sep + dsnUTF8AddrXtext(addr)
}

// dsnUTF8AddrXtext encodes addr as utf-8-addr-xtext (RFC 6533 §3): QCHARs
// as they are, everything else as \x{HHHH}.
func dsnUTF8AddrXtext(addr string) string {
	var b strings.Builder
	for _, r := range strings.ToValidUTF8(addr, "\uFFFD") {
		if r > 0x20 && r < 0x7f && r != '+' && r != '=' && r != '\\' {
			b.WriteRune(r)
			continue
		}
		fmt.Fprintf(&b, `\x{%02X}`, r)
	}
	return b.String()
}

// dsnClean makes a value safe for a 7-bit header field: line breaks, tabs
// and runs of spaces become one space, other control characters become '?',
// and non-ASCII characters are written as \x{HHHH} (the RFC 6533 escape) so
// nothing is lost.
func dsnClean(s string) string {
	var b strings.Builder
	space := false
	for _, r := range strings.ToValidUTF8(s, "\uFFFD") {
		switch {
		case r == ' ' || r == '\t' || r == '\r' || r == '\n':
			space = true
			continue
		case r < 0x20 || r == 0x7f:
			r = '?'
		}
		if space && b.Len() > 0 {
			b.WriteByte(' ')
		}
		space = false
		if r >= utf8.RuneSelf {
			fmt.Fprintf(&b, `\x{%02X}`, r)
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// dsnStatus returns status if it is an RFC 3463 code, else the generic code
// for the action.
func dsnStatus(status string, action DSNAction) string {
	if dsnValidStatus(status) {
		return status
	}
	switch action {
	case ActionFailed:
		return "5.0.0"
	case ActionDelayed:
		return "4.0.0"
	}
	return "2.0.0"
}

// dsnValidStatus checks class "." subject "." detail (RFC 3463 §2).
func dsnValidStatus(s string) bool {
	parts := strings.Split(s, ".")
	if len(parts) != 3 || len(parts[0]) != 1 || strings.IndexByte("245", parts[0][0]) < 0 {
		return false
	}
	for _, p := range parts[1:] {
		if len(p) < 1 || len(p) > 3 {
			return false
		}
		for i := 0; i < len(p); i++ {
			if p[i] < '0' || p[i] > '9' {
				return false
			}
		}
	}
	return true
}

// dsnDate formats t as an RFC 5322 date-time.
func dsnDate(t time.Time) string {
	return t.Format(time.RFC1123Z)
}

// dsnWriteField writes "Name: value" and CRLF, folding at spaces so lines
// stay within 78 octets where the value allows and within 998 always. A
// word too long for one line is split, which on unfolding reads as a space
// inside it: better than a line a relay would reject.
func dsnWriteField(b *bytes.Buffer, name, value string) {
	lineLen := len(name) + 1
	b.WriteString(name)
	b.WriteByte(':')
	first := true
	for _, word := range strings.Split(value, " ") {
		for len(word) > 0 {
			// A piece too long to share a line goes on a continuation line
			// of its own: SP plus at most 997 octets.
			maxWord := dsnMaxLine - 1
			if first {
				maxWord -= lineLen
			}
			piece := word
			if len(piece) > maxWord {
				cut := maxWord
				for cut > 0 && !utf8.RuneStart(piece[cut]) {
					cut--
				}
				piece = piece[:cut]
			}
			word = word[len(piece):]
			if !first && lineLen+1+len(piece) > dsnFoldAt {
				b.WriteString("\r\n")
				lineLen = 0
			}
			b.WriteByte(' ')
			b.WriteString(piece)
			lineLen += 1 + len(piece)
			first = false
		}
	}
	b.WriteString("\r\n")
}

// humanText renders the first part and returns it with its
// Content-Transfer-Encoding.
func (d *DSN) humanText(host string, rcpts []DSNRecipient, worst DSNAction, ret dsnReturned) ([]byte, string) {
	env := d.Envelope
	var t strings.Builder
	para := func(s string) {
		dsnWrap(&t, s, "", "")
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
		action DSNAction
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
			dsnWrap(&t, "<"+r.Rcpt.Addr+">", "  ", "  ")
			detail := func(label, value string) {
				dsnWrap(&t, label+": "+value, "    ", "      ")
			}
			detail("Status", dsnStatus(r.Status, r.Action))
			if r.RemoteMTA != "" {
				detail("Remote server", r.RemoteMTA)
			}
			if r.Diagnostic != "" {
				detail("Reply", r.Diagnostic)
			}
			if !r.LastAttempt.IsZero() {
				detail("Last attempt", dsnDate(r.LastAttempt))
			}
			if r.Action == ActionDelayed && !r.WillRetryUntil.IsZero() {
				detail("Will retry until", dsnDate(r.WillRetryUntil))
			}
			t.WriteString("\n")
		}
	}

	dsnWrap(&t, "Queue ID: "+env.QueueID, "", "  ")
	if !env.Received.IsZero() {
		dsnWrap(&t, "Arrived: "+dsnDate(env.Received), "", "  ")
	}
	dsnWrap(&t, "Sender: <"+env.From+">", "", "  ")
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
	if dsnIsASCII(text) {
		return []byte(strings.ReplaceAll(text, "\n", "\r\n")), "7bit"
	}
	var qp bytes.Buffer
	w := quotedprintable.NewWriter(&qp)
	w.Write([]byte(text))
	w.Close()
	return qp.Bytes(), "quoted-printable"
}

// dsnWrap writes s as lines of at most dsnFoldAt-2 characters, breaking at
// spaces, the first line prefixed by first and the rest by rest. Control
// characters in s become spaces; a word longer than a line is split.
func dsnWrap(t *strings.Builder, s, first, rest string) {
	const width = dsnFoldAt - 2
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
			if limit := dsnMaxLine/4 - len(prefix); len(line) == 0 && n > limit {
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

// dsnHeaderSection returns msg up to, not including, the empty line that
// ends its header section; all of msg if it has none.
func dsnHeaderSection(msg []byte) []byte {
	for off := 0; off < len(msg); {
		nl := bytes.IndexByte(msg[off:], '\n')
		if nl < 0 {
			return msg
		}
		line := msg[off : off+nl]
		if len(line) == 0 || (len(line) == 1 && line[0] == '\r') {
			return msg[:off]
		}
		off += nl + 1
	}
	return msg
}

// dsnLineSafe reports whether msg can travel verbatim over SMTP: every CR
// and LF paired as CRLF, no NUL, no line over 998 octets.
func dsnLineSafe(msg []byte) bool {
	lineLen := 0
	for i, c := range msg {
		switch c {
		case '\r':
			if i+1 >= len(msg) || msg[i+1] != '\n' {
				return false
			}
		case '\n':
			if i == 0 || msg[i-1] != '\r' {
				return false
			}
			lineLen = 0
			continue
		case 0:
			return false
		default:
			lineLen++
			if lineLen > dsnMaxLine {
				return false
			}
		}
	}
	return true
}

// dsnMakeLineSafe returns msg with every line ending in CRLF, NULs dropped
// and over-long lines folded (a header line continues after CRLF SP).
func dsnMakeLineSafe(msg []byte) []byte {
	if len(msg) == 0 {
		return nil
	}
	if dsnLineSafe(msg) && bytes.HasSuffix(msg, []byte("\r\n")) {
		return msg
	}
	const chunk = dsnMaxLine - 8
	var b bytes.Buffer
	lines := bytes.Split(bytes.ReplaceAll(bytes.ReplaceAll(msg, []byte("\r\n"), []byte("\n")), []byte("\r"), []byte("\n")), []byte("\n"))
	if len(lines[len(lines)-1]) == 0 {
		lines = lines[:len(lines)-1]
	}
	for _, line := range lines {
		line = bytes.ReplaceAll(line, []byte{0}, nil)
		for len(line) > chunk {
			cut := chunk
			for cut > 0 && !utf8.RuneStart(line[cut]) {
				cut--
			}
			b.Write(line[:cut])
			b.WriteString("\r\n ")
			line = line[cut:]
		}
		b.Write(line)
		b.WriteString("\r\n")
	}
	return b.Bytes()
}

func dsnIsASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			return false
		}
	}
	return true
}

func dsnHas8Bit(b []byte) bool {
	for _, c := range b {
		if c >= utf8.RuneSelf {
			return true
		}
	}
	return false
}

func dsnHasControlOrSpace(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] == 0x7f {
			return true
		}
	}
	return false
}
