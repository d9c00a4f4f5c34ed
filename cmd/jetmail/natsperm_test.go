package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/deliverer/mtasts"
	"github.com/jetmail/jetmail/events"
	"github.com/jetmail/jetmail/internal/smtptest"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// permissionsConf is the nats-server fragment operators include; the test
// loads the file itself, not a copy.
const permissionsConf = "../../charts/jetmail/nats/permissions.conf"

// natsRoles are the users of permissionsConf; role r signs in with the key
// whose public half is in $JETMAIL_<R>_NKEY.
var natsRoles = []string{"gateway", "deliverer", "controller", "admin"}

// TestNATSPermissionsLetEachRoleWorkAndNoMore runs every role of jetmail
// with its own NKEY against a nats-server configured by
// charts/jetmail/nats/permissions.conf. The controller's NATS half
// publishes the configuration (a route to an SMTP sink) and lists the pods;
// the real gateway and deliverer binaries, configured from it, carry mail
// from an SMTP client to the sink: duplicate guard, chunked bodies, a
// transmission cut off mid-DATA, a refused recipient with its bounce (one
// returning a chunked message) and delivery state, the body sweeper,
// configuration changes large enough for flow control, shutdown. The admin
// reads the queue, the bodies, the state and the consumer. The server must
// report no permissions violation meanwhile. Then each role tries what it
// must not do, and the server must refuse it as a permissions violation.
//
// JETMAIL_NATSPERM_TRACE=1 logs every subject each client published to or
// subscribed to: what to look at when the code needs a new permission.
func TestNATSPermissionsLetEachRoleWorkAndNoMore(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	bin := buildJetmail(t)
	srv := startPermissionedNATS(t, "", true)
	sink := startSink(t)
	spoolCfg := spool.ClusterConfig()
	spoolCfg.Replicas = 1

	// The controller's NATS half: open the buckets, publish a
	// configuration (a catch-all route to the sink), read it back and list
	// the pods, as controllers.ConfigReconciler does.
	ctl := srv.connect(t, "controller", "jetmail-controller")
	store, err := policy.OpenStore(ctx, ctl.js, 1)
	if err != nil {
		t.Fatalf("controller: OpenStore: %v", err)
	}
	rev := publishSnapshot(ctx, t, store, sink.port, 0)
	if cur, crev, err := store.Current(ctx); err != nil || cur == nil || crev != rev {
		t.Fatalf("controller: current snapshot: %v revision %d, %v; want revision %d", cur, crev, err, rev)
	}
	if _, err := store.Pods(ctx); err != nil {
		t.Fatalf("controller: list pods: %v", err)
	}

	// The gateway binary, its configuration from KV.
	gw := startRole(t, bin, "gateway", srv.url, srv.seeds["gateway"], "--smtp-listen", freePort(t), "--hostname", "gw.test", "--pod-name", "gw-pod")
	rcpts := []string{"ok@example.net", "reject@example.net"}
	msg1 := "From: a@example.org\r\nTo: ok@example.net, reject@example.net\r\nMessage-ID: <perm-1@example.org>\r\nSubject: permissions\r\n\r\nhello under least privilege\r\n"
	c := smtptest.DialReady(t, gw.smtp)
	qid1 := queuedAs(t, c.Mail("a@example.org", rcpts, msg1, 250))
	// A retransmission: the duplicate guard reads the original back.
	if again := c.Mail("a@example.org", rcpts, msg1, 250); queuedAs(t, again) != qid1 {
		t.Fatalf("retransmission %q, the original was queued as %s", again, qid1)
	}
	// Too large to travel inline: its body goes to the body stream in
	// chunks, and so does its bounce, which returns it whole (RET=FULL).
	var big strings.Builder
	big.WriteString("From: a@example.org\r\nTo: ok@example.net, reject@example.net\r\nMessage-ID: <perm-2@example.org>\r\nSubject: big\r\n\r\n")
	for big.Len() < 1200<<10 {
		big.WriteString(strings.Repeat("0123456789", 7) + "abcdef\r\n")
	}
	c.Cmd("MAIL FROM:<a@example.org> RET=FULL", 250)
	for _, r := range rcpts {
		c.Cmd("RCPT TO:<"+r+">", 250)
	}
	c.Cmd("DATA", 354)
	c.Send(big.String() + ".\r\n")
	qid2 := queuedAs(t, c.Expect(250))
	c.Cmd("QUIT", 221)

	// The controller's cluster gauges (controllers.ClusterMetrics): the
	// queue's figures and its oldest record, read-only.
	csp, err := spool.Attach(ctx, ctl.nc)
	if err != nil {
		t.Fatalf("controller: spool.Attach: %v", err)
	}
	if st, err := csp.Stats(ctx); err != nil || st.Oldest != qid1 || st.NotHandedOut != 2 {
		t.Fatalf("controller: queue stats %+v, %v; want 2 new, the oldest %s", st, err, qid1)
	}

	// The admin (the queue tools): read the queue, the bodies and the
	// configuration, and watch the delivery state.
	adm := srv.connect(t, "admin", "jetmail-admin")
	asp, err := spool.Open(ctx, adm.nc, spoolCfg)
	if err != nil {
		t.Fatalf("admin: spool.Open: %v", err)
	}
	seqs := map[string]uint64{}
	if err := asp.Scan(ctx, func(m *spool.Message) error {
		body, err := asp.ReadBody(ctx, m)
		if err != nil {
			return err
		}
		seqs[m.Envelope.QueueID] = m.Sequence
		if m.Envelope.QueueID == qid2 && (m.Envelope.Body.Chunks == 0 || len(body) < 1200<<10) {
			t.Errorf("admin: the big message has %d chunks and %d octets", m.Envelope.Body.Chunks, len(body))
		}
		return nil
	}); err != nil {
		t.Fatalf("admin: scan the queue: %v", err)
	}
	if len(seqs) != 2 || seqs[qid1] == 0 || seqs[qid2] == 0 {
		t.Fatalf("admin: the queue holds %v, want %s and %s", seqs, qid1, qid2)
	}
	// The queue tools themselves, signed in as the admin.
	for _, args := range [][]string{{"stat", "--scan"}, {"ls"}, {"show", qid2}, {"show", "--body", qid2}, {"hold", qid2}, {"stat"}, {"release", qid2}} {
		out, err := runQueue(t, srv.url, append(args, "--nats-nkey", srv.seeds["admin"])...)
		if err != nil {
			t.Fatalf("admin: jetmail queue %v: %v\n%s", args, err, out)
		}
		if args[0] == "ls" && (!strings.Contains(out, qid1) || !strings.Contains(out, qid2)) {
			t.Fatalf("admin: jetmail queue ls lists neither %s nor %s:\n%s", qid1, qid2, out)
		}
	}
	astore, err := policy.OpenStore(ctx, adm.js, 1)
	if err != nil {
		t.Fatalf("admin: OpenStore: %v", err)
	}
	if _, arev, err := astore.Current(ctx); err != nil || arev != rev {
		t.Fatalf("admin: current snapshot revision %d, %v; want %d", arev, err, rev)
	}
	stateWatch, err := asp.State().WatchAll(ctx)
	if err != nil {
		t.Fatalf("admin: watch the delivery state: %v", err)
	}
	var stateMu sync.Mutex
	var stateOps []string
	go func() {
		for e := range stateWatch.Updates() {
			if e != nil {
				stateMu.Lock()
				stateOps = append(stateOps, e.Key()+" "+e.Operation().String())
				stateMu.Unlock()
			}
		}
	}()

	// A client that goes away in the middle of a large DATA: the gateway
	// deletes the chunks it wrote.
	bodies := func() (last uint64, firsts int) {
		t.Helper()
		bs, err := adm.js.Stream(ctx, spool.BodyStream)
		if err != nil {
			t.Fatalf("admin: body stream: %v", err)
		}
		info, err := bs.Info(ctx, jetstream.WithSubjectFilter("jetmail.body.*.0"))
		if err != nil {
			t.Fatalf("admin: body stream: %v", err)
		}
		return info.State.LastSeq, len(info.State.Subjects)
	}
	before, _ := bodies()
	c = smtptest.DialReady(t, gw.smtp)
	c.Cmd("MAIL FROM:<a@example.org>", 250)
	c.Cmd("RCPT TO:<ok@example.net>", 250)
	c.Cmd("DATA", 354)
	c.Send(big.String())
	c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		last, firsts := bodies()
		if last > before && firsts == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the aborted transmission's chunks: last sequence %d (before %d), %d bodies, want 1; gateway log:\n%s", last, before, firsts, gw.log)
		}
		time.Sleep(20 * time.Millisecond)
	}

	// The deliverer's housekeeping, run now rather than after a random
	// hour: the body sweeper reads the queue's headers (the big body is in
	// use, so nothing goes), the queue metrics read the queue's stats and its oldest envelope.
	dl := srv.connect(t, "deliverer", "jetmail-deliverer")
	dsp, err := spool.Open(ctx, dl.nc, spoolCfg)
	if err != nil {
		t.Fatalf("deliverer: spool.Open: %v", err)
	}
	if n, err := dsp.SweepBodies(ctx, time.Nanosecond, time.Now().Add(time.Minute)); err != nil || n != 0 {
		t.Fatalf("deliverer: sweep bodies: %d deleted, %v; want 0", n, err)
	}
	if st, err := dsp.Stats(ctx); err != nil || st.Oldest != qid1 {
		t.Fatalf("deliverer: the queue's stats: oldest %v, %v; want %s", st, err, qid1)
	}

	// The deliverer binary, its configuration (the route to the sink)
	// from KV: both messages to ok@, both bounces (reject@ is refused) to
	// a@, the second returning the big message.
	dlv := startRole(t, bin, "deliverer", srv.url, srv.seeds["deliverer"], "--hostname", "dl.test", "--pod-name", "dl-pod")
	deadline = time.Now().Add(20 * time.Second)
	for len(sink.transactions()) < 4 {
		if time.Now().After(deadline) {
			t.Fatalf("the sink got %d of 4 messages; deliverer log:\n%s", len(sink.transactions()), dlv.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	got := map[string]int{}
	for _, tx := range sink.transactions() {
		kind := "?"
		switch {
		case tx.from == "a@example.org" && slices.Equal(tx.rcpts, []string{"ok@example.net"}) && strings.Contains(tx.body, "hello under least privilege"):
			kind = "message"
		case tx.from == "a@example.org" && slices.Equal(tx.rcpts, []string{"ok@example.net"}) && len(tx.body) >= 1200<<10:
			kind = "big message"
		case tx.from == "" && slices.Equal(tx.rcpts, []string{"a@example.org"}) && strings.Contains(tx.body, "reject@example.net"):
			kind = "bounce"
			if len(tx.body) >= 1200<<10 {
				kind = "big bounce"
			}
		}
		got[kind]++
	}
	if want := map[string]int{"message": 1, "big message": 1, "bounce": 1, "big bounce": 1}; !maps.Equal(got, want) {
		t.Fatalf("the sink got %v, want %v", got, want)
	}
	// Everything acknowledged, tombstoned, bodies deleted, state written
	// and cleared.
	deadline = time.Now().Add(10 * time.Second)
	for {
		var info *jetstream.ConsumerInfo
		cons, err := adm.js.Consumer(ctx, spool.QueueStream, spool.DeliveryConsumerName)
		if err == nil {
			info, err = cons.Info(ctx)
		}
		if err != nil {
			t.Fatalf("admin: the deliverers' consumer: %v", err)
		}
		_, firsts := bodies()
		stateMu.Lock()
		ops := strings.Join(stateOps, ", ")
		stateMu.Unlock()
		done := info.NumPending == 0 && info.NumAckPending == 0 && firsts == 0
		for _, q := range []string{qid1, qid2} {
			// The state was written, and is gone (purged from the stream,
			// no marker left).
			_, gerr := asp.State().Get(ctx, q)
			done = done && strings.Contains(ops, q+" KeyValuePutOp") && errors.Is(gerr, jetstream.ErrKeyNotFound)
		}
		if done {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("admin: queue not drained: %d pending, %d unacknowledged, %d bodies, state updates [%s]; deliverer log:\n%s",
				info.NumPending, info.NumAckPending, firsts, ops, dlv.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The event log: both binaries wrote theirs; the admin's queue hold and
	// release above recorded theirs, it records one more by hand, and reads
	// the whole log with jetmail report and jetmail events.
	if err := events.Publish(ctx, adm.js, "admin", []events.Event{{Kind: events.Held, QueueID: qid1, User: "admin"}}); err != nil {
		t.Fatalf("admin: publish an event: %v", err)
	}
	window := []string{"--nats-nkey", srv.seeds["admin"], "--from", time.Now().Add(-time.Hour).UTC().Format(time.RFC3339), "--to", time.Now().Add(time.Hour).UTC().Format(time.RFC3339)}
	deadline = time.Now().Add(15 * time.Second)
	for {
		out, err := runLogTool(t, srv.url, append([]string{"report", "-o", "json"}, window...)...)
		if err != nil {
			t.Fatalf("admin: jetmail report: %v\n%s", err, out)
		}
		var r report
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatal(err)
		}
		if r.Received == 2 && r.Duplicates == 1 && r.Delivered == 4 && r.Bounced == 2 && r.Notices["failed"] == 2 && r.Held == 2 && r.Released == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("admin: jetmail report never showed the gateway's and the deliverer's events: %s", out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if out, err := runLogTool(t, srv.url, append([]string{"events", "--queue-id", qid1}, window...)...); err != nil || !strings.Contains(out, "received") || !strings.Contains(out, "held") {
		t.Fatalf("admin: jetmail events --queue-id %s: %v\n%s", qid1, err, out)
	}
	stateWatch.Stop()
	if st, err := asp.LoadState(ctx, qid1); err != nil || st != nil {
		t.Fatalf("admin: state of %s after delivery: %+v, %v; want none", qid1, st, err)
	}
	if names := consumerNames(ctx, adm.js, spool.QueueStream); !slices.Contains(names, spool.DeliveryConsumerName) {
		t.Fatalf("admin: the queue's consumers: %v", names)
	}

	if st, err := csp.Stats(ctx); err != nil || !st.Consumer {
		t.Fatalf("controller: queue stats with the deliverers' consumer %+v, %v", st, err)
	}

	// Configuration changes reach both binaries: several large snapshots
	// in a row make the server ask their watches for flow control.
	for i := 1; i <= 3; i++ {
		rev = publishSnapshot(ctx, t, store, sink.port, i)
	}
	deadline = time.Now().Add(15 * time.Second)
	for {
		pods, err := store.Pods(ctx)
		var names []string
		for _, p := range pods {
			if p.Revision == rev {
				names = append(names, p.Pod+"/"+p.Role)
			}
		}
		sort.Strings(names)
		if err == nil && slices.Equal(names, []string{"dl-pod/deliverer", "gw-pod/gateway"}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("controller: pods on revision %d: %v, %v", rev, names, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, role := range []string{"gateway", "deliverer"} {
		if !srv.log.published("jetmail-"+role, "$JS.FC.") {
			t.Errorf("the %s's configuration watch was never asked for flow control: the test does not cover it", role)
		}
	}
	// Shutdown paths (watches stopping, their consumers deleted) count too.
	gw.stop(t)
	dlv.stop(t)
	if v := srv.log.violations(); len(v) > 0 {
		t.Fatalf("the roles at work ran into %d permissions violations:\n%s\ngateway log:\n%s\ndeliverer log:\n%s",
			len(v), strings.Join(v, "\n"), gw.log, dlv.log)
	}

	// What each role must not do.
	gwc := srv.connect(t, "gateway", "jetmail-gateway")
	gsp, err := spool.Open(ctx, gwc.nc, spoolCfg)
	if err != nil {
		t.Fatalf("gateway: spool.Open: %v", err)
	}
	dstore, err := policy.OpenStore(ctx, dl.js, 1)
	if err != nil {
		t.Fatalf("deliverer: OpenStore: %v", err)
	}
	queueSubj := "jetmail.queue.q" + qid1
	var wg sync.WaitGroup
	check := func(rc *roleConn, what, subject string, op func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rc.mustBeDenied(t, what, subject, op)
		}()
	}
	request := func(rc *roleConn, subject string) func(context.Context) error {
		return func(ctx context.Context) error {
			_, err := rc.nc.RequestWithContext(ctx, subject, []byte(`{}`))
			return err
		}
	}
	subscribe := func(rc *roleConn, subject string) func(context.Context) error {
		return func(ctx context.Context) error {
			sub, err := rc.nc.SubscribeSync(subject)
			if err != nil {
				return err
			}
			defer sub.Unsubscribe()
			_, err = sub.NextMsgWithContext(ctx)
			return err
		}
	}
	check(gwc, "gateway reads a delivery state", "$JS.API.STREAM.MSG.GET.KV_JETMAIL_STATE", func(ctx context.Context) error {
		_, err := gsp.LoadState(ctx, qid1)
		return err
	})
	check(gwc, "gateway watches the delivery state", "$JS.API.CONSUMER.CREATE.KV_JETMAIL_STATE.", func(ctx context.Context) error {
		w, err := gsp.State().WatchAll(ctx)
		if err == nil {
			w.Stop()
		}
		return err
	})
	check(gwc, "gateway listens to delivery state writes", "$KV.JETMAIL_STATE.>", subscribe(gwc, "$KV.JETMAIL_STATE.>"))
	check(gwc, "gateway writes a delivery state", "$KV.JETMAIL_STATE."+qid1, func(ctx context.Context) error {
		_, err := gsp.State().Put(ctx, qid1, []byte(`{}`))
		return err
	})
	check(gwc, "gateway reads the event log", "$JS.API.CONSUMER.CREATE.JETMAIL_EVENTS.", func(ctx context.Context) error {
		return events.Read(ctx, gwc.js, time.Now().Add(-time.Hour), time.Now(), func(events.Event) error { return nil })
	})
	check(dl, "deliverer reads the event log", "$JS.API.CONSUMER.CREATE.JETMAIL_EVENTS.", request(dl, "$JS.API.CONSUMER.CREATE.JETMAIL_EVENTS.peek"))
	check(gwc, "gateway deletes the event log", "$JS.API.STREAM.DELETE.JETMAIL_EVENTS", func(ctx context.Context) error {
		return gwc.js.DeleteStream(ctx, events.Stream)
	})
	check(gwc, "gateway deletes the queue stream", "$JS.API.STREAM.DELETE.JETMAIL_QUEUE", func(ctx context.Context) error {
		return gwc.js.DeleteStream(ctx, spool.QueueStream)
	})
	check(gwc, "gateway deletes the state bucket", "$JS.API.STREAM.DELETE.KV_JETMAIL_STATE", func(ctx context.Context) error {
		return gwc.js.DeleteKeyValue(ctx, spool.StateBucket)
	})
	check(gwc, "gateway takes the deliverers' messages", "$JS.API.CONSUMER.MSG.NEXT.JETMAIL_QUEUE.jetmail-deliverer",
		request(gwc, "$JS.API.CONSUMER.MSG.NEXT.JETMAIL_QUEUE.jetmail-deliverer"))
	check(gwc, "gateway publishes a configuration", "$KV.JETMAIL_CONFIG.snapshot", func(ctx context.Context) error {
		_, err := gwc.js.Publish(ctx, "$KV.JETMAIL_CONFIG.snapshot", []byte(`{}`))
		return err
	})
	check(dl, "deliverer publishes a configuration", "$KV.JETMAIL_CONFIG.snapshot", func(ctx context.Context) error {
		_, _, err := dstore.Publish(ctx, &policy.Snapshot{})
		return err
	})
	check(dl, "deliverer deletes the queue stream", "$JS.API.STREAM.DELETE.JETMAIL_QUEUE", func(ctx context.Context) error {
		return dl.js.DeleteStream(ctx, spool.QueueStream)
	})
	check(dl, "deliverer deletes a queued message", "$JS.API.STREAM.MSG.DELETE.JETMAIL_QUEUE", request(dl, "$JS.API.STREAM.MSG.DELETE.JETMAIL_QUEUE"))
	// (The controller may look the queue up and read its first record by
	// sequence, for the cluster gauges; nothing else of it.)
	check(ctl, "controller reads a queued envelope", "$JS.API.DIRECT.GET.JETMAIL_QUEUE."+queueSubj, request(ctl, "$JS.API.DIRECT.GET.JETMAIL_QUEUE."+queueSubj))
	check(ctl, "controller updates the queue stream", "$JS.API.STREAM.UPDATE.JETMAIL_QUEUE", request(ctl, "$JS.API.STREAM.UPDATE.JETMAIL_QUEUE"))
	check(ctl, "controller deletes a queued message", "$JS.API.STREAM.MSG.DELETE.JETMAIL_QUEUE", request(ctl, "$JS.API.STREAM.MSG.DELETE.JETMAIL_QUEUE"))
	check(ctl, "controller looks up another consumer of the queue", "$JS.API.CONSUMER.INFO.JETMAIL_QUEUE.peek", request(ctl, "$JS.API.CONSUMER.INFO.JETMAIL_QUEUE.peek"))
	check(ctl, "controller creates a consumer on the queue", "$JS.API.CONSUMER.CREATE.JETMAIL_QUEUE.peek", request(ctl, "$JS.API.CONSUMER.CREATE.JETMAIL_QUEUE.peek"))
	check(ctl, "controller takes the deliverers' messages", "$JS.API.CONSUMER.MSG.NEXT.JETMAIL_QUEUE.jetmail-deliverer",
		request(ctl, "$JS.API.CONSUMER.MSG.NEXT.JETMAIL_QUEUE.jetmail-deliverer"))
	check(ctl, "controller listens to the queue", "jetmail.queue.>", subscribe(ctl, "jetmail.queue.>"))
	check(ctl, "controller reads a body", "$JS.API.DIRECT.GET.JETMAIL_BODY", request(ctl, "$JS.API.DIRECT.GET.JETMAIL_BODY"))
	check(ctl, "controller reads a body from the leader", "$JS.API.STREAM.MSG.GET.JETMAIL_BODY", request(ctl, "$JS.API.STREAM.MSG.GET.JETMAIL_BODY"))
	check(ctl, "controller reads a delivery state", "$JS.API.DIRECT.GET.KV_JETMAIL_STATE.$KV.JETMAIL_STATE."+qid1, request(ctl, "$JS.API.DIRECT.GET.KV_JETMAIL_STATE.$KV.JETMAIL_STATE."+qid1))
	check(ctl, "controller reads a delivery state from the leader", "$JS.API.STREAM.MSG.GET.KV_JETMAIL_STATE", request(ctl, "$JS.API.STREAM.MSG.GET.KV_JETMAIL_STATE"))
	check(ctl, "controller queues a mail", "jetmail.queue.qX", request(ctl, "jetmail.queue.qX"))
	check(ctl, "controller writes events", "jetmail.events.x", request(ctl, "jetmail.events.x"))
	// Somebody else's stream on the same server.
	for _, rc := range []*roleConn{gwc, dl, ctl, adm} {
		for _, subj := range []string{
			"$JS.API.STREAM.INFO.OTHER", "$JS.API.STREAM.UPDATE.OTHER", "$JS.API.STREAM.DELETE.OTHER",
			"$JS.API.STREAM.PURGE.OTHER", "$JS.API.STREAM.MSG.GET.OTHER", "$JS.API.STREAM.MSG.DELETE.OTHER",
			"$JS.API.DIRECT.GET.OTHER", "$JS.API.DIRECT.GET.OTHER.other.secret", "$JS.API.CONSUMER.CREATE.OTHER.peek",
			"$JS.API.CONSUMER.INFO.OTHER.peek", "$JS.API.STREAM.CREATE.OTHER2", "$JS.API.STREAM.NAMES", "other.secret",
			// Jetmail's names where a wildcard might let them through.
			"$JS.API.CONSUMER.CREATE.OTHER.JETMAIL_QUEUE.other.>", "$JS.API.CONSUMER.CREATE.OTHER.jetmail-deliverer.jetmail.queue.>",
			"$JS.API.CONSUMER.MSG.NEXT.OTHER.JETMAIL_QUEUE", "$JS.API.DIRECT.GET.OTHER.jetmail.queue.x",
			"$JS.API.CONSUMER.CREATE.OTHER.x.$KV.JETMAIL_CONFIG.snapshot",
		} {
			check(rc, rc.role+" touches stream OTHER ("+subj+")", subj, request(rc, subj))
		}
		check(rc, rc.role+" listens to OTHER's subjects", "other.>", subscribe(rc, "other.>"))
	}
	wg.Wait()

	// Nothing refused was done: OTHER and the queue are as they were, the
	// configuration did not change.
	if _, crev, err := store.Current(ctx); err != nil || crev != rev {
		t.Errorf("controller: after the refused publishes the snapshot is revision %d (%v), want %d", crev, err, rev)
	}
	jsz, err := srv.ns.Jsz(&server.JSzOptions{Accounts: true, Streams: true})
	if err != nil {
		t.Fatal(err)
	}
	streams := map[string]uint64{}
	for _, a := range jsz.AccountDetails {
		for _, s := range a.Streams {
			streams[s.Name] = s.State.Msgs
		}
	}
	if len(streams) != 8 || streams["KV_"+mtasts.Bucket] != 0 || streams["OTHER"] != 1 || streams[spool.QueueStream] != 4 || streams["KV_"+spool.StateBucket] != 1 || streams[events.Stream] == 0 {
		t.Errorf("streams after the refusals: %v; want OTHER with its one message, the queue's 4 tombstones, the state bucket's one record, the waker's lease (finished states and a released hold leave nothing), the event log, the empty MTA-STS bucket, nothing created", streams)
	}
}

// TestNATSPermissionsLetEachRoleCreateTheStreams starts each role on an
// empty server, as happens when it is the first to run: it creates what it
// opens. The admin deletes everything in between.
func TestNATSPermissionsLetEachRoleCreateTheStreams(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv := startPermissionedNATS(t, "", false)
	spoolCfg := spool.ClusterConfig()
	spoolCfg.Replicas = 1
	adm := srv.connect(t, "admin", "jetmail-admin")
	all := []string{spool.QueueStream, spool.BodyStream, "KV_" + spool.StateBucket, "KV_" + policy.ConfigBucket, "KV_" + policy.PodsBucket, events.Stream}
	for _, role := range []string{"gateway", "deliverer", "controller"} {
		rc := srv.connect(t, role, "jetmail-"+role)
		want := all[3:5]
		if role != "controller" {
			if _, err := spool.Open(ctx, rc.nc, spoolCfg); err != nil {
				t.Fatalf("%s: spool.Open on an empty server: %v", role, err)
			}
			if _, err := events.OpenStream(ctx, rc.js, events.StreamConfig{Replicas: 1}); err != nil {
				t.Fatalf("%s: events.OpenStream on an empty server: %v", role, err)
			}
			want = all
		}
		if _, err := policy.OpenStore(ctx, rc.js, 1); err != nil {
			t.Fatalf("%s: OpenStore on an empty server: %v", role, err)
		}
		if role == "deliverer" {
			// The MTA-STS policies: created, written after a fetch, read.
			kv, err := mtasts.OpenBucket(ctx, rc.js, 1, jetstream.FileStorage)
			if err != nil {
				t.Fatalf("deliverer: mtasts.OpenBucket on an empty server: %v", err)
			}
			if _, err := kv.Put(ctx, "example.org", []byte(`{"mode":"enforce"}`)); err != nil {
				t.Fatalf("deliverer: put a policy: %v", err)
			}
			if _, err := kv.Get(ctx, "example.org"); err != nil {
				t.Fatalf("deliverer: get a policy: %v", err)
			}
			want = append(want, "KV_"+mtasts.Bucket)
		}
		for _, name := range want {
			if err := adm.js.DeleteStream(ctx, name); err != nil {
				t.Fatalf("admin: delete %s after the %s created it: %v", name, role, err)
			}
		}
		rc.nc.Close()
	}
	if v := srv.log.violations(); len(v) > 0 {
		t.Fatalf("%d permissions violations:\n%s", len(v), strings.Join(v, "\n"))
	}
}

// TestNATSPermissionsHoldWithTheV2AckFormat runs the deliverer's consumer
// and the configuration watches, in process, against a server that puts
// the domain and account hash in ack and flow-control subjects (feature
// flag js_ack_fc_v2, off by default in nats-server 2.15): an ack the
// server refused would bring every mail back after the ack wait, to be
// delivered again. On the way, a notice queued twice meets the duplicate
// guard.
func TestNATSPermissionsHoldWithTheV2AckFormat(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv := startPermissionedNATS(t, "feature_flags {\n  js_ack_fc_v2: true\n}\n", false)
	spoolCfg := spool.ClusterConfig()
	spoolCfg.Replicas = 1

	ctl := srv.connect(t, "controller", "jetmail-controller")
	store, err := policy.OpenStore(ctx, ctl.js, 1)
	if err != nil {
		t.Fatalf("controller: OpenStore: %v", err)
	}
	publishSnapshot(ctx, t, store, "25", 0)

	// Both roles that watch the configuration, each with its own key.
	var sp *spool.Spool
	seen := map[string]*atomic.Uint64{}
	wctx, stopWatch := context.WithCancel(ctx)
	watched := make(chan error, 2)
	for _, role := range []string{"gateway", "deliverer"} {
		rc := srv.connect(t, role, "jetmail-"+role)
		rsp, err := spool.Open(ctx, rc.nc, spoolCfg)
		if err != nil {
			t.Fatalf("%s: spool.Open: %v", role, err)
		}
		if role == "deliverer" {
			sp = rsp
		}
		rstore, err := policy.OpenStore(ctx, rc.js, 1)
		if err != nil {
			t.Fatalf("%s: OpenStore: %v", role, err)
		}
		last := &atomic.Uint64{}
		seen[role] = last
		go func() {
			watched <- rstore.Watch(wctx, func(_ *policy.Config, rev uint64) { last.Store(rev) }, func(rev uint64, err error) {
				t.Errorf("%s: revision %d rejected: %v", role, rev, err)
			})
		}()
	}

	// A notice queued twice (a deliverer died before it recorded the
	// first): the duplicate guard reads the first one back.
	now := time.Now()
	env := &spool.Envelope{QueueID: spool.NewQueueID(now), Received: now.UTC(), Gateway: "dl.test", ClientIP: "127.0.0.1",
		Helo: "dl.test", From: "", Rcpts: []spool.Rcpt{{Addr: "a@example.org"}}}
	guard := spool.Fingerprint("<>", []string{"dsn", "failed", "X"}, nil)
	first, err := sp.Enqueue(ctx, env, []byte("Subject: notice\r\n\r\nhi\r\n"), guard)
	if err != nil {
		t.Fatalf("deliverer: enqueue: %v", err)
	}
	env2 := *env
	env2.QueueID = spool.NewQueueID(now.Add(time.Millisecond))
	if again, err := sp.Enqueue(ctx, &env2, []byte("Subject: notice\r\n\r\nhi\r\n"), guard); err != nil || !again.Duplicate || again.QueueID != first.QueueID {
		t.Fatalf("deliverer: the notice queued again: %+v, %v; want a duplicate of %s", again, err, first.QueueID)
	}
	cons, err := sp.DeliveryConsumer(ctx, time.Minute, 100)
	if err != nil {
		t.Fatalf("deliverer: consumer: %v", err)
	}
	for i, ack := range []func(jetstream.Msg) error{
		func(m jetstream.Msg) error { return m.NakWithDelay(0) },
		func(m jetstream.Msg) error {
			if err := m.InProgress(); err != nil {
				return err
			}
			return m.DoubleAck(ctx)
		},
	} {
		batch, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatalf("deliverer: fetch: %v", err)
		}
		var msgs []jetstream.Msg
		for m := range batch.Messages() {
			msgs = append(msgs, m)
		}
		if len(msgs) != 1 {
			t.Fatalf("deliverer: fetch %d: %d messages (%v)", i, len(msgs), batch.Error())
		}
		// $JS.ACK.<domain>.<account hash>.JETMAIL_QUEUE.jetmail-deliverer....
		if tok := strings.Split(msgs[0].Reply(), "."); len(tok) < 6 || tok[4] != spool.QueueStream {
			t.Fatalf("reply subject %q is not in the v2 format", msgs[0].Reply())
		}
		if err := ack(msgs[0]); err != nil {
			t.Fatalf("deliverer: acknowledgement %d: %v", i, err)
		}
	}
	info, err := cons.Info(ctx)
	if err != nil || info.NumAckPending != 0 || info.NumPending != 0 {
		t.Fatalf("deliverer: after the ack: %+v, %v", info, err)
	}

	var rev uint64
	for i := 1; i <= 3; i++ {
		rev = publishSnapshot(ctx, t, store, "25", i)
	}
	deadline := time.Now().Add(10 * time.Second)
	for seen["gateway"].Load() != rev || seen["deliverer"].Load() != rev {
		if time.Now().After(deadline) {
			t.Fatalf("the watches saw revisions %d (gateway) and %d (deliverer) of %d", seen["gateway"].Load(), seen["deliverer"].Load(), rev)
		}
		time.Sleep(20 * time.Millisecond)
	}
	stopWatch()
	for range 2 {
		if err := <-watched; err != nil {
			t.Fatal(err)
		}
	}
	for _, role := range []string{"gateway", "deliverer"} {
		if !srv.log.published("jetmail-"+role, "$JS.FC.") {
			t.Errorf("the %s's watch was never asked for flow control: the test does not cover it", role)
		}
	}
	if v := srv.log.violations(); len(v) > 0 {
		t.Fatalf("%d permissions violations:\n%s", len(v), strings.Join(v, "\n"))
	}
}

// publishSnapshot publishes, as the controller, a configuration whose one
// route takes every domain to the sink; n > 0 pads it with a Secret of
// about 400 KiB (different for each n), so that a few of them make a
// watch ask for flow control.
func publishSnapshot(ctx context.Context, t *testing.T, store *policy.Store, sinkPort string, n int) uint64 {
	t.Helper()
	snap := &policy.Snapshot{MailRoutes: []v1alpha1.MailRoute{{
		ObjectMeta: metav1.ObjectMeta{Name: "sink", Namespace: "mail"},
		Spec:       v1alpha1.MailRouteSpec{Domains: []string{"*"}, NextHops: []string{"[127.0.0.1]:" + sinkPort}},
	}}}
	if n > 0 {
		snap.Secrets = []corev1.Secret{{ObjectMeta: metav1.ObjectMeta{Name: "padding", Namespace: "mail"},
			Data: map[string][]byte{"pad": bytes.Repeat([]byte{byte(n)}, 400<<10)}}}
	}
	if _, err := snap.Compile(); err != nil {
		t.Fatal(err)
	}
	rev, changed, err := store.Publish(ctx, snap)
	if err != nil || !changed {
		t.Fatalf("controller: publish snapshot %d: revision %d, changed %v, %v", n, rev, changed, err)
	}
	return rev
}

// consumerNames lists a stream's consumers; nil if that fails.
func consumerNames(ctx context.Context, js jetstream.JetStream, stream string) []string {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return nil
	}
	var names []string
	l := s.ConsumerNames(ctx)
	for n := range l.Name() {
		names = append(names, n)
	}
	if l.Err() != nil {
		return nil
	}
	return names
}

// permServer is a nats-server configured by permissionsConf.
type permServer struct {
	ns    *server.Server
	url   string
	seeds map[string]string // role: NKEY seed file
	log   *permLog
}

// startPermissionedNATS makes a key per role, then starts nats-server from
// a configuration that includes permissionsConf, with the public keys in
// the environment as the file says. Its store already holds a stream of
// somebody else's, OTHER, with one message.
func startPermissionedNATS(t *testing.T, extraConf string, other bool) *permServer {
	t.Helper()
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	if other {
		seedOther(t, store)
	}

	p := &permServer{seeds: map[string]string{}, log: &permLog{}}
	for _, role := range natsRoles {
		kp, err := nkeys.CreateUser()
		if err != nil {
			t.Fatal(err)
		}
		seed, _ := kp.Seed()
		pub, _ := kp.PublicKey()
		p.seeds[role] = filepath.Join(dir, role+".nk")
		if err := os.WriteFile(p.seeds[role], append(seed, '\n'), 0o600); err != nil {
			t.Fatal(err)
		}
		t.Setenv("JETMAIL_"+strings.ToUpper(role)+"_NKEY", pub)
	}
	frag, err := filepath.Abs(permissionsConf)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(frag); err != nil {
		t.Fatal(err)
	}
	// nats-server resolves an include relative to the including file.
	rel, err := filepath.Rel(dir, frag)
	if err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "nats-server.conf")
	if err := os.WriteFile(conf, fmt.Appendf(nil, "host: 127.0.0.1\nport: -1\njetstream {\n  store_dir: %q\n}\n%sinclude %q\n", store, extraConf, rel), 0o600); err != nil {
		t.Fatal(err)
	}
	opts, err := server.ProcessConfigFile(conf)
	if err != nil {
		t.Fatalf("nats-server refuses %s: %v", permissionsConf, err)
	}
	opts.NoSigs = true
	// Traced: which subjects each client used (see subjects and used).
	opts.MaxTracedMsgLen = 16
	if len(opts.Nkeys) != len(natsRoles) || len(opts.Users) != 0 {
		t.Fatalf("%s defines %d NKEY users and %d others, want exactly the %d roles", permissionsConf, len(opts.Nkeys), len(opts.Users), len(natsRoles))
	}
	ns, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	ns.SetLogger(p.log, false, true)
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("NATS did not start")
	}
	t.Cleanup(func() {
		ns.Shutdown()
		ns.WaitForShutdown()
		if os.Getenv("JETMAIL_NATSPERM_TRACE") != "" {
			t.Logf("subjects used, per client:\n%s", p.log.subjects())
		}
	})
	p.ns, p.url = ns, ns.ClientURL()
	// Nobody may sign in without a key.
	if nc, err := nats.Connect(p.url, nats.MaxReconnects(0)); err == nil {
		nc.Close()
		t.Fatal("nats-server let in a client without credentials")
	}
	return p
}

// seedOther creates, on a server without authentication sharing store,
// a stream that is not jetmail's.
func seedOther(t *testing.T, store string) {
	t.Helper()
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true,
		StoreDir: store, NoSigs: true, NoLog: true})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("NATS did not start")
	}
	defer func() { ns.Shutdown(); ns.WaitForShutdown() }()
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "OTHER", Subjects: []string{"other.>"}, AllowDirect: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, "other.secret", []byte("not jetmail's")); err != nil {
		t.Fatal(err)
	}
}

// roleConn is an in-process client signed in as one role, recording the
// permissions violations the server reports to it.
type roleConn struct {
	role string
	nc   *nats.Conn
	js   jetstream.JetStream

	mu     sync.Mutex
	denied []string
}

func (p *permServer) connect(t *testing.T, role, name string) *roleConn {
	t.Helper()
	auth, err := natsAuth(p.seeds[role], "")
	if err != nil {
		t.Fatal(err)
	}
	rc := &roleConn{role: role}
	opts := append(spool.NATSOptions(), nats.Name(name), nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		if errors.Is(err, nats.ErrPermissionViolation) {
			rc.mu.Lock()
			rc.denied = append(rc.denied, err.Error())
			rc.mu.Unlock()
		}
	}))
	rc.nc, err = nats.Connect(p.url, append(opts, auth...)...)
	if err != nil {
		t.Fatalf("%s signs in: %v", role, err)
	}
	t.Cleanup(rc.nc.Close)
	rc.js, err = jetstream.New(rc.nc)
	if err != nil {
		t.Fatal(err)
	}
	return rc
}

// mustBeDenied runs op, which must fail, and checks that the server
// reported a permissions violation on subject to this client (on a subject
// starting with it, if it ends with a dot).
func (rc *roleConn) mustBeDenied(t *testing.T, what, subject string, op func(context.Context) error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := op(ctx); err == nil {
		t.Errorf("%s: allowed", what)
		return
	}
	want := `"` + subject
	if !strings.HasSuffix(subject, ".") {
		want += `"`
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		rc.mu.Lock()
		var seen bool
		for _, d := range rc.denied {
			seen = seen || strings.Contains(d, want)
		}
		got := strings.Join(rc.denied, "\n")
		rc.mu.Unlock()
		if seen {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("%s: failed, but the server reported no permissions violation on %s; it reported:\n%s", what, want, got)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// permLog is the nats-server's logger: it keeps the permissions
// violations and the subjects every client used.
type permLog struct {
	mu   sync.Mutex
	viol []string
	used map[string]map[string]bool // client name: "PUB subject" / "SUB subject"
}

var (
	traceRe = regexp.MustCompile(`cid:\d+ - "([^"]*)".* - <<- \[(H?PUB|SUB) (\S+)`)
	inboxRe = regexp.MustCompile(`_INBOX\.[^.]+(\..*)?$`)
)

func (l *permLog) Errorf(format string, v ...any) {
	s := fmt.Sprintf(format, v...)
	if strings.Contains(s, "Violation") {
		l.mu.Lock()
		l.viol = append(l.viol, s)
		l.mu.Unlock()
	}
}

func (l *permLog) Tracef(format string, v ...any) {
	m := traceRe.FindStringSubmatch(fmt.Sprintf(format, v...))
	if m == nil {
		return
	}
	name, op, subj := m[1], strings.TrimPrefix(m[2], "H"), m[3]
	// Inboxes differ on every run.
	subj = inboxRe.ReplaceAllString(subj, "_INBOX.*")
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.used == nil {
		l.used = map[string]map[string]bool{}
	}
	if l.used[name] == nil {
		l.used[name] = map[string]bool{}
	}
	l.used[name][op+" "+subj] = true
}

func (l *permLog) Noticef(string, ...any) {}
func (l *permLog) Warnf(string, ...any)   {}
func (l *permLog) Debugf(string, ...any)  {}
func (l *permLog) Fatalf(format string, v ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.viol = append(l.viol, "nats-server fatal: "+fmt.Sprintf(format, v...))
}

func (l *permLog) violations() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.viol...)
}

// used reports whether a client whose name contains name published to a
// subject starting with prefix.
func (l *permLog) published(name, prefix string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for n, subs := range l.used {
		if !strings.Contains(n, name) {
			continue
		}
		for s := range subs {
			if strings.HasPrefix(s, "PUB "+prefix) {
				return true
			}
		}
	}
	return false
}

func (l *permLog) subjects() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b strings.Builder
	names := make([]string, 0, len(l.used))
	for n := range l.used {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		var subs []string
		for s := range l.used[n] {
			subs = append(subs, s)
		}
		sort.Strings(subs)
		fmt.Fprintf(&b, "%s:\n  %s\n", n, strings.Join(subs, "\n  "))
	}
	return b.String()
}

// roleProc is a jetmail binary running one role.
type roleProc struct {
	cmd           *exec.Cmd
	smtp, metrics string
	log           *syncBuffer
}

// startRole runs `jetmail <role>` signed in with seed and waits until it
// is ready.
func startRole(t *testing.T, bin, role, url, seed string, extra ...string) *roleProc {
	t.Helper()
	p := &roleProc{metrics: freePort(t), log: &syncBuffer{}}
	for i, a := range extra {
		if a == "--smtp-listen" {
			p.smtp = extra[i+1]
		}
	}
	args := append([]string{role, "--nats-url", url, "--nats-nkey", seed, "--replicas", "1",
		"--metrics-listen", p.metrics, "--log-format", "json"}, extra...)
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.cmd.Process.Kill(); p.cmd.Wait() })
	deadline := time.Now().Add(30 * time.Second)
	for readyz(p.metrics) != 200 {
		if time.Now().After(deadline) {
			t.Fatalf("%s never ready; log:\n%s", role, p.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return p
}

// stop sends SIGTERM and expects a clean exit.
func (p *roleProc) stop(t *testing.T) {
	t.Helper()
	stopProcess(t, p.cmd, p.log)
}

func queuedAs(t *testing.T, reply string) string {
	t.Helper()
	qid, ok := strings.CutPrefix(reply, "250 2.0.0 Ok: queued as ")
	if !ok {
		t.Fatalf("reply %q", reply)
	}
	return qid
}

// sink is an SMTP server on loopback that takes every recipient but
// reject@example.net and records what it gets.
type sink struct {
	port string
	mu   sync.Mutex
	txns []sinkTxn
}

type sinkTxn struct {
	from  string
	rcpts []string
	body  string
}

func startSink(t *testing.T) *sink {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	k := &sink{}
	_, k.port, _ = net.SplitHostPort(l.Addr().String())
	s := smtp.NewServer(k)
	s.Domain = "sink.test"
	s.MaxMessageBytes = 32 << 20
	s.ReadTimeout, s.WriteTimeout = 10*time.Second, 10*time.Second
	go s.Serve(l)
	t.Cleanup(func() { s.Close() })
	return k
}

func (k *sink) transactions() []sinkTxn {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]sinkTxn(nil), k.txns...)
}

func (k *sink) NewSession(*smtp.Conn) (smtp.Session, error) { return &sinkSession{k: k}, nil }

type sinkSession struct {
	k   *sink
	cur sinkTxn
}

func (s *sinkSession) Mail(from string, _ *smtp.MailOptions) error {
	s.cur = sinkTxn{from: from}
	return nil
}

func (s *sinkSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	if to == "reject@example.net" {
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
	}
	s.cur.rcpts = append(s.cur.rcpts, to)
	return nil
}

func (s *sinkSession) Data(r io.Reader) error {
	var b bytes.Buffer
	if _, err := io.Copy(&b, r); err != nil {
		return err
	}
	s.cur.body = b.String()
	s.k.mu.Lock()
	s.k.txns = append(s.k.txns, s.cur)
	s.k.mu.Unlock()
	return nil
}

func (s *sinkSession) Reset()        { s.cur = sinkTxn{} }
func (s *sinkSession) Logout() error { return nil }
