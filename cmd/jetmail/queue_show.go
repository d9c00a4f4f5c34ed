package main

import (
	"bytes"
	"cmp"
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
		// Earlier attempts, newest first, under the latest.
		for j := len(rs.History) - 1; j >= 0; j-- {
			h := rs.History[j]
			fmt.Fprintf(tw, "  \t%s\t\t%s\t\t%s\t%s\n", h.Status, stamp(h.At), cmp.Or(h.Relay, "-"),
				reply(spool.RcptState{Code: h.Code, Enhanced: h.Enhanced, Text: h.Text}))
		}
		if lost := rs.Attempts - 1 - len(rs.History); lost > 0 && len(rs.History) > 0 {
			fmt.Fprintf(tw, "  \t(%d earlier not kept)\t\t\t\t\t\n", lost)
		}
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
