package main

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/jetmail/jetmail/events"
)

// The event log tools, report and events, read JETMAIL_EVENTS with the
// queue tools' flags and sign-in (queueFlags), and write nothing.

// logFlags are the flags of report and events: the queue tools' NATS
// flags and output format, and the time window.
type logFlags struct {
	queueFlags
	since    time.Duration
	from, to string
}

func (lf *logFlags) register(cmd *cobra.Command, since time.Duration) {
	fl := cmd.Flags()
	lf.nats.register(fl)
	fl.StringVarP(&lf.output, "output", "o", "text", "output format: text or json")
	fl.DurationVar(&lf.timeout, "timeout", 10*time.Second, "bound on connecting to NATS")
	fl.DurationVar(&lf.since, "since", since, "events of this long ago until now")
	fl.StringVar(&lf.from, "from", "", "events from this time on (RFC 3339, e.g. 2026-12-02T00:00:00Z); overrides --since")
	fl.StringVar(&lf.to, "to", "", "events before this time (RFC 3339; default now)")
}

// window is [from, to) from the flags.
func (lf *logFlags) window(now time.Time) (time.Time, time.Time, error) {
	from, to := now.Add(-lf.since), now
	if lf.from != "" {
		t, err := time.Parse(time.RFC3339, lf.from)
		if err != nil {
			return from, to, fmt.Errorf("--from: %w", err)
		}
		from = t
	}
	if lf.to != "" {
		t, err := time.Parse(time.RFC3339, lf.to)
		if err != nil {
			return from, to, fmt.Errorf("--to: %w", err)
		}
		to = t
	}
	if !from.Before(to) {
		return from, to, fmt.Errorf("the window is empty: from %s to %s", stamp(from), stamp(to))
	}
	return from, to, nil
}

// run connects to NATS and runs fn with a buffered output.
func (lf *logFlags) run(cmd *cobra.Command, fn func(ctx context.Context, js jetstream.JetStream, w *bufio.Writer) error) error {
	dctx, cancel := context.WithTimeout(cmd.Context(), lf.timeout)
	nc, err := lf.dial(dctx, cmd, "jetmail-events")
	cancel()
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(cmd.OutOrStdout())
	err = fn(cmd.Context(), js, w)
	if ferr := w.Flush(); err == nil {
		err = ferr
	}
	return err
}

func reportCmd() *cobra.Command {
	var (
		lf  logFlags
		top int
	)
	cmd := &cobra.Command{
		Use:   "report",
		Short: "Summarize the mail traffic of the whole cluster from the event log (pflogsumm)",
		Long: `report reads the event log (stream JETMAIL_EVENTS), which every gateway and
deliverer writes, and summarizes a time window for the whole cluster:
messages received, delivered, deferred, bounced, expired and rejected,
duplicates suppressed, administrator actions, bytes in and out, top
senders, sending hosts, recipients and recipient domains (with their
delays), rejection reasons and deferral reasons by domain.

Against jetmail serve on this host:
  jetmail report --nats-nkey ./jetmail-data/nats-user.nk --since 24h`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			from, to, err := lf.window(queueNow())
			if err != nil {
				return err
			}
			return lf.run(cmd, func(ctx context.Context, js jetstream.JetStream, w *bufio.Writer) error {
				s := newSummary()
				if err := events.Read(ctx, js, from, to, func(e events.Event) error { s.add(e); return nil }); err != nil {
					return err
				}
				r := s.report(from, to, top)
				if lf.output == "json" {
					enc := json.NewEncoder(w)
					enc.SetIndent("", "  ")
					return enc.Encode(r)
				}
				return writeReport(w, r)
			})
		},
	}
	lf.register(cmd, 24*time.Hour)
	cmd.Flags().IntVar(&top, "top", 10, "rows of each top list")
	return cmd
}

// summary adds events up.
type summary struct {
	counts       map[events.Kind]int
	bytesIn      int64
	bytesOut     int64
	deferredMsgs map[string]bool
	reasons      map[string]int
	notices      map[string]int
	senders      map[string]*topRow
	hosts        map[string]*topRow
	rcpts        map[string]*topRow
	domains      map[string]*domainRow
	deferReasons map[[2]string]int
	delaySum     map[string]time.Duration
}

func newSummary() *summary {
	return &summary{counts: map[events.Kind]int{}, deferredMsgs: map[string]bool{}, reasons: map[string]int{},
		notices: map[string]int{}, senders: map[string]*topRow{}, hosts: map[string]*topRow{}, rcpts: map[string]*topRow{},
		domains: map[string]*domainRow{}, deferReasons: map[[2]string]int{}, delaySum: map[string]time.Duration{}}
}

func bump(m map[string]*topRow, key string, size int64) {
	r := m[key]
	if r == nil {
		r = &topRow{Name: key}
		m[key] = r
	}
	r.Count++
	r.Bytes += size
}

func (s *summary) domain(d string) *domainRow {
	r := s.domains[d]
	if r == nil {
		r = &domainRow{Domain: d}
		s.domains[d] = r
	}
	return r
}

func (s *summary) add(e events.Event) {
	s.counts[e.Kind]++
	switch e.Kind {
	case events.Received:
		s.bytesIn += e.Size
		bump(s.senders, events.Sender(e.From), e.Size)
		host := "[" + e.Client + "]"
		if e.Helo != "" {
			host = e.Helo + " " + host
		}
		bump(s.hosts, host, e.Size)
	case events.Rejected:
		s.reasons[cmp.Or(e.Reason, "other")]++
	case events.Delivered:
		s.bytesOut += e.Size
		bump(s.rcpts, strings.ToLower(e.Rcpt), e.Size)
		d := s.domain(e.Domain)
		d.Delivered++
		d.Bytes += e.Size
		s.delaySum[e.Domain] += e.Delay
		d.MaxDelay = max(d.MaxDelay, e.Delay)
	case events.Deferred:
		s.deferredMsgs[e.QueueID] = true
		s.domain(e.Domain).Deferred++
		s.deferReasons[[2]string{e.Domain, reasonText(e)}]++
	case events.Bounced, events.Expired:
		s.domain(e.Domain).Bounced++
	case events.DSN:
		s.notices[e.Notice]++
	}
}

// reasonText is a deferral's reply, short enough for a table row.
func reasonText(e events.Event) string {
	t := strings.TrimSpace(fmt.Sprintf("%d %s %s", e.Code, e.Enhanced, e.Reply))
	if len(t) > 100 {
		t = t[:100] + "..."
	}
	return t
}

// report is what `jetmail report -o json` writes; the text output shows
// the same figures.
type report struct {
	From time.Time `json:"from"`
	To   time.Time `json:"to"`
	// Messages received (queued by a gateway) and their octets.
	Received int   `json:"received"`
	BytesIn  int64 `json:"bytesIn"`
	// Recipients delivered and their octets (a message counts once per
	// recipient).
	Delivered int   `json:"delivered"`
	BytesOut  int64 `json:"bytesOut"`
	// Messages with at least one deferral, and deferrals (one per
	// recipient per attempt).
	Deferred  int `json:"deferred"`
	Deferrals int `json:"deferrals"`
	// Recipients bounced (failed permanently) and expired.
	Bounced int `json:"bounced"`
	Expired int `json:"expired"`
	// Refusals of connections, commands and messages, and their share of
	// everything the gateways were offered (received, duplicates,
	// refusals).
	Rejected        int     `json:"rejected"`
	RejectedPercent float64 `json:"rejectedPercent"`
	Duplicates      int     `json:"duplicates"`
	// Administrator actions.
	Held     int `json:"held"`
	Released int `json:"released"`
	Removed  int `json:"removed"`
	Retried  int `json:"retried"`
	// Notices (DSNs) queued by kind: failed, delayed, success.
	Notices map[string]int `json:"notices"`

	RejectReasons   []countRow  `json:"rejectReasons"`
	TopSenders      []topRow    `json:"topSenders"`
	TopSendingHosts []topRow    `json:"topSendingHosts"`
	TopRecipients   []topRow    `json:"topRecipients"`
	TopDomains      []domainRow `json:"topRecipientDomains"`
	DeferralReasons []deferRow  `json:"deferralReasons"`
}

type countRow struct {
	Name  string `json:"name"`
	Count int    `json:"count"`
}

type topRow struct {
	Name  string `json:"name"`
	Count int    `json:"count"`
	Bytes int64  `json:"bytes"`
}

type domainRow struct {
	Domain    string `json:"domain"`
	Delivered int    `json:"delivered"`
	Bytes     int64  `json:"bytes"`
	// AvgDelay and MaxDelay are from reception to delivery, over the
	// delivered recipients, in seconds in JSON.
	AvgDelay time.Duration `json:"-"`
	MaxDelay time.Duration `json:"-"`
	Deferred int           `json:"deferred"`
	Bounced  int           `json:"bounced"`

	AvgDelaySeconds float64 `json:"avgDelaySeconds"`
	MaxDelaySeconds float64 `json:"maxDelaySeconds"`
}

type deferRow struct {
	Domain string `json:"domain"`
	Reason string `json:"reason"`
	Count  int    `json:"count"`
}

func (s *summary) report(from, to time.Time, top int) *report {
	r := &report{From: from.UTC(), To: to.UTC(),
		Received: s.counts[events.Received], BytesIn: s.bytesIn,
		Delivered: s.counts[events.Delivered], BytesOut: s.bytesOut,
		Deferred: len(s.deferredMsgs), Deferrals: s.counts[events.Deferred],
		Bounced: s.counts[events.Bounced], Expired: s.counts[events.Expired],
		Rejected: s.counts[events.Rejected], Duplicates: s.counts[events.Duplicate],
		Held: s.counts[events.Held], Released: s.counts[events.Released], Removed: s.counts[events.Removed], Retried: s.counts[events.Retried],
		Notices: s.notices,
	}
	if offered := r.Received + r.Duplicates + r.Rejected; offered > 0 {
		r.RejectedPercent = float64(int(1000*float64(r.Rejected)/float64(offered)+0.5)) / 10
	}
	for name, n := range s.reasons {
		r.RejectReasons = append(r.RejectReasons, countRow{name, n})
	}
	slices.SortFunc(r.RejectReasons, func(a, b countRow) int { return cmp.Or(b.Count-a.Count, strings.Compare(a.Name, b.Name)) })
	r.TopSenders = topOf(s.senders, top)
	r.TopSendingHosts = topOf(s.hosts, top)
	r.TopRecipients = topOf(s.rcpts, top)
	for _, d := range s.domains {
		if d.Delivered > 0 {
			d.AvgDelay = s.delaySum[d.Domain] / time.Duration(d.Delivered)
		}
		d.AvgDelaySeconds, d.MaxDelaySeconds = d.AvgDelay.Seconds(), d.MaxDelay.Seconds()
		r.TopDomains = append(r.TopDomains, *d)
	}
	slices.SortFunc(r.TopDomains, func(a, b domainRow) int {
		return cmp.Or(b.Delivered+b.Deferred+b.Bounced-a.Delivered-a.Deferred-a.Bounced, strings.Compare(a.Domain, b.Domain))
	})
	r.TopDomains = r.TopDomains[:min(top, len(r.TopDomains))]
	for k, n := range s.deferReasons {
		r.DeferralReasons = append(r.DeferralReasons, deferRow{Domain: k[0], Reason: k[1], Count: n})
	}
	slices.SortFunc(r.DeferralReasons, func(a, b deferRow) int {
		return cmp.Or(b.Count-a.Count, strings.Compare(a.Domain, b.Domain), strings.Compare(a.Reason, b.Reason))
	})
	r.DeferralReasons = r.DeferralReasons[:min(top, len(r.DeferralReasons))]
	return r
}

func topOf(m map[string]*topRow, top int) []topRow {
	out := make([]topRow, 0, len(m))
	for _, r := range m {
		out = append(out, *r)
	}
	slices.SortFunc(out, func(a, b topRow) int { return cmp.Or(b.Count-a.Count, strings.Compare(a.Name, b.Name)) })
	return out[:min(top, len(out))]
}

func writeReport(w io.Writer, r *report) error {
	fmt.Fprintf(w, "jetmail report, the whole cluster, %s to %s\n\n", stamp(r.From), stamp(r.To))
	// Names to the left, figures to the right, as pflogsumm aligns them.
	type total struct {
		name string
		n    int64
		note string
	}
	notices := fmt.Sprintf("failed %d, delayed %d, success %d", r.Notices["failed"], r.Notices["delayed"], r.Notices["success"])
	totals := []total{
		{"received", int64(r.Received), "messages"},
		{"delivered", int64(r.Delivered), "recipients"},
		{"deferred", int64(r.Deferred), fmt.Sprintf("messages (%d deferrals)", r.Deferrals)},
		{"bounced", int64(r.Bounced), "recipients"},
		{"expired", int64(r.Expired), "recipients"},
		{"rejected", int64(r.Rejected), fmt.Sprintf("%.1f%% of received, duplicates and refusals", r.RejectedPercent)},
		{"duplicates", int64(r.Duplicates), "retransmissions suppressed"},
		{"notices", int64(r.Notices["failed"] + r.Notices["delayed"] + r.Notices["success"]), notices},
		{"held", int64(r.Held), "messages"},
		{"released", int64(r.Released), "messages"},
		{"removed", int64(r.Removed), "messages"},
		{"retried", int64(r.Retried), "messages"},
		{"bytes in", r.BytesIn, "received"},
		{"bytes out", r.BytesOut, "delivered"},
	}
	width := 1
	for _, t := range totals {
		width = max(width, len(fmt.Sprint(t.n)))
	}
	for _, t := range totals {
		fmt.Fprintf(w, "  %-10s  %*d  %s\n", t.name, width, t.n, t.note)
	}
	table := func(title, header string, rows [][]any) error {
		fmt.Fprintf(w, "\n%s\n", title)
		if len(rows) == 0 {
			fmt.Fprintln(w, "  none")
			return nil
		}
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "  "+header)
		for _, row := range rows {
			cells := make([]string, len(row))
			for i, c := range row {
				cells[i] = fmt.Sprint(c)
			}
			fmt.Fprintln(tw, "  "+strings.Join(cells, "\t"))
		}
		return tw.Flush()
	}
	var rows [][]any
	for _, c := range r.RejectReasons {
		rows = append(rows, []any{c.Count, c.Name})
	}
	if err := table("Rejections by reason", "COUNT\tREASON", rows); err != nil {
		return err
	}
	tops := func(title, what string, rs []topRow) error {
		var rows [][]any
		for _, t := range rs {
			rows = append(rows, []any{t.Count, t.Bytes, t.Name})
		}
		return table(title, "MESSAGES\tBYTES\t"+what, rows)
	}
	if err := tops("Top senders", "SENDER", r.TopSenders); err != nil {
		return err
	}
	if err := tops("Top sending hosts", "HOST", r.TopSendingHosts); err != nil {
		return err
	}
	if err := tops("Top recipients (delivered)", "RECIPIENT", r.TopRecipients); err != nil {
		return err
	}
	rows = nil
	for _, d := range r.TopDomains {
		rows = append(rows, []any{d.Domain, d.Delivered, d.Bytes, delay(d.AvgDelay, d.Delivered), delay(d.MaxDelay, d.Delivered), d.Deferred, d.Bounced})
	}
	if err := table("Top recipient domains", "DOMAIN\tDELIVERED\tBYTES\tAVG DELAY\tMAX DELAY\tDEFERRED\tBOUNCED", rows); err != nil {
		return err
	}
	rows = nil
	for _, d := range r.DeferralReasons {
		rows = append(rows, []any{d.Count, d.Domain, d.Reason})
	}
	return table("Deferral reasons by domain", "COUNT\tDOMAIN\tREASON", rows)
}

// delay is a delay for the report: to the millisecond under a second,
// else to the second.
func delay(d time.Duration, n int) string {
	switch {
	case n == 0:
		return "-"
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	}
	return age(d)
}
