package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
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
//	held      put on hold (queue hold): not attempted until released
const (
	stateNew      = "new"
	stateActive   = "active"
	stateDeferred = "deferred"
	stateHeld     = "held"
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
		Short: "The queue of the whole cluster: stat, ls, show, shape; rm, hold, release, retry",
		Long: `queue reads the queue from NATS JetStream, for the whole cluster at once,
without asking any deliverer. stat, ls, show and shape write nothing; rm,
hold, release and retry change the messages they select.

Against jetmail serve on this host:
  jetmail queue stat --nats-nkey ./jetmail-data/nats-user.nk`,
	}
	fl := cmd.PersistentFlags()
	qf.nats.register(fl)
	fl.StringVarP(&qf.output, "output", "o", "text", "output format: text or json (one object per line)")
	fl.DurationVar(&qf.timeout, "timeout", 10*time.Second, "bound on each request to NATS")
	cmd.AddCommand(queueStatCmd(&qf), queueLsCmd(&qf), queueShowCmd(&qf), queueShapeCmd(&qf))
	for _, a := range queueActions {
		cmd.AddCommand(queueActionCmd(&qf, a))
	}
	return cmd
}

// dial connects to NATS for an operator tool, with errors that say what
// to do. Under kubectl (the plugin) the URL is the release's, unless
// --nats-url was given.
func (qf *queueFlags) dial(ctx context.Context, cmd *cobra.Command, name string) (*nats.Conn, error) {
	if qf.output != "text" && qf.output != "json" {
		return nil, fmt.Errorf("-o %s: text or json", qf.output)
	}
	where := ""
	if natsURLFinder != nil && !cmd.Flags().Changed("nats-url") {
		url, from, err := natsURLFinder(ctx)
		if err != nil {
			return nil, err
		}
		qf.nats.url, where = url, from
	}
	auth, err := natsAuth(qf.nats.nkey, qf.nats.creds)
	if err != nil {
		return nil, err
	}
	opts := append(spool.NATSOptions(), nats.Name(name), nats.Timeout(qf.timeout))
	nc, err := nats.Connect(qf.nats.url, append(opts, auth...)...)
	if err != nil && where != "" {
		return nil, fmt.Errorf("%w\n  (the URL is that of %s; from outside the cluster, forward a port to NATS with kubectl port-forward and give --nats-url)", qf.connectError(err), where)
	}
	if err != nil {
		return nil, qf.connectError(err)
	}
	return nc, nil
}

// open connects to NATS and attaches to the queue.
func (qf *queueFlags) open(ctx context.Context, cmd *cobra.Command) (*spool.Spool, func(), error) {
	nc, err := qf.dial(ctx, cmd, "jetmail-queue")
	if err != nil {
		return nil, nil, err
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
	sp, closeNC, err := qf.open(octx, cmd)
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
	if !m.Held.IsZero() {
		return stateHeld
	}
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

func pendingStatus(s spool.RcptStatus) bool { return s.Pending() }

// ---- stat ----
