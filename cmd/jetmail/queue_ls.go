package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/jetmail/jetmail/spool"
)

// lsFilter holds the ls filters; a message is listed when it passes all.
type lsFilter struct {
	sender, rcpt, domain, state, errText string
	minAge, maxAge                       time.Duration
}

func (f *lsFilter) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.sender, "sender", "", "only mail from this envelope sender (case-insensitive; \"<>\" for bounces)")
	fl.StringVar(&f.rcpt, "rcpt", "", "only mail with this recipient (case-insensitive)")
	fl.StringVar(&f.domain, "domain", "", "only mail with a recipient in this domain")
	fl.StringVar(&f.state, "state", "", "only mail in this state (new, active, deferred, held) or with a recipient in this status (queued, deferred, delivered, failed)")
	fl.StringVar(&f.errText, "error", "", "only mail with a recipient whose last reply contains this text (case-insensitive)")
	fl.DurationVar(&f.minAge, "min-age", 0, "only mail queued at least this long ago")
	fl.DurationVar(&f.maxAge, "max-age", 0, "only mail queued at most this long ago")
}

func (f *lsFilter) check() error {
	switch f.state {
	case "", stateNew, stateActive, stateDeferred, stateHeld, string(spool.RcptQueued), string(spool.RcptDelivered), string(spool.RcptFailed):
		return nil
	}
	return fmt.Errorf("--state %s: one of new, active, deferred, held, queued, delivered, failed", f.state)
}

// envelopeMatch applies the filters that need no delivery state, so that
// the state of mail they leave out is never read.
func (f *lsFilter) envelopeMatch(m *spool.Message, now time.Time) bool {
	env := &m.Envelope
	if f.sender != "" {
		want := strings.Trim(f.sender, "<>")
		if !strings.EqualFold(env.From, want) {
			return false
		}
	}
	a := now.Sub(env.Received)
	if (f.minAge > 0 && a < f.minAge) || (f.maxAge > 0 && a > f.maxAge) {
		return false
	}
	if f.rcpt == "" && f.domain == "" {
		return true
	}
	// Before the delivery state is read (one request per message): a
	// recipient of the envelope must match.
	for _, r := range env.Rcpts {
		if (f.rcpt == "" || strings.EqualFold(r.Addr, f.rcpt)) && (f.domain == "" || domainOf(r.Addr) == strings.ToLower(f.domain)) {
			return true
		}
	}
	return false
}

// match applies the rest: the recipient filters must hold for one same
// recipient (mail to example.com failing with "greylisted").
func (f *lsFilter) match(state string, rcpts []spool.RcptState) bool {
	rcptState := f.state
	switch {
	case f.state == stateNew || f.state == stateActive || f.state == stateHeld:
		if state != f.state {
			return false
		}
		rcptState = ""
	case f.state == stateDeferred && state == stateDeferred:
		rcptState = ""
	}
	if f.rcpt == "" && f.domain == "" && f.errText == "" && rcptState == "" {
		return true
	}
	for _, rs := range rcpts {
		if (f.rcpt == "" || strings.EqualFold(rs.Addr, f.rcpt)) &&
			(f.domain == "" || domainOf(rs.Addr) == strings.ToLower(f.domain)) &&
			(f.errText == "" || strings.Contains(strings.ToLower(rs.Text), strings.ToLower(f.errText))) &&
			(rcptState == "" || string(rs.Status) == rcptState) {
			return true
		}
	}
	return false
}

// lsMessage is one line of `queue ls -o json`.
type lsMessage struct {
	QueueID     string         `json:"queueId"`
	Seq         uint64         `json:"seq"`
	Size        int64          `json:"size"`
	Received    time.Time      `json:"received"`
	State       string         `json:"state"`
	From        string         `json:"from"`
	Attempts    int            `json:"attempts"`
	NextAttempt time.Time      `json:"nextAttempt,omitzero"`
	Rcpts       []lsRcptOutput `json:"rcpts"`
}

type lsRcptOutput struct {
	Addr        string           `json:"addr"`
	Status      spool.RcptStatus `json:"status"`
	Attempts    int              `json:"attempts"`
	NextAttempt time.Time        `json:"nextAttempt,omitzero"`
	LastAttempt time.Time        `json:"lastAttempt,omitzero"`
	Code        int              `json:"code,omitempty"`
	Enhanced    string           `json:"enhanced,omitempty"`
	Reply       string           `json:"reply,omitempty"`
	Relay       string           `json:"relay,omitempty"`
}

func lsRecord(m *spool.Message, st *spool.DeliveryState, state string, rcpts []spool.RcptState) lsMessage {
	out := lsMessage{QueueID: m.Envelope.QueueID, Seq: m.Sequence, Size: m.Envelope.Body.Size,
		Received: m.Envelope.Received.UTC(), State: state, From: m.Envelope.From}
	if st != nil {
		out.Attempts, out.NextAttempt = st.Attempts, st.NextAttempt.UTC()
	}
	for _, rs := range rcpts {
		out.Rcpts = append(out.Rcpts, lsRcptOutput{Addr: rs.Addr, Status: rs.Status, Attempts: rs.Attempts,
			NextAttempt: rs.NextAttempt.UTC(), LastAttempt: rs.LastAttempt.UTC(), Code: rs.Code,
			Enhanced: rs.Enhanced, Reply: rs.Text, Relay: rs.RemoteMTA})
	}
	return out
}

func queueLsCmd(qf *queueFlags) *cobra.Command {
	var (
		f        lsFilter
		limit    int
		afterSeq uint64
	)
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List queued mail with each recipient's state and last reply (postqueue -p, qmail-qread)",
		Long: `ls reads the queue oldest first, one message at a time (never the whole queue
in memory), with each message's delivery state from JETMAIL_STATE. For each
message: queue ID, size, arrival time, state, sender; then each recipient
with its status, attempts, next attempt and last reply.

Message states: new (no deliverer has had it yet), active (a deliverer has
it and it is due), deferred (waiting for its next attempt). Recipient
statuses: queued (not attempted), deferred, delivered, failed (bounced).

--limit stops after that many messages and says how to ask for the next
page (--after-seq, the queue sequence of the last one listed).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := f.check(); err != nil {
				return err
			}
			return qf.run(cmd, func(ctx context.Context, sp *spool.Spool, w io.Writer) error {
				now := queueNow()
				stats, err := sp.Stats(ctx)
				if err != nil {
					return err
				}
				enc := json.NewEncoder(w)
				if qf.output == "text" {
					fmt.Fprintf(w, "%-14s  %10s  %-20s  %-8s  %s\n", "QUEUE ID", "SIZE", "ARRIVED", "STATE", "SENDER")
				}
				var n, size int64
				var lastSeq uint64
				errLimit := errors.New("limit")
				err = sp.ScanFrom(ctx, afterSeq+1, func(m *spool.Message) error {
					if !f.envelopeMatch(m, now) {
						return nil
					}
					st, err := sp.LoadState(ctx, m.Envelope.QueueID)
					if err != nil {
						return err
					}
					state := msgState(m, st, stats, now)
					rcpts := rcptStates(m, st)
					if !f.match(state, rcpts) {
						return nil
					}
					if limit > 0 && n == int64(limit) {
						return errLimit
					}
					n++
					size += m.Envelope.Body.Size
					lastSeq = m.Sequence
					if qf.output == "json" {
						return enc.Encode(lsRecord(m, st, state, rcpts))
					}
					return writeLsBlock(w, m, state, rcpts, now)
				})
				more := errors.Is(err, errLimit)
				if err != nil && !more {
					return err
				}
				if qf.output == "text" {
					noun := "messages"
					if n == 1 {
						noun = "message"
					}
					fmt.Fprintf(w, "-- %d %s, %d bytes", n, noun, size)
					if more {
						fmt.Fprintf(w, "; more: add --after-seq %d", lastSeq)
					}
					fmt.Fprintln(w)
				}
				return nil
			})
		},
	}
	f.register(cmd)
	cmd.Flags().IntVar(&limit, "limit", 0, "list at most this many messages (0: all)")
	cmd.Flags().Uint64Var(&afterSeq, "after-seq", 0, "list only mail after this queue sequence (the next page of a --limit listing)")
	return cmd
}

func writeLsBlock(w io.Writer, m *spool.Message, state string, rcpts []spool.RcptState, now time.Time) error {
	env := &m.Envelope
	fmt.Fprintf(w, "%-14s  %10d  %-20s  %-8s  %s\n", env.QueueID, env.Body.Size, stamp(env.Received), state, sender(env.From))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, rs := range rcpts {
		line := fmt.Sprintf("    %s\t%s\t%s\t%s", rs.Addr, rs.Status, attempts(rs.Attempts), nextAttempt(rs, now))
		if r := reply(rs); r != "" {
			line += "\t" + r
		}
		fmt.Fprintln(tw, line)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintln(w)
	return err
}

func sender(from string) string {
	if from == "" {
		return "<>"
	}
	return from
}

func attempts(n int) string {
	if n == 1 {
		return "1 attempt"
	}
	return fmt.Sprintf("%d attempts", n)
}

func nextAttempt(rs spool.RcptState, now time.Time) string {
	if !pendingStatus(rs.Status) {
		return "-"
	}
	if rs.NextAttempt.IsZero() || !rs.NextAttempt.After(now) {
		return "next: now"
	}
	return "next: " + stamp(rs.NextAttempt)
}

func reply(rs spool.RcptState) string {
	if rs.Code == 0 && rs.Text == "" {
		return ""
	}
	return strings.TrimSpace(fmt.Sprintf("%d %s %s", rs.Code, rs.Enhanced, rs.Text))
}

// ---- show ----
