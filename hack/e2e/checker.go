//go:build e2e

package e2e

import (
	"bytes"
	"fmt"
	"net/mail"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/jetmail/jetmail/internal/dsntest"
)

// fault is one thing the scenario did to the cluster.
type fault struct {
	name   string // what was done: "SIGKILL gateway gw-0", ...
	kind   string // deliverer-kill, deliverer-term, gateway-kill, nats-kill, nats-stop, controller-kill
	target string
	at     time.Time // the signal
	end    time.Time // the process back (restarted, resumed), or at
	note   string    // figures read at the time (sessions open, leader, ...)
	// deliverers is how many deliverers ran at the time (nats-kill).
	deliverers int
}

// The at-most-once window. A deliverer records a recipient as delivered
// after the remote's 250, and acknowledges the queue message after that
// record (deliverer/attempt.go: finish). If the deliverer, or the leader of
// the stream the record goes to, dies between the two, the message comes
// back and is delivered a second time: the one duplicate jetmail does not
// promise to prevent (README, "Results per recipient").
//
// A copy is in the window when the copy before it (the one whose record
// was lost) reached its sink shortly before a deliverer SIGKILL, sent by
// that deliverer (its EHLO name), or shortly before a SIGKILL of the NATS
// node leading the queue stream. "Shortly" is windowBefore: all of an
// attempt's destinations are tried before the record, each bounded by the
// session deadline (timeouts.session) on at most two next hops here, plus
// the record itself; windowBefore is that, with margin.
//
// The bound, in messages: each message the fault caught can be duplicated
// once by it, and a deliverer holds at most --max-in-flight messages
// (maxInFlight; deliverer/consume.go pulls only as many as it has free
// slots). So a deliverer SIGKILL explains at most maxInFlight duplicated
// messages, and a stream leader's SIGKILL at most maxInFlight for each
// deliverer running (every one of them may have had records in flight).
const windowBefore = 2*outboundSession + 15*time.Second

// windowBound is how many duplicated messages fault f can explain.
func windowBound(f *fault) int {
	if f.kind == "nats-kill" {
		return maxInFlight * f.deliverers
	}
	return maxInFlight
}

// dsnReport is one DSN a sink received, read as the sender's client would.
type dsnReport struct {
	origID string          // Message-ID of the original, from the returned headers
	failed map[string]bool // Final-Recipient addresses with Action: failed
	at     time.Time
}

// tally is what the sinks received, matched to what was sent.
type tally struct {
	sent, acked, unacked int
	// delivered: messages whose every ordinary recipient got a copy;
	// bounced: messages whose every bounce-* recipient is in a DSN read
	// back; complete: both, as far as the message has such recipients.
	delivered, bounced, complete int
	// lost lists acknowledged messages that are not complete.
	lost []string
	// Extra copies: in the at-most-once window of a fault, stored twice
	// (another queue ID), or neither.
	dupWindow, dupResend, dupOther int
	// windowPerFault counts the messages (not copies) each fault
	// duplicated within its window: the unit of the bound.
	windowPerFault map[*fault]map[*message]bool
	// otherPerFault counts the unexplained copies by the last fault
	// before each arrived, to say where they come from.
	otherPerFault map[*fault]int
	dupLines      []string // one per duplicated message, for the report
	errors        []string
	// firstDelivery is when a message's first copy or DSN arrived.
	firstDelivery map[*message]time.Time
}

// checker matches deliveries and DSNs to messages.
type checker struct {
	t      *testing.T
	tr     *traffic
	snk    *sinks
	faults []*fault
	// routeChanged is when every deliverer ran the changed MailRoute;
	// probe messages were sent after it.
	routeChanged time.Time
	dsns         map[int]*dsnReport // by index in the sinks' deliveries
}

func newChecker(t *testing.T, tr *traffic, snk *sinks) *checker {
	return &checker{t: t, tr: tr, snk: snk, dsns: map[int]*dsnReport{}}
}

// readDSN takes a DSN apart with internal/dsntest: the failed recipients
// from its message/delivery-status part, the original Message-ID from the
// returned headers.
func (c *checker) readDSN(raw []byte, at time.Time) *dsnReport {
	p := dsntest.Parse(c.t, raw)
	r := &dsnReport{failed: map[string]bool{}, at: at}
	for _, part := range p.Parts {
		ct := part.Header.Get("Content-Type")
		switch {
		case strings.HasPrefix(ct, "message/delivery-status"):
			for _, b := range dsntest.StatusBlocks(c.t, part.Body) {
				fr := b.Get("Final-Recipient")
				if fr == "" || !strings.EqualFold(b.Get("Action"), "failed") {
					continue
				}
				if i := strings.IndexByte(fr, ';'); i >= 0 {
					fr = fr[i+1:]
				}
				r.failed[strings.ToLower(strings.TrimSpace(fr))] = true
			}
		case strings.HasPrefix(ct, "text/rfc822-headers"), strings.HasPrefix(ct, "message/rfc822"):
			body := part.Body
			if !bytes.Contains(body, []byte("\r\n\r\n")) {
				body = append(append([]byte(nil), body...), "\r\n\r\n"...)
			}
			if m, err := mail.ReadMessage(bytes.NewReader(body)); err == nil {
				r.origID = strings.Trim(strings.TrimSpace(m.Header.Get("Message-Id")), "<>")
			}
		}
	}
	return r
}

// tally counts everything; called repeatedly while the queue drains.
func (c *checker) tally() *tally {
	deliveries := c.snk.snapshot()
	c.tr.mu.Lock()
	msgs := append([]*message(nil), c.tr.msgs...)
	state := map[*message]message{}
	for _, m := range msgs {
		state[m] = *m
	}
	c.tr.mu.Unlock()

	byID := map[string]*message{}
	for _, m := range msgs {
		byID[m.id] = m
	}
	type copyOf struct {
		d   delivery
		idx int
	}
	copies := map[*message]map[string][]copyOf{} // message → recipient → copies
	dsnsOf := map[*message]map[string][]delivery{}
	tl := &tally{windowPerFault: map[*fault]map[*message]bool{}, otherPerFault: map[*fault]int{}, firstDelivery: map[*message]time.Time{}}
	for i, d := range deliveries {
		if d.from == "" {
			r := c.dsns[i]
			if r == nil {
				r = c.readDSN(d.raw, d.at)
				c.dsns[i] = r
			}
			m := byID[r.origID]
			if m == nil {
				tl.errors = append(tl.errors, fmt.Sprintf("DSN at %s for an unknown message %q", d.sink, r.origID))
				continue
			}
			if dsnsOf[m] == nil {
				dsnsOf[m] = map[string][]delivery{}
			}
			for a := range r.failed {
				dsnsOf[m][a] = append(dsnsOf[m][a], d)
			}
			continue
		}
		m := byID[d.msgID]
		if m == nil {
			tl.errors = append(tl.errors, fmt.Sprintf("message %q from %s at %s is not one the test sent", d.msgID, d.from, d.sink))
			continue
		}
		if copies[m] == nil {
			copies[m] = map[string][]copyOf{}
		}
		for _, r := range d.rcpts {
			copies[m][r] = append(copies[m][r], copyOf{d, i})
			if strings.HasSuffix(r, "@"+routedDomain) {
				switch {
				case d.sink == hostD:
					tl.errors = append(tl.errors, fmt.Sprintf("%s: %s went to its MX (%s), not by the MailRoute", m.id, r, d.sink))
				case m.probe && d.sink != hostMoved:
					tl.errors = append(tl.errors, fmt.Sprintf("%s: %s, sent after the MailRoute change took effect, went to %s, not %s", m.id, r, d.sink, hostMoved))
				}
			}
		}
	}

	for _, m := range msgs {
		st := state[m]
		tl.sent++
		if st.acked {
			tl.acked++
		} else {
			tl.unacked++
		}
		if st.rejected != "" {
			tl.errors = append(tl.errors, fmt.Sprintf("%s was refused permanently by a gateway: %s", m.id, st.rejected))
		}
		if ids := uniq(st.queueIDs); len(ids) > 1 {
			tl.errors = append(tl.errors, fmt.Sprintf("%s: retransmissions got different queue IDs %v (stored twice)", m.id, ids))
		}
		hasNormal, hasBounce := false, false
		allDelivered, allBounced := true, true
		var extra []string
		for _, r := range m.rcpts {
			if strings.HasPrefix(r, "bounce-") {
				hasBounce = true
				ds := dsnsOf[m][r]
				if len(ds) == 0 {
					allBounced = false
					continue
				}
				if f, ok := tl.firstDelivery[m]; !ok || ds[0].at.Before(f) {
					tl.firstDelivery[m] = ds[0].at
				}
				for i := 1; i < len(ds); i++ {
					class := c.classify(tl, m, ds[i-1], ds[i], false)
					extra = append(extra, fmt.Sprintf("DSN for %s again at %s from %s [%s] (previous at %s from %s)",
						r, c.tr.w.since(ds[i].at), ds[i].helo, class, c.tr.w.since(ds[i-1].at), ds[i-1].helo))
				}
				continue
			}
			hasNormal = true
			cs := copies[m][r]
			if len(cs) == 0 {
				allDelivered = false
				continue
			}
			if f, ok := tl.firstDelivery[m]; !ok || cs[0].d.at.Before(f) {
				tl.firstDelivery[m] = cs[0].d.at
			}
			for i := 1; i < len(cs); i++ {
				prev, cur := cs[i-1].d, cs[i].d
				class := c.classify(tl, m, prev, cur, cur.queueID != cs[0].d.queueID)
				extra = append(extra, fmt.Sprintf("%s again at %s to %s from %s as %s [%s] (previous at %s to %s from %s as %s)",
					r, c.tr.w.since(cur.at), cur.sink, cur.helo, cur.queueID, class, c.tr.w.since(prev.at), prev.sink, prev.helo, prev.queueID))
			}
		}
		if hasNormal && allDelivered {
			tl.delivered++
		}
		if hasBounce && allBounced {
			tl.bounced++
		}
		if allDelivered && allBounced {
			tl.complete++
		} else if st.acked {
			tl.lost = append(tl.lost, fmt.Sprintf("%s (acknowledged at %s as %v, recipients %v)", m.id, c.tr.w.since(st.ackAt), uniq(st.queueIDs), m.rcpts))
		}
		if len(extra) > 0 {
			tl.dupLines = append(tl.dupLines, fmt.Sprintf("%s (sent %d times, 250s %v): %s", m.id, st.attempts, st.queueIDs, strings.Join(extra, "; ")))
		}
	}
	c.tr.mu.Lock()
	tl.errors = append(tl.errors, c.tr.replayBad...)
	c.tr.mu.Unlock()
	return tl
}

// classify books the copy cur, which followed prev, and says how. A copy
// under another queue ID than the first was stored twice: a
// retransmission the duplicate guard missed. Otherwise it is in the
// at-most-once window of a fault that came soon after prev (see
// windowBefore), and unexplained if there is none.
func (c *checker) classify(tl *tally, m *message, prev, cur delivery, storedTwice bool) string {
	if storedTwice {
		tl.dupResend++
		return "stored twice"
	}
	for _, f := range c.faults {
		explains := false
		switch f.kind {
		case "deliverer-kill":
			explains = prev.helo == f.target+".e2e.test"
		case "nats-kill":
			explains = true
		}
		if explains && !prev.at.After(f.at.Add(time.Second)) && prev.at.After(f.at.Add(-windowBefore)) {
			tl.dupWindow++
			if tl.windowPerFault[f] == nil {
				tl.windowPerFault[f] = map[*message]bool{}
			}
			tl.windowPerFault[f][m] = true
			return "window of " + f.name
		}
	}
	tl.dupOther++
	var last *fault
	for _, f := range c.faults {
		if !f.at.After(cur.at) && (last == nil || f.at.After(last.at)) {
			last = f
		}
	}
	if last == nil {
		return "unexplained, before any fault"
	}
	tl.otherPerFault[last]++
	return fmt.Sprintf("unexplained, %.1fs after %s", cur.at.Sub(last.at).Seconds(), last.name)
}

// drained reports whether every acknowledged message has reached its
// sinks and every bounce its DSN.
func (tl *tally) drained() bool { return len(tl.lost) == 0 }

// summary is the one greppable line the run prints.
func (tl *tally) summary() string {
	return fmt.Sprintf("e2e: sent=%d acknowledged=%d delivered=%d bounced=%d duplicates=%d (window=%d resends=%d other=%d) lost=%d",
		tl.sent, tl.acked, tl.delivered, tl.bounced, tl.dupWindow+tl.dupResend+tl.dupOther, tl.dupWindow, tl.dupResend, tl.dupOther, len(tl.lost))
}

// faultFigures are the lines per fault: what the senders saw around it,
// the duplicates it explains, and for NATS faults the worst delay from
// the fault to the delivery of the messages acknowledged around it.
func (c *checker) faultFigures(tl *tally) []string {
	var out []string
	c.tr.mu.Lock()
	type acked struct {
		m  *message
		at time.Time
	}
	var acks []acked
	for _, m := range c.tr.msgs {
		if m.acked {
			acks = append(acks, acked{m, m.ackAt})
		}
	}
	c.tr.mu.Unlock()
	sort.Slice(acks, func(i, j int) bool { return acks[i].at.Before(acks[j].at) })
	for _, f := range c.faults {
		o := c.tr.outcome(f.at, f.end.Add(5*time.Second))
		line := fmt.Sprintf("e2e: fault %s %q at %s back %s: senders saw 250=%d 4xx=%d neterr=%d 5xx=%d",
			f.kind, f.target, c.tr.w.since(f.at), c.tr.w.since(f.end), o["250"], o["4xx"], o["neterr"], o["5xx"])
		if f.kind == "deliverer-kill" || f.kind == "nats-kill" {
			line += fmt.Sprintf(" window_duplicated_messages=%d (bound %d)", len(tl.windowPerFault[f]), windowBound(f))
		}
		line += fmt.Sprintf(" unexplained_copies_after=%d", tl.otherPerFault[f])
		if strings.HasPrefix(f.kind, "nats-") {
			// Messages acknowledged from 5s before the fault to 5s after
			// the node is back.
			worst, n, missing, worstID := time.Duration(0), 0, 0, ""
			for _, a := range acks {
				if a.at.Before(f.at.Add(-5*time.Second)) || a.at.After(f.end.Add(5*time.Second)) {
					continue
				}
				n++
				d, ok := tl.firstDelivery[a.m]
				if !ok {
					missing++
					continue
				}
				if d.Sub(f.at) > worst {
					worst, worstID = d.Sub(f.at), a.m.id
				}
			}
			line += fmt.Sprintf(" acknowledged_around=%d worst_fault_to_delivery=%.1fs (%s) undelivered=%d", n, worst.Seconds(), worstID, missing)
		}
		if f.note != "" {
			line += " " + f.note
		}
		out = append(out, line)
	}
	return out
}

func uniq(ss []string) []string {
	var out []string
	seen := map[string]bool{}
	for _, s := range ss {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}
