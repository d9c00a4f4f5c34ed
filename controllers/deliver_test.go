package controllers

import (
	"context"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"go.uber.org/zap"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/deliverer"
	"github.com/jetmail/jetmail/deliverer/outbound"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/spool"
)

// sink is a real SMTP server on loopback that counts what it receives.
type sink struct {
	addr string
	got  atomic.Int64
}

func startSink(t *testing.T) *sink {
	t.Helper()
	s := &sink{}
	srv := smtp.NewServer(smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) { return &sinkSession{s: s}, nil }))
	srv.Domain = "sink.test"
	srv.AllowInsecureAuth = true
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = l.Addr().String()
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return s
}

type sinkSession struct{ s *sink }

func (x *sinkSession) Mail(string, *smtp.MailOptions) error { return nil }
func (x *sinkSession) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (x *sinkSession) Data(r io.Reader) error {
	_, _ = io.Copy(io.Discard, r)
	x.s.got.Add(1)
	return nil
}
func (x *sinkSession) Reset()        {}
func (x *sinkSession) Logout() error { return nil }

func TestMailRouteChangesWhereARunningDelivererSends(t *testing.T) {
	w := newWorld(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	a, b := startSink(t), startSink(t)

	// The deliverer follows the snapshots, like `jetmail deliverer`.
	src, err := policy.FollowStore(ctx, w.store, func(rev uint64, _ *policy.Config, err error) {
		if err != nil {
			t.Errorf("revision %d: %v", rev, err)
			return
		}
		_ = w.store.Heartbeat(ctx, "deliverer-1", "deliverer", rev)
	})
	if err != nil {
		t.Fatal(err)
	}
	dc := &outbound.Client{Hostname: "relay.test"}
	t.Cleanup(dc.Close)
	d, err := deliverer.New(deliverer.Config{Hostname: "relay.test", Spool: w.sp, Source: src,
		Resolver: &deliverer.Resolver{Servers: []string{"127.0.0.1:1"}}, Client: dc,
		Log: zap.NewNop(), AckWait: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	go d.Run(ctx)

	route := &v1alpha1.MailRoute{ObjectMeta: metav1.ObjectMeta{Name: "partner"},
		Spec: v1alpha1.MailRouteSpec{Domains: []string{"partner.test"}, NextHops: []string{"[" + hostOnly(a.addr) + "]:" + portOnly(a.addr)}, TLS: v1alpha1.TLSNone}}
	w.create(route)
	waitReady(t, w, route)
	queue(t, w.sp, "x@partner.test")
	eventually(t, 15*time.Second, "delivery to the first next hop", func() bool { return a.got.Load() == 1 })

	// Point the route elsewhere: the next message follows it.
	if err := w.c.Get(ctx, client.ObjectKeyFromObject(route), route); err != nil {
		t.Fatal(err)
	}
	route.Spec.NextHops = []string{"[" + hostOnly(b.addr) + "]:" + portOnly(b.addr)}
	if err := w.c.Update(ctx, route); err != nil {
		t.Fatal(err)
	}
	waitReady(t, w, route)
	queue(t, w.sp, "y@partner.test")
	eventually(t, 15*time.Second, "delivery to the new next hop", func() bool { return b.got.Load() == 1 })
	if a.got.Load() != 1 {
		t.Errorf("the old next hop got %d messages, want 1", a.got.Load())
	}
}

// waitReady waits until obj's current generation is Ready.
func waitReady(t *testing.T, w *world, obj client.Object) {
	t.Helper()
	eventually(t, 15*time.Second, obj.GetName()+" to be Ready", func() bool {
		_, r, st := w.conditions(obj)
		return r != nil && r.Status == metav1.ConditionTrue && st.ObservedGeneration == obj.GetGeneration()
	})
}

// queue commits a small message for rcpt.
func queue(t *testing.T, sp *spool.Spool, rcpt string) {
	t.Helper()
	now := time.Now()
	env := &spool.Envelope{QueueID: spool.NewQueueID(now), Received: now, ClientIP: "127.0.0.1", Helo: "client.test",
		From: "sender@example.org", Rcpts: []spool.Rcpt{{Addr: rcpt}}}
	b := sp.NewBody(context.Background(), env.QueueID)
	_, _ = io.WriteString(b, "Subject: routed\r\n\r\nhello\r\n")
	if _, err := sp.Commit(context.Background(), env, b, ""); err != nil {
		t.Fatal(err)
	}
}

func hostOnly(addr string) string { h, _, _ := net.SplitHostPort(addr); return h }
func portOnly(addr string) string { _, p, _ := net.SplitHostPort(addr); return p }
