package controllers

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/internal/smtptest"
	"github.com/jetmail/jetmail/policy"
	"github.com/jetmail/jetmail/smtpgw"
)

func i32(v int32) *int32 { return &v }
func i64(v int64) *int64 { return &v }

func TestAPIServerRejectsInvalidObjects(t *testing.T) {
	w := newWorld(t)
	neg := &metav1.Duration{Duration: -time.Second}
	yes := true
	for name, obj := range map[string]client.Object{
		"a RelayPolicy with a malformed CIDR": &v1alpha1.RelayPolicy{ObjectMeta: metav1.ObjectMeta{Name: "bad-cidr"},
			Spec: v1alpha1.RelayPolicySpec{RelayNetworks: []string{"10.0.0.0/33"}}},
		"a RelayPolicy with a domain that is not a domain": &v1alpha1.RelayPolicy{ObjectMeta: metav1.ObjectMeta{Name: "bad-domain"},
			Spec: v1alpha1.RelayPolicySpec{AcceptedDomains: []string{"exa mple..org"}}},
		"a RelayPolicy with a negative timeout": &v1alpha1.RelayPolicy{ObjectMeta: metav1.ObjectMeta{Name: "neg"},
			Spec: v1alpha1.RelayPolicySpec{Timeouts: &v1alpha1.InboundTimeouts{Command: neg}}},
		"a RelayPolicy allowing fewer than 100 recipients": &v1alpha1.RelayPolicy{ObjectMeta: metav1.ObjectMeta{Name: "rcpts"},
			Spec: v1alpha1.RelayPolicySpec{MaxRecipients: i32(50)}},
		"a RelayPolicy with a rejected sender that is no address": &v1alpha1.RelayPolicy{ObjectMeta: metav1.ObjectMeta{Name: "sender"},
			Spec: v1alpha1.RelayPolicySpec{RejectSenders: []string{"spammer"}}},
		"a MailRoute with an unknown TLS policy": &v1alpha1.MailRoute{ObjectMeta: metav1.ObjectMeta{Name: "tls"},
			Spec: v1alpha1.MailRouteSpec{Domains: []string{"example.org"}, NextHops: []string{"mx.example.org"}, TLS: "sometimes"}},
		"a MailRoute without next hops": &v1alpha1.MailRoute{ObjectMeta: metav1.ObjectMeta{Name: "nohops"},
			Spec: v1alpha1.MailRouteSpec{Domains: []string{"example.org"}}},
		"a MailRoute with a malformed next hop": &v1alpha1.MailRoute{ObjectMeta: metav1.ObjectMeta{Name: "badhop"},
			Spec: v1alpha1.MailRouteSpec{Domains: []string{"example.org"}, NextHops: []string{"mx example org:25"}}},
		"a MailRoute without TLS that asks for DANE": &v1alpha1.MailRoute{ObjectMeta: metav1.ObjectMeta{Name: "dane"},
			Spec: v1alpha1.MailRouteSpec{Domains: []string{"example.org"}, NextHops: []string{"mx.example.org"}, TLS: v1alpha1.TLSNone, DANE: &yes}},
		"a MailRoute without TLS that asks for MTA-STS": &v1alpha1.MailRoute{ObjectMeta: metav1.ObjectMeta{Name: "sts"},
			Spec: v1alpha1.MailRouteSpec{Domains: []string{"example.org"}, NextHops: []string{"mx.example.org"}, TLS: v1alpha1.TLSNone, MTASTS: &yes}},
		"a DeliveryPolicy with a port out of range": &v1alpha1.DeliveryPolicy{ObjectMeta: metav1.ObjectMeta{Name: "port"},
			Spec: v1alpha1.DeliveryPolicySpec{Port: i32(70000)}},
		"a DeliveryPolicy with a negative retry interval": &v1alpha1.DeliveryPolicy{ObjectMeta: metav1.ObjectMeta{Name: "retry"},
			Spec: v1alpha1.DeliveryPolicySpec{RetryIntervals: []metav1.Duration{{Duration: time.Minute}, *neg}}},
		"a DeliveryPolicy with a negative session deadline": &v1alpha1.DeliveryPolicy{ObjectMeta: metav1.ObjectMeta{Name: "session"},
			Spec: v1alpha1.DeliveryPolicySpec{Timeouts: &v1alpha1.OutboundTimeouts{Session: neg}}},
		"a DeliveryPolicy with a negative dead-destination time": &v1alpha1.DeliveryPolicy{ObjectMeta: metav1.ObjectMeta{Name: "dead"},
			Spec: v1alpha1.DeliveryPolicySpec{DeadDestinationTime: neg}},
	} {
		t.Run(name, func(t *testing.T) {
			obj.SetNamespace(w.ns)
			err := w.c.Create(context.Background(), obj)
			if err == nil {
				t.Fatalf("the API server stored it")
			}
			if !strings.Contains(err.Error(), "Invalid value") && !strings.Contains(err.Error(), "Unsupported value") &&
				!strings.Contains(err.Error(), "Required value") && !strings.Contains(err.Error(), "should be") {
				t.Errorf("refused, but not by validation: %v", err)
			}
		})
	}
	// And a valid one of each kind is stored.
	w.create(&v1alpha1.RelayPolicy{ObjectMeta: metav1.ObjectMeta{Name: "ok"},
		Spec: v1alpha1.RelayPolicySpec{RelayNetworks: []string{"10.0.0.0/8", "2001:db8::/32", "192.0.2.1"},
			AcceptedDomains: []string{"example.org", ".example.org", "*.example.net"}, RejectSenders: []string{"a@b.example", "@c.example"}}})
	w.create(&v1alpha1.MailRoute{ObjectMeta: metav1.ObjectMeta{Name: "ok"},
		Spec: v1alpha1.MailRouteSpec{Domains: []string{"*"}, NextHops: []string{"[192.0.2.1]:2525", "smtp.example.org:587", "mx.example.org"}, TLS: v1alpha1.TLSVerify, DANE: &yes, MTASTS: &yes}})
	w.create(&v1alpha1.DeliveryPolicy{ObjectMeta: metav1.ObjectMeta{Name: "ok"},
		Spec: v1alpha1.DeliveryPolicySpec{Port: i32(2525), RetryIntervals: []metav1.Duration{{Duration: time.Minute}}}})
}

// dataPlane is an in-process gateway that follows the controller's
// snapshots through policy.FollowStore and reports its revision, as
// `jetmail gateway` does.
type dataPlane struct {
	gw       *smtpgw.Gateway
	addr     string
	revision atomic.Uint64
}

func startDataPlane(t *testing.T, w *world, pod string) *dataPlane {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	d := &dataPlane{}
	running := func(rev uint64) {
		for old := d.revision.Load(); old < rev && !d.revision.CompareAndSwap(old, rev); old = d.revision.Load() {
		}
		_ = w.store.Heartbeat(ctx, pod, "gateway", d.revision.Load())
	}
	src, err := policy.FollowStore(ctx, w.store, func(rev uint64, _ *policy.Config, err error) {
		if err != nil {
			t.Errorf("revision %d does not compile: %v", rev, err)
			return
		}
		running(rev)
	})
	if err != nil {
		t.Fatal(err)
	}
	if rev := src.Revision(); rev > 0 {
		running(rev)
	}
	d.gw = smtpgw.New(smtpgw.Config{Hostname: "mx.test"}, w.sp, src, zap.NewNop(), prometheus.NewRegistry())
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d.addr = l.Addr().String()
	go d.gw.Serve(l)
	t.Cleanup(func() {
		sctx, c := context.WithTimeout(context.Background(), 3*time.Second)
		defer c()
		d.gw.Shutdown(sctx)
	})
	return d
}

// rcptReply opens a session and returns the reply to one RCPT TO.
func rcptReply(t *testing.T, addr, to string) string {
	t.Helper()
	c := smtptest.DialReady(t, addr)
	defer c.Close()
	c.Cmd("MAIL FROM:<a@example.org>", 250)
	c.Send("RCPT TO:<" + to + ">\r\n")
	_, reply, err := c.ReadReply()
	if err != nil {
		t.Fatalf("RCPT TO:<%s>: %v", to, err)
	}
	c.Send("QUIT\r\n")
	return reply
}

func TestRelayPolicyChangesWhatARunningGatewayAccepts(t *testing.T) {
	w := newWorld(t)
	dp := startDataPlane(t, w, "gw-1")
	// A site policy: loopback is not a relay client, only example.org is
	// accepted.
	w.create(&v1alpha1.RelayPolicy{ObjectMeta: metav1.ObjectMeta{Name: "site"},
		Spec: v1alpha1.RelayPolicySpec{RelayNetworks: []string{"10.0.0.0/8"}, AcceptedDomains: []string{"example.org"}}})
	eventually(t, 10*time.Second, "the relay to be refused", func() bool {
		return strings.HasPrefix(rcptReply(t, dp.addr, "x@elsewhere.test"), "554 5.7.1")
	})
	if got := rcptReply(t, dp.addr, "x@example.org"); !strings.HasPrefix(got, "250") {
		t.Fatalf("accepted domain got %q", got)
	}

	// Allow loopback to relay: within seconds the running gateway does.
	allow := &v1alpha1.RelayPolicy{ObjectMeta: metav1.ObjectMeta{Name: "loopback"},
		Spec: v1alpha1.RelayPolicySpec{RelayNetworks: []string{"127.0.0.0/8"}}}
	w.create(allow)
	start := time.Now()
	eventually(t, 10*time.Second, "the relay to be allowed", func() bool {
		return strings.HasPrefix(rcptReply(t, dp.addr, "x@elsewhere.test"), "250")
	})
	t.Logf("relay allowed %s after the RelayPolicy was created", time.Since(start).Round(time.Millisecond))

	// Delete it: refused again.
	if err := w.c.Delete(context.Background(), allow); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the relay to be refused again", func() bool {
		return strings.HasPrefix(rcptReply(t, dp.addr, "x@elsewhere.test"), "554 5.7.1")
	})
}

func TestInvalidObjectBesideValidOnesLeavesTheRunningConfigurationAlone(t *testing.T) {
	w := newWorld(t)
	dp := startDataPlane(t, w, "gw-1")
	good := &v1alpha1.RelayPolicy{ObjectMeta: metav1.ObjectMeta{Name: "good"},
		Spec: v1alpha1.RelayPolicySpec{RelayNetworks: []string{"127.0.0.0/8"}, MaxMessageBytes: i64(1 << 20)}}
	w.create(good)
	eventually(t, 10*time.Second, "the good policy to be accepted", func() bool {
		a, _, _ := w.conditions(good)
		return a != nil && a.Status == metav1.ConditionTrue
	})
	_, _, st := w.conditions(good)
	revBefore := st.Revision
	eventually(t, 10*time.Second, "the gateway to run it", func() bool { return dp.revision.Load() >= revBefore })

	// Passes the API server's validation, fails the compiler: it sets a
	// limit the other object already sets differently.
	bad := &v1alpha1.RelayPolicy{ObjectMeta: metav1.ObjectMeta{Name: "bad"},
		Spec: v1alpha1.RelayPolicySpec{AcceptedDomains: []string{"example.org"}, MaxMessageBytes: i64(2 << 20)}}
	w.create(bad)
	eventually(t, 10*time.Second, "the bad policy to be rejected", func() bool {
		a, _, _ := w.conditions(bad)
		return a != nil && a.Status == metav1.ConditionFalse
	})
	a, r, _ := w.conditions(bad)
	if !strings.Contains(a.Message, "RelayPolicy "+w.ns+"/bad: spec.maxMessageBytes conflicts with RelayPolicy "+w.ns+"/good") {
		t.Errorf("Accepted message %q does not say what is wrong", a.Message)
	}
	if r == nil || r.Status != metav1.ConditionFalse || r.Reason != "NotAccepted" {
		t.Errorf("Ready %+v, want False/NotAccepted", r)
	}
	// The running configuration is unchanged: same revision, and the good
	// object is still accepted.
	snap, rev, err := w.store.Current(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if rev != revBefore || len(snap.RelayPolicies) != 1 || snap.RelayPolicies[0].Name != "good" {
		t.Errorf("configuration changed: revision %d (was %d), %d relay policies", rev, revBefore, len(snap.RelayPolicies))
	}
	if a, _, _ := w.conditions(good); a.Status != metav1.ConditionTrue {
		t.Errorf("the good object lost Accepted: %+v", a)
	}

	// A broken update of an accepted object keeps its last good generation
	// in force: point its AUTH at a Secret that does not exist.
	if err := w.c.Get(context.Background(), client.ObjectKeyFromObject(good), good); err != nil {
		t.Fatal(err)
	}
	good.Spec.Auth = &v1alpha1.RelayAuth{UsersSecretRef: &v1alpha1.SecretKeyRef{Name: "missing", Key: "users"}}
	if err := w.c.Update(context.Background(), good); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the broken update to be rejected", func() bool {
		a, _, st := w.conditions(good)
		return a != nil && a.Status == metav1.ConditionFalse && st.ObservedGeneration == good.Generation
	})
	a, _, _ = w.conditions(good)
	if !strings.Contains(a.Message, "Secret missing not found") || !strings.Contains(a.Message, "last accepted generation stays in force") {
		t.Errorf("Accepted message %q", a.Message)
	}
	if got := rcptReply(t, dp.addr, "x@elsewhere.test"); !strings.HasPrefix(got, "250") {
		t.Errorf("the previous generation is no longer in force: relay got %q", got)
	}

	// Fixing the objects recovers.
	if err := w.c.Get(context.Background(), client.ObjectKeyFromObject(good), good); err != nil {
		t.Fatal(err)
	}
	good.Spec.Auth = nil
	if err := w.c.Update(context.Background(), good); err != nil {
		t.Fatal(err)
	}
	if err := w.c.Get(context.Background(), client.ObjectKeyFromObject(bad), bad); err != nil {
		t.Fatal(err)
	}
	bad.Spec.MaxMessageBytes = nil
	if err := w.c.Update(context.Background(), bad); err != nil {
		t.Fatal(err)
	}
	for _, o := range []client.Object{good, bad} {
		eventually(t, 10*time.Second, o.GetName()+" to be accepted and ready", func() bool {
			a, r, _ := w.conditions(o)
			return a != nil && a.Status == metav1.ConditionTrue && r != nil && r.Status == metav1.ConditionTrue
		})
	}
	snap, _, _ = w.store.Current(context.Background())
	if len(snap.RelayPolicies) != 2 {
		t.Errorf("%d relay policies in force, want 2", len(snap.RelayPolicies))
	}
}

func TestReadyOnlyAfterTheDataPlaneReportsTheRevision(t *testing.T) {
	w := newWorld(t)
	rp := &v1alpha1.RelayPolicy{ObjectMeta: metav1.ObjectMeta{Name: "site"},
		Spec: v1alpha1.RelayPolicySpec{RelayNetworks: []string{"127.0.0.0/8"}}}
	w.create(rp)
	eventually(t, 10*time.Second, "Accepted", func() bool {
		a, _, _ := w.conditions(rp)
		return a != nil && a.Status == metav1.ConditionTrue
	})
	_, r, st := w.conditions(rp)
	if r == nil || r.Status != metav1.ConditionFalse || r.Reason != "NoDataPlane" {
		t.Fatalf("Ready %+v with no pod reporting, want False/NoDataPlane", r)
	}
	ctx := context.Background()
	// A pod still on an older revision: not ready.
	if err := w.store.Heartbeat(ctx, "gw-old", "gateway", st.Revision-1); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "Ready=False/Rolling", func() bool {
		_, r, _ := w.conditions(rp)
		return r != nil && r.Status == metav1.ConditionFalse && r.Reason == "Rolling"
	})
	// It catches up: ready.
	if err := w.store.Heartbeat(ctx, "gw-old", "gateway", st.Revision); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "Ready=True", func() bool {
		_, r, _ := w.conditions(rp)
		return r != nil && r.Status == metav1.ConditionTrue
	})
	if a, _, st := w.conditions(rp); st.ObservedGeneration != rp.Generation || a.ObservedGeneration != rp.Generation {
		t.Errorf("observedGeneration %d / %d, want %d", st.ObservedGeneration, a.ObservedGeneration, rp.Generation)
	}
}

func TestSecondDeliveryPolicyIsRejected(t *testing.T) {
	w := newWorld(t)
	first := &v1alpha1.DeliveryPolicy{ObjectMeta: metav1.ObjectMeta{Name: "first"}, Spec: v1alpha1.DeliveryPolicySpec{MaxSessions: i32(10)}}
	w.create(first)
	eventually(t, 10*time.Second, "the first to be accepted", func() bool {
		a, _, _ := w.conditions(first)
		return a != nil && a.Status == metav1.ConditionTrue
	})
	second := &v1alpha1.DeliveryPolicy{ObjectMeta: metav1.ObjectMeta{Name: "second"}, Spec: v1alpha1.DeliveryPolicySpec{MaxSessions: i32(20)}}
	w.create(second)
	eventually(t, 10*time.Second, "the second to be rejected", func() bool {
		a, _, _ := w.conditions(second)
		return a != nil && a.Status == metav1.ConditionFalse && strings.Contains(a.Message, "already defined by DeliveryPolicy "+w.ns+"/first")
	})
	snap, _, _ := w.store.Current(context.Background())
	if len(snap.DeliveryPolicies) != 1 || *snap.DeliveryPolicies[0].Spec.MaxSessions != 10 {
		t.Errorf("the first DeliveryPolicy is not the one in force: %+v", snap.DeliveryPolicies)
	}
	_ = corev1.EventTypeWarning
}

// A cluster object must never make a pod read its own files: a `file`
// field is refused, naming the field, even when the file exists on the
// controller's host with valid content, and the last accepted generation
// stays in force.
func TestFileFieldsAreRefusedInTheCluster(t *testing.T) {
	w := newWorld(t)
	creds := filepath.Join(t.TempDir(), "creds")
	if err := os.WriteFile(creds, []byte("relay:secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	route := &v1alpha1.MailRoute{ObjectMeta: metav1.ObjectMeta{Name: "via-file"},
		Spec: v1alpha1.MailRouteSpec{Domains: []string{"example.net"}, NextHops: []string{"smtp.example.net"}}}
	w.create(route)
	eventually(t, 10*time.Second, "the route to be accepted", func() bool {
		a, _, _ := w.conditions(route)
		return a != nil && a.Status == metav1.ConditionTrue
	})
	if err := w.c.Get(context.Background(), client.ObjectKeyFromObject(route), route); err != nil {
		t.Fatal(err)
	}
	route.Spec.Auth = &v1alpha1.RouteAuth{File: creds}
	if err := w.c.Update(context.Background(), route); err != nil {
		t.Fatal(err)
	}
	users := &v1alpha1.RelayPolicy{ObjectMeta: metav1.ObjectMeta{Name: "users-file"},
		Spec: v1alpha1.RelayPolicySpec{Auth: &v1alpha1.RelayAuth{UsersFile: creds}}}
	w.create(users)
	for obj, field := range map[client.Object]string{route: "spec.auth.file", users: "spec.auth.usersFile"} {
		eventually(t, 10*time.Second, obj.GetName()+" to be refused", func() bool {
			a, _, st := w.conditions(obj)
			return a != nil && a.Status == metav1.ConditionFalse && st.ObservedGeneration == obj.GetGeneration()
		})
		if a, _, _ := w.conditions(obj); !strings.Contains(a.Message, field) || !strings.Contains(a.Message, "jetmail serve") {
			t.Errorf("%s: Accepted message %q does not name %s", obj.GetName(), a.Message, field)
		}
	}
	snap, _, err := w.store.Current(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.MailRoutes) != 1 || snap.MailRoutes[0].Spec.Auth != nil || len(snap.RelayPolicies) != 0 {
		t.Errorf("the snapshot holds %+v and %d relay policies; want the route's last accepted generation only",
			snap.MailRoutes, len(snap.RelayPolicies))
	}
}
