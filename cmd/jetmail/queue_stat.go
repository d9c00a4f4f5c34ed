package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/jetmail/jetmail/spool"
)

// statOutput is `queue stat -o json`.
type statOutput struct {
	Messages     uint64     `json:"messages"`
	New          uint64     `json:"new"`
	Active       uint64     `json:"active"`
	Deferred     uint64     `json:"deferred"`
	Held         uint64     `json:"held"`
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

  messages  new + active + deferred + held (the jetmail_queue_messages gauge)
  new       not handed to a deliverer yet (the consumer's pending count)
  deferred  delivery states in JETMAIL_STATE: mail whose last attempt left
            recipients to retry, handed out and waiting for a short retry,
            or parked (acknowledged until the waker hands it out again). For
            a minute after such mail leaves the queue its cleared state
            still counts, so this is an estimate
  held      put on hold (queue hold), from the markers hold leaves in
            JETMAIL_STATE: never attempted until released
  active    handed out minus deferred and held: in an attempt now or
            about to be
  bytes     the queue stream (envelopes, inline bodies, tombstones) and the
            stream of large bodies
  oldest    the first message in the queue stream (parked mail included),
            by the time in its queue ID

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
					Messages: st.Messages(), Bytes: st.QueueBytes + st.BodyBytes,
					QueueBytes: st.QueueBytes, BodyBytes: st.BodyBytes, Consumer: st.Consumer, Oldest: st.Oldest,
				}
				// As the cluster gauges count them.
				out.New, out.Active, out.Deferred, out.Held = st.ByState()
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
		case stateHeld:
			out.Held++
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
	fmt.Fprintf(tw, "held\t%d\ton hold until released (queue release)\n", out.Held)
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
