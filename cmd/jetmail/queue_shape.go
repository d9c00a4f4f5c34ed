package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/jetmail/jetmail/spool"
)

// shapeBuckets are qshape's age buckets, in minutes: a message falls in
// the first bucket whose bound its age is below; the last is open.
var shapeBuckets = []int{5, 10, 20, 40, 80, 160, 320}

// shapeRow is one domain's line of `queue shape`: messages by age bucket.
type shapeRow struct {
	Domain  string `json:"domain"`
	Total   int    `json:"total"`
	Buckets []int  `json:"buckets"`
}

// shapeOutput is `queue shape -o json`.
type shapeOutput struct {
	By string `json:"by"`
	// Bounds are the upper bounds of the buckets in minutes; the last
	// bucket has none.
	Bounds []int      `json:"boundsMinutes"`
	Total  shapeRow   `json:"total"`
	Rows   []shapeRow `json:"domains"`
	// Others sums the domains past --top.
	Others *shapeRow `json:"others,omitempty"`
}

func queueShapeCmd(qf *queueFlags) *cobra.Command {
	var (
		f       lsFilter
		senders bool
		top     int
	)
	cmd := &cobra.Command{
		Use:   "shape",
		Short: "Queued mail by recipient (or sender) domain and age (qshape)",
		Long: `shape is Postfix's qshape: a table of the queued messages by recipient
domain (--senders: by sender domain) and by age, in the buckets
0-5, 5-10, 10-20, 20-40, 40-80, 80-160, 160-320 and 320+ minutes, with a
TOTAL row, the --top domains by count and the rest summed as (others).

A message counts once in each recipient domain where it has a recipient
still to deliver (queued or deferred); delivered and bounced recipients do
not count. The ls filters select the messages (--state deferred is
qshape's deferred queue, --state held its hold queue).

It reads every envelope once, streamed, and the delivery states in one
read of their bucket.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := f.check(); err != nil {
				return err
			}
			return qf.run(cmd, func(ctx context.Context, sp *spool.Spool, w io.Writer) error {
				out, err := shape(ctx, sp, &f, senders, top, queueNow())
				if err != nil {
					return err
				}
				if qf.output == "json" {
					return json.NewEncoder(w).Encode(out)
				}
				return writeShape(w, out)
			})
		},
	}
	f.register(cmd)
	cmd.Flags().BoolVarP(&senders, "senders", "s", false, "by sender domain instead of recipient domain (qshape -s)")
	cmd.Flags().IntVar(&top, "top", 20, "how many domains to show (0: all)")
	return cmd
}

func shape(ctx context.Context, sp *spool.Spool, f *lsFilter, senders bool, top int, now time.Time) (*shapeOutput, error) {
	stats, err := sp.Stats(ctx)
	if err != nil {
		return nil, err
	}
	// The states first, in one read: most messages have none.
	states := map[string]*spool.DeliveryState{}
	if err := sp.States(ctx, func(s *spool.DeliveryState) error {
		states[s.QueueID] = s
		return nil
	}); err != nil {
		return nil, err
	}
	out := &shapeOutput{By: "recipient domain", Bounds: shapeBuckets, Total: shapeRow{Domain: "TOTAL", Buckets: make([]int, len(shapeBuckets)+1)}}
	if senders {
		out.By = "sender domain"
	}
	rows := map[string]*shapeRow{}
	count := func(dom string, b int) {
		r := rows[dom]
		if r == nil {
			r = &shapeRow{Domain: dom, Buckets: make([]int, len(shapeBuckets)+1)}
			rows[dom] = r
		}
		r.Total++
		r.Buckets[b]++
	}
	err = sp.Scan(ctx, func(m *spool.Message) error {
		if !f.envelopeMatch(m, now) {
			return nil
		}
		st := states[m.Envelope.QueueID]
		rcpts := rcptStates(m, st)
		if !f.match(msgState(m, st, stats, now), rcpts) {
			return nil
		}
		b := ageBucket(now.Sub(m.Envelope.Received))
		seen := map[string]bool{}
		for _, rs := range rcpts {
			if pendingStatus(rs.Status) {
				seen[domainOf(rs.Addr)] = true
			}
		}
		if len(seen) == 0 {
			return nil
		}
		out.Total.Total++
		out.Total.Buckets[b]++
		if senders {
			dom := "<>"
			if m.Envelope.From != "" {
				dom = domainOf(m.Envelope.From)
			}
			count(dom, b)
			return nil
		}
		for dom := range seen {
			count(dom, b)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, r := range rows {
		out.Rows = append(out.Rows, *r)
	}
	sort.Slice(out.Rows, func(i, j int) bool {
		if out.Rows[i].Total != out.Rows[j].Total {
			return out.Rows[i].Total > out.Rows[j].Total
		}
		return out.Rows[i].Domain < out.Rows[j].Domain
	})
	if top > 0 && len(out.Rows) > top {
		o := shapeRow{Domain: "(others)", Buckets: make([]int, len(shapeBuckets)+1)}
		for _, r := range out.Rows[top:] {
			o.Total += r.Total
			for i, n := range r.Buckets {
				o.Buckets[i] += n
			}
		}
		out.Rows, out.Others = out.Rows[:top], &o
	}
	return out, nil
}

// ageBucket is the index of the bucket of a message of age a.
func ageBucket(a time.Duration) int {
	for i, bound := range shapeBuckets {
		if a < time.Duration(bound)*time.Minute {
			return i
		}
	}
	return len(shapeBuckets)
}

func writeShape(w io.Writer, out *shapeOutput) error {
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', tabwriter.AlignRight)
	head := "\tT"
	for _, b := range shapeBuckets {
		head += "\t" + strconv.Itoa(b)
	}
	head += "\t" + strconv.Itoa(shapeBuckets[len(shapeBuckets)-1]) + "+\t"
	fmt.Fprintln(tw, head)
	row := func(r shapeRow) {
		line := r.Domain + "\t" + strconv.Itoa(r.Total)
		for _, n := range r.Buckets {
			line += "\t" + strconv.Itoa(n)
		}
		fmt.Fprintln(tw, line+"\t")
	}
	row(out.Total)
	for _, r := range out.Rows {
		row(r)
	}
	if out.Others != nil {
		row(*out.Others)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "(messages by %s and age in minutes)\n", out.By)
	return err
}
