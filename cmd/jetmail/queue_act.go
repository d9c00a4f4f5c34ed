package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/jetmail/jetmail/events"
	"github.com/jetmail/jetmail/spool"
)

// queueAction is one of the commands that change queued mail: rm, hold,
// release, retry (postsuper -d, -h, -H; postqueue -i, -f).
type queueAction struct {
	name, short, long string
	// done is the past tense for the summary ("removed").
	done string
	// applies tells whether the action applies to a message in state
	// (stateNew, ...), and if not, why not (for the summary).
	applies func(state string) (ok bool, skip string)
	do      func(sp *spool.Spool, ctx context.Context, m *spool.Message, now time.Time) error
	// needState is set when applies needs the delivery state (not only
	// the record).
	needState bool
	// event is what the event log records for each message changed.
	event events.Kind
}

var queueActions = []queueAction{
	{
		name: "rm", done: "removed",
		short: "Remove messages from the queue (postsuper -d)",
		long: `rm deletes messages from the queue: no further attempt, no bounce. A message
in a delivery attempt right now is removed too: the attempt goes on, and when
it records its outcome the deliverer logs that the message was removed and
writes nothing back (recipients it reached have the message; nothing else
is sent). The duplicate guard of a removed message stays for the duplicate
window, so a client's retransmission of it is not queued again.`,
		applies: func(string) (bool, string) { return true, "" },
		do:      (*spool.Spool).Remove,
		event:   events.Removed,
	},
	{
		name: "hold", done: "held",
		short: "Put messages on hold: never attempted until released (postsuper -h)",
		long: `hold keeps messages in the queue without attempting them until 'queue
release'. Their queue lifetime keeps counting, as in Postfix: a message
released after its lifetime is bounced as expired at once. A held message is
never expired while it is held. A message in a delivery attempt right now is
held once that attempt ends (what it delivered stays delivered).`,
		applies: func(state string) (bool, string) {
			if state == stateHeld {
				return false, "already held"
			}
			return true, ""
		},
		do:    (*spool.Spool).Hold,
		event: events.Held,
	},
	{
		name: "release", done: "released",
		short: "Release held messages: their recipients are due now (postsuper -H)",
		applies: func(state string) (bool, string) {
			if state != stateHeld {
				return false, "not held"
			}
			return true, ""
		},
		do:    (*spool.Spool).Release,
		event: events.Released,
	},
	{
		name: "retry", done: "made due now",
		short: "Make deferred recipients due now (postqueue -i ID, postqueue -f)",
		long: `retry makes the deferred recipients of deferred messages due now: the
deliverers attempt them at once, whatever their retry time says. New and
active messages are due already and are left alone; held ones need a release.
A recipient's retry schedule goes on from its attempt count.`,
		applies: func(state string) (bool, string) {
			switch state {
			case stateDeferred:
				return true, ""
			case stateHeld:
				return false, "held (release them)"
			}
			return false, "due already (" + state + ")"
		},
		do:        (*spool.Spool).Retry,
		needState: true,
		event:     events.Retried,
	},
}

// actSummary is what an action did, the last line of its output (the one
// object of -o json).
type actSummary struct {
	Action   string         `json:"action"`
	Matched  int            `json:"matched"`
	Affected int            `json:"affected"`
	Skipped  map[string]int `json:"skipped,omitempty"`
	// Gone counts messages that left the queue between the listing and
	// the action (delivered meanwhile).
	Gone   int      `json:"gone,omitempty"`
	Errors []string `json:"errors,omitempty"`
	DryRun bool     `json:"dryRun,omitempty"`
}

// actWorkers is how many messages an action changes at once: each change
// is a write JetStream acknowledges after its fsync, so a bulk action of
// one at a time would wait for every disk flush in turn.
const actWorkers = 32

func queueActionCmd(qf *queueFlags, a queueAction) *cobra.Command {
	var (
		f   lsFilter
		all bool
		yes bool
	)
	long := a.long
	if long == "" {
		long = a.short + "."
	}
	cmd := &cobra.Command{
		Use:   a.name + " [QUEUE-ID...]",
		Short: a.short,
		Long: long + `

Select messages by queue ID, or by the filters of 'queue ls', or all of them
with --all. A selection by filters or --all is done only with --yes; without
it, the command counts what it would change and stops. It prints how many
messages it changed and why it left others alone.`,
		RunE: func(cmd *cobra.Command, ids []string) error {
			if err := f.check(); err != nil {
				return err
			}
			filtered := f != (lsFilter{})
			switch {
			case len(ids) > 0 && (filtered || all):
				return errors.New("give queue IDs, or filters, or --all; not several")
			case len(ids) == 0 && !filtered && !all:
				return fmt.Errorf("nothing selected: give queue IDs, ls filters (--domain, --sender, ...), or --all")
			}
			return qf.run(cmd, func(ctx context.Context, sp *spool.Spool, w io.Writer) error {
				r := &actRun{a: a, sp: sp, now: queueNow(), f: &f, dry: len(ids) == 0 && !yes}
				var err error
				if len(ids) > 0 {
					err = r.byID(ctx, ids)
				} else {
					err = r.bySelection(ctx, cmd.ErrOrStderr())
				}
				if err != nil {
					return err
				}
				if err := r.record(ctx); err != nil {
					fmt.Fprintf(cmd.ErrOrStderr(), "warning: the event log did not record these actions: %v\n", err)
				}
				if qf.output == "json" {
					if err := json.NewEncoder(w).Encode(r.sum); err != nil {
						return err
					}
				} else {
					writeActSummary(w, a, &r.sum)
				}
				if len(r.sum.Errors) > 0 {
					return fmt.Errorf("%d messages could not be %s", len(r.sum.Errors), a.done)
				}
				if r.dry && r.sum.Matched > 0 {
					return fmt.Errorf("nothing done: add --yes to %s these %d messages", a.name, r.sum.Matched)
				}
				return nil
			})
		},
	}
	f.register(cmd)
	cmd.Flags().BoolVar(&all, "all", false, "every message in the queue")
	cmd.Flags().BoolVar(&yes, "yes", false, "do it (needed with filters or --all)")
	return cmd
}

// actRun is one run of an action.
type actRun struct {
	a   queueAction
	sp  *spool.Spool
	now time.Time
	f   *lsFilter
	dry bool

	mu   sync.Mutex
	sum  actSummary
	done []events.Event
}

// record puts one event per message changed in the cluster's event log,
// under the name "queue@<host>".
func (r *actRun) record(ctx context.Context) error {
	if len(r.done) == 0 {
		return nil
	}
	host, _ := os.Hostname()
	pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return events.Publish(pctx, r.sp.JetStream(), "queue@"+host, r.done)
}

func (r *actRun) byID(ctx context.Context, ids []string) error {
	r.sum.Action = r.a.name
	stats, err := r.sp.Stats(ctx)
	if err != nil {
		return err
	}
	for _, id := range ids {
		m, err := r.sp.Find(ctx, strings.ToUpper(id))
		if errors.Is(err, spool.ErrNoSuchMessage) {
			r.sum.Errors = append(r.sum.Errors, err.Error())
			continue
		}
		if err != nil {
			return err
		}
		r.sum.Matched++
		r.apply(ctx, m, nil, "", stats)
	}
	return nil
}

// bySelection walks the queue once, oldest first, and acts on every
// message the filters select, actWorkers at a time.
func (r *actRun) bySelection(ctx context.Context, stderr io.Writer) error {
	r.sum.Action, r.sum.DryRun = r.a.name, r.dry
	stats, err := r.sp.Stats(ctx)
	if err != nil {
		return err
	}
	bar := newProgress(stderr, int64(stats.Records), r.a.name)
	defer bar.close()
	type job struct {
		m     *spool.Message
		st    *spool.DeliveryState
		state string
	}
	work := make(chan job)
	var wg sync.WaitGroup
	for range actWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range work {
				r.apply(ctx, j.m, j.st, j.state, stats)
			}
		}()
	}
	// The states in one read of their bucket, not one request per
	// message: most messages have none.
	var states map[string]*spool.DeliveryState
	if r.a.needState || r.f.state != "" || r.f.errText != "" {
		states = map[string]*spool.DeliveryState{}
		if err := r.sp.States(ctx, func(s *spool.DeliveryState) error {
			states[s.QueueID] = s
			return nil
		}); err != nil {
			return err
		}
	}
	err = r.sp.Scan(ctx, func(m *spool.Message) error {
		bar.add()
		if !r.f.envelopeMatch(m, r.now) {
			return nil
		}
		j := job{m: m}
		if states != nil {
			st := states[m.Envelope.QueueID]
			j.st, j.state = st, msgState(m, st, stats, r.now)
			if !r.f.match(j.state, rcptStates(m, st)) {
				return nil
			}
		}
		r.mu.Lock()
		r.sum.Matched++
		r.mu.Unlock()
		select {
		case work <- j:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	close(work)
	wg.Wait()
	return err
}

// apply acts on one message and counts the result. state is its state
// when the selection read it ("": not read), and is read here if the
// action depends on it.
func (r *actRun) apply(ctx context.Context, m *spool.Message, st *spool.DeliveryState, state string, stats *spool.QueueStats) {
	switch {
	case state != "":
	case r.a.needState:
		st, err := r.sp.LoadState(ctx, m.Envelope.QueueID)
		if err != nil {
			r.fail(m, err)
			return
		}
		state = msgState(m, st, stats, r.now)
	case !m.Held.IsZero():
		state = stateHeld
	default:
		state = stateNew // only the record counts
	}
	if ok, why := r.a.applies(state); !ok {
		r.mu.Lock()
		if r.sum.Skipped == nil {
			r.sum.Skipped = map[string]int{}
		}
		r.sum.Skipped[why]++
		r.mu.Unlock()
		return
	}
	if r.dry {
		return
	}
	// The record may change between the listing and the action (a
	// deliverer finished the message, another administrator acted): read
	// it again and try once more. (An attempt saving its outcome does not
	// change the record.)
	err := r.a.do(r.sp, ctx, m, r.now)
	if errors.Is(err, spool.ErrChanged) {
		m2, gerr := r.sp.Get(ctx, m.Subject)
		switch {
		case gerr != nil || m2.Tombstone || m2.Envelope.QueueID != m.Envelope.QueueID:
			r.mu.Lock()
			r.sum.Gone++
			r.mu.Unlock()
			return
		}
		err = r.a.do(r.sp, ctx, m2, r.now)
	}
	if err != nil {
		r.fail(m, err)
		return
	}
	env := &m.Envelope
	r.mu.Lock()
	r.sum.Affected++
	r.done = append(r.done, events.Event{Time: time.Now(), Kind: r.a.event, QueueID: env.QueueID, From: events.Sender(env.From),
		Rcpts: len(env.Rcpts), Size: env.Body.Size})
	r.mu.Unlock()
}

func (r *actRun) fail(m *spool.Message, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sum.Errors = append(r.sum.Errors, fmt.Sprintf("%s: %v", m.Envelope.QueueID, err))
}

func writeActSummary(w io.Writer, a queueAction, s *actSummary) {
	for _, e := range s.Errors {
		fmt.Fprintf(w, "error: %s\n", e)
	}
	if s.DryRun {
		fmt.Fprintf(w, "%d %s match; nothing done (add --yes)\n", s.Matched, plural(s.Matched, "message", "messages"))
		return
	}
	fmt.Fprintf(w, "%s %d %s", a.done, s.Affected, plural(s.Affected, "message", "messages"))
	var notes []string
	for why, n := range s.Skipped {
		notes = append(notes, fmt.Sprintf("%d left alone: %s", n, why))
	}
	if s.Gone > 0 {
		notes = append(notes, fmt.Sprintf("%d left the queue meanwhile", s.Gone))
	}
	if len(notes) > 0 {
		fmt.Fprintf(w, " (%s)", strings.Join(notes, "; "))
	}
	fmt.Fprintln(w)
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// progress is a progress bar on a terminal, and nothing when the output
// goes elsewhere (a pipe, a file, a test).
type progress struct{ bar *progressbar.ProgressBar }

func newProgress(w io.Writer, total int64, what string) *progress {
	f, ok := w.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return &progress{}
	}
	return &progress{bar: progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(f),
		progressbar.OptionSetDescription(what+": reading the queue"),
		progressbar.OptionShowCount(),
		progressbar.OptionShowIts(),
		progressbar.OptionSetItsString("msg"),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionClearOnFinish(),
	)}
}

func (p *progress) add() {
	if p.bar != nil {
		_ = p.bar.Add(1)
	}
}

func (p *progress) close() {
	if p.bar != nil {
		_ = p.bar.Finish()
	}
}
