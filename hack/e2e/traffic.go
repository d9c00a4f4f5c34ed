//go:build e2e

package e2e

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
)

// Traffic settings. The senders behave as real clients do: a message whose
// 250 they did not see (a 4xx, a broken connection, a timeout) is sent
// again, with the same bytes and Message-ID, possibly through the other
// gateway; and a sample of the messages whose 250 they did see is sent
// again too, as by a client that lost the reply.
const (
	sessionsPerGateway = 4
	messagesPerConn    = 40
	maxAttempts        = 40                     // per message; then it counts as never acknowledged
	replaySample       = 0.02                   // share of acknowledged messages sent again
	bounceShare        = 0.03                   // messages with a bounce-* recipient (550 at the sink)
	largeShare         = 0.005                  // messages over the inline limit (JETMAIL_BODY chunks)
	dialTimeout        = 3 * time.Second        //
	transactionTimeout = 45 * time.Second       // a whole transaction, final reply included
	resendAfter        = 500 * time.Millisecond // first resend delay; grows per attempt, at most resendMax
	resendMax          = 5 * time.Second        //
)

// message is one message the senders send until they see its 250.
type message struct {
	idx   int
	id    string // Message-ID, without <>
	from  string
	rcpts []string
	data  []byte
	probe bool // sent after the MailRoute change, to check it

	// Under traffic.mu.
	attempts  int
	firstSent time.Time
	acked     bool
	ackAt     time.Time
	queueIDs  []string // from every 250, first one first
	rejected  string   // a 5xx reply, which no message here deserves
	replayed  bool     // sent again after its 250 (the lost-reply sample)
	gaveUp    bool     // maxAttempts without a 250
}

// sendEvent is one transaction's outcome, for the figures per fault.
type sendEvent struct {
	at     time.Time
	gw     string
	result string // "250", "4xx", "5xx", "neterr"
}

// retry is a message waiting to be sent again.
type retry struct {
	m      *message
	due    time.Time
	avoid  int  // the gateway index that failed it (a resend prefers the other)
	replay bool // the lost-reply sample: already acknowledged
}

// traffic sends messages through the gateways.
type traffic struct {
	w   *world
	gws []*role

	mu          sync.Mutex
	msgs        []*message
	retries     []retry
	outstanding int // messages (and replays) not finished yet
	events      []sendEvent
	replays     int      // replays answered 250
	replayBad   []string // replays answered otherwise than with the original queue ID
	rng         *rand.Rand
	fresh       chan *message
	deadline    time.Time
}

func newTraffic(w *world, gws []*role, seed uint64) *traffic {
	return &traffic{w: w, gws: gws, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

// makeMessages builds n messages to random recipient domains; every one
// has a unique Message-ID. If only is not "", every recipient is there.
func (tr *traffic) makeMessages(n int, only string, probe bool) []*message {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	var out []*message
	for k := 0; k < n; k++ {
		idx := len(tr.msgs)
		m := &message{idx: idx, probe: probe,
			id:   fmt.Sprintf("e2e-%06d.%d@senders.test", idx, tr.w.start.Unix()),
			from: fmt.Sprintf("s%02d@%s", idx%50, sendersDomain)}
		nr := 1 + tr.rng.IntN(3)
		bounce := tr.rng.Float64() < bounceShare
		seen := map[string]bool{}
		for len(m.rcpts) < nr {
			dom := only
			if dom == "" {
				dom = domainName(tr.rng.IntN(domainCount))
			}
			local := fmt.Sprintf("u%d", tr.rng.IntN(1000))
			if bounce && len(m.rcpts) == 0 {
				local = fmt.Sprintf("bounce-%d", idx)
			}
			a := local + "@" + dom
			if !seen[a] {
				seen[a] = true
				m.rcpts = append(m.rcpts, a)
			}
		}
		size := 300 + tr.rng.IntN(4000)
		if tr.rng.Float64() < largeShare {
			size = 1100 << 10
		}
		m.data = messageBytes(m, size)
		tr.msgs = append(tr.msgs, m)
		out = append(out, m)
	}
	return out
}

// messageBytes renders a message with CRLF lines of printable text.
func messageBytes(m *message, size int) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "From: <%s>\r\nTo: %s\r\nSubject: e2e %d\r\nDate: %s\r\nMessage-ID: <%s>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
		m.from, strings.Join(m.rcpts, ", "), m.idx, time.Now().Format(time.RFC1123Z), m.id)
	line := fmt.Sprintf("message %d of the jetmail end-to-end test, padding to size ....................\r\n", m.idx)
	for b.Len() < size {
		b.WriteString(line)
	}
	return []byte(b.String())
}

// send sends msgs at rate per second through every gateway, with
// sessionsPerGateway sessions each, and keeps resending what was not
// acknowledged until every message has its 250 (or maxAttempts), or until
// deadline. It returns when every session is done.
func (tr *traffic) send(msgs []*message, rate float64, deadline time.Time) {
	tr.mu.Lock()
	tr.outstanding += len(msgs)
	tr.fresh = make(chan *message)
	tr.deadline = deadline
	tr.mu.Unlock()
	go func() {
		defer close(tr.fresh)
		tick := time.Duration(float64(time.Second) / rate)
		next := time.Now()
		for _, m := range msgs {
			if d := time.Until(next); d > 0 {
				time.Sleep(d)
			}
			next = next.Add(tick)
			select {
			case tr.fresh <- m:
			case <-time.After(time.Until(deadline)):
				return
			}
		}
	}()
	var wg sync.WaitGroup
	for gi := range tr.gws {
		for range sessionsPerGateway {
			wg.Add(1)
			go func() {
				defer wg.Done()
				tr.session(gi)
			}()
		}
	}
	wg.Wait()
}

// next picks the next message for a session of gateway gi: a retry that
// is due (preferring those another gateway failed), else a fresh one. It
// returns nil when there is nothing to do for now, and done when the
// session should end.
func (tr *traffic) next(gi int) (r retry, ok, done bool) {
	tr.mu.Lock()
	now := time.Now()
	if now.After(tr.deadline) {
		tr.mu.Unlock()
		return retry{}, false, true
	}
	for i, rt := range tr.retries {
		if !rt.due.After(now) && (rt.avoid != gi || now.Sub(rt.due) > 2*time.Second) {
			tr.retries = append(tr.retries[:i], tr.retries[i+1:]...)
			tr.mu.Unlock()
			return rt, true, false
		}
	}
	fresh := tr.fresh
	tr.mu.Unlock()
	select {
	case m, open := <-fresh:
		if open {
			return retry{m: m, avoid: -1}, true, false
		}
		tr.mu.Lock()
		done = tr.outstanding == 0
		tr.mu.Unlock()
		if !done {
			time.Sleep(50 * time.Millisecond)
		}
		return retry{}, false, done
	case <-time.After(100 * time.Millisecond):
		return retry{}, false, false
	}
}

// session is one SMTP client bound to one gateway, reconnecting as needed.
func (tr *traffic) session(gi int) {
	gw := tr.gws[gi]
	var c *client
	defer func() {
		if c != nil {
			c.quit()
		}
	}()
	inConn := 0
	for {
		rt, ok, done := tr.next(gi)
		if done {
			return
		}
		if !ok {
			continue
		}
		if c == nil {
			var err error
			c, err = dial(gw.smtp)
			if err != nil {
				tr.result(rt, gi, "", err)
				time.Sleep(200 * time.Millisecond)
				continue
			}
			inConn = 0
		}
		qid, err := c.send(rt.m)
		tr.result(rt, gi, qid, err)
		inConn++
		if err != nil {
			c.close()
			c = nil
		} else if inConn >= messagesPerConn {
			c.quit()
			c = nil
		}
	}
}

// result books the outcome of one transaction and schedules what follows.
func (tr *traffic) result(rt retry, gi int, qid string, err error) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	m, now := rt.m, time.Now()
	m.attempts++
	if m.firstSent.IsZero() {
		m.firstSent = now
	}
	ev := sendEvent{at: now, gw: tr.gws[gi].name}
	var se *smtp.SMTPError
	switch {
	case err == nil:
		ev.result = "250"
	case errors.As(err, &se) && se.Code >= 500:
		ev.result = "5xx"
	case errors.As(err, &se):
		ev.result = "4xx"
	default:
		ev.result = "neterr"
	}
	tr.events = append(tr.events, ev)

	switch ev.result {
	case "250":
		m.queueIDs = append(m.queueIDs, qid)
		if rt.replay {
			tr.replays++
			if qid != m.queueIDs[0] {
				tr.replayBad = append(tr.replayBad, fmt.Sprintf("%s: replay answered %q, first 250 said %q", m.id, qid, m.queueIDs[0]))
			}
			tr.outstanding--
			return
		}
		if !m.acked {
			m.acked, m.ackAt = true, now
			tr.outstanding--
			if !m.replayed && tr.rng.Float64() < replaySample {
				// A client that lost this 250 sends the message again.
				m.replayed = true
				tr.outstanding++
				tr.retries = append(tr.retries, retry{m: m, due: now.Add(time.Duration(500+tr.rng.IntN(1500)) * time.Millisecond), avoid: gi, replay: true})
			}
		}
	case "5xx":
		m.rejected = err.Error()
		tr.outstanding--
	default:
		if m.attempts >= maxAttempts {
			if !m.acked {
				m.gaveUp = true
			}
			tr.outstanding--
			return
		}
		wait := min(resendAfter*time.Duration(m.attempts), resendMax)
		tr.retries = append(tr.retries, retry{m: m, due: now.Add(wait), avoid: gi, replay: rt.replay})
	}
}

// resent counts the messages sent more than once, and the replays of
// acknowledged ones that were answered.
func (tr *traffic) resent() (messages, replays int) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	for _, m := range tr.msgs {
		if m.attempts > 1 {
			messages++
		}
	}
	return messages, tr.replays
}

// outcome counts transactions by result between from and to, on every
// gateway.
func (tr *traffic) outcome(from, to time.Time) map[string]int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	out := map[string]int{}
	for _, e := range tr.events {
		if !e.at.Before(from) && e.at.Before(to) {
			out[e.result]++
		}
	}
	return out
}

// client is one SMTP session to a gateway (go-smtp's client), under a
// deadline per transaction.
type client struct {
	conn net.Conn
	c    *smtp.Client
}

func dial(addr string) (*client, error) {
	conn, err := net.DialTimeout("tcp", addr, dialTimeout)
	if err != nil {
		return nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(transactionTimeout))
	c := smtp.NewClient(conn)
	if err := c.Hello("client.e2e.test"); err != nil {
		conn.Close()
		return nil, err
	}
	return &client{conn: conn, c: c}, nil
}

var queuedAs = regexp.MustCompile(`queued as ([0-9A-Z]{14})`)

// send runs one transaction and returns the queue ID of the 250.
func (c *client) send(m *message) (string, error) {
	_ = c.conn.SetDeadline(time.Now().Add(transactionTimeout))
	if err := c.c.Mail(m.from, nil); err != nil {
		return "", err
	}
	for _, r := range m.rcpts {
		if err := c.c.Rcpt(r, nil); err != nil {
			return "", err
		}
	}
	wc, err := c.c.Data()
	if err != nil {
		return "", err
	}
	if _, err := wc.Write(m.data); err != nil {
		return "", err
	}
	resp, err := wc.CloseWithResponse()
	if err != nil {
		return "", err
	}
	id := queuedAs.FindStringSubmatch(resp.StatusText)
	if id == nil {
		return "", fmt.Errorf("250 without a queue ID: %q", resp.StatusText)
	}
	return id[1], nil
}

func (c *client) quit() {
	_ = c.conn.SetDeadline(time.Now().Add(5 * time.Second))
	_ = c.c.Quit()
	c.conn.Close()
}

func (c *client) close() { c.conn.Close() }
