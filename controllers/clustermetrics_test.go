package controllers

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/jetmail/jetmail/internal/natstest"
	"github.com/jetmail/jetmail/spool"
)

// gathered is what a registry exports, as "name{label=value,...}" ->
// value, for the jetmail_cluster_ metrics.
func gathered(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		if !strings.HasPrefix(mf.GetName(), "jetmail_cluster_") {
			continue
		}
		for _, m := range mf.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, l.GetName()+"="+l.GetValue())
			}
			sort.Strings(ls)
			key := mf.GetName()
			if len(ls) > 0 {
				key += "{" + strings.Join(ls, ",") + "}"
			}
			out[key] = m.GetGauge().GetValue()
		}
	}
	return out
}

// queueAged commits a small message that arrived age ago.
func queueAged(t *testing.T, sp *spool.Spool, age time.Duration, rcpt string) string {
	t.Helper()
	at := time.Now().Add(-age)
	env := &spool.Envelope{QueueID: spool.NewQueueID(at), Received: at, ClientIP: "127.0.0.1", Helo: "client.test",
		From: "sender@example.org", Rcpts: []spool.Rcpt{{Addr: rcpt}}}
	if _, err := sp.Enqueue(context.Background(), env, []byte("Subject: gauges\r\n\r\nhello\r\n"), ""); err != nil {
		t.Fatal(err)
	}
	return env.QueueID
}

// followerOnly is what a replica that does not lead exports.
var followerOnly = map[string]float64{"jetmail_cluster_leader": 0}

// The elected controller exports the queue's figures for the cluster; the
// other replica exports only that it does not lead; when the leader
// stops, the new one takes over the gauges and the old one exports none.
func TestLeaderExportsTheClusterQueueGauges(t *testing.T) {
	w := newBareWorld(t)
	ctx := context.Background()
	// Three messages, the first an hour old; the deliverers' consumer
	// hands out two, one of which has a delivery state (deferred).
	oldest := queueAged(t, w.sp, time.Hour, "a@example.net")
	queueAged(t, w.sp, 0, "b@example.net")
	held := queueAged(t, w.sp, 0, "c@example.net")
	cons, err := w.sp.DeliveryConsumer(ctx, 5*time.Minute, 100)
	if err != nil {
		t.Fatal(err)
	}
	fetch := func(n int) {
		t.Helper()
		batch, err := cons.Fetch(n, jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		got := 0
		for m := range batch.Messages() {
			got++
			if m.Headers().Get(spool.HeaderHeld) != "" {
				_ = m.NakWithDelay(time.Hour) // as a deliverer does
			}
		}
		if got != n {
			t.Fatalf("fetched %d messages, want %d", got, n)
		}
	}
	fetch(3)
	// The third is put on hold (a new record, which a deliverer takes and
	// hands back); a fourth arrives, which no deliverer has had yet.
	m, err := w.sp.Find(ctx, held)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.sp.Hold(ctx, m, time.Now()); err != nil {
		t.Fatal(err)
	}
	fetch(1)
	queueAged(t, w.sp, 0, "d@example.net")
	if err := w.sp.SaveState(ctx, &spool.DeliveryState{QueueID: oldest, Attempts: 1,
		Rcpts: []spool.RcptState{{Addr: "a@example.net", Status: spool.RcptDeferred}}}); err != nil {
		t.Fatal(err)
	}
	st, err := w.sp.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Oldest != oldest || st.QueueBytes == 0 {
		t.Fatalf("spool stats %+v, want the oldest %s", st, oldest)
	}
	want := map[string]float64{
		"jetmail_cluster_leader":                         1,
		"jetmail_cluster_queue_messages{state=new}":      1,
		"jetmail_cluster_queue_messages{state=active}":   1,
		"jetmail_cluster_queue_messages{state=deferred}": 1,
		"jetmail_cluster_queue_messages{state=held}":     1,
		"jetmail_cluster_queue_bytes{stream=queue}":      float64(st.QueueBytes),
		"jetmail_cluster_queue_bytes{stream=body}":       float64(st.BodyBytes),
		"jetmail_cluster_delivery_states":                1,
	}
	const age = "jetmail_cluster_queue_oldest_message_age_seconds"
	exportsWant := func(reg *prometheus.Registry) func() bool {
		return func() bool {
			g := gathered(t, reg)
			a, ok := g[age]
			delete(g, age)
			return ok && a >= 3600 && a < 3660 && fmt.Sprint(g) == fmt.Sprint(want)
		}
	}

	election := ManagerOptions{LeaderElect: true, LeaseDuration: 60 * time.Second,
		RenewDeadline: 40 * time.Second, RetryPeriod: 200 * time.Millisecond,
		NATS: w.nc, ClusterMetricsEvery: 100 * time.Millisecond}
	type replica struct {
		reg  *prometheus.Registry
		stop func()
		mgr  interface{ Elected() <-chan struct{} }
	}
	var rs [2]replica
	for i := range rs {
		o := election
		rs[i].reg = prometheus.NewRegistry()
		o.Registerer = rs[i].reg
		rs[i].mgr, rs[i].stop = w.startManager(o)
	}
	var leader, follower replica
	select {
	case <-rs[0].mgr.Elected():
		leader, follower = rs[0], rs[1]
	case <-rs[1].mgr.Elected():
		leader, follower = rs[1], rs[0]
	case <-time.After(30 * time.Second):
		t.Fatal("no replica was elected within 30s")
	}
	eventually(t, 10*time.Second, "the leader to export the cluster gauges", exportsWant(leader.reg))
	for range 5 {
		if g := gathered(t, follower.reg); fmt.Sprint(g) != fmt.Sprint(followerOnly) {
			t.Fatalf("the follower exports %v, want only %v", g, followerOnly)
		}
		time.Sleep(100 * time.Millisecond)
	}

	leader.stop()
	if g := gathered(t, leader.reg); fmt.Sprint(g) != fmt.Sprint(followerOnly) {
		t.Errorf("the stopped leader exports %v, want only %v", g, followerOnly)
	}
	select {
	case <-follower.mgr.Elected():
	case <-time.After(20 * time.Second):
		t.Fatal("the follower was not elected within 20s of the leader stopping")
	}
	eventually(t, 10*time.Second, "the new leader to export the cluster gauges", exportsWant(follower.reg))
}

// Before any gateway has created the queue the leader exports no queue
// gauges (the controller never creates it), then starts when it appears;
// when JetStream stops answering, the gauges go away instead of going
// stale.
func TestClusterGaugesWaitForTheQueueAndNeverGoStale(t *testing.T) {
	ns := natstest.Start(t, natstest.Options{})
	nc := natstest.Connect(t, ns, spool.NATSOptions()...)
	t.Cleanup(nc.Close)
	cm := NewClusterMetrics(nc, 50*time.Millisecond)
	reg := prometheus.NewRegistry()
	reg.MustRegister(cm)
	if g := gathered(t, reg); fmt.Sprint(g) != fmt.Sprint(followerOnly) {
		t.Fatalf("before it runs: %v, want only %v", g, followerOnly)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = cm.Start(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	leaderOnly := map[string]float64{"jetmail_cluster_leader": 1}
	eventually(t, 5*time.Second, "the leader flag", func() bool { return fmt.Sprint(gathered(t, reg)) == fmt.Sprint(leaderOnly) })
	time.Sleep(300 * time.Millisecond)
	if g := gathered(t, reg); fmt.Sprint(g) != fmt.Sprint(leaderOnly) {
		t.Fatalf("without a queue: %v, want only %v", g, leaderOnly)
	}
	if _, err := spool.Attach(ctx, nc); err == nil {
		t.Fatal("the cluster gauges created the queue")
	}

	sp, err := spool.Open(ctx, nc, spool.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	queueAged(t, sp, time.Minute, "a@example.net")
	eventually(t, 5*time.Second, "the gauges of the new queue", func() bool {
		g := gathered(t, reg)
		return g["jetmail_cluster_queue_messages{state=new}"] == 1 && g["jetmail_cluster_queue_oldest_message_age_seconds"] >= 60
	})

	natstest.Stop(ns)
	eventually(t, 5*time.Second, "the gauges to go away with JetStream", func() bool {
		return fmt.Sprint(gathered(t, reg)) == fmt.Sprint(leaderOnly)
	})
	cancel()
	<-done
	if g := gathered(t, reg); fmt.Sprint(g) != fmt.Sprint(followerOnly) {
		t.Errorf("after it stopped: %v, want only %v", g, followerOnly)
	}
}
