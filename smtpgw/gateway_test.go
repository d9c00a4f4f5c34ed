package smtpgw

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jetmail/jetmail/internal/smtptest"
)

func TestQueuedMessageLandsInTheStreamWithItsEnvelope(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)

	c := smtptest.DialReady(t, g.addr)
	c.Cmd("MAIL FROM:<alice@example.org> SIZE=200 BODY=8BITMIME RET=HDRS ENVID=abc123", 250)
	c.Cmd("RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.net", 250)
	c.Cmd("RCPT TO:<carol@example.com>", 250)
	c.Cmd("DATA", 354)
	c.Send(simpleMessage("m1", "hello") + ".\r\n")
	reply := c.Expect(250)
	if !strings.HasPrefix(reply, "250 2.0.0 Ok: queued as ") {
		t.Fatalf("reply %q", reply)
	}
	qid := queueIDOf(t, reply)
	c.Cmd("QUIT", 221)

	msgs := queued(t, sp)
	if len(msgs) != 1 {
		t.Fatalf("%d messages queued, want 1", len(msgs))
	}
	m := msgs[0]
	e := m.Envelope
	if e.QueueID != qid || e.From != "alice@example.org" || e.ClientIP != "127.0.0.1" || e.Helo != "client.test" {
		t.Errorf("envelope %+v", e)
	}
	if e.Mail.Size != 200 || e.Mail.Body != "8BITMIME" || e.Mail.Ret != "HDRS" || e.Mail.EnvID != "abc123" {
		t.Errorf("mail params %+v", e.Mail)
	}
	if len(e.Rcpts) != 2 || e.Rcpts[0].Addr != "bob@example.net" || strings.Join(e.Rcpts[0].Notify, ",") != "SUCCESS,FAILURE" ||
		e.Rcpts[0].ORcpt != "RFC822;bob@example.net" || e.Rcpts[1].Addr != "carol@example.com" {
		t.Errorf("rcpts %+v", e.Rcpts)
	}
	body, err := sp.ReadBody(context.Background(), m)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(body), "Received: from client.test ([127.0.0.1])\r\n\tby mx.test (jetmail) with ESMTP id "+qid) {
		t.Errorf("body starts %q", string(body[:120]))
	}
	if !strings.HasSuffix(string(body), simpleMessage("m1", "hello")) {
		t.Errorf("body does not end with the client's message: %q", body)
	}
	if e.Body.Size != int64(len(body)) || e.Body.Chunks != 0 {
		t.Errorf("body ref %+v, len %d", e.Body, len(body))
	}
}

func TestNewPolicyChangesTheAdvertisedSizeForNewConnectionsOnly(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, compile(t, `
apiVersion: mail.jetmail.io/v1alpha1
kind: RelayPolicy
metadata: {name: small}
spec:
  relayNetworks: [127.0.0.0/8]
  maxMessageBytes: 4096
`))
	size := func(c *smtptest.Client) string {
		c.Send("EHLO client.test\r\n")
		var sizeLine string
		for {
			code, line, err := readLine(c)
			if err != nil || code != 250 {
				t.Fatalf("EHLO: %q %v", line, err)
			}
			if strings.Contains(line, "SIZE") {
				sizeLine = line[4:]
			}
			if line[3] == ' ' {
				return sizeLine
			}
		}
	}
	old := smtptest.Dial(t, g.addr)
	old.Expect(220)
	if got := size(old); got != "SIZE 4096" {
		t.Fatalf("advertised %q, want SIZE 4096", got)
	}

	g.setPolicy(compile(t, `
apiVersion: mail.jetmail.io/v1alpha1
kind: RelayPolicy
metadata: {name: big}
spec:
  relayNetworks: [127.0.0.0/8]
  maxMessageBytes: 8192
`))
	fresh := smtptest.Dial(t, g.addr)
	fresh.Expect(220)
	if got := size(fresh); got != "SIZE 8192" {
		t.Errorf("a new connection is offered %q, want SIZE 8192", got)
	}
	// The open session finishes under the rules it started with, and
	// still delivers into the queue.
	if got := size(old); got != "SIZE 4096" {
		t.Errorf("the open connection is now offered %q, want SIZE 4096", got)
	}
	old.Mail("a@example.org", []string{"b@example.net"}, simpleMessage("old-front", "x"), 250)
	fresh.Mail("a@example.org", []string{"b@example.net"}, simpleMessage("new-front", strings.Repeat("y", 5000)), 250)
	if n := len(queued(t, sp)); n != 2 {
		t.Fatalf("%d queued, want 2", n)
	}
}

// readLine reads one line of a (possibly multi-line) reply.
func readLine(c *smtptest.Client) (int, string, error) {
	_ = c.Conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := c.R.ReadString('\n')
	if err != nil || len(line) < 4 {
		return 0, line, fmt.Errorf("short reply %q: %v", line, err)
	}
	var code int
	_, err = fmt.Sscanf(line[:3], "%d", &code)
	return code, strings.TrimRight(line, "\r\n"), err
}
