package smtpgw

import (
	"fmt"
	"math/rand"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/jetmail/jetmail/internal/smtptest"
	"github.com/jetmail/jetmail/spool"
)

// FuzzSessionInterleavings drives a real gateway with sessions made of
// random interleavings of MAIL, RCPT, DATA, BDAT, RSET, EHLO, NOOP, AUTH
// and STARTTLS, pipelined or not, with stalls, trickled commands, transfers
// abandoned in the middle of a chunk and chunks cut off by the minimum data
// rate. Every message's data is full of command lines aimed at a forged
// domain. A model of the session predicts every reply code, and at the end:
//
//   - every 250 to a message is that message, with the envelope the client
//     gave, stored exactly once;
//   - nothing else is stored (no aborted, refused or cut transfer);
//   - no byte of message data ever ran as a command: no stored envelope
//     names the forged domain, and replies never get out of step.
//
// `go test` runs the seeds below; `go test -fuzz=FuzzSessionInterleavings
// ./smtpgw/` explores further (one input is a list of operations).
func FuzzSessionInterleavings(f *testing.F) {
	for seed := int64(1); seed <= 12; seed++ {
		r := rand.New(rand.NewSource(seed))
		ops := make([]byte, 60+r.Intn(60))
		r.Read(ops)
		f.Add(ops)
	}
	hash, err := bcrypt.GenerateFromPassword([]byte(authPass), bcrypt.MinCost)
	if err != nil {
		f.Fatal(err)
	}
	n := startNATS(f)
	sp := n.spool(f)
	tlsCfg, err := SelfSigned("mx.test")
	if err != nil {
		f.Fatal(err)
	}
	g := startGateway(f, sp, relayPolicy(f, `  relayNetworks: ["127.0.0.0/8"]
  auth:
    usersSecretRef: {name: smtp-users, key: users}
    allowInsecure: true
  limits:
    maxErrors: 10000
  timeouts:
    command: 5s
    minDataRate: 500
    dataRateGrace: 500ms
`, "apiVersion: v1\nkind: Secret\nmetadata:\n  name: smtp-users\n  namespace: mail\nstringData:\n  users: |\n    alice:"+string(hash)+"\n"),
		func(c *Config) {
			c.TLS = tlsCfg
			c.Auth = AuthLimits{Failures: 1 << 30, Delay: time.Microsecond, MaxDelay: time.Microsecond}
		})

	// Every message acknowledged by this gateway: the queue holds the mail
	// of earlier inputs too.
	acked := map[string]ackedMail{}
	f.Fuzz(func(t *testing.T, ops []byte) {
		m := &sessionModel{t: t, addr: g.addr, ops: ops, acked: acked}
		m.run()
		t.Logf("operations drawn (MAIL, MAIL <>, RCPT, RCPT, DATA, BDAT, BDAT, BDAT LAST, RSET, EHLO, NOOP or stall, AUTH, STARTTLS, trickle, abandon, slow chunk): %v", m.kinds)
		checkStored(t, sp, acked)
	})
}

// forgedDomain appears only in message data; an envelope that names it
// means data ran as commands.
const forgedDomain = "forged.test"

// ackedMail is a message the gateway answered 250 to.
type ackedMail struct {
	from  string
	rcpts []string
	data  string
}

var interleaveSeq atomic.Int64

// sessionModel plays the operations against the gateway and predicts each
// reply from the state of the transaction.
type sessionModel struct {
	t     *testing.T
	addr  string
	ops   []byte
	pos   int
	acked map[string]ackedMail

	c       *smtptest.Client
	tls     bool
	inTx    bool
	from    string
	rcpts   []string
	inBDAT  bool
	chunks  strings.Builder
	slowCut int
	stalled time.Duration // stalls add up to a second at most per input
	kinds   [16]int
	// pending is what was written and not yet answered: the expected
	// reply prefixes, in order.
	pending []expectation
	out     strings.Builder
}

type expectation struct {
	want string
	then func(reply string)
}

// next takes the next operation byte (0 when the input is used up).
func (m *sessionModel) next() byte {
	if m.pos >= len(m.ops) {
		return 0
	}
	b := m.ops[m.pos]
	m.pos++
	return b
}

func (m *sessionModel) dial() {
	m.c = smtptest.Dial(m.t, m.addr)
	m.tls, m.inTx, m.from, m.rcpts, m.inBDAT = false, false, "", nil, false
	m.chunks.Reset()
	replyWant(m.c, "220")
	m.cmd("EHLO fuzz.test", "250", nil)
	m.flush()
}

// cmd queues a command and the reply it must get.
func (m *sessionModel) cmd(raw, want string, then func(string)) {
	m.out.WriteString(raw + "\r\n")
	m.pending = append(m.pending, expectation{want, then})
}

// flush writes what is queued (pipelined) and checks every reply in order.
func (m *sessionModel) flush() {
	if m.out.Len() > 0 {
		m.c.Send(m.out.String())
		m.out.Reset()
	}
	for _, e := range m.pending {
		r := replyWant(m.c, e.want)
		if e.then != nil {
			e.then(r)
		}
	}
	m.pending = nil
}

func (m *sessionModel) resetTx() {
	m.inTx, m.from, m.rcpts, m.inBDAT = false, "", nil, false
	m.chunks.Reset()
}

// messageData is a message whose every line looks like a command that
// would forge a transaction if it ran.
func messageData(id string, r byte) string {
	var b strings.Builder
	b.WriteString("Message-ID: <" + id + ">\r\nSubject: interleave\r\n\r\n")
	for i := 0; i < 1+int(r%4); i++ {
		b.WriteString("RSET\r\nMAIL FROM:<ceo@" + forgedDomain + ">\r\nRCPT TO:<victim@" + forgedDomain + ">\r\nDATA\r\nNOOP\r\n")
	}
	return b.String()
}

func (m *sessionModel) run() {
	m.dial()
	defer func() { m.c.Close() }()
	for steps := 0; m.pos < len(m.ops) && steps < 200; steps++ {
		op := m.next()
		pipeline := op&0x80 != 0 // leave the command queued with the next ones
		m.kinds[op%16]++
		switch op % 16 {
		case 0, 1: // MAIL
			from := fmt.Sprintf("s%d@example.org", m.next()%4)
			if op%2 == 1 {
				from = "" // the null sender
			}
			if m.inBDAT {
				m.cmd("MAIL FROM:<"+from+">", "502 5.5.1", nil)
			} else if m.inTx {
				m.cmd("MAIL FROM:<"+from+">", "503 5.5.1", nil)
			} else {
				m.cmd("MAIL FROM:<"+from+">", "250 2.0.0", nil)
				m.inTx, m.from = true, from
			}
		case 2, 3: // RCPT
			to := fmt.Sprintf("r%d@x%d.test", m.next()%8, op%2)
			switch {
			case !m.inTx:
				m.cmd("RCPT TO:<"+to+">", "502 5.5.1", nil)
			case m.inBDAT:
				m.cmd("RCPT TO:<"+to+">", "502 5.5.1", nil)
			default:
				m.cmd("RCPT TO:<"+to+">", "250 2.0.0", nil)
				m.rcpts = append(m.rcpts, to)
			}
		case 4: // DATA, never pipelined past the 354
			if m.inBDAT || !m.inTx || len(m.rcpts) == 0 {
				m.cmd("DATA", "502 5.5.1", nil)
				break
			}
			m.cmd("DATA", "354", nil)
			m.flush()
			id := fmt.Sprintf("i%d@interleave.test", interleaveSeq.Add(1))
			data := messageData(id, m.next())
			m.out.WriteString(data + ".\r\n")
			m.expectQueued(id, data)
			pipeline = false
		case 5, 6, 7: // a BDAT chunk; LAST on 7
			last := op%16 == 7
			if op%16 == 6 && op&0x40 != 0 {
				// A BDAT refused for its argument: its chunk is read and
				// dropped whatever state the transaction is in.
				chunk := "RSET\r\nMAIL FROM:<x@" + forgedDomain + ">\r\n"
				m.out.WriteString(fmt.Sprintf("BDAT %d LASTX\r\n%s", len(chunk), chunk))
				m.pending = append(m.pending, expectation{"501 5.5.4", nil})
				break
			}
			id := fmt.Sprintf("i%d@interleave.test", interleaveSeq.Add(1))
			chunk := "\r\nRSET\r\nMAIL FROM:<x@" + forgedDomain + ">\r\n.\r\n"
			if !m.inBDAT {
				chunk = messageData(id, m.next())
			}
			cmd := fmt.Sprintf("BDAT %d", len(chunk))
			if last {
				cmd += " LAST"
			}
			if m.inBDAT && m.chunks.Len() > 0 {
				// The Message-ID is in the first chunk.
				head := m.chunks.String()
				id = head[len("Message-ID: <"):strings.IndexByte(head, '>')]
			}
			m.out.WriteString(cmd + "\r\n")
			switch {
			case !m.inTx || len(m.rcpts) == 0:
				m.out.WriteString(chunk)
				m.pending = append(m.pending, expectation{"502 5.5.1", nil})
			case last:
				m.out.WriteString(chunk)
				m.chunks.WriteString(chunk)
				m.pending = append(m.pending, expectation{"250 2.0.0", m.queuedThen(id, m.chunks.String())})
				m.resetTx()
			default:
				m.out.WriteString(chunk)
				m.chunks.WriteString(chunk)
				m.inBDAT = true
				m.pending = append(m.pending, expectation{"250 2.0.0", nil})
			}
		case 8: // RSET
			m.cmd("RSET", "250 2.0.0", nil)
			m.resetTx()
		case 9: // EHLO again
			m.cmd("EHLO again.test", "250", nil)
			m.resetTx()
		case 10: // NOOP, or a stall
			if op&0x40 != 0 && !m.inBDAT && m.stalled < time.Second { // a transfer is under the minimum rate
				m.flush()
				d := time.Duration(m.next()%25) * 4 * time.Millisecond
				m.stalled += d
				time.Sleep(d)
			}
			m.cmd("NOOP", "250 2.0.0", nil)
		case 11: // a wrong AUTH
			if m.inTx {
				m.cmd("AUTH PLAIN "+b64("\x00alice\x00wrong"), "503 5.5.1", nil)
			} else {
				m.cmd("AUTH PLAIN "+b64("\x00alice\x00wrong"), "535 5.7.8", nil)
			}
		case 12: // STARTTLS
			switch {
			case m.tls:
				m.cmd("STARTTLS", "502 5.5.1", nil)
			case m.inBDAT:
				m.cmd("STARTTLS", "502 5.5.1", nil)
			default:
				m.cmd("STARTTLS", "220 2.0.0", nil)
				m.flush()
				m.c.UpgradeTLS("mx.test")
				m.tls = true
				m.resetTx()
				m.cmd("EHLO fuzz.test", "250", nil)
			}
			pipeline = false
		case 13: // a command trickled a byte at a time
			if m.inBDAT { // a transfer is under the minimum rate
				break
			}
			m.flush()
			for _, b := range []byte("NOOP\r\n") {
				m.c.Send(string(b))
				time.Sleep(time.Millisecond)
			}
			m.pending = append(m.pending, expectation{"250 2.0.0", nil})
		case 14: // abandon the connection in the middle of a chunk
			if !m.inTx || len(m.rcpts) == 0 {
				break
			}
			m.flush()
			m.c.Send("BDAT 100 LAST\r\nMessage-ID: <abandoned@interleave.test>\r\nRSET\r\n")
			m.c.Close()
			m.dial()
			continue
		case 15: // a chunk cut off by the minimum data rate (once at most)
			// Not in the middle of a transfer: the rate is averaged over
			// the whole transfer, whose earlier chunks came fast.
			if !m.inTx || len(m.rcpts) == 0 || m.inBDAT || m.slowCut >= 1 {
				break
			}
			m.slowCut++
			m.flush()
			tail := "\r\nRSET\r\nMAIL FROM:<ceo@" + forgedDomain + ">\r\nRCPT TO:<v@" + forgedDomain + ">\r\nDATA\r\nx\r\n.\r\n"
			m.c.Send(fmt.Sprintf("BDAT %d LAST\r\n", 10+len(tail)))
			// 10 octets in 1.5 s: far below 500 octets/s, on TLS too
			// (where each one costs a record of about 30).
			for i := 0; i < 10; i++ {
				time.Sleep(150 * time.Millisecond)
				if _, err := m.c.Conn.Write([]byte("z")); err != nil {
					break
				}
			}
			m.c.Conn.Write([]byte(tail))
			if replies := collectReplies(m.c, 5*time.Second); len(replies) != 1 || !strings.HasPrefix(replies[0], "421 4.4.2") {
				m.t.Fatalf("a chunk cut by the minimum rate got %q, want one 421 4.4.2 and a close", replies)
			}
			m.c.Close()
			m.dial()
			continue
		}
		if !pipeline {
			m.flush()
		}
	}
	m.flush()
	expectNOOPNext(m.c)
}

// expectQueued checks the reply to a message's end and records it.
func (m *sessionModel) expectQueued(id, data string) {
	m.pending = append(m.pending, expectation{"250 2.0.0", m.queuedThen(id, data)})
	m.resetTx()
}

func (m *sessionModel) queuedThen(id, data string) func(string) {
	from, rcpts := m.from, append([]string(nil), m.rcpts...)
	return func(reply string) {
		if !strings.Contains(reply, "queued as ") {
			m.t.Fatalf("reply %q to %s names no queue ID", reply, id)
		}
		m.acked[id] = ackedMail{from: from, rcpts: rcpts, data: data}
	}
}

// checkStored holds the queue to what the gateway acknowledged.
func checkStored(t *testing.T, sp *spool.Spool, acked map[string]ackedMail) {
	t.Helper()
	stored := byMessageID(t, sp)
	for id, a := range acked {
		ms := stored[id]
		if len(ms) != 1 {
			t.Errorf("%s acknowledged, stored %d times", id, len(ms))
			continue
		}
		e := ms[0].Envelope
		var rcpts []string
		for _, r := range e.Rcpts {
			rcpts = append(rcpts, r.Addr)
		}
		if e.From != a.from || strings.Join(rcpts, ",") != strings.Join(a.rcpts, ",") {
			t.Errorf("%s stored from %q to %q, sent from %q to %q", id, e.From, rcpts, a.from, a.rcpts)
		}
		if body := storedBody(t, sp, ms[0]); !strings.HasSuffix(body, "\r\n"+a.data) {
			t.Errorf("%s stored as %q, sent %q", id, body, a.data)
		}
	}
	for id, ms := range stored {
		if !strings.HasSuffix(id, "@interleave.test") {
			continue
		}
		if _, ok := acked[id]; !ok && len(ms) > 0 {
			t.Errorf("%s stored %d times without a 250", id, len(ms))
		}
		for _, msg := range ms {
			if strings.Contains(msg.Envelope.From, forgedDomain) {
				t.Errorf("a forged envelope was stored: %+v", msg.Envelope)
			}
			for _, r := range msg.Envelope.Rcpts {
				if strings.Contains(r.Addr, forgedDomain) {
					t.Errorf("a forged envelope was stored: %+v", msg.Envelope)
				}
			}
		}
	}
}
