package smtpgw

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/crypto/bcrypt"

	"github.com/jetmail/jetmail/internal/smtptest"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// Attacks at the seam between go-smtp and the session: transfers aborted,
// cut short or stalled, reads that fail in the middle of a command, and
// what must still hold afterwards. Each test here failed against go-smtp
// v0.26.0 as released (third_party/go-smtp/PATCHES.md says which patch
// fixes which).

// collectReplies reads replies until the connection closes or limit passes
// and returns their last lines.
func collectReplies(c *smtptest.Client, limit time.Duration) []string {
	var out []string
	end := time.Now().Add(limit)
	for time.Now().Before(end) {
		lines, err := c.ReplyLines(time.Until(end))
		if err != nil {
			return out
		}
		out = append(out, lines[len(lines)-1])
	}
	return out
}

// byMessageID indexes the queue by the Message-ID in each stored body.
func byMessageID(t *testing.T, sp *spool.Spool) map[string][]*spool.Message {
	t.Helper()
	out := map[string][]*spool.Message{}
	for _, m := range queued(t, sp) {
		body := storedBody(t, sp, m)
		i := strings.Index(body, "Message-ID: <")
		if i < 0 {
			out[""] = append(out[""], m)
			continue
		}
		id := body[i+len("Message-ID: <"):]
		id = id[:strings.IndexByte(id, '>')]
		out[id] = append(out[id], m)
	}
	return out
}

func TestAbortedBDATLeavesTheNextTransactionWhole(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)

	const rounds = 25
	acked := map[string]bool{}
	for _, abort := range []string{"RSET", "EHLO again.test"} {
		for _, pipelined := range []bool{false, true} {
			name := fmt.Sprintf("%s, pipelined %v", abort, pipelined)
			c := smtptest.DialReady(t, g.addr)
			for i := 0; i < rounds; i++ {
				id := fmt.Sprintf("%s.%v.%d@seam.test", strings.Fields(abort)[0], pipelined, i)
				msg := "Message-ID: <" + id + ">\r\nSubject: second\r\n\r\nthe second transaction\r\n"
				steps := []string{
					"MAIL FROM:<first@example.org>\r\n",
					"RCPT TO:<first@x.test>\r\n",
					"BDAT 5\r\nhello",
					abort + "\r\n",
					"MAIL FROM:<s@example.org>\r\n",
					"RCPT TO:<r1@x.test>\r\n",
					fmt.Sprintf("BDAT %d LAST\r\n%s", len(msg), msg),
				}
				var replies []string
				if pipelined {
					c.Send(strings.Join(steps, ""))
					for range steps {
						lines, err := c.ReplyLines(replyTimeout)
						if err != nil {
							t.Fatalf("%s round %d: %v after %q", name, i, err, replies)
						}
						replies = append(replies, lines[len(lines)-1])
					}
				} else {
					for _, s := range steps {
						c.Send(s)
						lines, err := c.ReplyLines(replyTimeout)
						if err != nil {
							t.Fatalf("%s round %d: %v after %q", name, i, err, replies)
						}
						replies = append(replies, lines[len(lines)-1])
					}
				}
				for j, r := range replies[:6] {
					if !strings.HasPrefix(r, "250 ") {
						t.Fatalf("%s round %d: reply %d to %q is %q", name, i, j, steps[j], r)
					}
				}
				if !strings.HasPrefix(replies[6], "250 2.0.0 Ok: queued as ") {
					t.Fatalf("%s round %d: the second transaction got %q", name, i, replies[6])
				}
				acked[id] = true
			}
			expectNOOPNext(c)
		}
	}

	// Every 250 is that message, with its own envelope, stored once; the
	// aborted transfers stored nothing.
	stored := byMessageID(t, sp)
	for id := range acked {
		ms := stored[id]
		if len(ms) != 1 {
			t.Errorf("%s acknowledged and stored %d times", id, len(ms))
			continue
		}
		e := ms[0].Envelope
		if e.From != "s@example.org" || len(e.Rcpts) != 1 || e.Rcpts[0].Addr != "r1@x.test" {
			t.Errorf("%s stored with envelope from %q to %+v", id, e.From, e.Rcpts)
		}
	}
	if len(stored) != len(acked) {
		t.Errorf("%d messages stored, %d acknowledged", len(stored), len(acked))
	}
}

func TestDATAAfterAnAbortedBDATIsStillUnderTheMinimumRate(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, relayPolicy(t, `  relayNetworks: ["127.0.0.0/8"]
  timeouts:
    data: 1m
    minDataRate: 1000
    dataRateGrace: 1s
`))
	c := smtptest.DialReady(t, g.addr)
	// The aborted transfer's end and the next DATA's start come in one
	// write, as close together as a client can put them.
	cmdWant(c, "MAIL FROM:<first@example.org>", "250 2.0.0")
	cmdWant(c, "RCPT TO:<first@x.test>", "250 2.0.0")
	c.Send("BDAT 5\r\nhelloRSET\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<r1@x.test>\r\nDATA\r\n")
	for _, want := range []string{"250 2.0.0", "250 2.0.0", "250 2.0.0", "250 2.0.0", "354"} {
		replyWant(c, want)
	}
	start := time.Now()
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for i := 0; i < 100; i++ { // 10 bytes per second, for at most 10 s
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			if _, err := c.Conn.Write([]byte("y")); err != nil {
				return
			}
		}
	}()
	replyWant(c, "421 4.4.2")
	if d := time.Since(start); d > 4*time.Second {
		t.Errorf("cut off after %s, want soon after the 1s grace", d)
	}
	c.ExpectClosed()
	if got := queueCount(t, sp); got != 0 {
		t.Errorf("%d queued", got)
	}
}

// forgedTail is the rest of a chunk that a slow or stalled client hopes the
// server will read as commands once it has cut the transfer short.
const forgedTail = "RSET\r\nMAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@elsewhere.test>\r\nDATA\r\n" +
	"Subject: pay now\r\n\r\nforged\r\n.\r\nQUIT\r\n"

func TestBDATChunkCutShortIsNeverRunAsCommands(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, relayPolicy(t, `  relayNetworks: ["127.0.0.0/8"]
  timeouts:
    command: 2s
    data: 1m
    minDataRate: 100
    dataRateGrace: 1s
`))
	head := "Subject: x\r\n" // the slow part
	chunk := head + forgedTail

	for _, tc := range []struct {
		name  string
		send  func(c *smtptest.Client)
		reply string
	}{
		{"a chunk trickled below the minimum rate gets 421 4.4.2 and a close", func(c *smtptest.Client) {
			for i := 0; i < len(head); i++ {
				time.Sleep(300 * time.Millisecond)
				if _, err := c.Conn.Write([]byte{head[i]}); err != nil {
					return
				}
			}
			c.Conn.Write([]byte(forgedTail))
		}, "421 4.4.2 Data rate below the minimum"},
		{"a chunk stalled past the idle timeout gets 421 4.4.2 and a close", func(c *smtptest.Client) {
			c.Conn.Write([]byte(head))
			time.Sleep(3 * time.Second)
			c.Conn.Write([]byte(forgedTail))
		}, "421 4.4.2 Timeout waiting for data"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := smtptest.DialReady(t, g.addr)
			cmdWant(c, "MAIL FROM:<alice@example.org>", "250 2.0.0")
			cmdWant(c, "RCPT TO:<bob@example.net>", "250 2.0.0")
			c.Send(fmt.Sprintf("BDAT %d LAST\r\n", len(chunk)))
			var wg sync.WaitGroup
			wg.Add(1)
			go func() { defer wg.Done(); tc.send(c) }()
			replies := collectReplies(c, 10*time.Second)
			wg.Wait()
			if len(replies) != 1 || !strings.HasPrefix(replies[0], tc.reply) {
				t.Fatalf("replies %q, want exactly one %q and a close", replies, tc.reply)
			}
			if got := queueCount(t, sp); got != 0 {
				t.Fatalf("%d queued: the rest of the chunk ran as commands", got)
			}
		})
	}
}

func TestAbortedTransfersAndResetsPipelinedAreAnsweredInStep(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)
	c := smtptest.DialReady(t, g.addr)
	msg := uniqueMessage(t, "one")
	// A client that pipelines everything: a refused chunk, a nested MAIL,
	// AUTH and STARTTLS in the middle of a transfer, then a whole message.
	c.Send("BDAT 8\r\nMAIL X\r\n" + // no transaction: the chunk is read and refused
		"MAIL FROM:<a@example.org>\r\n" +
		"MAIL FROM:<b@example.org>\r\n" + // nested: 503, the first stands
		"RCPT TO:<r@example.net>\r\n" +
		"BDAT 4\r\nab\r\n" +
		"AUTH PLAIN AGFsaWNlAHg=\r\n" + // during a transaction: 503
		"STARTTLS\r\n" + // during a transfer: refused
		fmt.Sprintf("BDAT %d LAST\r\n%s", len(msg), msg))
	want := []string{"502 5.5.1", "250 2.0.0", "503 5.5.1", "250 2.0.0", "250 2.0.0", "503 5.5.1", "502 5.5.1", "250 2.0.0"}
	var reply string
	for _, w := range want {
		reply = replyWant(c, w)
	}
	expectNOOPNext(c)
	m := queuedMail(t, sp, reply)
	if e := m.Envelope; e.From != "a@example.org" || len(e.Rcpts) != 1 || e.Rcpts[0].Addr != "r@example.net" {
		t.Errorf("envelope %+v", e)
	}
	if body := storedBody(t, sp, m); !strings.HasSuffix(body, "\r\nab\r\n"+msg) {
		t.Errorf("stored %q", body)
	}
}

func TestNestedMAILIsABadSequence(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)
	c := smtptest.DialReady(t, g.addr)
	cmdWant(c, "MAIL FROM:<a@example.org>", "250 2.0.0")
	cmdWant(c, "RCPT TO:<r@example.net>", "250 2.0.0")
	cmdWant(c, "MAIL FROM:<>", "503 5.5.1")
	cmdWant(c, "DATA", "354")
	c.Send(uniqueMessage(t, "x") + ".\r\n")
	if e := queuedMail(t, sp, replyWant(c, "250 2.0.0")).Envelope; e.From != "a@example.org" {
		t.Errorf("stored from %q", e.From)
	}
	// After the transaction a new MAIL is fine, the null sender too.
	cmdWant(c, "MAIL FROM:<>", "250 2.0.0")
	cmdWant(c, "MAIL FROM:<a@example.org>", "503 5.5.1")
}

func TestPartialCommandLineIsNotRunAtTheIdleTimeout(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, relayPolicy(t, `  relayNetworks: ["127.0.0.0/8"]
  timeouts:
    command: 1s
`))
	c := smtptest.DialReady(t, g.addr)
	cmdWant(c, "MAIL FROM:<a@example.org>", "250 2.0.0")
	cmdWant(c, "RCPT TO:<r@example.net>", "250 2.0.0")
	start := time.Now()
	c.Send("QUIT") // no line ending: not a command
	replies := collectReplies(c, 5*time.Second)
	if len(replies) != 1 || !strings.HasPrefix(replies[0], "421 4.4.2") {
		t.Fatalf("replies %q, want one 421 4.4.2", replies)
	}
	if d := time.Since(start); d > 2500*time.Millisecond {
		t.Errorf("closed after %s, want one 1s timeout", d)
	}
}

func TestOverlongLineInDATAGetsOneReplyAndAClose(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)
	c := smtptest.DialReady(t, g.addr)
	cmdWant(c, "MAIL FROM:<a@example.org>", "250 2.0.0")
	cmdWant(c, "RCPT TO:<r@example.net>", "250 2.0.0")
	cmdWant(c, "DATA", "354")
	go c.Conn.Write([]byte("Subject: " + strings.Repeat("h", 1<<20) + "\r\n\r\nbody\r\n.\r\nNOOP\r\n"))
	replies := collectReplies(c, 10*time.Second)
	if len(replies) != 1 || !strings.HasPrefix(replies[0], "500 5.5.2") {
		t.Fatalf("replies %q, want exactly one 500 5.5.2 and a close", replies)
	}
	if got := queueCount(t, sp); got != 0 {
		t.Errorf("%d queued", got)
	}
}

// tlsAuthPolicy is authPolicy's user alice with a small error budget and
// short timeouts.
func tlsAuthPolicy(t *testing.T) *policy.Relay {
	hash, err := bcrypt.GenerateFromPassword([]byte(authPass), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	secret := "apiVersion: v1\nkind: Secret\nmetadata:\n  name: smtp-users\n  namespace: mail\nstringData:\n  users: |\n    alice:" + string(hash) + "\n"
	return relayPolicy(t, nonRelaySpec+`  auth:
    usersSecretRef: {name: smtp-users, key: users}
    allowInsecure: true
  limits:
    maxErrors: 5
  timeouts:
    command: 1s
    session: 3s
`, secret)
}

func startTLSGateway(t *testing.T, sp *spool.Spool, pol *policy.Relay, lim AuthLimits) *testGateway {
	tlsCfg, err := SelfSigned("mx.test")
	if err != nil {
		t.Fatal(err)
	}
	return startGateway(t, sp, pol, func(c *Config) { c.TLS = tlsCfg; c.Auth = lim })
}

func TestFailedAUTHCountsTowardMaxErrorsUnderTLS(t *testing.T) {
	n := startNATS(t)
	g := startTLSGateway(t, n.spool(t), tlsAuthPolicy(t), AuthLimits{Failures: 1000, Delay: time.Millisecond, MaxDelay: time.Millisecond})
	for _, tls := range []bool{false, true} {
		c := smtptest.DialReady(t, g.addr)
		if tls {
			startTLS(c)
			ehlo(c, "client.test")
		}
		for i := 0; i < 5; i++ {
			cmdWant(c, "AUTH PLAIN "+b64("\x00alice\x00wrong"), "535 5.7.8")
		}
		// The sixth error is one too many: the session ends before the
		// right password can be tried.
		c.Send("AUTH PLAIN " + b64("\x00alice\x00wrong") + "\r\nAUTH PLAIN " + b64("\x00alice\x00"+authPass) + "\r\n")
		replies := collectReplies(c, 5*time.Second)
		if len(replies) != 2 || !strings.HasPrefix(replies[0], "535 5.7.8") || !strings.HasPrefix(replies[1], "421 4.7.0") {
			t.Errorf("TLS %v: after five failures, replies %q, want 535 then 421 4.7.0 and a close", tls, replies)
		}
	}
	if got := testutil.ToFloat64(g.metrics.auth.WithLabelValues("failure")); got != 12 {
		t.Errorf("jetmail_smtp_auth_total{result=failure} = %v, want 12", got)
	}
	if got := testutil.ToFloat64(g.metrics.auth.WithLabelValues("success")); got != 0 {
		t.Errorf("jetmail_smtp_auth_total{result=success} = %v, want 0", got)
	}
}

func TestAUTHFailuresFromOneAddressLockItOut(t *testing.T) {
	n := startNATS(t)
	g := startTLSGateway(t, n.spool(t), tlsAuthPolicy(t), AuthLimits{Failures: 4, Delay: 50 * time.Millisecond, MaxDelay: 200 * time.Millisecond})
	// Four failures over two connections from 127.0.0.1, the later ones
	// answered more slowly.
	var took []time.Duration
	for i := 0; i < 2; i++ {
		c := smtptest.DialReady(t, g.addr)
		startTLS(c)
		ehlo(c, "client.test")
		for j := 0; j < 2; j++ {
			start := time.Now()
			cmdWant(c, "AUTH PLAIN "+b64("\x00alice\x00wrong"), "535 5.7.8")
			took = append(took, time.Since(start))
		}
	}
	if took[3] < 200*time.Millisecond || took[2] < 100*time.Millisecond {
		t.Errorf("replies to failures took %v, want growing delays of 0, 50, 100, 200 ms", took)
	}
	// Now even the right password is not checked from this address...
	c := smtptest.DialReady(t, g.addr)
	cmdWant(c, "AUTH PLAIN "+b64("\x00alice\x00"+authPass), "421 4.7.0")
	c.ExpectClosed()
	// ...while another address is unaffected.
	other := smtptest.DialFrom(t, g.addr, "127.0.0.2")
	other.Expect(220)
	other.Cmd("EHLO other.test", 250)
	cmdWant(other, "AUTH PLAIN "+b64("\x00alice\x00"+authPass), "235 2.0.0")
	if got := testutil.ToFloat64(g.metrics.auth.WithLabelValues("locked")); got != 1 {
		t.Errorf("jetmail_smtp_auth_total{result=locked} = %v, want 1", got)
	}
}

func TestPasswordChecksAreBounded(t *testing.T) {
	n := startNATS(t)
	// One check slot, and a wait for it shorter than a check that holds it.
	g := startTLSGateway(t, n.spool(t), tlsAuthPolicy(t), AuthLimits{Checks: 1, CheckWait: time.Millisecond})
	hold := make(chan struct{})
	started := make(chan struct{})
	go g.auth.check(func() { close(started); <-hold })
	<-started
	c := smtptest.DialReady(t, g.addr)
	cmdWant(c, "AUTH PLAIN "+b64("\x00alice\x00"+authPass), "454 4.7.0")
	close(hold)
	cmdWant(c, "AUTH PLAIN "+b64("\x00alice\x00"+authPass), "235 2.0.0")
	if got := testutil.ToFloat64(g.metrics.auth.WithLabelValues("busy")); got != 1 {
		t.Errorf("jetmail_smtp_auth_total{result=busy} = %v, want 1", got)
	}
}

func TestFailedSTARTTLSHandshakeClosesTheConnection(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startTLSGateway(t, sp, tlsAuthPolicy(t), AuthLimits{})

	t.Run("a plaintext command where the handshake should be ends the session", func(t *testing.T) {
		c := smtptest.DialReady(t, g.addr)
		cmdWant(c, "STARTTLS", "220 2.0.0")
		// No protection may be dropped silently: no 550 and on in
		// plaintext, as go-smtp did.
		c.Send("MAIL FROM:<a@example.org>\r\nRCPT TO:<r@example.org>\r\nNOOP\r\n")
		if replies := collectReplies(c, 5*time.Second); len(replies) != 0 {
			t.Fatalf("replies %q after a failed handshake, want a close", replies)
		}
	})
	t.Run("a STARTTLS with no handshake ends after one command timeout", func(t *testing.T) {
		c := smtptest.DialReady(t, g.addr)
		cmdWant(c, "STARTTLS", "220 2.0.0")
		start := time.Now()
		if replies := collectReplies(c, 5*time.Second); len(replies) != 0 {
			t.Fatalf("replies %q, want a close", replies)
		}
		if d := time.Since(start); d > 1800*time.Millisecond {
			t.Errorf("closed after %s, want one 1s timeout", d)
		}
	})
	if got := queueCount(t, sp); got != 0 {
		t.Errorf("%d queued", got)
	}
}

func TestTimeoutsUnderTLSAndInAUTHSayWhatHappened(t *testing.T) {
	n := startNATS(t)
	g := startTLSGateway(t, n.spool(t), tlsAuthPolicy(t), AuthLimits{})

	t.Run("an unanswered AUTH LOGIN challenge ends after one command timeout", func(t *testing.T) {
		for _, tls := range []bool{false, true} {
			c := smtptest.DialReady(t, g.addr)
			if tls {
				startTLS(c)
				ehlo(c, "client.test")
			}
			cmdWant(c, "AUTH LOGIN", "334")
			start := time.Now()
			replies := collectReplies(c, 5*time.Second)
			if len(replies) != 1 || !strings.HasPrefix(replies[0], "421 4.4.2") {
				t.Errorf("TLS %v: replies %q, want one 421 4.4.2", tls, replies)
			}
			if d := time.Since(start); d > 1800*time.Millisecond {
				t.Errorf("TLS %v: closed after %s, want one 1s timeout", tls, d)
			}
		}
	})
	t.Run("the session deadline under TLS is named as such", func(t *testing.T) {
		c := smtptest.DialReady(t, g.addr)
		startTLS(c)
		ehlo(c, "client.test")
		// Never idle; the session limit is 3 s.
		if text := sessionEnd(c, true, 10*time.Second); !strings.HasPrefix(text, "421 4.4.2 Session time limit") {
			t.Fatalf("reply %q", text)
		}
		c.ExpectClosed()
	})
}

func TestBDATChunkCutShortByTheClientStoresNothing(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)
	for _, first := range []bool{false, true} {
		c := smtptest.DialReady(t, g.addr)
		cmdWant(c, "MAIL FROM:<a@example.org>", "250 2.0.0")
		cmdWant(c, "RCPT TO:<r@example.net>", "250 2.0.0")
		if first {
			bdat(c, "Subject: two chunks\r\n", false, "250 2.0.0")
		}
		// The client goes away 60 octets short of its last chunk: the
		// part that came must not be stored as if it were the message.
		c.Send("BDAT 100 LAST\r\nMessage-ID: <cut@seam.test>\r\n\r\ntruncated\r\n")
		c.Close()
	}
	// A message sent afterwards is stored; the cut ones never are.
	c := smtptest.DialReady(t, g.addr)
	cmdWant(c, "MAIL FROM:<a@example.org>", "250 2.0.0")
	cmdWant(c, "RCPT TO:<r@example.net>", "250 2.0.0")
	queuedMail(t, sp, bdat(c, uniqueMessage(t, "whole"), true, "250 2.0.0"))
	eventually(t, 5*time.Second, "the cut sessions to end", func() bool { return g.OpenConnections() == 1 })
	if got := queueCount(t, sp); got != 1 {
		t.Errorf("%d stored, want only the whole message", got)
	}
}

func TestRefusedBDATChunkIsNeverRunAsCommands(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)
	chunk := "MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@elsewhere.test>\r\nDATA\r\n"
	for _, tc := range []struct{ cmd, want string }{
		{fmt.Sprintf("BDAT %d LASTX", len(chunk)), "501 5.5.4"},
		{fmt.Sprintf("BDAT %d LAST MORE", len(chunk)), "501 5.5.4"},
		{fmt.Sprintf("BDAT %d", len(chunk)), "502 5.5.1"}, // no transaction
	} {
		c := smtptest.DialReady(t, g.addr)
		c.Send(tc.cmd + "\r\n" + chunk)
		replyWant(c, tc.want)
		expectNOOPNext(c)
	}
	// Without a size the chunk's end cannot be found: the session ends.
	for _, cmd := range []string{"BDAT", "BDAT x LAST", "BDAT -5"} {
		c := smtptest.DialReady(t, g.addr)
		c.Send(cmd + "\r\n" + chunk)
		if replies := collectReplies(c, 5*time.Second); len(replies) != 1 || !strings.HasPrefix(replies[0], "501 5.5.4") {
			t.Errorf("%q: replies %q, want one 501 5.5.4 and a close", cmd, replies)
		}
	}
	if got := queueCount(t, sp); got != 0 {
		t.Errorf("%d queued", got)
	}
}
