package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/spf13/cobra"

	"github.com/jetmail/jetmail/spool"
)

// The queue tools read the queue cluster-wide from NATS; none of them
// writes. Message states (ls, show, stat --scan):
//
//	new       no deliverer has been given it yet
//	active    a deliverer has it and it is due: in an attempt now, or
//	          about to be (its retry time has come)
//	deferred  its last attempt left recipients to retry later, and that
//	          time has not come
const (
	stateNew      = "new"
	stateActive   = "active"
	stateDeferred = "deferred"
)

// queueNow is the clock of the queue tools (tests set it).
var queueNow = time.Now

type queueFlags struct {
	nats    natsFlags
	output  string
	timeout time.Duration
}

func queueCmd() *cobra.Command {
	var qf queueFlags
	cmd := &cobra.Command{
		Use:   "queue",
		Short: "Look at the queue of the whole cluster: stat, ls, show (read-only)",
		Long: `queue reads the queue from NATS JetStream, for the whole cluster at once,
without asking any deliverer. It writes nothing.

Against jetmail serve on this host:
  jetmail queue stat --nats-nkey ./jetmail-data/nats-user.nk`,
	}
	fl := cmd.PersistentFlags()
	qf.nats.register(fl)
	fl.StringVarP(&qf.output, "output", "o", "text", "output format: text or json (one object per line)")
	fl.DurationVar(&qf.timeout, "timeout", 10*time.Second, "bound on each request to NATS")
	cmd.AddCommand(queueStatCmd(&qf), queueLsCmd(&qf), queueShowCmd(&qf))
	return cmd
}

// open connects to NATS and attaches to the queue, with errors that say
// what to do.
func (qf *queueFlags) open(ctx context.Context) (*spool.Spool, func(), error) {
	if qf.output != "text" && qf.output != "json" {
		return nil, nil, fmt.Errorf("-o %s: text or json", qf.output)
	}
	auth, err := natsAuth(qf.nats.nkey, qf.nats.creds)
	if err != nil {
		return nil, nil, err
	}
	opts := append(spool.NATSOptions(), nats.Name("jetmail-queue"), nats.Timeout(qf.timeout))
	nc, err := nats.Connect(qf.nats.url, append(opts, auth...)...)
	if err != nil {
		return nil, nil, qf.connectError(err)
	}
	sp, err := spool.Attach(ctx, nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return sp, nc.Close, nil
}

const serveNATS = "nats://127.0.0.1:4222"

func (qf *queueFlags) connectError(err error) error {
	signIn := qf.nats.nkey == "" && qf.nats.creds == ""
	atServe := qf.nats.url == serveNATS
	switch {
	case errors.Is(err, nats.ErrAuthorization) && signIn && atServe:
		return fmt.Errorf("connect to NATS at %s: %w\n  jetmail serve's NATS lets in only the holder of its NKEY: add --nats-nkey ./jetmail-data/%s (the file is in serve's --data-dir)", qf.nats.url, err, spool.EmbeddedKeyFile)
	case errors.Is(err, nats.ErrAuthorization) && signIn:
		return fmt.Errorf("connect to NATS at %s: %w\n  sign in with --nats-nkey (an NKEY seed file) or --nats-creds (a credentials file)", qf.nats.url, err)
	case errors.Is(err, nats.ErrNoServers) && atServe:
		return fmt.Errorf("connect to NATS at %s: %w\n  is jetmail serve running on this host? Elsewhere, give the cluster's NATS with --nats-url", qf.nats.url, err)
	}
	return fmt.Errorf("connect to NATS at %s: %w", qf.nats.url, err)
}

// run is the common frame of the queue subcommands.
func (qf *queueFlags) run(cmd *cobra.Command, fn func(ctx context.Context, sp *spool.Spool, w io.Writer) error) error {
	ctx, cancel := context.WithCancel(cmd.Context())
	defer cancel()
	octx, ocancel := context.WithTimeout(ctx, qf.timeout)
	sp, closeNC, err := qf.open(octx)
	ocancel()
	if err != nil {
		return err
	}
	defer closeNC()
	w := bufio.NewWriter(cmd.OutOrStdout())
	err = fn(ctx, sp, w)
	if ferr := w.Flush(); err == nil {
		err = ferr
	}
	return err
}

// msgState is the state of one queued message (see the constants).
func msgState(m *spool.Message, st *spool.DeliveryState, stats *spool.QueueStats, now time.Time) string {
	if st != nil && st.Claim.Held("", now) {
		return stateActive
	}
	if st != nil && st.NextAttempt.After(now) {
		for _, r := range st.Rcpts {
			if r.Status == spool.RcptQueued || r.Status == spool.RcptDeferred {
				return stateDeferred
			}
		}
	}
	if !stats.Consumer || m.Sequence > stats.HandedUpTo {
		return stateNew
	}
	return stateActive
}

// rcptStates are the recipients of m with what st says of each (queued,
// never attempted, for those it does not mention).
func rcptStates(m *spool.Message, st *spool.DeliveryState) []spool.RcptState {
	out := make([]spool.RcptState, 0, len(m.Envelope.Rcpts))
	for _, r := range m.Envelope.Rcpts {
		rs := spool.RcptState{Addr: r.Addr, Status: spool.RcptQueued}
		if st != nil {
			for _, s := range st.Rcpts {
				if strings.EqualFold(s.Addr, r.Addr) {
					rs = s
					break
				}
			}
		}
		out = append(out, rs)
	}
	return out
}

func domainOf(addr string) string {
	return strings.ToLower(addr[strings.LastIndexByte(addr, '@')+1:])
}

func pendingStatus(s spool.RcptStatus) bool {
	return s == spool.RcptQueued || s == spool.RcptDeferred
}

// ---- stat ----

// statOutput is `queue stat -o json`.
type statOutput struct {
	Messages     uint64     `json:"messages"`
	New          uint64     `json:"new"`
	Active       uint64     `json:"active"`
	Deferred     uint64     `json:"deferred"`
	Exact        bool       `json:"exact"`
	Bytes        uint64     `json:"bytes"`
	QueueBytes   uint64     `json:"queueBytes"`
	BodyBytes    uint64     `json:"bodyBytes"`
	Oldest       string     `json:"oldest,omitempty"`
	OldestTime   time.Time  `json:"oldestTime,omitzero"`
	OldestAgeSec float64    `json:"oldestAgeSeconds"`
	Consumer     bool       `json:"consumer"`
	Destinations []destStat `json:"destinations,omitempty"`
}

type destStat struct {
	Domain     string `json:"domain"`
	Recipients int    `json:"recipients"`
	Messages   int    `json:"messages"`
}

func queueStatCmd(qf *queueFlags) *cobra.Command {
	var (
		scan bool
		top  int
	)
	cmd := &cobra.Command{
		Use:   "stat",
		Short: "Counts by state, bytes, the oldest message (qmail-qstat); --scan adds exact counts and the top destinations",
		Long: `stat answers from the stream and consumer information of JetStream, without
reading any message, whatever the size of the queue:

  messages  the deliverers' consumer: not handed out yet + handed out and not
            acknowledged (the jetmail_queue_messages gauge)
  new       not handed to a deliverer yet (the consumer's pending count)
  deferred  delivery states in JETMAIL_STATE: mail whose last attempt left
            recipients to retry. For a minute after such mail leaves the
            queue its cleared state still counts, so this is an estimate
  active    handed out minus deferred: in an attempt now or about to be
  bytes     the queue stream (envelopes, inline bodies, tombstones) and the
            stream of large bodies
  oldest    the first message not acknowledged, by the time in its queue ID

--scan reads every envelope and every delivery state once (streamed, not
loaded whole) for exact counts and the top destinations by pending
recipients: its time grows with the queue.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return qf.run(cmd, func(ctx context.Context, sp *spool.Spool, w io.Writer) error {
				now := queueNow()
				st, err := sp.Stats(ctx)
				if err != nil {
					return err
				}
				out := statOutput{
					Messages: st.NotHandedOut + st.HandedOut, New: st.NotHandedOut,
					Deferred: min(st.States, st.HandedOut), Bytes: st.QueueBytes + st.BodyBytes,
					QueueBytes: st.QueueBytes, BodyBytes: st.BodyBytes, Consumer: st.Consumer, Oldest: st.Oldest,
				}
				out.Active = st.HandedOut - out.Deferred
				if t, ok := spool.QueueIDTime(st.Oldest); ok {
					out.OldestTime = t
					out.OldestAgeSec = now.Sub(t).Seconds()
				}
				if scan {
					if err := statScan(ctx, sp, st, now, top, &out); err != nil {
						return err
					}
				}
				if qf.output == "json" {
					return json.NewEncoder(w).Encode(out)
				}
				return writeStat(w, &out, now)
			})
		},
	}
	cmd.Flags().BoolVar(&scan, "scan", false, "read every envelope and delivery state: exact counts and the top destinations")
	cmd.Flags().IntVar(&top, "top", 10, "with --scan: how many destinations to list")
	return cmd
}

// statScan counts exactly by reading the states, then the envelopes.
func statScan(ctx context.Context, sp *spool.Spool, st *spool.QueueStats, now time.Time, top int, out *statOutput) error {
	states := map[string]*spool.DeliveryState{}
	if err := sp.States(ctx, func(s *spool.DeliveryState) error {
		states[s.QueueID] = s
		return nil
	}); err != nil {
		return err
	}
	type agg struct{ rcpts, msgs int }
	dests := map[string]*agg{}
	*out = statOutput{Exact: true, Bytes: out.Bytes, QueueBytes: out.QueueBytes, BodyBytes: out.BodyBytes,
		Consumer: out.Consumer, Oldest: out.Oldest, OldestTime: out.OldestTime, OldestAgeSec: out.OldestAgeSec}
	err := sp.Scan(ctx, func(m *spool.Message) error {
		ds := states[m.Envelope.QueueID]
		out.Messages++
		switch msgState(m, ds, st, now) {
		case stateNew:
			out.New++
		case stateActive:
			out.Active++
		case stateDeferred:
			out.Deferred++
		}
		seen := map[string]bool{}
		for _, rs := range rcptStates(m, ds) {
			if !pendingStatus(rs.Status) {
				continue
			}
			d := domainOf(rs.Addr)
			a := dests[d]
			if a == nil {
				a = &agg{}
				dests[d] = a
			}
			a.rcpts++
			if !seen[d] {
				seen[d] = true
				a.msgs++
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	for d, a := range dests {
		out.Destinations = append(out.Destinations, destStat{Domain: d, Recipients: a.rcpts, Messages: a.msgs})
	}
	sort.Slice(out.Destinations, func(i, j int) bool {
		a, b := out.Destinations[i], out.Destinations[j]
		if a.Recipients != b.Recipients {
			return a.Recipients > b.Recipients
		}
		return a.Domain < b.Domain
	})
	if top >= 0 && len(out.Destinations) > top {
		out.Destinations = out.Destinations[:top]
	}
	return nil
}

func writeStat(w io.Writer, out *statOutput, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	how := "from stream and consumer info; deferred is an estimate (--scan for exact counts)"
	if out.Exact {
		how = "exact, from a read of every envelope and delivery state"
	}
	fmt.Fprintf(tw, "messages\t%d\t%s\n", out.Messages, how)
	fmt.Fprintf(tw, "new\t%d\tnot handed to a deliverer yet\n", out.New)
	fmt.Fprintf(tw, "active\t%d\tin an attempt now or due\n", out.Active)
	fmt.Fprintf(tw, "deferred\t%d\twaiting for a retry\n", out.Deferred)
	fmt.Fprintf(tw, "bytes\t%d\tqueue %d, large bodies %d\n", out.Bytes, out.QueueBytes, out.BodyBytes)
	if out.Oldest != "" {
		fmt.Fprintf(tw, "oldest\t%s\t%s, arrived %s\n", age(now.Sub(out.OldestTime)), out.Oldest, stamp(out.OldestTime))
	} else {
		fmt.Fprintf(tw, "oldest\t-\t\n")
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if !out.Consumer {
		fmt.Fprintf(w, "(no deliverer has run yet: the consumer %s does not exist)\n", spool.DeliveryConsumerName)
	}
	if len(out.Destinations) > 0 {
		fmt.Fprintln(w)
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "DESTINATION\tRECIPIENTS\tMESSAGES")
		for _, d := range out.Destinations {
			fmt.Fprintf(tw, "%s\t%d\t%d\n", d.Domain, d.Recipients, d.Messages)
		}
		return tw.Flush()
	}
	return nil
}

// stamp is how the queue tools print a time: UTC, to the second.
func stamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format("2006-01-02 15:04:05Z")
}

// age is a duration to the second, or to the minute past a day.
func age(d time.Duration) string {
	if d < 0 {
		return "-" + age(-d)
	}
	if d >= 24*time.Hour {
		d = d.Round(time.Minute)
		days := d / (24 * time.Hour)
		return fmt.Sprintf("%dd%s", days, strings.TrimSuffix((d%(24*time.Hour)).String(), "0s"))
	}
	return d.Round(time.Second).String()
}

// ---- ls ----

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
	fl.StringVar(&f.state, "state", "", "only mail in this state (new, active, deferred) or with a recipient in this status (queued, deferred, delivered, failed)")
	fl.StringVar(&f.errText, "error", "", "only mail with a recipient whose last reply contains this text (case-insensitive)")
	fl.DurationVar(&f.minAge, "min-age", 0, "only mail queued at least this long ago")
	fl.DurationVar(&f.maxAge, "max-age", 0, "only mail queued at most this long ago")
}

func (f *lsFilter) check() error {
	switch f.state {
	case "", stateNew, stateActive, stateDeferred, string(spool.RcptQueued), string(spool.RcptDelivered), string(spool.RcptFailed):
		return nil
	}
	return fmt.Errorf("--state %s: one of new, active, deferred, queued, delivered, failed", f.state)
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
	case f.state == stateNew || f.state == stateActive:
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

func queueShowCmd(qf *queueFlags) *cobra.Command {
	var body bool
	cmd := &cobra.Command{
		Use:   "show QUEUE-ID",
		Short: "One message: envelope, each recipient's state, headers; --body the whole message as stored (postcat -q)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			qid := strings.ToUpper(args[0])
			return qf.run(cmd, func(ctx context.Context, sp *spool.Spool, w io.Writer) error {
				m, err := sp.Find(ctx, qid)
				if err != nil {
					return err
				}
				data, err := sp.ReadBody(ctx, m)
				if err != nil {
					return err
				}
				if body {
					_, err := w.Write(data)
					return err
				}
				st, err := sp.LoadState(ctx, qid)
				if err != nil {
					return err
				}
				stats, err := sp.Stats(ctx)
				if err != nil {
					return err
				}
				now := queueNow()
				state := msgState(m, st, stats, now)
				header := headerOf(data)
				if qf.output == "json" {
					return json.NewEncoder(w).Encode(struct {
						lsMessage
						Envelope spool.Envelope       `json:"envelope"`
						Delivery *spool.DeliveryState `json:"delivery,omitempty"`
						Header   string               `json:"header"`
					}{lsRecord(m, st, state, rcptStates(m, st)), m.Envelope, st, string(header)})
				}
				return writeShow(w, m, st, state, header, now)
			})
		},
	}
	cmd.Flags().BoolVar(&body, "body", false, "print the whole message as stored, headers and body (postcat -q)")
	return cmd
}

// headerOf is the header section of a message, up to the blank line.
func headerOf(data []byte) []byte {
	if i := bytes.Index(data, []byte("\r\n\r\n")); i >= 0 {
		return data[:i+2]
	}
	if i := bytes.Index(data, []byte("\n\n")); i >= 0 {
		return data[:i+1]
	}
	return data
}

func writeShow(w io.Writer, m *spool.Message, st *spool.DeliveryState, state string, header []byte, now time.Time) error {
	env := &m.Envelope
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	p := func(k, format string, a ...any) { fmt.Fprintf(tw, k+"\t"+format+"\n", a...) }
	p("queue id", "%s (queue sequence %d)", env.QueueID, m.Sequence)
	p("state", "%s", state)
	p("arrived", "%s (%s ago)", stamp(env.Received), age(now.Sub(env.Received)))
	p("size", "%d bytes", env.Body.Size)
	p("sender", "%s", sender(env.From))
	auth := ""
	if env.AuthUser != "" {
		auth = ", AUTH " + env.AuthUser
	}
	tls := ""
	if env.TLS {
		tls = ", TLS"
	}
	p("client", "%s (HELO %s%s%s)", env.ClientIP, env.Helo, tls, auth)
	p("gateway", "%s", env.Gateway)
	var params []string
	mp := env.Mail
	if mp.Size > 0 {
		params = append(params, fmt.Sprintf("SIZE=%d", mp.Size))
	}
	for k, v := range map[string]string{"BODY": mp.Body, "RET": mp.Ret, "ENVID": mp.EnvID} {
		if v != "" {
			params = append(params, k+"="+v)
		}
	}
	if mp.SMTPUTF8 {
		params = append(params, "SMTPUTF8")
	}
	sort.Strings(params)
	if len(params) > 0 {
		p("mail params", "%s", strings.Join(params, " "))
	}
	storage := "inline"
	if env.Body.Chunks > 0 {
		storage = fmt.Sprintf("%d chunks in %s", env.Body.Chunks, spool.BodyStream)
	}
	p("body", "%s, sha256 %s", storage, env.Body.SHA256)
	if st != nil {
		p("attempts", "%d, last %s, next %s", st.Attempts, stamp(st.LastAttempt), stamp(st.NextAttempt))
		if st.Claim.Held("", now) {
			p("claimed", "by %s until %s", st.Claim.Holder, stamp(st.Claim.Until))
		}
	} else {
		p("attempts", "none recorded")
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w, "\nrecipients:")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  RECIPIENT\tSTATUS\tATTEMPTS\tLAST ATTEMPT\tNEXT ATTEMPT\tRELAY\tLAST REPLY")
	for i, rs := range rcptStates(m, st) {
		relay := rs.RemoteMTA
		if relay == "" {
			relay = "-"
		}
		next := "-"
		if pendingStatus(rs.Status) {
			next = stamp(rs.NextAttempt)
		}
		fmt.Fprintf(tw, "  %s\t%s\t%d\t%s\t%s\t%s\t%s\n", rs.Addr, rs.Status, rs.Attempts, stamp(rs.LastAttempt), next, relay, reply(rs))
		r := env.Rcpts[i]
		if len(r.Notify) > 0 || r.ORcpt != "" {
			fmt.Fprintf(tw, "  \tNOTIFY=%s ORCPT=%s\t\t\t\t\t\n", strings.Join(r.Notify, ","), r.ORcpt)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w, "\nheaders:")
	_, err := w.Write(bytes.ReplaceAll(header, []byte("\r\n"), []byte("\n")))
	return err
}
