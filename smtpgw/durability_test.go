package smtpgw

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/jetmail/jetmail/internal/smtptest"
	"github.com/jetmail/jetmail/spool"
)

func TestRetransmissionToASecondGatewayIsAnsweredWithTheOriginalQueueID(t *testing.T) {
	n := startNATS(t)
	g1 := startGateway(t, n.spool(t), nil)
	g2 := startGateway(t, n.spool(t), nil)
	msg := simpleMessage("retransmit-1", "the same bytes twice")

	// The client sends the final dot and drops the connection before
	// reading our reply: it never learns that the mail was queued.
	c := smtptest.DialReady(t, g1.addr)
	c.Cmd("MAIL FROM:<alice@example.org>", 250)
	c.Cmd("RCPT TO:<bob@example.net>", 250)
	c.Cmd("RCPT TO:<carol@example.net>", 250)
	c.Cmd("DATA", 354)
	c.Send(msg + ".\r\n")
	c.Conn.Close()
	eventually(t, 5*time.Second, "the first transmission to be queued", func() bool { return len(queued(t, g1.sp)) == 1 })
	first := queued(t, g1.sp)[0].Envelope.QueueID

	// It retries through another gateway, listing the recipients in
	// another order.
	c2 := smtptest.DialReady(t, g2.addr)
	reply := c2.Mail("alice@example.org", []string{"carol@example.net", "bob@example.net"}, msg, 250)
	if got := queueIDOf(t, reply); got != first {
		t.Errorf("retransmission answered with %s, want the original %s", got, first)
	}
	if msgs := queued(t, g2.sp); len(msgs) != 1 {
		t.Fatalf("%d queue entries, want exactly 1", len(msgs))
	}

	// A different message from the same sender to the same recipients is
	// new mail.
	reply = c2.Mail("alice@example.org", []string{"bob@example.net", "carol@example.net"}, simpleMessage("retransmit-2", "another"), 250)
	if queueIDOf(t, reply) == first {
		t.Error("a different message was taken for a duplicate")
	}
	if msgs := queued(t, g2.sp); len(msgs) != 2 {
		t.Fatalf("%d queue entries, want 2", len(msgs))
	}
}

func TestIdenticalMessagesWithoutMessageIDAreBothQueued(t *testing.T) {
	// Two alerts with identical bytes and no Message-ID are the hard case:
	// a retransmission cannot be told from a second alert, and losing an
	// alert is worse than a duplicate, so neither is suppressed.
	n := startNATS(t)
	g := startGateway(t, n.spool(t), nil)
	c := smtptest.DialReady(t, g.addr)
	alert := "Subject: disk full\r\n\r\n/var is full\r\n"
	a := queueIDOf(t, c.Mail("monitor@example.org", []string{"ops@example.net"}, alert, 250))
	b := queueIDOf(t, c.Mail("monitor@example.org", []string{"ops@example.net"}, alert, 250))
	if a == b {
		t.Fatalf("both alerts got queue ID %s", a)
	}
	if msgs := queued(t, g.sp); len(msgs) != 2 {
		t.Fatalf("%d queued, want 2", len(msgs))
	}
}

func TestDuplicateGuardHoldsAfterTheMailLeftTheQueue(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)
	c := smtptest.DialReady(t, g.addr)
	msg := simpleMessage("after-delivery", "x")
	first := queueIDOf(t, c.Mail("a@example.org", []string{"b@example.net"}, msg, 250))
	m := queued(t, sp)[0]
	if err := sp.Complete(context.Background(), m); err != nil {
		t.Fatal(err)
	}
	if got := queueIDOf(t, c.Mail("a@example.org", []string{"b@example.net"}, msg, 250)); got != first {
		t.Errorf("retransmission after delivery got %s, want %s", got, first)
	}
	if msgs := queued(t, sp); len(msgs) != 0 {
		t.Errorf("%d queued after the retransmission of a delivered mail, want 0", len(msgs))
	}
}

func TestLostNATSConnectionDuringDataGets451AndQueuesNothing(t *testing.T) {
	n := startNATS(t)
	nc := n.connect(t, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	cfg := spool.DefaultConfig()
	cfg.PublishTimeout = 2 * time.Second
	sp, err := spool.Open(context.Background(), nc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	g := startGateway(t, sp, nil)
	c := smtptest.DialReady(t, g.addr)
	c.Cmd("MAIL FROM:<a@example.org>", 250)
	c.Cmd("RCPT TO:<b@example.net>", 250)
	c.Cmd("DATA", 354)
	c.Send("Subject: cut\r\nMessage-ID: <cut@x>\r\n\r\nfirst half\r\n")

	// JetStream goes away while the client is still sending.
	n.srv.Shutdown()
	n.srv.WaitForShutdown()

	c.Send("second half\r\n.\r\n")
	start := time.Now()
	reply := c.Expect(451)
	if !strings.HasPrefix(reply, "451 4.3.0 ") {
		t.Errorf("reply %q, want 451 4.3.0", reply)
	}
	if d := time.Since(start); d > cfg.PublishTimeout+2*time.Second {
		t.Errorf("451 took %s, more than the publish timeout", d)
	}
	// The session is still usable for a QUIT.
	c.Cmd("QUIT", 221)

	// Bring the store back: nothing was queued.
	n2 := startNATSAt(t, n.dir, -1)
	sp2 := n2.spool(t)
	if msgs := queued(t, sp2); len(msgs) != 0 {
		t.Fatalf("%d messages queued after a failed commit, want 0", len(msgs))
	}
}

func TestTwentyMebibyteMessageEndToEnd(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, compile(t, `
apiVersion: mail.jetmail.io/v1alpha1
kind: RelayPolicy
metadata: {name: big}
spec:
  relayNetworks: [127.0.0.0/8]
  maxMessageBytes: 26214400
`))
	var b bytes.Buffer
	b.WriteString("Subject: big\r\nMessage-ID: <big@x>\r\n\r\n")
	line := strings.Repeat("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", 1) // 62 octets
	for i := 0; b.Len() < 20<<20; i++ {
		fmt.Fprintf(&b, "%08d %s\r\n", i, line)
	}
	data := b.String()
	c := smtptest.DialReady(t, g.addr)
	c.Cmd("MAIL FROM:<a@example.org> SIZE="+fmt.Sprint(len(data)), 250)
	c.Cmd("RCPT TO:<b@example.net>", 250)
	c.Cmd("DATA", 354)
	c.Send(data + ".\r\n")
	qid := queueIDOf(t, c.Expect(250))

	msgs := queued(t, sp)
	if len(msgs) != 1 || msgs[0].Envelope.QueueID != qid {
		t.Fatalf("queued %d, want the one message %s", len(msgs), qid)
	}
	if msgs[0].Envelope.Body.Chunks < 2 {
		t.Errorf("a 20 MiB body in %d chunks: it cannot fit in one NATS payload", msgs[0].Envelope.Body.Chunks)
	}
	body, err := sp.ReadBody(context.Background(), msgs[0])
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(string(body), data) {
		t.Fatal("stored body differs from what the client sent")
	}
}

func TestDribblingClientIsCutOffAtTheDataDeadline(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, compile(t, `
apiVersion: mail.jetmail.io/v1alpha1
kind: RelayPolicy
metadata: {name: slow}
spec:
  relayNetworks: [127.0.0.0/8]
  timeouts:
    command: 10s
    data: 3s
    minDataRate: 0
`))
	c := smtptest.DialReady(t, g.addr)
	c.Cmd("MAIL FROM:<a@example.org>", 250)
	c.Cmd("RCPT TO:<b@example.net>", 250)
	// The gateway starts the data clock when go-smtp hands it the body,
	// after it has written the 354: a clock started here on reading the
	// 354 can start later than the gateway's and see the cut-off a hair
	// before 3s. Starting it before sending DATA bounds it from below.
	start := time.Now()
	c.Cmd("DATA", 354)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		// One byte every 300 ms: never idle long enough for the idle
		// timeout, forever if nobody stops it (bounded here at 60 s).
		for i := 0; i < 200; i++ {
			select {
			case <-stop:
				return
			case <-time.After(300 * time.Millisecond):
			}
			if _, err := c.Conn.Write([]byte("x")); err != nil {
				return
			}
		}
	}()
	reply := c.Expect(421)
	elapsed := time.Since(start)
	if !strings.HasPrefix(reply, "421 4.4.2 ") {
		t.Errorf("reply %q, want 421 4.4.2", reply)
	}
	if elapsed < 3*time.Second || elapsed > 4500*time.Millisecond {
		t.Errorf("cut off after %s, want at the 3s deadline", elapsed)
	}
	c.ExpectClosed()
	if msgs := queued(t, sp); len(msgs) != 0 {
		t.Errorf("%d queued", len(msgs))
	}
	eventually(t, 5*time.Second, "the slot to be released", func() bool { return g.OpenConnections() == 0 })
}

func TestSlowClientBelowTheMinimumDataRateIsCutOff(t *testing.T) {
	n := startNATS(t)
	g := startGateway(t, n.spool(t), compile(t, `
apiVersion: mail.jetmail.io/v1alpha1
kind: RelayPolicy
metadata: {name: slow}
spec:
  relayNetworks: [127.0.0.0/8]
  timeouts:
    data: 1m
    minDataRate: 1000
    dataRateGrace: 1s
`))
	c := smtptest.DialReady(t, g.addr)
	c.Cmd("MAIL FROM:<a@example.org>", 250)
	c.Cmd("RCPT TO:<b@example.net>", 250)
	c.Cmd("DATA", 354)
	start := time.Now()
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for i := 0; i < 100; i++ { // one byte per 100 ms: 10 B/s
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
	reply := c.Expect(421)
	if !strings.HasPrefix(reply, "421 4.4.2 ") {
		t.Errorf("reply %q", reply)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("cut off after %s, want soon after the 1s grace", d)
	}
	c.ExpectClosed()
}

func TestSessionDeadlineEndsABusyIdleSession(t *testing.T) {
	n := startNATS(t)
	g := startGateway(t, n.spool(t), compile(t, `
apiVersion: mail.jetmail.io/v1alpha1
kind: RelayPolicy
metadata: {name: short}
spec:
  relayNetworks: [127.0.0.0/8]
  timeouts:
    command: 10s
    session: 2s
`))
	// The session clock starts when the gateway accepts the connection,
	// before its greeting and the EHLO: start ours before dialling, or it
	// starts later and can see the cut-off before 2s.
	start := time.Now()
	c := smtptest.DialReady(t, g.addr)
	// NOOPs keep the session from ever being idle.
	text := sessionEnd(c, true, 10*time.Second)
	if !strings.HasPrefix(text, "421 4.4.2 Session time limit") {
		t.Fatalf("reply %q", text)
	}
	if d := time.Since(start); d < 2*time.Second || d > 3500*time.Millisecond {
		t.Errorf("ended after %s, want at the 2s deadline", d)
	}
	c.ExpectClosed()
}

func TestShutdownLetsTransactionsFinishAndRefusesNewWork(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil, func(c *Config) { c.ShutdownGrace = 5 * time.Second })

	busy := smtptest.DialReady(t, g.addr)
	busy.Cmd("MAIL FROM:<a@example.org>", 250)
	busy.Cmd("RCPT TO:<b@example.net>", 250)
	busy.Cmd("DATA", 354)
	busy.Send("Subject: in flight\r\n\r\n")
	idle := smtptest.DialReady(t, g.addr)

	done := make(chan error, 1)
	go func() { done <- g.Shutdown(context.Background()) }()

	// The idle session is told to go away.
	if line := idle.Expect(421); !strings.HasPrefix(line, "421 4.3.2") {
		t.Errorf("idle session got %q", line)
	}
	idle.ExpectClosed()
	// The transaction in flight completes, and then the session ends at
	// once rather than when the grace runs out.
	busy.Send("body\r\n.\r\n")
	busy.Expect(250)
	finished := time.Now()
	if line := busy.Expect(421); !strings.HasPrefix(line, "421 4.3.2") {
		t.Errorf("after its transaction the session got %q, want 421 4.3.2", line)
	}
	busy.ExpectClosed()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if waited := time.Since(finished); waited > 2*time.Second {
			t.Errorf("Shutdown returned %s after the last transaction ended; the grace is 5s, nothing was left to wait for", waited)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return")
	}
	if len(queued(t, sp)) != 1 {
		t.Error("the transaction in flight was not queued")
	}
}

func TestFullStoreGets451AndTheSessionGoesOn(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t, func(c *spool.Config) { c.MaxQueueBytes = 16 << 10 })
	g := startGateway(t, sp, nil)
	c := smtptest.DialReady(t, g.addr)
	body := strings.Repeat("z", 3000)
	stored := 0
	for i := 0; i < 20; i++ {
		c.Cmd("MAIL FROM:<a@example.org>", 250)
		c.Cmd("RCPT TO:<b@example.net>", 250)
		c.Cmd("DATA", 354)
		c.Send(simpleMessage(fmt.Sprintf("full-%d", i), body) + ".\r\n")
		code, line, err := c.ReadReply()
		if err != nil {
			t.Fatal(err)
		}
		if code == 250 {
			stored++
			continue
		}
		if !strings.HasPrefix(line, "451 4.3.0 ") {
			t.Fatalf("a full store answered %q, want 451 4.3.0", line)
		}
		// Still serving: the client may try again later on this session.
		c.Cmd("NOOP", 250)
		if got := len(queued(t, sp)); got != stored {
			t.Fatalf("%d queued, want the %d acknowledged", got, stored)
		}
		return
	}
	t.Fatal("the store never filled up")
}

func TestFullBodyStoreGets451ForALargeMessage(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t, func(c *spool.Config) { c.MaxBodyBytes = 512 << 10 })
	g := startGateway(t, sp, nil)
	c := smtptest.DialReady(t, g.addr)
	c.Cmd("MAIL FROM:<a@example.org>", 250)
	c.Cmd("RCPT TO:<b@example.net>", 250)
	c.Cmd("DATA", 354)
	line := strings.Repeat("b", 98) + "\r\n"
	c.Send(simpleMessage("big-full", strings.Repeat(line, 20000)) + ".\r\n") // 2 MB: chunked
	if reply := c.Expect(451); !strings.HasPrefix(reply, "451 4.3.0 ") {
		t.Fatalf("a full body store answered %q, want 451 4.3.0", reply)
	}
	c.Cmd("NOOP", 250)
	if got := len(queued(t, sp)); got != 0 {
		t.Fatalf("%d queued after a failed body write", got)
	}
}
