package smtpgw

import (
	"context"
	"strings"
	"testing"
)

func TestQueuedMessageLandsInTheStreamWithItsEnvelope(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)

	c := dialReady(t, g.addr)
	c.cmd("MAIL FROM:<alice@example.org> SIZE=200 BODY=8BITMIME RET=HDRS ENVID=abc123", 250)
	c.cmd("RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.net", 250)
	c.cmd("RCPT TO:<carol@example.com>", 250)
	c.cmd("DATA", 354)
	c.send(simpleMessage("m1", "hello") + ".\r\n")
	reply := c.expect(250)
	if !strings.HasPrefix(reply, "250 2.0.0 Ok: queued as ") {
		t.Fatalf("reply %q", reply)
	}
	qid := queueIDOf(t, reply)
	c.cmd("QUIT", 221)

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
