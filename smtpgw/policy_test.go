package smtpgw

import (
	"context"
	"encoding/base64"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
	"golang.org/x/crypto/bcrypt"

	"github.com/jetmail/jetmail/internal/smtptest"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// The relay policy tests run real SMTP sessions over loopback against a
// gateway queueing into a real in-process JetStream. Every refusal is
// checked by its reply code and enhanced status code, and every acceptance
// by what landed in the queue stream.

// relayPolicy compiles one RelayPolicy whose spec is given as YAML already
// indented by two spaces; extra is appended as further YAML documents.
func relayPolicy(t testing.TB, spec string, extra ...string) *policy.Relay {
	t.Helper()
	doc := "apiVersion: mail.jetmail.io/v1alpha1\nkind: RelayPolicy\nmetadata:\n  name: test\n  namespace: mail\nspec:\n" + spec
	for _, e := range extra {
		doc += "\n---\n" + e
	}
	return compile(t, doc)
}

// nonRelaySpec makes 127.0.0.1 an ordinary internet client: not in the
// relay networks, so it may only send to the accepted domains.
const nonRelaySpec = `  relayNetworks: ["10.0.0.0/8"]
  acceptedDomains: ["example.org", ".sub.example.com"]
`

// replyTimeout bounds every reply these tests wait for. A reply that does
// not come means the server is waiting for something the client believes
// it has already sent.
const replyTimeout = 5 * time.Second

// replyWant reads one reply and fails unless its last line starts with
// want, a code and enhanced status code such as "554 5.7.1" (or a code
// alone for replies that carry none, such as 334).
func replyWant(c *smtptest.Client, want string) string {
	c.T.Helper()
	lines, err := c.ReplyLines(replyTimeout)
	if err != nil {
		c.T.Fatalf("reading reply (want %q): %v", want, err)
	}
	last := lines[len(lines)-1]
	if !strings.HasPrefix(last+" ", want+" ") {
		c.T.Fatalf("got %q, want %q", last, want)
	}
	return last
}

// cmdWant sends a command line and checks the reply like replyWant.
func cmdWant(c *smtptest.Client, line, want string) string {
	c.T.Helper()
	c.Send(line + "\r\n")
	return replyWant(c, want)
}

// ehlo says EHLO and returns the extension keywords offered.
func ehlo(c *smtptest.Client, name string) []string {
	c.T.Helper()
	c.Send("EHLO " + name + "\r\n")
	lines, err := c.ReplyLines(replyTimeout)
	if err != nil {
		c.T.Fatalf("EHLO: %v", err)
	}
	if !strings.HasPrefix(lines[0], "250") {
		c.T.Fatalf("EHLO: got %q", lines)
	}
	var caps []string
	for _, l := range lines[1:] {
		caps = append(caps, l[4:])
	}
	return caps
}

func hasCap(caps []string, prefix string) bool {
	for _, c := range caps {
		if c == prefix || strings.HasPrefix(c, prefix+" ") {
			return true
		}
	}
	return false
}

// expectNOOPNext proves that no reply is pending: the next reply must be
// the NOOP's own, not one to a command the server found in message data.
func expectNOOPNext(c *smtptest.Client) {
	c.T.Helper()
	if r := cmdWant(c, "NOOP", "250 2.0.0"); !strings.Contains(r, "done nothing") {
		c.T.Fatalf("reply to NOOP is %q: a reply to some other command was pending", r)
	}
}

// uniqueMessage is simpleMessage with a Message-ID of its own per test, so
// that the duplicate guard never takes one test's mail for another's.
func uniqueMessage(t testing.TB, body string) string {
	return simpleMessage(strings.NewReplacer("/", ".", " ", "_").Replace(t.Name()), body)
}

// queueCount is the number of mails in the queue stream.
func queueCount(t testing.TB, sp *spool.Spool) int {
	t.Helper()
	return len(queued(t, sp))
}

// queuedMail finds the queued mail a "250 ... queued as ID" reply names.
func queuedMail(t testing.TB, sp *spool.Spool, reply string) *spool.Message {
	t.Helper()
	qid := queueIDOf(t, reply)
	for _, m := range queued(t, sp) {
		if m.Envelope.QueueID == qid {
			return m
		}
	}
	t.Fatalf("mail %s is not in the queue stream", qid)
	return nil
}

// storedBody reads back the body of a queued mail.
func storedBody(t testing.TB, sp *spool.Spool, m *spool.Message) string {
	t.Helper()
	b, err := sp.ReadBody(context.Background(), m)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// sendMail runs MAIL, RCPT and DATA expecting 250 2.0.0 for the envelope
// commands and 354 for DATA, sends data (which must end with CRLF) and
// returns the final reply, checked against want.
func sendMail(c *smtptest.Client, from, to, data, want string) string {
	c.T.Helper()
	cmdWant(c, "MAIL FROM:<"+from+">", "250 2.0.0")
	cmdWant(c, "RCPT TO:<"+to+">", "250 2.0.0")
	cmdWant(c, "DATA", "354")
	c.Send(data + ".\r\n")
	return replyWant(c, want)
}

func TestDefaultPolicyLetsLoopbackClientsRelayAnywhere(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)

	for name, rcpt := range map[string]string{
		"a loopback client may send to a domain on the internet": "bob@example.net",
		"a loopback client may send to an address literal":       "bob@[192.0.2.1]",
		"a loopback client may send to a percent-hack address":   "bob%other.test@example.net",
	} {
		t.Run(name, func(t *testing.T) {
			c := smtptest.DialReady(t, g.addr)
			reply := sendMail(c, "alice@example.org", rcpt, uniqueMessage(t, "hi"), "250 2.0.0")
			e := queuedMail(t, sp, reply).Envelope
			if e.ClientIP != "127.0.0.1" || len(e.Rcpts) != 1 || e.Rcpts[0].Addr != rcpt || e.AuthUser != "" {
				t.Errorf("envelope %+v", e)
			}
		})
	}
}

func TestNonRelayClientMaySendOnlyToAcceptedDomains(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, relayPolicy(t, nonRelaySpec))

	for _, tc := range []struct {
		name string
		rcpt string
		want string
	}{
		{"a recipient at an accepted domain is accepted", "user@example.org", "250 2.0.0"},
		{"an accepted domain matches whatever its case", "user@EXAMPLE.Org", "250 2.0.0"},
		{"an accepted domain matches with a trailing dot", "user@example.org.", "250 2.0.0"},
		{"a subdomain of a dotted parent is accepted", "user@a.sub.example.com", "250 2.0.0"},
		{"a deep subdomain of a dotted parent is accepted", "user@x.y.sub.example.com", "250 2.0.0"},
		{"the dotted parent itself is refused", "user@sub.example.com", "554 5.7.1"},
		{"a subdomain of an exact accepted domain is refused", "user@mail.example.org", "554 5.7.1"},
		{"a domain that merely ends in an accepted name is refused", "user@badexample.org", "554 5.7.1"},
		{"a domain that merely ends in a parent's name is refused", "user@evilsub.example.com", "554 5.7.1"},
		{"any other domain is refused", "user@victim.test", "554 5.7.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := queueCount(t, sp)
			c := smtptest.DialReady(t, g.addr)
			cmdWant(c, "MAIL FROM:<alice@elsewhere.test>", "250 2.0.0")
			cmdWant(c, "RCPT TO:<"+tc.rcpt+">", tc.want)
			if tc.want != "250 2.0.0" {
				cmdWant(c, "DATA", "502 5.5.1")
				if got := queueCount(t, sp); got != before {
					t.Fatalf("%d mails queued after a refused recipient", got-before)
				}
				return
			}
			cmdWant(c, "DATA", "354")
			c.Send(uniqueMessage(t, "hi") + ".\r\n")
			e := queuedMail(t, sp, replyWant(c, "250 2.0.0")).Envelope
			if len(e.Rcpts) != 1 || e.Rcpts[0].Addr != tc.rcpt {
				t.Errorf("rcpts %+v", e.Rcpts)
			}
		})
	}
}

// The MAIL FROM / RCPT TO pairs of nmap's smtp-open-relay script, with
// victim.test as the domain relayed to, example.org (accepted) as the
// server's own name and [10.1.1.1] as its address; then a few more forms
// that hide another domain behind an accepted one.
func TestNonRelayClientCannotRelayWithOpenRelayTricks(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, relayPolicy(t, nonRelaySpec))

	const ipFrom = "antispam@[10.1.1.1]"
	for _, tc := range []struct {
		name     string
		from, to string
		want     string
	}{
		{"a null sender may not relay", "", "relaytest@victim.test", "554 5.7.1"},
		{"a sender at the victim domain may not relay", "antispam@victim.test", "relaytest@victim.test", "554 5.7.1"},
		{"a sender claiming our own domain may not relay", "antispam@example.org", "relaytest@victim.test", "554 5.7.1"},
		{"a sender at our address literal may not relay", ipFrom, "relaytest@victim.test", "554 5.7.1"},
		{"a percent hack at our address literal is refused", ipFrom, "relaytest%victim.test@[10.1.1.1]", "554 5.7.1"},
		{"a percent hack at an accepted domain is refused", ipFrom, "relaytest%victim.test@example.org", "554 5.7.1"},
		{"a quoted address without a domain is refused", ipFrom, `"relaytest@victim.test"`, "501 5.5.2"},
		{"a quoted percent hack without a domain is refused", ipFrom, `"relaytest%victim.test"`, "501 5.5.2"},
		{"a double @ at our address literal is refused", ipFrom, "relaytest@victim.test@[10.1.1.1]", "554 5.7.1"},
		{"a quoted local part with @ at our address literal is refused", ipFrom, `"relaytest@victim.test"@[10.1.1.1]`, "554 5.7.1"},
		{"a double @ at an accepted domain is refused", ipFrom, "relaytest@victim.test@example.org", "554 5.7.1"},
		{"a source route through our address literal is refused", ipFrom, "@[10.1.1.1]:relaytest@victim.test", "554 5.7.1"},
		{"a source route through an accepted domain is refused", ipFrom, "@example.org:relaytest@victim.test", "554 5.7.1"},
		{"a bang path without a domain is refused", ipFrom, "victim.test!relaytest", "501 5.5.2"},
		{"a bang path at our address literal is refused", ipFrom, "victim.test!relaytest@[10.1.1.1]", "554 5.7.1"},
		{"a bang path at an accepted domain is refused", ipFrom, "victim.test!relaytest@example.org", "554 5.7.1"},

		{"a quoted local part with @ at an accepted domain is refused", ipFrom, `"relaytest@victim.test"@example.org`, "554 5.7.1"},
		{"a quoted percent hack at an accepted domain is refused", ipFrom, `"relaytest%victim.test"@example.org`, "554 5.7.1"},
		{"a bang path at an accepted subdomain is refused", ipFrom, "victim.test!relaytest@a.sub.example.com", "554 5.7.1"},
		{"an IPv4 address literal is refused", ipFrom, "relaytest@[10.1.1.1]", "554 5.7.1"},
		{"an IPv6 address literal is refused", ipFrom, "relaytest@[IPv6:2001:db8::1]", "554 5.7.1"},
		{"a multi-hop source route ending at the victim is refused", ipFrom, "@example.org,@a.sub.example.com:relaytest@victim.test", "554 5.7.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := queueCount(t, sp)
			c := smtptest.DialReady(t, g.addr)
			cmdWant(c, "MAIL FROM:<"+tc.from+">", "250 2.0.0")
			cmdWant(c, "RCPT TO:<"+tc.to+">", tc.want)
			cmdWant(c, "DATA", "502 5.5.1")
			if got := queueCount(t, sp); got != before {
				t.Fatalf("%d mails queued after a relay attempt", got-before)
			}
		})
	}
}

// authFixture is a policy with one SMTP AUTH user, alice, whose bcrypt hash
// lives in a Secret next to the RelayPolicy.
func authPolicy(t testing.TB, allowInsecure bool) *policy.Relay {
	t.Helper()
	hash, err := bcrypt.GenerateFromPassword([]byte(authPass), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	secret := "apiVersion: v1\nkind: Secret\nmetadata:\n  name: smtp-users\n  namespace: mail\nstringData:\n  users: |\n    # user:bcrypt\n    alice:" + string(hash) + "\n"
	spec := nonRelaySpec + "  auth:\n    usersSecretRef:\n      name: smtp-users\n      key: users\n"
	if allowInsecure {
		spec += "    allowInsecure: true\n"
	}
	return relayPolicy(t, spec, secret)
}

const authPass = "correct horse"

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

// authStep is one line the client sends and the reply it expects.
type authStep struct{ send, want string }

func TestAuthIsRefusedBeforeSTARTTLS(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	tlsCfg, err := SelfSigned("mx.test")
	if err != nil {
		t.Fatal(err)
	}
	g := startGateway(t, sp, authPolicy(t, false), func(c *Config) { c.TLS = tlsCfg })

	for _, tc := range []struct {
		name string
		line string
	}{
		{"AUTH PLAIN with an initial response gets 523 5.7.10", "AUTH PLAIN " + b64("\x00alice\x00"+authPass)},
		{"AUTH PLAIN without an initial response gets 523 5.7.10", "AUTH PLAIN"},
		{"AUTH LOGIN gets 523 5.7.10", "AUTH LOGIN"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := smtptest.Dial(t, g.addr)
			replyWant(c, "220")
			caps := ehlo(c, "client.test")
			if !hasCap(caps, "STARTTLS") || hasCap(caps, "AUTH") {
				t.Fatalf("before STARTTLS the gateway offers %q; want STARTTLS and no AUTH", caps)
			}
			cmdWant(c, tc.line, "523 5.7.10")
			// The refused AUTH gave no relaying rights.
			cmdWant(c, "MAIL FROM:<alice@example.org>", "250 2.0.0")
			cmdWant(c, "RCPT TO:<bob@other.test>", "554 5.7.1")
		})
	}
}

func TestAuthOnPlaintextWhenAllowedInsecure(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, authPolicy(t, true))

	const (
		userChallenge = "334 VXNlcm5hbWU6" // "Username:"
		passChallenge = "334 UGFzc3dvcmQ6" // "Password:"
	)
	for _, tc := range []struct {
		name  string
		steps []authStep
		ok    bool
	}{
		{"AUTH PLAIN with an initial response and the right password succeeds",
			[]authStep{{"AUTH PLAIN " + b64("\x00alice\x00"+authPass), "235 2.0.0"}}, true},
		{"AUTH PLAIN after an empty challenge and the right password succeeds",
			[]authStep{{"AUTH PLAIN", "334"}, {b64("\x00alice\x00" + authPass), "235 2.0.0"}}, true},
		{"AUTH PLAIN naming alice as her own authorization identity succeeds",
			[]authStep{{"AUTH PLAIN " + b64("alice\x00alice\x00"+authPass), "235 2.0.0"}}, true},
		{"AUTH LOGIN with both challenges and the right password succeeds",
			[]authStep{{"AUTH LOGIN", userChallenge}, {b64("alice"), passChallenge}, {b64(authPass), "235 2.0.0"}}, true},
		{"AUTH LOGIN with the user name as initial response and the right password succeeds",
			[]authStep{{"AUTH LOGIN " + b64("alice"), passChallenge}, {b64(authPass), "235 2.0.0"}}, true},
		{"AUTH PLAIN with a wrong password gets 535 5.7.8",
			[]authStep{{"AUTH PLAIN " + b64("\x00alice\x00wrong"), "535 5.7.8"}}, false},
		{"AUTH PLAIN for an unknown user gets 535 5.7.8",
			[]authStep{{"AUTH PLAIN " + b64("\x00mallory\x00"+authPass), "535 5.7.8"}}, false},
		{"AUTH PLAIN acting for another identity gets 535 5.7.8",
			[]authStep{{"AUTH PLAIN " + b64("bob\x00alice\x00"+authPass), "535 5.7.8"}}, false},
		{"AUTH LOGIN with a wrong password gets 535 5.7.8",
			[]authStep{{"AUTH LOGIN", userChallenge}, {b64("alice"), passChallenge}, {b64("wrong"), "535 5.7.8"}}, false},
		{"AUTH LOGIN with an initial response and a wrong password gets 535 5.7.8",
			[]authStep{{"AUTH LOGIN " + b64("alice"), passChallenge}, {b64("wrong"), "535 5.7.8"}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := queueCount(t, sp)
			c := smtptest.Dial(t, g.addr)
			replyWant(c, "220")
			if caps := ehlo(c, "client.test"); !hasCap(caps, "AUTH PLAIN LOGIN") {
				t.Fatalf("EHLO offers %q, want AUTH PLAIN LOGIN", caps)
			}
			for _, s := range tc.steps {
				cmdWant(c, s.send, s.want)
			}
			cmdWant(c, "MAIL FROM:<alice@example.org>", "250 2.0.0")
			if !tc.ok {
				cmdWant(c, "RCPT TO:<bob@other.test>", "554 5.7.1")
				cmdWant(c, "DATA", "502 5.5.1")
				if got := queueCount(t, sp); got != before {
					t.Fatalf("%d mails queued after failed AUTH", got-before)
				}
				return
			}
			cmdWant(c, "RCPT TO:<bob@other.test>", "250 2.0.0")
			cmdWant(c, "DATA", "354")
			c.Send(uniqueMessage(t, "hi") + ".\r\n")
			m := queuedMail(t, sp, replyWant(c, "250 2.0.0"))
			if m.Envelope.AuthUser != "alice" || m.Envelope.TLS {
				t.Errorf("envelope AuthUser %q TLS %v, want alice and false", m.Envelope.AuthUser, m.Envelope.TLS)
			}
			if body := storedBody(t, sp, m); !strings.Contains(body, " with ESMTPA id ") {
				t.Errorf("Received header does not say ESMTPA: %q", body)
			}
			cmdWant(c, "AUTH PLAIN "+b64("\x00alice\x00"+authPass), "503 5.5.1")
		})
	}
}

// startTLS upgrades an SMTP client connection after "STARTTLS" got 220.
func startTLS(c *smtptest.Client) {
	c.T.Helper()
	cmdWant(c, "STARTTLS", "220 2.0.0")
	c.UpgradeTLS("mx.test")
}

func TestAuthAfterSTARTTLS(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	tlsCfg, err := SelfSigned("mx.test")
	if err != nil {
		t.Fatal(err)
	}
	g := startGateway(t, sp, authPolicy(t, false), func(c *Config) { c.TLS = tlsCfg })

	for _, tc := range []struct {
		name  string
		steps []authStep
		ok    bool
	}{
		{"AUTH PLAIN with the right password succeeds under TLS",
			[]authStep{{"AUTH PLAIN " + b64("\x00alice\x00"+authPass), "235 2.0.0"}}, true},
		{"AUTH LOGIN with the right password succeeds under TLS",
			[]authStep{{"AUTH LOGIN", "334 VXNlcm5hbWU6"}, {b64("alice"), "334 UGFzc3dvcmQ6"}, {b64(authPass), "235 2.0.0"}}, true},
		{"AUTH PLAIN with a wrong password gets 535 5.7.8 under TLS",
			[]authStep{{"AUTH PLAIN " + b64("\x00alice\x00wrong"), "535 5.7.8"}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := queueCount(t, sp)
			c := smtptest.Dial(t, g.addr)
			replyWant(c, "220")
			ehlo(c, "client.test")
			startTLS(c)
			caps := ehlo(c, "client.test")
			if hasCap(caps, "STARTTLS") || !hasCap(caps, "AUTH PLAIN LOGIN") {
				t.Fatalf("after STARTTLS the gateway offers %q; want AUTH PLAIN LOGIN and no STARTTLS", caps)
			}
			for _, s := range tc.steps {
				cmdWant(c, s.send, s.want)
			}
			cmdWant(c, "MAIL FROM:<alice@example.org>", "250 2.0.0")
			if !tc.ok {
				cmdWant(c, "RCPT TO:<bob@other.test>", "554 5.7.1")
				if got := queueCount(t, sp); got != before {
					t.Fatalf("%d mails queued after failed AUTH", got-before)
				}
				return
			}
			cmdWant(c, "RCPT TO:<bob@other.test>", "250 2.0.0")
			cmdWant(c, "DATA", "354")
			c.Send(uniqueMessage(t, "hi") + ".\r\n")
			m := queuedMail(t, sp, replyWant(c, "250 2.0.0"))
			if e := m.Envelope; e.AuthUser != "alice" || !e.TLS || e.ClientIP != "127.0.0.1" {
				t.Errorf("envelope %+v, want AuthUser alice and TLS", e)
			}
			if body := storedBody(t, sp, m); !strings.Contains(body, " with ESMTPSA id ") {
				t.Errorf("Received header does not say ESMTPSA: %q", body)
			}
		})
	}
}

func TestRejectSenders(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, relayPolicy(t, `  relayNetworks: ["127.0.0.0/8"]
  rejectSenders: ["spammer@bad.test", "@evil.test"]
`))

	for _, tc := range []struct {
		name string
		from string
		want string
	}{
		{"an exactly listed sender is refused with 553 5.7.1", "spammer@bad.test", "553 5.7.1"},
		{"an exactly listed sender is refused whatever its case", "Spammer@BAD.test", "553 5.7.1"},
		{"another user at a listed sender's domain is accepted", "friend@bad.test", "250 2.0.0"},
		{"any sender at a listed @domain is refused with 553 5.7.1", "anyone@evil.test", "553 5.7.1"},
		{"a listed @domain matches whatever its case", "anyone@EVIL.Test", "553 5.7.1"},
		{"an unlisted sender is accepted", "alice@example.org", "250 2.0.0"},
		{"the null sender is accepted", "", "250 2.0.0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := queueCount(t, sp)
			c := smtptest.DialReady(t, g.addr)
			cmdWant(c, "MAIL FROM:<"+tc.from+">", tc.want)
			if tc.want != "250 2.0.0" {
				cmdWant(c, "RCPT TO:<bob@example.net>", "502 5.5.1")
				cmdWant(c, "DATA", "502 5.5.1")
				if got := queueCount(t, sp); got != before {
					t.Fatalf("%d mails queued from a refused sender", got-before)
				}
				return
			}
			cmdWant(c, "RCPT TO:<bob@example.net>", "250 2.0.0")
			cmdWant(c, "DATA", "354")
			c.Send(uniqueMessage(t, "hi") + ".\r\n")
			if e := queuedMail(t, sp, replyWant(c, "250 2.0.0")).Envelope; e.From != tc.from {
				t.Errorf("envelope From %q, want %q", e.From, tc.from)
			}
		})
	}
}

// sizedMessage is a message of exactly size octets as the client means it
// (RFC 1870: CRLFs counted, the terminating dot not), in lines of 78.
func sizedMessage(size int) string {
	var b strings.Builder
	b.WriteString("Subject: size\r\n\r\n")
	for rem := size - b.Len(); rem > 0; rem = size - b.Len() {
		l := min(rem, 78)
		if rem-l == 1 { // leave no single octet for a last line
			l--
		}
		b.WriteString(strings.Repeat("x", l-2) + "\r\n")
	}
	return b.String()
}

func TestMaxMessageBytes(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, relayPolicy(t, `  relayNetworks: ["127.0.0.0/8"]
  maxMessageBytes: 2048
`))

	for _, tc := range []struct {
		name      string
		mailParam string
		mailWant  string
		size      int
		want      string
	}{
		{"a declared SIZE over the limit is refused at MAIL FROM with 552 5.3.4", " SIZE=4096", "552 5.3.4", 0, ""},
		{"a declared SIZE just under the limit is accepted", " SIZE=2047", "250 2.0.0", 100, "250 2.0.0"},
		{"a message over the limit is refused after DATA with 552 5.3.4", "", "250 2.0.0", 3000, "552 5.3.4"},
		{"a message one octet over the limit is refused with 552 5.3.4", "", "250 2.0.0", 2049, "552 5.3.4"},
		{"a message well under the limit is queued", "", "250 2.0.0", 1000, "250 2.0.0"},
		{"a message one octet under the limit is queued", " SIZE=2047", "250 2.0.0", 2047, "250 2.0.0"},
		// go-smtp refuses a message of exactly its limit (it checks its
		// budget before reading the final dot), so the limit is exclusive
		// everywhere, SIZE= included, and EHLO shows the configured number.
		{"a message of exactly the limit is refused, the limit being exclusive", "", "250 2.0.0", 2048, "552 5.3.4"},
		{"a SIZE= of exactly the limit is refused", " SIZE=2048", "552 5.3.4", 0, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := queueCount(t, sp)
			c := smtptest.Dial(t, g.addr)
			replyWant(c, "220")
			if caps := ehlo(c, "client.test"); !hasCap(caps, "SIZE 2048") {
				t.Fatalf("EHLO offers %q, want SIZE 2048", caps)
			}
			cmdWant(c, "MAIL FROM:<alice@example.org>"+tc.mailParam, tc.mailWant)
			if tc.size == 0 {
				cmdWant(c, "RCPT TO:<bob@example.net>", "502 5.5.1")
			} else {
				cmdWant(c, "RCPT TO:<bob@example.net>", "250 2.0.0")
				cmdWant(c, "DATA", "354")
				data := sizedMessage(tc.size)
				if len(data) != tc.size {
					t.Fatalf("test message is %d octets, want %d", len(data), tc.size)
				}
				c.Send(data + ".\r\n")
				reply := replyWant(c, tc.want)
				if tc.want == "250 2.0.0" {
					if body := storedBody(t, sp, queuedMail(t, sp, reply)); !strings.HasSuffix(body, "\r\n"+data) {
						t.Errorf("stored body does not end with the message")
					}
					return
				}
			}
			if got := queueCount(t, sp); got != before {
				t.Fatalf("%d mails queued over the size limit", got-before)
			}
			// The session goes on.
			expectNOOPNext(c)
			reply := sendMail(c, "alice@example.org", "bob@example.net", uniqueMessage(t, "hi"), "250 2.0.0")
			queuedMail(t, sp, reply)
		})
	}
}

func TestMaxRecipients(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)

	for _, tc := range []struct {
		name  string
		rcpts int
	}{
		{"100 recipients are all accepted and stored", 100},
		{"the 101st recipient gets 452 4.5.3 and the first 100 are stored", 101},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := smtptest.DialReady(t, g.addr)
			cmdWant(c, "MAIL FROM:<alice@example.org>", "250 2.0.0")
			// Pipelined, as a real client would, then the replies in order.
			var cmds strings.Builder
			for i := 1; i <= tc.rcpts; i++ {
				fmt.Fprintf(&cmds, "RCPT TO:<r%d@example.net>\r\n", i)
			}
			c.Send(cmds.String())
			for i := 1; i <= tc.rcpts; i++ {
				want := "250 2.0.0"
				if i > policy.DefaultMaxRecipients {
					want = "452 4.5.3"
				}
				replyWant(c, want)
			}
			cmdWant(c, "DATA", "354")
			c.Send(uniqueMessage(t, "hi") + ".\r\n")
			e := queuedMail(t, sp, replyWant(c, "250 2.0.0")).Envelope
			if len(e.Rcpts) != policy.DefaultMaxRecipients {
				t.Fatalf("%d recipients stored, want %d", len(e.Rcpts), policy.DefaultMaxRecipients)
			}
			for i, r := range e.Rcpts {
				if want := fmt.Sprintf("r%d@example.net", i+1); r.Addr != want {
					t.Fatalf("recipient %d is %q, want %q", i, r.Addr, want)
				}
			}
		})
	}
}

// labels makes a domain name of exactly n octets from labels of up to 63.
func labels(n int) string {
	var parts []string
	for n > 0 {
		l := min(63, n)
		if n-l == 1 { // a dot and nothing after it: shorten this label
			l--
		}
		parts = append(parts, strings.Repeat("d", l))
		n -= l + 1
	}
	return strings.Join(parts, ".")
}

func TestRFC5321SizeLimits(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)

	local64 := strings.Repeat("l", 64)
	// "<" local "@" domain ">": 1+64+1+189+1 = 256.
	path256 := local64 + "@" + labels(189)
	path257 := local64 + "@" + labels(190)
	envid := func(lineLen int) string {
		prefix := "MAIL FROM:<alice@example.org> ENVID="
		return prefix + strings.Repeat("e", lineLen-len(prefix)-2)
	}
	for _, tc := range []struct {
		name  string
		steps []authStep // sent after EHLO (or instead of it, when the first is a HELO/EHLO)
	}{
		{"a local part of 64 octets is accepted", []authStep{
			{"MAIL FROM:<" + local64 + "@example.org>", "250 2.0.0"},
			{"RCPT TO:<" + local64 + "@example.net>", "250 2.0.0"}}},
		{"a recipient local part of 65 octets is refused with 501 5.1.3", []authStep{
			{"MAIL FROM:<alice@example.org>", "250 2.0.0"},
			{"RCPT TO:<" + local64 + "l@example.net>", "501 5.1.3"}}},
		{"a sender local part of 65 octets is refused with 501 5.1.7", []authStep{
			{"MAIL FROM:<" + local64 + "l@example.org>", "501 5.1.7"}}},
		{"a path of 256 octets is accepted", []authStep{
			{"MAIL FROM:<" + path256 + ">", "250 2.0.0"},
			{"RCPT TO:<" + path256 + ">", "250 2.0.0"}}},
		{"a recipient path of 257 octets is refused with 501 5.1.3", []authStep{
			{"MAIL FROM:<alice@example.org>", "250 2.0.0"},
			{"RCPT TO:<" + path257 + ">", "501 5.1.3"}}},
		{"a domain label of 63 octets is accepted", []authStep{
			{"MAIL FROM:<alice@example.org>", "250 2.0.0"},
			{"RCPT TO:<bob@" + strings.Repeat("d", 63) + ".example>", "250 2.0.0"}}},
		{"a domain label of 64 octets is refused with 501 5.1.3", []authStep{
			{"MAIL FROM:<alice@example.org>", "250 2.0.0"},
			{"RCPT TO:<bob@" + strings.Repeat("d", 64) + ".example>", "501 5.1.3"}}},
		{"an EHLO domain of 255 octets in labels of 63 is accepted", []authStep{
			{"EHLO " + labels(255), "250"},
			{"MAIL FROM:<alice@example.org>", "250 2.0.0"}}},
		{"an overlong HELO is refused with 501 5.5.4 and the client may try again", []authStep{
			{"HELO " + labels(300), "501 5.5.4"},
			{"MAIL FROM:<alice@example.org>", "502 5.5.1"},
			{"HELO client.test", "250 2.0.0"},
			{"MAIL FROM:<alice@example.org>", "250 2.0.0"}}},
		{"a command line of 512 octets is accepted", []authStep{
			{envid(512), "250 2.0.0"}}},
		{"a MAIL FROM line of 10,000 octets is refused with 501 5.1.7 and the session goes on", []authStep{
			{"MAIL FROM:<" + strings.Repeat("a", 9975) + "@example.org>", "501 5.1.7"},
			{"MAIL FROM:<alice@example.org>", "250 2.0.0"}}},
		{"a RCPT TO line of 10,000 octets is refused with 501 5.1.3 and the session goes on", []authStep{
			{"MAIL FROM:<alice@example.org>", "250 2.0.0"},
			{"RCPT TO:<bob@" + labels(9975) + ">", "501 5.1.3"},
			{"RCPT TO:<bob@example.net>", "250 2.0.0"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := smtptest.Dial(t, g.addr)
			replyWant(c, "220")
			if first := tc.steps[0].send; !strings.HasPrefix(first, "HELO ") && !strings.HasPrefix(first, "EHLO ") {
				ehlo(c, "client.test")
			}
			for _, s := range tc.steps {
				cmdWant(c, s.send, s.want)
			}
			expectNOOPNext(c)
			// A new connection is served as well.
			smtptest.DialReady(t, g.addr).Cmd("QUIT", 221)
		})
	}
}

func TestRFC5321TextLineOf1000OctetsIsStoredUnchanged(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)

	for _, tc := range []struct {
		name string
		line string
	}{
		{"a text line of 998 octets plus CRLF is stored unchanged", strings.Repeat("t", 998)},
		{"a dot-stuffed text line of 998 octets is stored with one dot", "." + strings.Repeat("t", 997)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := smtptest.DialReady(t, g.addr)
			data := "Subject: long\r\n\r\n" + tc.line + "\r\nend\r\n"
			sent := data
			if strings.HasPrefix(tc.line, ".") {
				sent = strings.Replace(data, "\r\n.", "\r\n..", 1)
			}
			cmdWant(c, "MAIL FROM:<alice@example.org>", "250 2.0.0")
			cmdWant(c, "RCPT TO:<bob@example.net>", "250 2.0.0")
			cmdWant(c, "DATA", "354")
			c.Send(sent + ".\r\n")
			body := storedBody(t, sp, queuedMail(t, sp, replyWant(c, "250 2.0.0")))
			if !strings.HasSuffix(body, "\r\n"+data) {
				t.Fatalf("stored body does not end with the message as sent")
			}
		})
	}
}

func TestLineOverMaxLineLengthClosesTheConnection(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)

	for _, tc := range []struct {
		name string
		line string
	}{
		{"a command line over 64 KiB gets 500 5.4.0 and the connection is closed", "NOOP " + strings.Repeat("j", 70<<10)},
		{"a MAIL FROM over 64 KiB gets 500 5.4.0 and the connection is closed", "MAIL FROM:<" + strings.Repeat("a", 70<<10) + "@example.org>"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := smtptest.DialReady(t, g.addr)
			cmdWant(c, tc.line, "500 5.4.0")
			c.ExpectClosed()
			smtptest.DialReady(t, g.addr).Cmd("QUIT", 221)
		})
	}
}

func TestMaxErrorsClosesTheConnection(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, relayPolicy(t, `  relayNetworks: ["127.0.0.0/8"]
  rejectSenders: ["@evil.test"]
  limits:
    maxErrors: 3
`))

	for _, tc := range []struct {
		name string
		bad  authStep
	}{
		{"four unknown commands end the session with 421 4.7.0", authStep{"FROB", "500 5.5.2"}},
		{"four out-of-order commands end the session with 421 4.7.0", authStep{"RCPT TO:<bob@example.net>", "502 5.5.1"}},
		{"four refused senders end the session with 421 4.7.0", authStep{"MAIL FROM:<x@evil.test>", "553 5.7.1"}},
		{"four malformed addresses end the session with 421 4.7.0", authStep{"MAIL FROM:<x@-bad-.test>", "501 5.1.7"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := smtptest.DialReady(t, g.addr)
			for i := 0; i < 3; i++ {
				cmdWant(c, tc.bad.send, tc.bad.want)
			}
			// Three errors are within the budget.
			expectNOOPNext(c)
			cmdWant(c, tc.bad.send, tc.bad.want)
			replyWant(c, "421 4.7.0")
			c.ExpectClosed()
		})
	}
}

func TestMaxReceivedHeaders(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, relayPolicy(t, `  relayNetworks: ["127.0.0.0/8"]
  limits:
    maxReceivedHeaders: 5
`))

	received := func(n int, name string) string {
		return strings.Repeat(name+": from a.test by b.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n", n)
	}
	for _, tc := range []struct {
		name string
		data string
		want string
	}{
		{"a message with 5 Received headers is queued", received(5, "Received") + "Subject: hops\r\n\r\nhi\r\n", "250 2.0.0"},
		{"a message with 6 Received headers is refused with 554 5.4.6", received(6, "Received") + "Subject: hops\r\n\r\nhi\r\n", "554 5.4.6"},
		{"Received headers are counted whatever their case", received(6, "RECEIVED") + "Subject: hops\r\n\r\nhi\r\n", "554 5.4.6"},
		{"Received lines in the body are not counted", received(5, "Received") + "Subject: hops\r\n\r\n" + received(5, "Received"), "250 2.0.0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := queueCount(t, sp)
			c := smtptest.DialReady(t, g.addr)
			reply := sendMail(c, "alice@example.org", "bob@example.net", tc.data, tc.want)
			if tc.want == "250 2.0.0" {
				if body := storedBody(t, sp, queuedMail(t, sp, reply)); !strings.HasSuffix(body, "\r\n"+tc.data) {
					t.Errorf("stored body does not end with the message")
				}
				return
			}
			if got := queueCount(t, sp); got != before {
				t.Fatalf("%d mails queued from a loop", got-before)
			}
			expectNOOPNext(c)
		})
	}
}

func TestSMTPUTF8(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)

	for _, tc := range []struct {
		name     string
		mail     string
		mailWant string
		rcpt     string
		rcptWant string
	}{
		{"a non-ASCII sender without SMTPUTF8 is refused with 553 5.6.7", "MAIL FROM:<ü@example.org>", "553 5.6.7", "", ""},
		{"a non-ASCII sender domain without SMTPUTF8 is refused with 553 5.6.7", "MAIL FROM:<a@bücher.example>", "553 5.6.7", "", ""},
		{"a non-ASCII recipient without SMTPUTF8 is refused with 553 5.6.7", "MAIL FROM:<a@example.org>", "250 2.0.0", "RCPT TO:<ü@example.net>", "553 5.6.7"},
		{"a non-ASCII sender with SMTPUTF8 is accepted", "MAIL FROM:<ü@example.org> SMTPUTF8", "250 2.0.0", "RCPT TO:<bob@example.net>", "250 2.0.0"},
		{"a non-ASCII recipient with SMTPUTF8 is accepted", "MAIL FROM:<a@example.org> SMTPUTF8", "250 2.0.0", "RCPT TO:<ü@bücher.example>", "250 2.0.0"},
		{"an address that is not UTF-8 is refused with 501 5.1.7 even with SMTPUTF8", "MAIL FROM:<\xff@example.org> SMTPUTF8", "501 5.1.7", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := queueCount(t, sp)
			c := smtptest.DialReady(t, g.addr)
			cmdWant(c, tc.mail, tc.mailWant)
			if tc.rcpt == "" {
				cmdWant(c, "RCPT TO:<bob@example.net>", "502 5.5.1")
				return
			}
			cmdWant(c, tc.rcpt, tc.rcptWant)
			if tc.rcptWant != "250 2.0.0" {
				cmdWant(c, "DATA", "502 5.5.1")
				if got := queueCount(t, sp); got != before {
					t.Fatalf("%d mails queued", got-before)
				}
				return
			}
			cmdWant(c, "DATA", "354")
			c.Send(uniqueMessage(t, "grüße") + ".\r\n")
			e := queuedMail(t, sp, replyWant(c, "250 2.0.0")).Envelope
			from := strings.TrimSuffix(strings.TrimPrefix(tc.mail, "MAIL FROM:<"), "> SMTPUTF8")
			to := strings.TrimSuffix(strings.TrimPrefix(tc.rcpt, "RCPT TO:<"), ">")
			if !e.Mail.SMTPUTF8 || e.From != from || len(e.Rcpts) != 1 || e.Rcpts[0].Addr != to {
				t.Errorf("envelope From %q Rcpts %+v SMTPUTF8 %v; want %q, %q, true", e.From, e.Rcpts, e.Mail.SMTPUTF8, from, to)
			}
		})
	}
}

func TestConnectionLimits(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)

	for _, tc := range []struct {
		name    string
		limits  string
		clients [3]string // two admitted, then one refused
		refusal string
		other   string // a client that is still admitted while the third is refused, or ""
	}{
		{"a third connection from one address gets 421 4.7.0 and a slot frees when one closes",
			"maxConnectionsPerIP: 2", [3]string{"127.0.0.1", "127.0.0.1", "127.0.0.1"},
			"421 4.7.0 Too many connections from your address", "127.0.0.2"},
		{"a third connection in all gets 421 4.7.0 and a slot frees when one closes",
			"maxConnections: 2", [3]string{"127.0.0.1", "127.0.0.2", "127.0.0.3"},
			"421 4.7.0 Too many connections,", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := startGateway(t, sp, relayPolicy(t, "  relayNetworks: [\"127.0.0.0/8\"]\n  limits:\n    "+tc.limits+"\n"))
			a := smtptest.DialFrom(t, g.addr, tc.clients[0])
			replyWant(a, "220")
			b := smtptest.DialFrom(t, g.addr, tc.clients[1])
			replyWant(b, "220")
			var other *smtptest.Client
			if tc.other != "" {
				other = smtptest.DialFrom(t, g.addr, tc.other)
				replyWant(other, "220")
			}
			third := smtptest.DialFrom(t, g.addr, tc.clients[2])
			if r := replyWant(third, "421 4.7.0"); !strings.HasPrefix(r, tc.refusal) {
				t.Errorf("refusal %q, want %q", r, tc.refusal)
			}
			third.ExpectClosed()
			// The admitted ones still work.
			b.Cmd("EHLO client.test", 250)
			if other != nil {
				other.Cmd("EHLO client.test", 250)
				other.Cmd("QUIT", 221)
			}
			a.Cmd("QUIT", 221)
			want := 1
			eventually(t, 5*time.Second, "the closed connections to free their slots", func() bool { return g.OpenConnections() == want })
			d := smtptest.DialFrom(t, g.addr, tc.clients[2])
			replyWant(d, "220")
			d.Cmd("EHLO client.test", 250)
		})
	}
}

func TestProxyProtocol(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, relayPolicy(t, `  relayNetworks: ["192.0.2.0/24"]
  acceptedDomains: ["example.org"]
`), func(c *Config) { c.ProxyProtocol = true })

	v2 := func(src string) string {
		h := &proxyproto.Header{
			Version: 2, Command: proxyproto.PROXY, TransportProtocol: proxyproto.TCPv4,
			SourceAddr:      &net.TCPAddr{IP: net.ParseIP(src), Port: 12345},
			DestinationAddr: &net.TCPAddr{IP: net.ParseIP("10.0.0.1"), Port: 25},
		}
		b, err := h.Format()
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	for _, tc := range []struct {
		name   string
		header string
		ip     string
		relay  bool
	}{
		{"a v1 header from a relay network may relay", "PROXY TCP4 192.0.2.7 10.0.0.1 12345 25\r\n", "192.0.2.7", true},
		{"a v1 header from elsewhere may only send to accepted domains", "PROXY TCP4 198.51.100.7 10.0.0.1 12345 25\r\n", "198.51.100.7", false},
		{"a v2 header from a relay network may relay", v2("192.0.2.7"), "192.0.2.7", true},
		{"a v2 header from elsewhere may only send to accepted domains", v2("198.51.100.7"), "198.51.100.7", false},
		{"a v1 TCP6 header from elsewhere may only send to accepted domains", "PROXY TCP6 2001:db8::7 2001:db8::1 12345 25\r\n", "2001:db8::7", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := queueCount(t, sp)
			c := smtptest.Dial(t, g.addr)
			c.Send(tc.header)
			replyWant(c, "220")
			ehlo(c, "client.test")
			cmdWant(c, "MAIL FROM:<alice@example.org>", "250 2.0.0")
			to := "bob@other.test"
			if tc.relay {
				cmdWant(c, "RCPT TO:<"+to+">", "250 2.0.0")
			} else {
				cmdWant(c, "RCPT TO:<"+to+">", "554 5.7.1")
				to = "bob@example.org"
				cmdWant(c, "RCPT TO:<"+to+">", "250 2.0.0")
			}
			cmdWant(c, "DATA", "354")
			c.Send(uniqueMessage(t, "hi") + ".\r\n")
			m := queuedMail(t, sp, replyWant(c, "250 2.0.0"))
			if e := m.Envelope; e.ClientIP != tc.ip || len(e.Rcpts) != 1 || e.Rcpts[0].Addr != to {
				t.Errorf("envelope ClientIP %q Rcpts %+v; want %s and %s", e.ClientIP, e.Rcpts, tc.ip, to)
			}
			if body := storedBody(t, sp, m); !strings.Contains(body, "(["+tc.ip+"])") {
				t.Errorf("Received header does not name %s: %q", tc.ip, body[:min(len(body), 200)])
			}
			if got := queueCount(t, sp); got != before+1 {
				t.Errorf("%d mails queued, want 1", got-before)
			}
		})
	}
}

func TestProxyProtocolIsRequiredWhenConfigured(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, relayPolicy(t, `  relayNetworks: ["192.0.2.0/24"]
  acceptedDomains: ["example.org"]
`), func(c *Config) { c.ProxyProtocol = true })

	for _, tc := range []struct {
		name  string
		first string
	}{
		{"a connection that starts with SMTP instead of a PROXY header is closed without a greeting", "EHLO client.test\r\n"},
		{"a connection with a malformed v1 header is closed without a greeting", "PROXY TCP4 192.0.2.7\r\nEHLO client.test\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := smtptest.Dial(t, g.addr)
			c.Send(tc.first)
			c.ExpectClosed()
			eventually(t, 5*time.Second, "the refused connection to free its slot", func() bool { return g.OpenConnections() == 0 })
			if got := queueCount(t, sp); got != 0 {
				t.Fatalf("%d mails queued", got)
			}
		})
	}
}
