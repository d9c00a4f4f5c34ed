package dsn

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/mail"
	"net/textproto"
	"strings"
	"testing"
	"time"

	"github.com/jetmail/jetmail/internal/dsntest"
	"github.com/jetmail/jetmail/spool"
)

var (
	dsnTestReceived = time.Date(2025, 3, 4, 10, 11, 12, 0, time.FixedZone("", 3600))
	dsnTestAttempt  = time.Date(2025, 3, 4, 11, 0, 5, 0, time.UTC)
	dsnTestUntil    = time.Date(2025, 3, 9, 10, 11, 12, 0, time.UTC)
	dsnTestNow      = time.Date(2025, 3, 4, 11, 0, 6, 0, time.UTC)
)

const (
	dsnTestHeaders = "Received: from client.example.org (client.example.org [192.0.2.7])\r\n" +
		"\tby mx1.jetmail.test with ESMTPS id 01JNQX4ZQ7\r\n" +
		"From: Alice <alice@example.org>\r\n" +
		"To: Bob <bob@example.net>\r\n" +
		"Subject: quarterly figures\r\n" +
		"Message-ID: <figures-1@example.org>\r\n"
	dsnTestBodyText = "The secret body line that only RET=FULL may return."
	dsnTestOriginal = dsnTestHeaders + "\r\n" + dsnTestBodyText + "\r\n"
)

func dsnTestEnvelope(ret, envID string) *spool.Envelope {
	return &spool.Envelope{
		QueueID:  "01JNQX4ZQ7",
		Received: dsnTestReceived,
		From:     "alice@example.org",
		Mail:     spool.MailParams{Ret: ret, EnvID: envID},
	}
}

// wantBlock is the exact content of one status block: every field present
// with exactly this value, dates compared as instants, and nothing else.
type wantBlock struct {
	fields map[string]string
	dates  map[string]time.Time
}

func checkBlock(t *testing.T, name string, got textproto.MIMEHeader, want wantBlock) {
	t.Helper()
	seen := map[string]bool{}
	for k, v := range want.fields {
		k = textproto.CanonicalMIMEHeaderKey(k)
		seen[k] = true
		if g := got.Values(k); len(g) != 1 || g[0] != v {
			t.Errorf("%s: %s = %q, want %q", name, k, g, v)
		}
	}
	for k, v := range want.dates {
		k = textproto.CanonicalMIMEHeaderKey(k)
		seen[k] = true
		g := got.Values(k)
		if len(g) != 1 {
			t.Errorf("%s: %s = %q, want one date %v", name, k, g, v)
			continue
		}
		d, err := mail.ParseDate(g[0])
		if err != nil {
			t.Errorf("%s: %s = %q does not parse: %v", name, k, g[0], err)
		} else if !d.Equal(v) {
			t.Errorf("%s: %s = %v, want %v", name, k, d, v)
		}
	}
	for k := range got {
		if !seen[k] {
			t.Errorf("%s: unexpected field %s: %q", name, k, got[k])
		}
	}
}

func checkLines(t *testing.T, raw []byte) {
	t.Helper()
	if !bytes.HasSuffix(raw, []byte("\r\n")) {
		t.Errorf("message does not end in CRLF")
	}
	for i, line := range bytes.SplitAfter(raw, []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		if !bytes.HasSuffix(line, []byte("\r\n")) {
			t.Errorf("line %d does not end in CRLF: %.60q", i+1, line)
			continue
		}
		content := line[:len(line)-2]
		if bytes.ContainsRune(content, '\r') {
			t.Errorf("line %d has a bare CR: %.60q", i+1, line)
		}
		if len(content) > 998 {
			t.Errorf("line %d is %d octets, over 998: %.60q", i+1, len(content), line)
		}
	}
}

func TestDSNBuild(t *testing.T) {
	perMessage := func(envID string) wantBlock {
		w := wantBlock{
			fields: map[string]string{
				"Reporting-MTA":      "dns; mx1.jetmail.test",
				"X-Jetmail-Queue-ID": "01JNQX4ZQ7",
			},
			dates: map[string]time.Time{"Arrival-Date": dsnTestReceived},
		}
		if envID != "" {
			w.fields["Original-Envelope-Id"] = envID
		}
		return w
	}
	bobFailed := Recipient{
		Rcpt:        spool.Rcpt{Addr: "bob@example.net"},
		Action:      ActionFailed,
		Status:      "5.1.1",
		RemoteMTA:   "mx.example.net",
		Diagnostic:  "550 5.1.1 <bob@example.net>: user unknown",
		LastAttempt: dsnTestAttempt,
		// Set by mistake: Will-Retry-Until is for delayed recipients only.
		WillRetryUntil: dsnTestUntil,
	}
	bobFailedBlock := wantBlock{
		fields: map[string]string{
			"Final-Recipient": "rfc822; bob@example.net",
			"Action":          "failed",
			"Status":          "5.1.1",
			"Remote-MTA":      "dns; mx.example.net",
			"Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.net>: user unknown",
		},
		dates: map[string]time.Time{"Last-Attempt-Date": dsnTestAttempt},
	}
	carolDelayed := Recipient{
		Rcpt:           spool.Rcpt{Addr: "carol@example.com", Notify: []string{"DELAY", "FAILURE"}},
		Action:         ActionDelayed,
		Status:         "4.4.1",
		RemoteMTA:      "mx2.example.com",
		Diagnostic:     "451 4.4.1 try again later",
		LastAttempt:    dsnTestAttempt,
		WillRetryUntil: dsnTestUntil,
	}
	carolDelayedBlock := wantBlock{
		fields: map[string]string{
			"Final-Recipient": "rfc822; carol@example.com",
			"Action":          "delayed",
			"Status":          "4.4.1",
			"Remote-MTA":      "dns; mx2.example.com",
			"Diagnostic-Code": "smtp; 451 4.4.1 try again later",
		},
		dates: map[string]time.Time{"Last-Attempt-Date": dsnTestAttempt, "Will-Retry-Until": dsnTestUntil},
	}
	daveDelivered := Recipient{
		Rcpt:        spool.Rcpt{Addr: "dave@example.com", Notify: []string{"SUCCESS"}},
		Action:      ActionDelivered,
		Status:      "2.0.0",
		RemoteMTA:   "mx.example.com",
		Diagnostic:  "250 2.0.0 Ok: queued as 4Bx",
		LastAttempt: dsnTestAttempt,
	}
	daveDeliveredBlock := wantBlock{
		fields: map[string]string{
			"Final-Recipient": "rfc822; dave@example.com",
			"Action":          "delivered",
			"Status":          "2.0.0",
			"Remote-MTA":      "dns; mx.example.com",
			"Diagnostic-Code": "smtp; 250 2.0.0 Ok: queued as 4Bx",
		},
		dates: map[string]time.Time{"Last-Attempt-Date": dsnTestAttempt},
	}

	tests := map[string]struct {
		ret, envID  string
		original    string
		rcpts       []Recipient
		subject     string
		perMessage  wantBlock
		blocks      []wantBlock
		returnType  string
		returnsBody bool
		textHas     []string
		textCTE     string
	}{
		"a failed recipient with RET=HDRS gets a bounce with only the original headers": {
			ret: "HDRS", original: dsnTestOriginal,
			rcpts:      []Recipient{bobFailed},
			subject:    "Undelivered Mail Returned to Sender",
			perMessage: perMessage(""),
			blocks:     []wantBlock{bobFailedBlock},
			returnType: "text/rfc822-headers",
			textHas:    []string{"01JNQX4ZQ7", "<bob@example.net>", "550 5.1.1 <bob@example.net>: user unknown", "mx.example.net"},
			textCTE:    "7bit",
		},
		"a failed recipient without RET gets a bounce with only the original headers": {
			original:   dsnTestOriginal,
			rcpts:      []Recipient{bobFailed},
			subject:    "Undelivered Mail Returned to Sender",
			perMessage: perMessage(""),
			blocks:     []wantBlock{bobFailedBlock},
			returnType: "text/rfc822-headers",
			textHas:    []string{"01JNQX4ZQ7", "<bob@example.net>", "headers of your message"},
			textCTE:    "7bit",
		},
		"a failed recipient with RET=FULL gets the whole original back": {
			ret: "FULL", original: dsnTestOriginal,
			rcpts:       []Recipient{bobFailed},
			subject:     "Undelivered Mail Returned to Sender",
			perMessage:  perMessage(""),
			blocks:      []wantBlock{bobFailedBlock},
			returnType:  "message/rfc822",
			returnsBody: true,
			textHas:     []string{"Your message is included below"},
			textCTE:     "7bit",
		},
		"a delayed recipient gets a delay warning with Will-Retry-Until": {
			original:   dsnTestOriginal,
			rcpts:      []Recipient{carolDelayed},
			subject:    "Delayed Mail (still being retried)",
			perMessage: perMessage(""),
			blocks:     []wantBlock{carolDelayedBlock},
			returnType: "text/rfc822-headers",
			textHas:    []string{"<carol@example.com>", "451 4.4.1 try again later", "Will retry until: " + formatDate(dsnTestUntil)},
			textCTE:    "7bit",
		},
		"a recipient who asked for SUCCESS gets a success report": {
			ret: "FULL", original: dsnTestOriginal,
			rcpts:       []Recipient{daveDelivered},
			subject:     "Successful Mail Delivery Report",
			perMessage:  perMessage(""),
			blocks:      []wantBlock{daveDeliveredBlock},
			returnType:  "message/rfc822",
			returnsBody: true,
			textHas:     []string{"<dave@example.com>", "delivered to these recipients"},
			textCTE:     "7bit",
		},
		"mixed failed, delayed and delivered recipients are titled by the failure": {
			original:   dsnTestOriginal,
			rcpts:      []Recipient{daveDelivered, carolDelayed, bobFailed},
			subject:    "Undelivered Mail Returned to Sender",
			perMessage: perMessage(""),
			blocks:     []wantBlock{daveDeliveredBlock, carolDelayedBlock, bobFailedBlock},
			returnType: "text/rfc822-headers",
			textHas:    []string{"<bob@example.net>", "<carol@example.com>", "<dave@example.com>", "failed permanently", "is delayed"},
			textCTE:    "7bit",
		},
		"mixed relayed and delayed recipients are titled by the delay": {
			original: dsnTestOriginal,
			rcpts: []Recipient{
				{Rcpt: spool.Rcpt{Addr: "erin@example.com", Notify: []string{"SUCCESS", "DELAY"}}, Action: ActionRelayed, Status: "2.0.0", RemoteMTA: "old.example.com"},
				carolDelayed,
			},
			subject:    "Delayed Mail (still being retried)",
			perMessage: perMessage(""),
			blocks: []wantBlock{
				{fields: map[string]string{
					"Final-Recipient": "rfc822; erin@example.com",
					"Action":          "relayed",
					"Status":          "2.0.0",
					"Remote-MTA":      "dns; old.example.com",
				}},
				carolDelayedBlock,
			},
			returnType: "text/rfc822-headers",
			textHas:    []string{"<erin@example.com>", "passed on"},
			textCTE:    "7bit",
		},
		"ENVID and ORCPT are reported when the client gave them": {
			ret: "HDRS", envID: "QQ314159", original: dsnTestOriginal,
			rcpts: []Recipient{{
				Rcpt:   spool.Rcpt{Addr: "bob@example.net", ORcpt: "rfc822;Bob.Smith+tag@example.net"},
				Action: ActionFailed, Status: "5.7.1",
			}},
			subject:    "Undelivered Mail Returned to Sender",
			perMessage: perMessage("QQ314159"),
			blocks: []wantBlock{{fields: map[string]string{
				"Original-Recipient": "rfc822;Bob.Smith+tag@example.net",
				"Final-Recipient":    "rfc822; bob@example.net",
				"Action":             "failed",
				"Status":             "5.7.1",
			}}},
			returnType: "text/rfc822-headers",
			textCTE:    "7bit",
		},
		"a recipient who asked for NEVER is left out of a bounce for others": {
			original: dsnTestOriginal,
			rcpts: []Recipient{
				{Rcpt: spool.Rcpt{Addr: "quiet@example.net", Notify: []string{"NEVER"}}, Action: ActionFailed, Status: "5.1.1"},
				bobFailed,
				{Rcpt: spool.Rcpt{Addr: "nosuccess@example.net"}, Action: ActionDelivered, Status: "2.0.0"},
			},
			subject:    "Undelivered Mail Returned to Sender",
			perMessage: perMessage(""),
			blocks:     []wantBlock{bobFailedBlock},
			returnType: "text/rfc822-headers",
			textCTE:    "7bit",
		},
		"a non-ASCII recipient is reported as utf-8 with RFC 6533 escapes and a quoted-printable text": {
			original: dsnTestOriginal,
			rcpts: []Recipient{{
				Rcpt:   spool.Rcpt{Addr: "jösé@exämple.de", ORcpt: "utf-8;jösé+x@exämple.de"},
				Action: ActionFailed, Status: "5.1.1",
				Diagnostic: "550 5.1.1 unbekannter Empfänger",
			}},
			subject:    "Undelivered Mail Returned to Sender",
			perMessage: perMessage(""),
			blocks: []wantBlock{{fields: map[string]string{
				"Original-Recipient": `utf-8;j\x{F6}s\x{E9}\x{2B}x@ex\x{E4}mple.de`,
				"Final-Recipient":    `utf-8; j\x{F6}s\x{E9}@ex\x{E4}mple.de`,
				"Action":             "failed",
				"Status":             "5.1.1",
				"Diagnostic-Code":    `smtp; 550 5.1.1 unbekannter Empf\x{E4}nger`,
			}}},
			returnType: "text/rfc822-headers",
			textHas:    []string{"<jösé@exämple.de>", "unbekannter Empfänger"},
			textCTE:    "quoted-printable",
		},
		"a missing or malformed status is reported as the generic code for the action": {
			original: dsnTestOriginal,
			rcpts: []Recipient{
				{Rcpt: spool.Rcpt{Addr: "a@example.net"}, Action: ActionFailed},
				{Rcpt: spool.Rcpt{Addr: "b@example.net"}, Action: ActionDelayed, Status: "4.4"},
			},
			subject:    "Undelivered Mail Returned to Sender",
			perMessage: perMessage(""),
			blocks: []wantBlock{
				{fields: map[string]string{"Final-Recipient": "rfc822; a@example.net", "Action": "failed", "Status": "5.0.0"}},
				{fields: map[string]string{"Final-Recipient": "rfc822; b@example.net", "Action": "delayed", "Status": "4.0.0"}},
			},
			returnType: "text/rfc822-headers",
			textCTE:    "7bit",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			d := &Report{
				ReportingMTA: "mx1.jetmail.test",
				Envelope:     dsnTestEnvelope(tc.ret, tc.envID),
				Original:     []byte(tc.original),
				Recipients:   tc.rcpts,
				Now:          dsnTestNow,
			}
			raw, err := d.Build()
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			checkLines(t, raw)
			p := dsntest.Parse(t, raw)

			h := p.Header
			if from, err := mail.ParseAddress(h.Get("From")); err != nil || from.Address != "MAILER-DAEMON@mx1.jetmail.test" || from.Name != "Mail Delivery System" {
				t.Errorf("From = %q (%v)", h.Get("From"), err)
			}
			if to, err := mail.ParseAddress(h.Get("To")); err != nil || to.Address != "alice@example.org" {
				t.Errorf("To = %q (%v), want the original sender", h.Get("To"), err)
			}
			if got := h.Get("Subject"); got != tc.subject {
				t.Errorf("Subject = %q, want %q", got, tc.subject)
			}
			if got := h.Get("Auto-Submitted"); got != "auto-replied" {
				t.Errorf("Auto-Submitted = %q, want auto-replied", got)
			}
			if got := h.Get("MIME-Version"); got != "1.0" {
				t.Errorf("MIME-Version = %q", got)
			}
			if date, err := h.Date(); err != nil || !date.Equal(dsnTestNow) {
				t.Errorf("Date = %q (%v), want %v", h.Get("Date"), err, dsnTestNow)
			}
			if id := h.Get("Message-ID"); !strings.HasPrefix(id, "<") || !strings.HasSuffix(id, "@mx1.jetmail.test>") || len(id) < len("<@mx1.jetmail.test>")+16 {
				t.Errorf("Message-ID = %q, want <random@mx1.jetmail.test>", id)
			}

			wantTypes := []string{"text/plain", "message/delivery-status", tc.returnType}
			if got := p.ContentTypes(); strings.Join(got, ",") != strings.Join(wantTypes, ",") {
				t.Fatalf("parts = %v, want %v", got, wantTypes)
			}

			textPart := p.Parts[0]
			if _, params, _ := mime.ParseMediaType(textPart.Header.Get("Content-Type")); !strings.EqualFold(params["charset"], "utf-8") {
				t.Errorf("text part Content-Type = %q, want charset=utf-8", textPart.Header.Get("Content-Type"))
			}
			if got := textPart.Header.Get("Content-Transfer-Encoding"); got != tc.textCTE {
				t.Errorf("text part Content-Transfer-Encoding = %q, want %q", got, tc.textCTE)
			}
			// The explanation is wrapped; compare with runs of space collapsed.
			text := strings.Join(strings.Fields(string(textPart.Body)), " ")
			for _, want := range append([]string{"01JNQX4ZQ7"}, tc.textHas...) {
				if !strings.Contains(text, want) {
					t.Errorf("text part lacks %q:\n%s", want, textPart.Body)
				}
			}

			blocks := dsntest.StatusBlocks(t, p.Parts[1].Body)
			if len(blocks) != 1+len(tc.blocks) {
				t.Fatalf("delivery-status has %d blocks, want %d:\n%s", len(blocks), 1+len(tc.blocks), p.Parts[1].Body)
			}
			checkBlock(t, "per-message", blocks[0], tc.perMessage)
			for i, want := range tc.blocks {
				checkBlock(t, "recipient "+want.fields["Final-Recipient"], blocks[1+i], want)
			}

			returned := string(p.Parts[2].Body)
			if !strings.Contains(returned, "Subject: quarterly figures") || !strings.Contains(returned, "Message-ID: <figures-1@example.org>") {
				t.Errorf("returned part lacks the original headers:\n%s", returned)
			}
			if got := strings.Contains(returned, dsnTestBodyText); got != tc.returnsBody {
				t.Errorf("returned part contains the body = %v, want %v:\n%s", got, tc.returnsBody, returned)
			}
			if tc.returnsBody && returned != tc.original {
				t.Errorf("returned original differs from the stored one:\n%q\nwant\n%q", returned, tc.original)
			}
		})
	}
}

func TestDSNBuildRefuses(t *testing.T) {
	failed := []Recipient{{Rcpt: spool.Rcpt{Addr: "bob@example.net"}, Action: ActionFailed, Status: "5.1.1"}}
	nullSender := dsnTestEnvelope("", "")
	nullSender.From = ""
	injected := dsnTestEnvelope("", "")
	injected.From = "alice@example.org>\r\nBcc: victim@example.com"

	tests := map[string]struct {
		dsn    Report
		target error // nil: any error will do
	}{
		"a bounce about a bounce (null sender) is refused": {
			dsn:    Report{ReportingMTA: "mx1.jetmail.test", Envelope: nullSender, Recipients: failed},
			target: ErrNullSender,
		},
		"a notice with no recipients is refused": {
			dsn:    Report{ReportingMTA: "mx1.jetmail.test", Envelope: dsnTestEnvelope("", "")},
			target: ErrNothingToReport,
		},
		"a notice whose only recipient said NOTIFY=NEVER is refused": {
			dsn: Report{ReportingMTA: "mx1.jetmail.test", Envelope: dsnTestEnvelope("", ""), Recipients: []Recipient{
				{Rcpt: spool.Rcpt{Addr: "bob@example.net", Notify: []string{"NEVER"}}, Action: ActionFailed},
			}},
			target: ErrNothingToReport,
		},
		"a success report nobody asked for is refused": {
			dsn: Report{ReportingMTA: "mx1.jetmail.test", Envelope: dsnTestEnvelope("", ""), Recipients: []Recipient{
				{Rcpt: spool.Rcpt{Addr: "bob@example.net"}, Action: ActionDelivered},
			}},
			target: ErrNothingToReport,
		},
		"a notice without an envelope is refused": {
			dsn: Report{ReportingMTA: "mx1.jetmail.test", Recipients: failed},
		},
		"a notice without a reporting MTA is refused": {
			dsn: Report{Envelope: dsnTestEnvelope("", ""), Recipients: failed},
		},
		"a sender that would inject header lines is refused": {
			dsn: Report{ReportingMTA: "mx1.jetmail.test", Envelope: injected, Recipients: failed},
		},
		"an unknown action is refused": {
			dsn: Report{ReportingMTA: "mx1.jetmail.test", Envelope: dsnTestEnvelope("", ""), Recipients: []Recipient{
				{Rcpt: spool.Rcpt{Addr: "bob@example.net"}, Action: "expanded"},
			}},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			raw, err := tc.dsn.Build()
			if err == nil {
				t.Fatalf("Build succeeded, want an error:\n%s", raw)
			}
			if tc.target != nil && !errors.Is(err, tc.target) {
				t.Errorf("Build error = %v, want %v", err, tc.target)
			}
		})
	}
}

func TestWantsNotice(t *testing.T) {
	type want struct{ failed, delayed, delivered, relayed bool }
	tests := map[string]struct {
		notify []string
		want   want
	}{
		"no NOTIFY means failures and delays":          {nil, want{true, true, false, false}},
		"NOTIFY=NEVER means nothing":                   {[]string{"NEVER"}, want{}},
		"NOTIFY=never in lower case means nothing":     {[]string{"never"}, want{}},
		"NEVER mixed with others still means nothing":  {[]string{"NEVER", "FAILURE"}, want{}},
		"NOTIFY=SUCCESS means only successes":          {[]string{"SUCCESS"}, want{false, false, true, true}},
		"NOTIFY=FAILURE means only failures":           {[]string{"FAILURE"}, want{true, false, false, false}},
		"NOTIFY=DELAY means only delays":               {[]string{"DELAY"}, want{false, true, false, false}},
		"NOTIFY=SUCCESS,FAILURE leaves out delays":     {[]string{"SUCCESS", "FAILURE"}, want{true, false, true, true}},
		"NOTIFY=SUCCESS,FAILURE,DELAY means all":       {[]string{"SUCCESS", "FAILURE", "DELAY"}, want{true, true, true, true}},
		"a comma-joined list is read as a list":        {[]string{"delay,success"}, want{false, true, true, true}},
		"an empty NOTIFY list is the same as no list":  {[]string{}, want{true, true, false, false}},
		"a list of blanks is the same as no NOTIFY":    {[]string{" "}, want{true, true, false, false}},
		"an unknown keyword alone asks for no notices": {[]string{"SOMETIMES"}, want{}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			r := spool.Rcpt{Addr: "bob@example.net", Notify: tc.notify}
			got := want{
				failed:    WantsNotice(r, ActionFailed),
				delayed:   WantsNotice(r, ActionDelayed),
				delivered: WantsNotice(r, ActionDelivered),
				relayed:   WantsNotice(r, ActionRelayed),
			}
			if got != tc.want {
				t.Errorf("WantsNotice(%q) = %+v, want %+v", tc.notify, got, tc.want)
			}
			if WantsNotice(r, "expanded") {
				t.Errorf("WantsNotice(%q, expanded) = true for an action we never report", tc.notify)
			}
		})
	}
}

func TestDSNLinesStayShort(t *testing.T) {
	words := strings.Repeat("the remote server explained at great length ", 50) // 2,200 chars
	diag := "550 5.7.1 " + strings.TrimSpace(words[:1990])
	longLocal := strings.Repeat("x", 1500)
	longHeader := "X-Long: " + strings.Repeat("y", 2500) + "\r\n"
	tests := map[string]struct {
		rcpt     Recipient
		original string
		// wantDiag is the exact Diagnostic-Code when it survives folding
		// unchanged; "" to check only the line limits.
		wantDiag string
		// wantLong is the returned X-Long header with folding spaces
		// removed; "" if the original has none.
		wantLong string
	}{
		"a 2,000-character diagnostic with spaces is folded and reads back unchanged": {
			rcpt:     Recipient{Rcpt: spool.Rcpt{Addr: "bob@example.net"}, Action: ActionFailed, Status: "5.7.1", Diagnostic: diag},
			original: dsnTestOriginal,
			wantDiag: "smtp; " + diag,
		},
		"a 2,000-character diagnostic without spaces is split": {
			rcpt:     Recipient{Rcpt: spool.Rcpt{Addr: "bob@example.net"}, Action: ActionFailed, Diagnostic: "550 " + strings.Repeat("z", 2000)},
			original: dsnTestOriginal,
		},
		"a multi-line reply with a bare LF becomes one line": {
			rcpt:     Recipient{Rcpt: spool.Rcpt{Addr: "bob@example.net"}, Action: ActionFailed, Diagnostic: "550-5.1.1 first line\r\n550 5.1.1 second\nline"},
			original: dsnTestOriginal,
			wantDiag: "smtp; 550-5.1.1 first line 550 5.1.1 second line",
		},
		"a 1,500-character address stays within the limits": {
			rcpt:     Recipient{Rcpt: spool.Rcpt{Addr: longLocal + "@example.net"}, Action: ActionFailed},
			original: dsnTestOriginal,
		},
		"an original header line over 998 octets is folded in the returned headers": {
			rcpt:     Recipient{Rcpt: spool.Rcpt{Addr: "bob@example.net"}, Action: ActionFailed},
			original: dsnTestHeaders + longHeader + "\r\n" + dsnTestBodyText + "\r\n",
			wantLong: strings.Repeat("y", 2500),
		},
		"an original with bare LF is returned with CRLF": {
			rcpt:     Recipient{Rcpt: spool.Rcpt{Addr: "bob@example.net"}, Action: ActionFailed},
			original: strings.ReplaceAll(dsnTestOriginal, "\r\n", "\n"),
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			d := &Report{
				ReportingMTA: "mx1.jetmail.test",
				Envelope:     dsnTestEnvelope("FULL", ""),
				Original:     []byte(tc.original),
				Recipients:   []Recipient{tc.rcpt},
				Now:          dsnTestNow,
			}
			raw, err := d.Build()
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			checkLines(t, raw)
			p := dsntest.Parse(t, raw)
			if len(p.Parts) != 3 {
				t.Fatalf("got %d parts, want 3", len(p.Parts))
			}
			blocks := dsntest.StatusBlocks(t, p.Parts[1].Body)
			if len(blocks) != 2 {
				t.Fatalf("got %d status blocks, want 2", len(blocks))
			}
			if tc.wantDiag != "" {
				if got := blocks[1].Get("Diagnostic-Code"); got != tc.wantDiag {
					t.Errorf("Diagnostic-Code = %q,\nwant %q", got, tc.wantDiag)
				}
			}
			// The returned headers must still read as a header section.
			returned, err := textproto.NewReader(bufio.NewReader(bytes.NewReader(p.Parts[2].Body))).ReadMIMEHeader()
			if err != nil && err != io.EOF {
				t.Fatalf("returned headers do not parse: %v\n%s", err, p.Parts[2].Body)
			}
			if got := returned.Get("Subject"); got != "quarterly figures" {
				t.Errorf("returned Subject = %q", got)
			}
			if tc.wantLong != "" {
				if got := strings.ReplaceAll(returned.Get("X-Long"), " ", ""); got != tc.wantLong {
					t.Errorf("returned X-Long is %d octets after unfolding, want %d", len(got), len(tc.wantLong))
				}
			}
		})
	}
}

func TestDSNReturnFallsBackToHeaders(t *testing.T) {
	huge := dsnTestHeaders + "\r\n" + dsnTestBodyText + "\r\n" +
		strings.Repeat(strings.Repeat("b", 78)+"\r\n", MaxReturnedBody/80+1)
	tests := map[string]struct {
		original string
		size     int64
		textHas  string
	}{
		"an original over MaxReturnedBody is returned as headers only": {
			original: huge,
			textHas:  "only its headers are included",
		},
		"an original over MaxReturnedBody given as its first piece is returned as headers only": {
			original: huge[:64<<10],
			size:     int64(len(huge)),
			textHas:  fmt.Sprintf("Your message was %d bytes", len(huge)),
		},
		"an original with bare LF is returned as headers only": {
			original: strings.ReplaceAll(dsnTestOriginal, "\r\n", "\n"),
			textHas:  "could not be included unchanged",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if name == "an original over MaxReturnedBody is returned as headers only" && len(tc.original) <= MaxReturnedBody {
				t.Fatalf("test original is %d octets, not over %d", len(tc.original), MaxReturnedBody)
			}
			d := &Report{
				ReportingMTA: "mx1.jetmail.test",
				Envelope:     dsnTestEnvelope("FULL", ""),
				Original:     []byte(tc.original),
				OriginalSize: tc.size,
				Recipients:   []Recipient{{Rcpt: spool.Rcpt{Addr: "bob@example.net"}, Action: ActionFailed, Status: "5.2.3"}},
				Now:          dsnTestNow,
			}
			raw, err := d.Build()
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			if len(raw) > 64<<10 {
				t.Errorf("notice is %d octets; the body must not be in it", len(raw))
			}
			checkLines(t, raw)
			p := dsntest.Parse(t, raw)
			if got := strings.Join(p.ContentTypes(), ","); got != "text/plain,message/delivery-status,text/rfc822-headers" {
				t.Fatalf("parts = %s", got)
			}
			returned := string(p.Parts[2].Body)
			if !strings.Contains(returned, "Subject: quarterly figures") {
				t.Errorf("returned headers lack the Subject:\n%s", returned)
			}
			if strings.Contains(returned, dsnTestBodyText) {
				t.Errorf("returned part contains the body")
			}
			text := strings.Join(strings.Fields(string(p.Parts[0].Body)), " ")
			if !strings.Contains(text, tc.textHas) {
				t.Errorf("text part does not say %q:\n%s", tc.textHas, p.Parts[0].Body)
			}
		})
	}
}

func TestDSNMessageIDIsFresh(t *testing.T) {
	d := &Report{
		ReportingMTA: "mx1.jetmail.test",
		Envelope:     dsnTestEnvelope("", ""),
		Original:     []byte(dsnTestOriginal),
		Recipients:   []Recipient{{Rcpt: spool.Rcpt{Addr: "bob@example.net"}, Action: ActionFailed}},
		Now:          dsnTestNow,
	}
	ids := map[string]bool{}
	for range 3 {
		raw, err := d.Build()
		if err != nil {
			t.Fatalf("Build: %v", err)
		}
		ids[dsntest.Parse(t, raw).Header.Get("Message-ID")] = true
	}
	if len(ids) != 3 {
		t.Errorf("three builds gave %d distinct Message-IDs: %v", len(ids), ids)
	}
}

func TestDSN8BitIsDeclared(t *testing.T) {
	utf8Original := dsnTestHeaders + "\r\n" + "Grüße aus Köln\r\n"
	tests := map[string]struct {
		ret, from   string
		original    string
		wantPartCTE string // of the returned part
		wantTopCTE  string // of the whole message; "" for none (7bit)
	}{
		"an 8-bit original returned whole is marked 8bit, and so is the message": {
			ret: "FULL", from: "alice@example.org", original: utf8Original,
			wantPartCTE: "8bit", wantTopCTE: "8bit",
		},
		"the headers of an 8-bit original are 7bit when they are ASCII": {
			ret: "HDRS", from: "alice@example.org", original: utf8Original,
			wantPartCTE: "7bit",
		},
		"a non-ASCII sender is addressed as is": {
			ret: "HDRS", from: "jösé@exämple.de", original: dsnTestOriginal,
			wantPartCTE: "7bit",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			env := dsnTestEnvelope(tc.ret, "")
			env.From = tc.from
			d := &Report{
				ReportingMTA: "mx1.jetmail.test",
				Envelope:     env,
				Original:     []byte(tc.original),
				Recipients:   []Recipient{{Rcpt: spool.Rcpt{Addr: "bob@example.net"}, Action: ActionFailed}},
				Now:          dsnTestNow,
			}
			raw, err := d.Build()
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			checkLines(t, raw)
			p := dsntest.Parse(t, raw)
			if to, err := mail.ParseAddress(p.Header.Get("To")); err != nil || to.Address != tc.from {
				t.Errorf("To = %q (%v), want %s", p.Header.Get("To"), err, tc.from)
			}
			if got := p.Header.Get("Content-Transfer-Encoding"); got != tc.wantTopCTE {
				t.Errorf("message Content-Transfer-Encoding = %q, want %q", got, tc.wantTopCTE)
			}
			if got := p.Parts[2].Header.Get("Content-Transfer-Encoding"); got != tc.wantPartCTE {
				t.Errorf("returned part Content-Transfer-Encoding = %q, want %q", got, tc.wantPartCTE)
			}
			if tc.ret == "FULL" && string(p.Parts[2].Body) != tc.original {
				t.Errorf("returned original = %q, want %q", p.Parts[2].Body, tc.original)
			}
		})
	}
}
