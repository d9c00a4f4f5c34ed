package smtpgw

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/jetmail/jetmail/internal/smtptest"
)

// Every RelayPolicy setting in README's configuration table applies to the
// next connection of a running gateway, without a restart: each case runs
// a probe under one policy, puts another in force through the gateway's
// policy.Source (what the configuration watchers do on every change) and
// runs the probe again.
func TestEveryRelayPolicySettingAppliesWithoutARestart(t *testing.T) {
	n := startNATS(t)
	sp := n.spool(t)
	g := startGateway(t, sp, nil)
	hash, err := bcrypt.GenerateFromPassword([]byte(authPass), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	users := "apiVersion: v1\nkind: Secret\nmetadata:\n  name: smtp-users\n  namespace: mail\nstringData:\n  users: |\n    alice:" + string(hash) + "\n"
	const relay = "  relayNetworks: [\"127.0.0.0/8\"]\n"

	// rcpt reports the reply to RCPT TO:<to> on a new connection.
	rcpt := func(t *testing.T, to string) string {
		c := smtptest.DialReady(t, g.addr)
		defer c.Close()
		cmdWant(c, "MAIL FROM:<a@example.org>", "250 2.0.0")
		c.Send("RCPT TO:<" + to + ">\r\n")
		_, line, err := c.ReadReply()
		if err != nil {
			t.Fatal(err)
		}
		return line
	}
	// dataReply is the reply to data sent after DATA on a new connection.
	dataReply := func(t *testing.T, data string) string {
		c := smtptest.DialReady(t, g.addr)
		defer c.Close()
		cmdWant(c, "MAIL FROM:<a@example.org>", "250 2.0.0")
		cmdWant(c, "RCPT TO:<b@example.net>", "250 2.0.0")
		cmdWant(c, "DATA", "354")
		c.Send(data + ".\r\n")
		_, line, _ := c.ReadReply()
		return line
	}
	// ended is how a new session that is idle (or busy) ends within limit.
	ended := func(t *testing.T, busy bool, limit time.Duration) string {
		c := smtptest.DialReady(t, g.addr)
		defer c.Close()
		return sessionEnd(c, busy, limit)
	}
	for _, tc := range []struct {
		name        string
		before      string // spec lines
		after       string
		probe       func(t *testing.T) string
		want, wantB string // reply prefixes under before and after
	}{
		{"relayNetworks", "  relayNetworks: [\"10.0.0.0/8\"]\n  acceptedDomains: [example.org]\n", relay,
			func(t *testing.T) string { return rcpt(t, "x@elsewhere.test") }, "554 5.7.1", "250 2.0.0"},
		{"acceptedDomains", "  relayNetworks: [\"10.0.0.0/8\"]\n  acceptedDomains: [a.test]\n", "  relayNetworks: [\"10.0.0.0/8\"]\n  acceptedDomains: [b.test]\n",
			func(t *testing.T) string { return rcpt(t, "x@b.test") }, "554 5.7.1", "250 2.0.0"},
		{"rejectSenders", relay, relay + "  rejectSenders: [\"@evil.test\"]\n",
			func(t *testing.T) string {
				c := smtptest.DialReady(t, g.addr)
				defer c.Close()
				c.Send("MAIL FROM:<x@evil.test>\r\n")
				_, line, _ := c.ReadReply()
				return line
			}, "250 2.0.0", "553 5.7.1"},
		{"maxMessageBytes", relay + "  maxMessageBytes: 4096\n", relay + "  maxMessageBytes: 8192\n",
			func(t *testing.T) string {
				return dataReply(t, simpleMessage(fmt.Sprintf("size-%d", time.Now().UnixNano()), strings.Repeat("z", 5000)))
			}, "552 5.3.4", "250 2.0.0"},
		{"maxRecipients", relay, relay + "  maxRecipients: 150\n",
			func(t *testing.T) string {
				c := smtptest.DialReady(t, g.addr)
				defer c.Close()
				cmdWant(c, "MAIL FROM:<a@example.org>", "250 2.0.0")
				var b strings.Builder
				for i := 0; i < 101; i++ {
					fmt.Fprintf(&b, "RCPT TO:<r%d@example.net>\r\n", i)
				}
				c.Send(b.String())
				var line string
				for i := 0; i < 101; i++ {
					_, line, _ = c.ReadReply()
				}
				return line // the 101st
			}, "452 4.5.3", "250 2.0.0"},
		{"auth.usersSecretRef and auth.allowInsecure", relay,
			relay + "  auth:\n    usersSecretRef: {name: smtp-users, key: users}\n    allowInsecure: true\n",
			func(t *testing.T) string {
				c := smtptest.DialReady(t, g.addr)
				defer c.Close()
				c.Send("AUTH PLAIN " + b64("\x00alice\x00"+authPass) + "\r\n")
				_, line, _ := c.ReadReply()
				return line
			}, "523 5.7.10", "235 2.0.0"},
		{"timeouts.command", relay + "  timeouts: {command: 5s}\n", relay + "  timeouts: {command: 1s}\n",
			func(t *testing.T) string { return ended(t, false, 2500*time.Millisecond) }, "still open", "421 4.4.2 Idle timeout"},
		{"timeouts.session", relay + "  timeouts: {session: 1m}\n", relay + "  timeouts: {session: 2s}\n",
			func(t *testing.T) string { return ended(t, true, 3500*time.Millisecond) }, "still open", "421 4.4.2 Session time limit"},
		{"timeouts.minDataRate", relay + "  timeouts: {minDataRate: 0}\n", relay + "  timeouts: {minDataRate: 1000, dataRateGrace: 500ms}\n",
			func(t *testing.T) string {
				c := smtptest.DialReady(t, g.addr)
				defer c.Close()
				cmdWant(c, "MAIL FROM:<a@example.org>", "250 2.0.0")
				cmdWant(c, "RCPT TO:<b@example.net>", "250 2.0.0")
				cmdWant(c, "DATA", "354")
				msg := simpleMessage(fmt.Sprintf("slow-%d", time.Now().UnixNano()), "x")
				for i := 0; i < 12; i++ { // 12 octets in 1.2 s, then the rest
					time.Sleep(100 * time.Millisecond)
					if _, err := c.Conn.Write([]byte{msg[i]}); err != nil {
						break
					}
				}
				c.Conn.Write([]byte(msg[12:] + ".\r\n"))
				_, line, _ := c.ReadReply()
				return line
			}, "250 2.0.0", "421 4.4.2 Data rate below the minimum"},
		{"limits.maxConnectionsPerIP", relay, relay + "  limits: {maxConnectionsPerIP: 1}\n",
			func(t *testing.T) string {
				first := smtptest.DialReady(t, g.addr)
				defer first.Close()
				second := smtptest.Dial(t, g.addr)
				defer second.Close()
				_, line, _ := second.ReadReply()
				return line
			}, "220", "421 4.7.0"},
		{"limits.maxErrors", relay, relay + "  limits: {maxErrors: 1}\n",
			func(t *testing.T) string {
				c := smtptest.DialReady(t, g.addr)
				defer c.Close()
				c.Send("FROB\r\nFROB\r\nNOOP\r\n")
				c.ReadReply()
				c.ReadReply()
				_, line, _ := c.ReadReply()
				return line
			}, "250 2.0.0", "421 4.7.0"},
		{"limits.maxReceivedHeaders", relay, relay + "  limits: {maxReceivedHeaders: 1}\n",
			func(t *testing.T) string {
				return dataReply(t, "Received: from a\r\nReceived: from b\r\n"+simpleMessage(fmt.Sprintf("hops-%d", time.Now().UnixNano()), "x"))
			}, "250 2.0.0", "554 5.4.6"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g.setPolicy(relayPolicy(t, tc.before, users))
			if got := tc.probe(t); !strings.HasPrefix(got, tc.want) {
				t.Fatalf("before the change: %q, want %q", got, tc.want)
			}
			g.setPolicy(relayPolicy(t, tc.after, users))
			// The probe's connections before the change are gone (one
			// limit under test counts them).
			eventually(t, 5*time.Second, "earlier connections to close", func() bool { return g.OpenConnections() == 0 })
			if got := tc.probe(t); !strings.HasPrefix(got, tc.wantB) {
				t.Fatalf("after the change, on a new connection: %q, want %q", got, tc.wantB)
			}
		})
	}
}
