package main

import (
	"bytes"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jetmail/jetmail/internal/mxtest"
)

// A serve process killed while it streams a large body to the next hop: the
// hop has part of the message and no final dot, so it keeps nothing; after
// a restart the message goes again, and arrives once, whole.
func TestServeKilledWhileStreamingALargeBodyDeliversItOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildJetmail(t)
	dataDir := t.TempDir()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	slow := mxtest.Throttle(ln, 2<<20)
	sink := mxtest.Serve(t, mxtest.Count(slow), "sink.test", &mxtest.MX{})
	flags := []string{"--relayhost", ln.Addr().String(), "--ack-wait", "5s"}
	p := startServe(t, bin, dataDir, flags...)

	var b strings.Builder
	b.WriteString("From: alice@example.org\r\nTo: bob@example.net\r\nSubject: big\r\nMessage-ID: <streamkill@example.org>\r\n\r\n")
	for i := 0; b.Len() < 8<<20; i++ {
		fmt.Fprintf(&b, "%08d %s\r\n", i, strings.Repeat(string(rune('a'+i%26)), 70))
	}
	text := b.String()
	if reply := sendMail(t, p.smtp, "alice@example.org", "bob@example.net", text); !strings.HasPrefix(reply, "250 ") {
		t.Fatalf("reply %q", reply)
	}
	// At 2 MiB/s the 8 MiB take four seconds: kill once one is through.
	mxtest.Within(t, 30*time.Second, "1 MiB of the body on its way", func() bool { return slow.Read.Load() > 1<<20 })
	if err := p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	p.cmd.Wait()
	sentAtKill := slow.Read.Load()
	time.Sleep(500 * time.Millisecond)
	if n := len(sink.Transactions()); n != 0 || sentAtKill > 8<<20 {
		t.Fatalf("after the kill (%d bytes sent) the hop stored %d messages; want none", sentAtKill, n)
	}

	p2 := startServe(t, bin, dataDir, flags...)
	mxtest.Within(t, 90*time.Second, "the message at the hop", func() bool { return len(sink.Transactions()) == 1 })
	// Longer than an ack wait more: no second copy follows.
	time.Sleep(7 * time.Second)
	txns := sink.Transactions()
	if len(txns) != 1 {
		t.Fatalf("the hop stored %d messages; want 1", len(txns))
	}
	if !bytes.HasSuffix(txns[0].Body, []byte(text)) {
		t.Fatalf("the hop got %d octets that do not end with the %d sent", len(txns[0].Body), len(text))
	}
	if n := sink.Accepted.Load(); n < 2 {
		t.Errorf("%d connections to the hop; want the cut one and the one that delivered", n)
	}
	p2.stop(t)
}
