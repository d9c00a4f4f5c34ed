package smtpgw

import (
	"fmt"
	"strings"
	"testing"

	"github.com/jetmail/jetmail/internal/smtptest"
)

// SMTP smuggling (CVE-2023-51764 and kin): an outbound server that ends
// DATA on something other than CRLF.CRLF lets a sender hide a second
// transaction in the first one's data. These tests send every end-of-data
// look-alike followed by a smuggled transaction and check that the gateway
// refuses the message as a whole, runs none of the smuggled commands and
// hangs up (DATA) or stays in step with the client (BDAT, whose chunks have
// explicit sizes).

// smuggledTransaction is what an attacker hides behind a fake end of data.
const smuggledTransaction = "MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nsmuggled\r\n"

const smuggleHead = "From: alice@example.org\r\nTo: bob@example.net\r\nSubject: smuggle\r\n\r\n"

// smuggleCases are message data, each sent after 354 and followed by the
// client's real end of data, ".\r\n" (the data always ends with CRLF).
var smuggleCases = []struct {
	name string
	data string
}{
	{"LF dot LF before a smuggled transaction is refused", smuggleHead + "hello\n.\n" + smuggledTransaction},
	{"LF dot CRLF before a smuggled transaction is refused", smuggleHead + "hello\n.\r\n" + smuggledTransaction},
	{"CR dot CR before a smuggled transaction is refused", smuggleHead + "hello\r.\r" + smuggledTransaction},
	{"CR dot CRLF before a smuggled transaction is refused", smuggleHead + "hello\r.\r\n" + smuggledTransaction},
	{"CRLF dot LF before a smuggled transaction is refused", smuggleHead + "hello\r\n.\n" + smuggledTransaction},
	{"CRLF dot CR before a smuggled transaction is refused", smuggleHead + "hello\r\n.\r" + smuggledTransaction},
	{"CRLF dot CR CRLF before a smuggled transaction is refused", smuggleHead + "hello\r\n.\r\r\n" + smuggledTransaction},
	{"a bare LF in the middle of a line is refused", smuggleHead + "hel\nlo\r\n" + smuggledTransaction},
	{"a bare CR in the middle of a line is refused", smuggleHead + "hel\rlo\r\n" + smuggledTransaction},
	{"a bare LF in a header is refused", "From: alice@example.org\nSubject: smuggle\r\n\r\nhello\r\n" + smuggledTransaction},
	{"a bare CR right before the real CRLF.CRLF is refused", smuggleHead + "hello\r\n" + strings.TrimSuffix(smuggledTransaction, "\r\n") + "\r\r\n"},
}

func TestSmugglingSequencesInDATAAreRefused(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)

	for _, tc := range smuggleCases {
		t.Run(tc.name, func(t *testing.T) {
			before := queueCount(t, sp)
			c := smtptest.DialReady(t, g.addr)
			cmdWant(c, "MAIL FROM:<alice@example.org>", "250 2.0.0")
			cmdWant(c, "RCPT TO:<bob@example.net>", "250 2.0.0")
			cmdWant(c, "DATA", "354")
			c.Send(tc.data + ".\r\n")
			replyWant(c, "554 5.5.2")
			// Exactly one reply to the data, then the connection is
			// closed: none of the smuggled commands ran.
			c.ExpectClosed()
			if got := queueCount(t, sp); got != before {
				t.Fatalf("%d mails queued from smuggled data", got-before)
			}
			// The gateway goes on serving, and a clean mail carries
			// nothing of the smuggled one.
			c = smtptest.DialReady(t, g.addr)
			reply := sendMail(c, "alice@example.org", "bob@example.net", uniqueMessage(t, "clean"), "250 2.0.0")
			m := queuedMail(t, sp, reply)
			if e := m.Envelope; e.From != "alice@example.org" || len(e.Rcpts) != 1 || e.Rcpts[0].Addr != "bob@example.net" {
				t.Errorf("envelope %+v", e)
			}
			if body := storedBody(t, sp, m); strings.Contains(body, "\r\nsmuggled\r\n") || strings.Contains(body, "evil@x") {
				t.Errorf("the clean mail carries smuggled data: %q", body)
			}
			if got := queueCount(t, sp); got != before+1 {
				t.Fatalf("%d mails queued, want 1", got-before)
			}
		})
	}
}

// bdat sends one BDAT chunk and checks the reply.
func bdat(c *smtptest.Client, chunk string, last bool, want string) string {
	c.T.Helper()
	cmd := fmt.Sprintf("BDAT %d", len(chunk))
	if last {
		cmd += " LAST"
	}
	c.Send(cmd + "\r\n" + chunk)
	return replyWant(c, want)
}

func TestBDATChecksLineEndingsToo(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)

	type chunk struct {
		data string
		last bool
		want string
	}
	for _, tc := range []struct {
		name   string
		chunks []chunk
		stored string // the message as stored after our Received header, "" when refused
	}{
		{"a single chunk with a bare LF is refused", []chunk{
			{smuggleHead + "hello\n.\n" + smuggledTransaction, true, "554 5.5.2"}}, ""},
		{"a single chunk with a bare CR is refused", []chunk{
			{smuggleHead + "hello\r\n.\r" + smuggledTransaction, true, "554 5.5.2"}}, ""},
		{"a bare LF in a first chunk fails the transaction at the last chunk", []chunk{
			{smuggleHead + "hel\nlo\r\n", false, "250 2.0.0"},
			{"more\r\n", true, "554 5.5.2"}}, ""},
		{"a CR ending one chunk and a non-LF starting the next is refused", []chunk{
			{smuggleHead + "hello\r", false, "250 2.0.0"},
			{"MAIL FROM:<evil@x>\r\n", true, "554 5.5.2"}}, ""},
		{"a CR ending the last chunk is refused", []chunk{
			{smuggleHead + "hello\r", true, "554 5.5.2"}}, ""},
		{"a clean single chunk is queued as sent", []chunk{
			{smuggleHead + "hello\r\n", true, "250 2.0.0"}}, smuggleHead + "hello\r\n"},
		{"a CRLF split across two chunks is queued as sent", []chunk{
			{smuggleHead + "hello\r", false, "250 2.0.0"},
			{"\nworld\r\n", true, "250 2.0.0"}}, smuggleHead + "hello\r\nworld\r\n"},
		{"CRLF.CRLF inside a chunk is data, not an end", []chunk{
			{smuggleHead + "hello\r\n.\r\n" + smuggledTransaction, true, "250 2.0.0"}}, smuggleHead + "hello\r\n.\r\n" + smuggledTransaction},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := queueCount(t, sp)
			c := smtptest.DialReady(t, g.addr)
			cmdWant(c, "MAIL FROM:<alice@example.org>", "250 2.0.0")
			cmdWant(c, "RCPT TO:<bob@example.net>", "250 2.0.0")
			var reply string
			for _, ch := range tc.chunks {
				reply = bdat(c, ch.data, ch.last, ch.want)
			}
			expectNOOPNext(c)
			if tc.stored == "" {
				if got := queueCount(t, sp); got != before {
					t.Fatalf("%d mails queued from a refused BDAT transfer", got-before)
				}
				// The session is still usable, by BDAT too.
				cmdWant(c, "MAIL FROM:<alice@example.org>", "250 2.0.0")
				cmdWant(c, "RCPT TO:<bob@example.net>", "250 2.0.0")
				queuedMail(t, sp, bdat(c, uniqueMessage(t, "clean"), true, "250 2.0.0"))
				return
			}
			if body := storedBody(t, sp, queuedMail(t, sp, reply)); !strings.HasSuffix(body, "\r\n"+tc.stored) {
				t.Errorf("stored body %q does not end with %q", body, tc.stored)
			}
			if got := queueCount(t, sp); got != before+1 {
				t.Fatalf("%d mails queued, want 1", got-before)
			}
		})
	}
}

// lfLines is a message body of n octets in LF-terminated lines of 64.
func lfLines(n int) string {
	return strings.Repeat(strings.Repeat("z", 63)+"\n", n/64) + strings.Repeat("z", n%64)
}

func TestNormalizeLineEndingsFrom(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, relayPolicy(t, `  relayNetworks: ["127.0.0.0/8"]
  normalizeLineEndingsFrom: ["127.0.0.0/8"]
`))

	for _, tc := range []struct {
		name   string
		data   string // sent after 354, then ".\r\n"
		want   string
		stored string // what the stored body ends with
	}{
		{"a bare LF becomes CRLF", "Subject: n\r\n\r\na\nb\r\n", "250 2.0.0", "Subject: n\r\n\r\na\r\nb\r\n"},
		{"a bare CR becomes CRLF", "Subject: n\r\n\r\na\rb\r\n", "250 2.0.0", "Subject: n\r\n\r\na\r\nb\r\n"},
		{"CRLF stays CRLF", "Subject: n\r\n\r\na\r\nb\r\n", "250 2.0.0", "Subject: n\r\n\r\na\r\nb\r\n"},
		{"LF CR becomes two line ends", "Subject: n\r\n\r\na\n\rb\r\n", "250 2.0.0", "Subject: n\r\n\r\na\r\n\r\nb\r\n"},
		{"a message in LF-only lines is stored in CRLF lines", "Subject: n\n\nline one\nline two\n\r\n", "250 2.0.0",
			"Subject: n\r\n\r\nline one\r\nline two\r\n\r\n"},
		{"LF dot LF is data, not an end of data", "Subject: n\r\n\r\na\n.\n" + smuggledTransaction, "250 2.0.0",
			"Subject: n\r\n\r\na\r\n.\r\n" + smuggledTransaction},
		{"CR dot CR is data, not an end of data", "Subject: n\r\n\r\na\r.\r" + smuggledTransaction, "250 2.0.0",
			"Subject: n\r\n\r\na\r\n.\r\n" + smuggledTransaction},
		{"CRLF dot CR is still refused", "Subject: n\r\n\r\na\r\n.\r" + smuggledTransaction, "554 5.5.2", ""},
		{"CRLF dot CR CRLF is still refused", "Subject: n\r\n\r\na\r\n.\r\r\n" + smuggledTransaction, "554 5.5.2", ""},
		{"a message of 32,700 octets in LF-only lines is stored whole", "Subject: n\r\n\r\n" + lfLines(32700) + "\r\n", "250 2.0.0",
			"Subject: n\r\n\r\n" + strings.ReplaceAll(lfLines(32700), "\n", "\r\n") + "\r\n"},
		{"a message of 100,000 octets in LF-only lines is stored whole", "Subject: n\r\n\r\n" + lfLines(100000) + "\r\n", "250 2.0.0",
			"Subject: n\r\n\r\n" + strings.ReplaceAll(lfLines(100000), "\n", "\r\n") + "\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := queueCount(t, sp)
			c := smtptest.DialReady(t, g.addr)
			cmdWant(c, "MAIL FROM:<alice@example.org>", "250 2.0.0")
			cmdWant(c, "RCPT TO:<bob@example.net>", "250 2.0.0")
			cmdWant(c, "DATA", "354")
			c.Send(tc.data + ".\r\n")
			reply := replyWant(c, tc.want)
			if tc.stored == "" {
				// Refused, and the connection closed, as in strict mode.
				c.ExpectClosed()
				if got := queueCount(t, sp); got != before {
					t.Fatalf("%d mails queued from smuggled data", got-before)
				}
				return
			}
			// Exactly one reply: only CRLF.CRLF ended the data.
			expectNOOPNext(c)
			body := storedBody(t, sp, queuedMail(t, sp, reply))
			if !strings.HasSuffix(body, "\r\n"+tc.stored) {
				t.Errorf("stored body (%d octets) does not end with the normalized message (%d octets)\nstored tail %q\nwant tail   %q",
					len(body), len(tc.stored), tail(body, 80), tail(tc.stored, 80))
			}
			if got := queueCount(t, sp); got != before+1 {
				t.Fatalf("%d mails queued, want 1", got-before)
			}
		})
	}
}

func tail(s string, n int) string { return s[max(0, len(s)-n):] }
