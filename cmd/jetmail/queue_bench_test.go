package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/jetmail/jetmail/spool"
)

// TestQueueToolsOnALargeQueue times the queue tools on a queue of
// JETMAIL_QUEUE_BENCH messages (the README's figures: 1000000), filled with
// direct publishes of envelopes in spool's format, none handed out:
//
//	JETMAIL_QUEUE_BENCH=1000000 go test -run TestQueueToolsOnALargeQueue -v -timeout 15m ./cmd/jetmail/
func TestQueueToolsOnALargeQueue(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("JETMAIL_QUEUE_BENCH"))
	if n == 0 {
		t.Skip("set JETMAIL_QUEUE_BENCH to the number of messages")
	}
	f := newQueueFixture(t)
	js := f.sp.JetStream()
	body := []byte("Subject: x\r\n\r\nhello\r\n")
	sum := sha256.Sum256(body)
	start := time.Now()
	for i := 0; i < n; i++ {
		qid := spool.NewQueueID(qNow.Add(-time.Duration(n-i) * time.Millisecond))
		env := spool.Envelope{QueueID: qid, Received: qNow.Add(-time.Duration(n-i) * time.Millisecond), From: fmt.Sprintf("s%d@example.net", i%1000),
			Rcpts: []spool.Rcpt{{Addr: fmt.Sprintf("r@d%d.example", i%50)}}, Body: spool.BodyRef{ID: qid + "-AAAAAAAA", Size: int64(len(body)), SHA256: hex.EncodeToString(sum[:])}}
		head, _ := json.Marshal(env)
		m := &nats.Msg{Subject: "jetmail.queue.q" + qid, Header: nats.Header{}, Data: append(append(head, '\n'), body...)}
		m.Header.Set(spool.HeaderQueueID, qid)
		m.Header.Set(spool.HeaderBodyID, env.Body.ID)
		if _, err := js.PublishMsgAsync(m); err != nil {
			t.Fatal(err)
		}
		if i%2000 == 1999 {
			<-js.PublishAsyncComplete()
		}
	}
	<-js.PublishAsyncComplete()
	t.Logf("filled %d in %s", n, time.Since(start))
	if _, err := f.sp.DeliveryConsumer(testCtx(t), time.Minute, 1000); err != nil {
		t.Fatal(err)
	}
	// One destination in 50: the filtered listing reads 50 envelopes for
	// each message it lists, and the states of those it lists only.
	// The newest tenth of the queue (one message per millisecond).
	tenth := (time.Duration(n/10) * time.Millisecond).String()
	for _, args := range [][]string{{"stat"}, {"ls", "--limit", "100"}, {"ls", "--limit", "100", "--domain", "d49.example"}, {"stat", "--scan"},
		{"shape"}, {"rm", "--max-age", tenth, "--yes"}, {"stat"}} {
		start := time.Now()
		out, err := runQueue(t, f.url, args...)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%v: %s (%d bytes of output)", args, time.Since(start), len(out))
		if args[0] != "ls" && args[0] != "shape" {
			t.Logf("%s", out)
		}
	}
}
