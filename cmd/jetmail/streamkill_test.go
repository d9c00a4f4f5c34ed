package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jetmail/jetmail/internal/mxtest"
)

// slowProxy forwards TCP connections to upstream, the client's bytes at
// about rate bytes per second, the upstream's at full speed.
type slowProxy struct {
	addr      string
	sent      atomic.Int64 // client bytes forwarded
	conns     atomic.Int64
	closeOnce sync.Once
	ln        net.Listener
}

func startSlowProxy(t *testing.T, upstream string, rate int) *slowProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &slowProxy{addr: ln.Addr().String(), ln: ln}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.conns.Add(1)
			u, err := net.Dial("tcp", upstream)
			if err != nil {
				c.Close()
				continue
			}
			wg.Go(func() { io.Copy(c, u); c.Close() })
			wg.Go(func() {
				defer u.Close()
				buf := make([]byte, 16<<10)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						if _, werr := u.Write(buf[:n]); werr != nil {
							return
						}
						p.sent.Add(int64(n))
						time.Sleep(time.Duration(n) * time.Second / time.Duration(rate))
					}
					if err != nil {
						return
					}
				}
			})
		}
	})
	return p
}

// A serve process killed while it streams a large body to the next hop: the
// hop has part of the message and no final dot, so it keeps nothing; after
// a restart the message goes again, and arrives once, whole.
func TestServeKilledWhileStreamingALargeBodyDeliversItOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildJetmail(t)
	dataDir := t.TempDir()
	sink := mxtest.Start(t, &mxtest.MX{})
	proxy := startSlowProxy(t, sink.Hop.Addr.String(), 2<<20)
	flags := []string{"--relayhost", proxy.addr, "--ack-wait", "5s"}
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
	mxtest.Within(t, 30*time.Second, "1 MiB of the body on its way", func() bool { return proxy.sent.Load() > 1<<20 })
	if err := p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	p.cmd.Wait()
	sentAtKill := proxy.sent.Load()
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
	if proxy.conns.Load() < 2 {
		t.Errorf("%d connections to the hop; want the cut one and the one that delivered", proxy.conns.Load())
	}
	p2.stop(t)
}
