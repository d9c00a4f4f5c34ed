package deliverer

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"go.uber.org/zap/zaptest/observer"

	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/internal/natstest"
	"github.com/jetmail/jetmail/spool"
)

// A NATS node killed while a deliverer streams a large body from it: the
// leader of the body stream goes away between two chunk reads. The
// message reaches the MX once and whole: either the read waits for the
// new leader and the session goes on, or it fails, the session ends
// without the final dot (the MX keeps nothing of it) and the message is
// deferred and sent again.
func TestANATSNodeKilledWhileABodyStreams(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a NATS cluster")
	}
	c := natstest.StartCluster(t)
	e := newE2EAt(t, c.URL(), spool.ClusterConfig())
	e.retryEvery(time.Second)
	// The MX reads 2 MiB/s: the 6 MiB body takes three seconds.
	slow := mxtest.Throttle(e.listener(e2eMX1), 2<<20)
	mx := mxtest.Serve(t, mxtest.Count(slow), "mx1.big.test", &mxtest.MX{})
	e.dns.Add(t, "big.test. 60 IN MX 10 mx1.big.test.", "mx1.big.test. 60 IN A "+e2eMX1)
	var logs *observer.ObservedLogs
	// A small send buffer: the deliverer reads the chunks as the MX takes
	// them, not megabytes ahead, so most are still to read at the kill.
	smallSends := func(c *Config, _ *e2eConn) {
		var d net.Dialer
		c.Client.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := d.DialContext(ctx, network, addr)
			if tc, ok := conn.(*net.TCPConn); ok {
				_ = tc.SetWriteBuffer(64 << 10)
			}
			return conn, err
		}
	}
	e.startDeliverer(e2eOwnConn(), observed(&logs), smallSends)
	defer func() {
		if t.Failed() {
			for _, l := range logs.All() {
				t.Logf("%s %s %v", l.Time.Format("15:04:05.000"), l.Message, l.ContextMap())
			}
		}
	}()

	var b strings.Builder
	b.WriteString("From: <" + e2eSender + ">\r\nTo: <ann@big.test>\r\nSubject: big\r\nMessage-ID: <nodekill@e2e.test>\r\n\r\n")
	for i := 0; b.Len() < 6<<20; i++ {
		fmt.Fprintf(&b, "%08d %s\r\n", i, strings.Repeat(string(rune('a'+i%26)), 70))
	}
	body := []byte(b.String())
	qid := e.enqueueMail(e2eSender, []spool.Rcpt{{Addr: "ann@big.test"}}, body)
	if m := e.message(qid); m.Envelope.Body.Chunks < 20 {
		t.Fatalf("the body is in %d chunks; the test wants it read chunk by chunk", m.Envelope.Body.Chunks)
	}

	mxtest.Within(t, 30*time.Second, "1 MiB of the body at the MX", func() bool { return slow.Read.Load() > 1<<20 })
	var leader *server.Server
	for _, s := range c.Servers {
		if s.JetStreamIsStreamLeader(server.DEFAULT_GLOBAL_ACCOUNT, spool.BodyStream) {
			leader = s
		}
	}
	if leader == nil {
		t.Fatal("no leader of the body stream")
	}
	readAtKill := slow.Read.Load()
	natstest.Stop(leader)
	t.Logf("killed %s, the body stream's leader, %d bytes into the transfer", leader.Name(), readAtKill)

	mxtest.Within(t, 60*time.Second, "the message at the MX", func() bool { return len(mx.Transactions()) == 1 })
	e.waitEmpty(30 * time.Second)
	// Two ack waits more: no second copy follows.
	time.Sleep(2 * e2eAckWait)
	txns := mx.Transactions()
	if len(txns) != 1 {
		t.Fatalf("the MX stored %d messages; want 1", len(txns))
	}
	if !bytes.HasSuffix(txns[0].Body, body) {
		t.Fatalf("the MX got %d octets that do not end with the %d queued", len(txns[0].Body), len(body))
	}
	t.Logf("%d connections to the MX (2: the session was cut and the message sent again; 1: the read waited for the new leader)", mx.Accepted.Load())
	for _, l := range logs.FilterMessage("delivery").All() {
		t.Logf("delivery %v", l.ContextMap())
	}
}
