package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/deliverer"
	"github.com/jetmail/jetmail/deliverer/outbound"
	"github.com/jetmail/jetmail/events"
	"github.com/jetmail/jetmail/internal/mxtest"
	"github.com/jetmail/jetmail/internal/natstest"
	"github.com/jetmail/jetmail/internal/smtptest"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/smtpgw"
	"github.com/jetmail/jetmail/spool"
)

// mailWorld is a gateway and a deliverer in process on one NATS server,
// writing one event log (batches every 50 ms), with routes to SMTP servers
// on loopback:
//
//	ok.test, sender.test  a sink that takes everything
//	bounce.test           a server that refuses every recipient (550 5.1.1)
//	down.test             a port nobody listens on
//
// The gateway accepts mail for those four domains only: loopback may not
// relay elsewhere.
type mailWorld struct {
	url   string
	smtp  string
	js    jetstream.JetStream
	sink  *mxtest.MX
	start time.Time
}

func newMailWorld(t *testing.T) *mailWorld {
	t.Helper()
	ctx := testCtx(t)
	w := &mailWorld{start: time.Now()}
	ns := natstest.Start(t, natstest.Options{})
	w.url = ns.ClientURL()
	nc := natstest.Connect(t, ns, spool.NATSOptions()...)
	cfg := spool.DefaultConfig()
	cfg.PublishTimeout = 5 * time.Second
	sp, err := spool.Open(ctx, nc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	w.js = sp.JetStream()
	if _, err := events.OpenStream(ctx, w.js, events.StreamConfig{Replicas: 1, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	evl := events.New(events.Config{JetStream: w.js, Pod: "pod-0", Interval: 50 * time.Millisecond})

	w.sink = mxtest.Start(t, &mxtest.MX{})
	refuser := mxtest.Start(t, &mxtest.MX{Rcpt: func(string) error {
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
	}})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	downPort := l.Addr().(*net.TCPAddr).Port
	l.Close()
	route := func(name, hop string, domains ...string) v1alpha1.MailRoute {
		return v1alpha1.MailRoute{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "mail"},
			Spec: v1alpha1.MailRouteSpec{Domains: domains, NextHops: []string{hop}, TLS: v1alpha1.TLSNone}}
	}
	dp := v1alpha1.DeliveryPolicy{ObjectMeta: metav1.ObjectMeta{Name: "d", Namespace: "mail"},
		Spec: v1alpha1.DeliveryPolicySpec{RetryIntervals: []metav1.Duration{{Duration: time.Hour}}}}
	delivery, err := policy.CompileDelivery([]v1alpha1.DeliveryPolicy{dp}, []v1alpha1.MailRoute{
		route("sink", "[127.0.0.1]:"+fmt.Sprint(w.sink.Hop.Addr.Port()), "ok.test", "sender.test"),
		route("refuser", "[127.0.0.1]:"+fmt.Sprint(refuser.Hop.Addr.Port()), "bounce.test"),
		route("down", fmt.Sprintf("[127.0.0.1]:%d", downPort), "down.test"),
	}, nil, policy.CompileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	relay, err := policy.CompileRelay([]v1alpha1.RelayPolicy{{ObjectMeta: metav1.ObjectMeta{Name: "r", Namespace: "mail"},
		Spec: v1alpha1.RelayPolicySpec{AcceptedDomains: []string{"ok.test", "sender.test", "bounce.test", "down.test"}}}}, nil, policy.CompileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	src := policy.NewSource(&policy.Config{Relay: relay, Delivery: delivery}, 1)

	gw := smtpgw.New(smtpgw.Config{Hostname: "gw.test", Events: evl}, sp, src, zap.NewNop(), nil)
	gl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	w.smtp = gl.Addr().String()
	go gw.Serve(gl)
	client := &outbound.Client{Hostname: "dl.test"}
	d, err := deliverer.New(deliverer.Config{Hostname: "dl.test", Spool: sp, Source: src, Resolver: &deliverer.Resolver{},
		Client: client, Events: evl, AckWait: 5 * time.Second, Grace: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	dctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(dctx) }()
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		gw.Shutdown(sctx)
		stop()
		<-done
		client.Close()
		evl.Close(sctx)
	})
	return w
}

// runTool runs a jetmail subcommand in process against the world's NATS.
func (w *mailWorld) runTool(t *testing.T, args ...string) string {
	t.Helper()
	out, err := runLogTool(t, w.url, args...)
	if err != nil {
		t.Fatalf("jetmail %v: %v\n%s", args, err, out)
	}
	return out
}

// runLogTool runs `jetmail report|events args...` in process.
func runLogTool(t *testing.T, url string, args ...string) (string, error) {
	t.Helper()
	root := reportCmd()
	if args[0] == "events" {
		root = eventsCmd()
	}
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(append(args[1:], "--nats-url", url))
	err := root.ExecuteContext(testCtx(t))
	return out.String(), err
}

// window is the --from/--to of the whole test (the queue tools' clock is
// fixed in these tests, so --since would look at another day).
func (w *mailWorld) window() []string {
	return []string{"--from", w.start.Add(-time.Minute).UTC().Format(time.RFC3339), "--to", time.Now().Add(time.Minute).UTC().Format(time.RFC3339)}
}

func (w *mailWorld) report(t *testing.T) *report {
	t.Helper()
	var r report
	out := w.runTool(t, append([]string{"report", "-o", "json"}, w.window()...)...)
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("report -o json: %v\n%s", err, out)
	}
	return &r
}

func msg(n int, rcpt string) string {
	return fmt.Sprintf("From: someone\r\nTo: %s\r\nMessage-ID: <m%d@sender.test>\r\nSubject: test %d\r\n\r\nbody %d\r\n", rcpt, n, n, n)
}

// The report adds up exactly the traffic the test made: accepted,
// refused (relay denied), duplicates, delivered to a sink, deferred by a
// destination that is down, bounced by one that refuses (and the bounces,
// delivered to the sender's domain).
func TestReportAddsUpTheTrafficOfTheCluster(t *testing.T) {
	w := newMailWorld(t)
	c := smtptest.DialReady(t, w.smtp)
	var bytesIn int64
	send := func(from string, n int, rcpt string) {
		data := msg(n, rcpt)
		bytesIn += int64(len(data))
		c.Mail(from, []string{rcpt}, data, 250)
	}
	for i := 1; i <= 5; i++ {
		send("alice@sender.test", i, fmt.Sprintf("user%d@ok.test", i))
	}
	// A retransmission of the first: suppressed, not received again.
	c.Mail("alice@sender.test", []string{"user1@ok.test"}, msg(1, "user1@ok.test"), 250)
	for i := 6; i <= 7; i++ {
		send("bob@sender.test", i, fmt.Sprintf("user%d@down.test", i))
	}
	for i := 8; i <= 9; i++ {
		send("alice@sender.test", i, fmt.Sprintf("user%d@bounce.test", i))
	}
	for i := range 3 {
		c.Cmd("MAIL FROM:<carol@sender.test>", 250)
		c.Cmd(fmt.Sprintf("RCPT TO:<x%d@elsewhere.example>", i), 554)
		c.Cmd("RSET", 250)
	}
	c.Cmd("QUIT", 221)

	var r *report
	deadline := time.Now().Add(30 * time.Second)
	for {
		r = w.report(t)
		if r.Delivered >= 7 && r.Deferrals >= 2 && r.Bounced >= 2 && r.Notices["failed"] >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the traffic never all showed in the report: %+v", r)
		}
		time.Sleep(100 * time.Millisecond)
	}
	var bytesOut int64
	for _, tx := range w.sink.Transactions() {
		bytesOut += int64(len(tx.Body))
	}
	if len(w.sink.Transactions()) != 7 {
		t.Fatalf("the sink got %d messages, want 5 and 2 bounces", len(w.sink.Transactions()))
	}
	type figures struct {
		Received, Delivered, Deferred, Deferrals, Bounced, Expired, Rejected, Duplicates, Held, Removed int
		BytesIn, BytesOut                                                                               int64
		Percent                                                                                         float64
	}
	got := figures{r.Received, r.Delivered, r.Deferred, r.Deferrals, r.Bounced, r.Expired, r.Rejected, r.Duplicates, r.Held, r.Removed, r.BytesIn, r.BytesOut, r.RejectedPercent}
	want := figures{Received: 9, Delivered: 7, Deferred: 2, Deferrals: 2, Bounced: 2, Rejected: 3, Duplicates: 1, BytesIn: bytesIn, BytesOut: bytesOut, Percent: 23.1}
	if got != want {
		t.Errorf("report figures\n got %+v\nwant %+v", got, want)
	}
	if len(r.Notices) != 1 || r.Notices["failed"] != 2 {
		t.Errorf("notices %v, want 2 failed", r.Notices)
	}
	if len(r.RejectReasons) != 1 || r.RejectReasons[0] != (countRow{"relay", 3}) {
		t.Errorf("rejection reasons %+v, want relay 3", r.RejectReasons)
	}
	if len(r.TopSenders) != 2 || r.TopSenders[0].Name != "alice@sender.test" || r.TopSenders[0].Count != 7 || r.TopSenders[1].Name != "bob@sender.test" || r.TopSenders[1].Count != 2 {
		t.Errorf("top senders %+v", r.TopSenders)
	}
	if len(r.TopSendingHosts) != 1 || r.TopSendingHosts[0].Name != "client.test [127.0.0.1]" || r.TopSendingHosts[0].Count != 9 || r.TopSendingHosts[0].Bytes != bytesIn {
		t.Errorf("top sending hosts %+v", r.TopSendingHosts)
	}
	if len(r.TopRecipients) != 6 || r.TopRecipients[0].Name != "alice@sender.test" || r.TopRecipients[0].Count != 2 || r.TopRecipients[1].Name != "user1@ok.test" {
		t.Errorf("top recipients %+v", r.TopRecipients)
	}
	var doms []string
	for _, d := range r.TopDomains {
		doms = append(doms, fmt.Sprintf("%s %d/%d/%d", d.Domain, d.Delivered, d.Deferred, d.Bounced))
		if d.Delivered > 0 && (d.MaxDelaySeconds <= 0 || d.AvgDelaySeconds <= 0 || d.AvgDelaySeconds > d.MaxDelaySeconds || d.MaxDelaySeconds > 30) {
			t.Errorf("delays of %s: avg %vs, max %vs", d.Domain, d.AvgDelaySeconds, d.MaxDelaySeconds)
		}
	}
	if g := strings.Join(doms, ", "); g != "ok.test 5/0/0, bounce.test 0/0/2, down.test 0/2/0, sender.test 2/0/0" {
		t.Errorf("recipient domains (delivered/deferred/bounced): %s", g)
	}
	n := 0
	for _, d := range r.DeferralReasons {
		if d.Domain != "down.test" || !strings.HasPrefix(d.Reason, "451 4.4.1 ") {
			t.Errorf("deferral reason %+v", d)
		}
		n += d.Count
	}
	if n != 2 {
		t.Errorf("deferral reasons add up to %d, want 2: %+v", n, r.DeferralReasons)
	}

	// The text report shows the same figures, aligned.
	text := w.runTool(t, append([]string{"report"}, w.window()...)...)
	for _, line := range []string{
		"  received       9  messages\n",
		"  delivered      7  recipients\n",
		"  deferred       2  messages (2 deferrals)\n",
		"  bounced        2  recipients\n",
		"  rejected       3  23.1% of received, duplicates and refusals\n",
		"  duplicates     1  retransmissions suppressed\n",
		"  notices        2  failed 2, delayed 0, success 0\n",
		"  held           0  messages\n",
		fmt.Sprintf("  bytes in     %d  received\n", bytesIn),
		fmt.Sprintf("  bytes out   %d  delivered\n", bytesOut),
		"  COUNT  REASON\n  3      relay\n",
		"  MESSAGES  BYTES  SENDER\n  7 ",
		"  DOMAIN       DELIVERED  BYTES",
		"  down.test    0          0      -          -          2         0\n",
	} {
		if !strings.Contains(text, line) {
			t.Errorf("the text report lacks %q:\n%s", line, text)
		}
	}

	// events lists them, filtered.
	out := w.runTool(t, append([]string{"events", "--kind", "rejected", "-o", "json"}, w.window()...)...)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 {
		t.Fatalf("events --kind rejected: %d lines:\n%s", len(lines), out)
	}
	var e events.Event
	if err := json.Unmarshal([]byte(lines[0]), &e); err != nil {
		t.Fatal(err)
	}
	if e.Kind != events.Rejected || e.Reason != events.ReasonRelay || e.Code != 554 || e.Enhanced != "5.7.1" || e.From != "carol@sender.test" ||
		e.Rcpt != "x0@elsewhere.example" || e.Client != "127.0.0.1" || e.Helo != "client.test" || e.Pod != "pod-0" {
		t.Errorf("a rejection event: %s", lines[0])
	}
	out = w.runTool(t, append([]string{"events", "--domain", "bounce.test", "--kind", "bounced"}, w.window()...)...)
	if strings.Count(out, "\n") != 2 || !strings.Contains(out, "  bounced    ") || !strings.Contains(out, "550 5.1.1 no such user") {
		t.Errorf("events --domain bounce.test --kind bounced:\n%s", out)
	}
}

// events --follow prints an event stored after it started, and only
// those its filters let through.
func TestEventsFollowPrintsNewEventsThatMatch(t *testing.T) {
	w := newMailWorld(t)
	ctx, cancel := context.WithCancel(testCtx(t))
	defer cancel()
	var out syncBuffer
	cmd := eventsCmd()
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs([]string{"--follow", "--rcpt", "late@ok.test", "--kind", "delivered", "--nats-url", w.url})
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, err := w.js.Stream(ctx, events.Stream)
		if err == nil && s.CachedInfo().State.Consumers > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("events --follow never started reading: %s", out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	c := smtptest.DialReady(t, w.smtp)
	c.Mail("alice@sender.test", []string{"other@ok.test"}, msg(1, "other@ok.test"), 250)
	c.Mail("alice@sender.test", []string{"late@ok.test"}, msg(2, "late@ok.test"), 250)
	c.Cmd("QUIT", 221)
	deadline = time.Now().Add(15 * time.Second)
	for !strings.Contains(out.String(), "late@ok.test") {
		if time.Now().After(deadline) {
			t.Fatalf("events --follow printed no delivery to late@ok.test:\n%s", out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Let the other delivery's batch arrive too, then stop.
	for len(w.sink.Transactions()) < 2 {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("events --follow: %v", err)
	}
	got := out.String()
	if strings.Count(got, "\n") != 1 || !strings.Contains(got, "  delivered  ") || !strings.Contains(got, "to=<late@ok.test>") ||
		!strings.Contains(got, "relay=127.0.0.1") || strings.Contains(got, "other@ok.test") {
		t.Fatalf("events --follow printed:\n%s", got)
	}
}
