package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/jetmail/jetmail/events"
)

// eventFilter holds the filters of `jetmail events`; an event is shown
// when it passes all.
type eventFilter struct {
	sender, rcpt, domain, errText, queueID string
	kinds                                  []string
}

func (f *eventFilter) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.sender, "sender", "", "only events of mail from this envelope sender (case-insensitive; \"<>\" for bounces)")
	fl.StringVar(&f.rcpt, "rcpt", "", "only events about this recipient (case-insensitive)")
	fl.StringVar(&f.domain, "domain", "", "only events about a recipient in this domain")
	fl.StringSliceVar(&f.kinds, "kind", nil, "only these kinds (comma separated): "+kindList())
	fl.StringVar(&f.errText, "error", "", "only events whose reply contains this text (case-insensitive)")
	fl.StringVar(&f.queueID, "queue-id", "", "only events of this queue ID (a notice's events too: they name the message they report on)")
}

func kindList() string {
	var ks []string
	for _, k := range events.Kinds {
		ks = append(ks, string(k))
	}
	return strings.Join(ks, ", ")
}

func (f *eventFilter) check() error {
	for _, k := range f.kinds {
		if !slices.Contains(events.Kinds, events.Kind(k)) {
			return fmt.Errorf("--kind %s: one of %s", k, kindList())
		}
	}
	return nil
}

func (f *eventFilter) match(e *events.Event) bool {
	switch {
	case len(f.kinds) > 0 && !slices.Contains(f.kinds, string(e.Kind)):
		return false
	case f.sender != "" && !strings.EqualFold(strings.Trim(e.From, "<>"), strings.Trim(f.sender, "<>")):
		return false
	case f.sender != "" && e.From == "":
		return false
	case f.rcpt != "" && !strings.EqualFold(e.Rcpt, f.rcpt):
		return false
	case f.domain != "" && !strings.EqualFold(e.Domain, f.domain):
		return false
	case f.errText != "" && !strings.Contains(strings.ToLower(e.Reply), strings.ToLower(f.errText)):
		return false
	case f.queueID != "" && !strings.EqualFold(e.QueueID, f.queueID) && !strings.EqualFold(e.Orig, f.queueID):
		return false
	}
	return true
}

func eventsCmd() *cobra.Command {
	var (
		lf     logFlags
		f      eventFilter
		follow bool
	)
	cmd := &cobra.Command{
		Use:   "events",
		Short: "Print the event log of the whole cluster, or follow it (tail -f of the mail logs)",
		Long: `events prints the events of the whole cluster from the event log (stream
JETMAIL_EVENTS), one line per event, or with -o json one object per line:
receptions, rejections, duplicates, delivery results, notices queued and
administrator actions. Each pod's events are in order; pods' batches
interleave by the second.

--follow prints events as they are stored, from now on (or from --since or
--from when given), until interrupted.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := f.check(); err != nil {
				return err
			}
			now := queueNow()
			from, to, err := lf.window(now)
			if err != nil {
				return err
			}
			return lf.run(cmd, func(ctx context.Context, js jetstream.JetStream, w *bufio.Writer) error {
				enc := json.NewEncoder(w)
				show := func(e events.Event) error {
					if !f.match(&e) {
						return nil
					}
					if lf.output == "json" {
						return enc.Encode(e)
					}
					_, err := fmt.Fprintln(w, eventLine(&e))
					return err
				}
				if !follow {
					return events.Read(ctx, js, from, to, show)
				}
				start := time.Now()
				if cmd.Flags().Changed("since") || lf.from != "" {
					start = from
				}
				return events.Follow(ctx, js, start, func(e events.Event) error {
					if e.Time.Before(start) {
						return nil
					}
					if err := show(e); err != nil {
						return err
					}
					return w.Flush()
				})
			})
		},
	}
	lf.register(cmd, time.Hour)
	f.register(cmd)
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "print events as they are stored, until interrupted")
	return cmd
}

// eventLine is one event on one line: time, kind, queue ID, pod, then
// what the kind has to say.
func eventLine(e *events.Event) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s  %-9s  %-14s  %s", stamp(e.Time), e.Kind, dash(e.QueueID), dash(e.Pod))
	kv := func(k, v string) {
		if v != "" {
			fmt.Fprintf(&b, "  %s=%s", k, v)
		}
	}
	if e.From != "" {
		kv("from", "<"+strings.Trim(e.From, "<>")+">")
	}
	if e.Rcpt != "" {
		kv("to", "<"+e.Rcpt+">")
	}
	if e.Rcpts > 1 {
		kv("rcpts", fmt.Sprint(e.Rcpts))
	}
	kv("orig", e.Orig)
	kv("notice", e.Notice)
	if e.Client != "" {
		kv("client", strings.TrimSpace(e.Helo+" ["+e.Client+"]"))
	}
	kv("user", e.User)
	if e.Size > 0 {
		kv("size", fmt.Sprint(e.Size))
	}
	kv("relay", e.Relay)
	if e.Delay > 0 {
		kv("delay", delay(e.Delay, 1))
	}
	if e.Attempt > 0 {
		kv("attempt", fmt.Sprint(e.Attempt))
	}
	kv("reason", e.Reason)
	if e.Code != 0 || e.Reply != "" {
		fmt.Fprintf(&b, "  %s", strings.TrimSpace(fmt.Sprintf("%d %s %s", e.Code, e.Enhanced, e.Reply)))
	}
	return b.String()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
