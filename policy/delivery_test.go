package policy_test

import (
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/policy"
)

// The CRD has no field for the EHLO, STARTTLS and AUTH timeouts: they are
// the documented defaults wherever a configuration comes from, and never
// the greeting timeout.
func TestOutboundTimeoutsDefaults(t *testing.T) {
	want := policy.OutboundTimeouts{
		Connect: 30 * time.Second, Greeting: 5 * time.Minute, Ehlo: 5 * time.Minute,
		StartTLS: 2 * time.Minute, Auth: 2 * time.Minute, Mail: 5 * time.Minute,
		Rcpt: 5 * time.Minute, DataInit: 2 * time.Minute, DataBlock: 3 * time.Minute,
		DataDone: 10 * time.Minute, Session: 15 * time.Minute, MinDataRate: 512,
		DataRateGrace: 30 * time.Second,
	}
	if got := policy.DefaultOutboundTimeouts(); got != want {
		t.Errorf("DefaultOutboundTimeouts() = %+v\nwant %+v", got, want)
	}
	if got := policy.DefaultDelivery().Timeouts; got != want {
		t.Errorf("DefaultDelivery().Timeouts = %+v\nwant %+v", got, want)
	}

	dp := v1alpha1.DeliveryPolicy{ObjectMeta: metav1.ObjectMeta{Name: "d", Namespace: "mail"},
		Spec: v1alpha1.DeliveryPolicySpec{Timeouts: &v1alpha1.OutboundTimeouts{
			Greeting: dur(time.Minute), Session: dur(20 * time.Minute), MinDataRate: ptr(int64(0)),
		}}}
	routes := []v1alpha1.MailRoute{
		{ObjectMeta: metav1.ObjectMeta{Name: "plain", Namespace: "mail"},
			Spec: v1alpha1.MailRouteSpec{Domains: []string{"plain.example"}, NextHops: []string{"smtp.plain.example"}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "quick", Namespace: "mail"},
			Spec: v1alpha1.MailRouteSpec{Domains: []string{"quick.example"}, NextHops: []string{"smtp.quick.example"},
				Timeouts: &v1alpha1.OutboundTimeouts{Greeting: dur(10 * time.Second), Rcpt: dur(time.Minute)}}},
	}
	d, err := policy.CompileDelivery([]v1alpha1.DeliveryPolicy{dp}, routes, nil, policy.CompileOptions{Relayhost: "[192.0.2.1]:587"})
	if err != nil {
		t.Fatal(err)
	}
	fromPolicy := want
	fromPolicy.Greeting, fromPolicy.Session, fromPolicy.MinDataRate = time.Minute, 20*time.Minute, 0
	if d.Timeouts != fromPolicy {
		t.Errorf("DeliveryPolicy timeouts = %+v\nwant %+v", d.Timeouts, fromPolicy)
	}
	quick := fromPolicy
	quick.Greeting, quick.Rcpt = 10*time.Second, time.Minute
	for domain, want := range map[string]policy.OutboundTimeouts{
		"plain.example": fromPolicy, // the DeliveryPolicy's
		"quick.example": quick,      // changed by the route's spec.timeouts
		"other.example": fromPolicy, // the relayhost's
	} {
		r := d.Route(domain)
		if r == nil {
			t.Fatalf("no route for %s", domain)
		}
		if r.Timeouts != want {
			t.Errorf("%s: route timeouts = %+v\nwant %+v", r.Name, r.Timeouts, want)
		}
		if r.Timeouts.StartTLS != 2*time.Minute || r.Timeouts.Auth != 2*time.Minute || r.Timeouts.Ehlo != 5*time.Minute {
			t.Errorf("%s: EHLO %s, STARTTLS %s, AUTH %s; want 5m, 2m, 2m", r.Name, r.Timeouts.Ehlo, r.Timeouts.StartTLS, r.Timeouts.Auth)
		}
	}
}

func TestOutboundTimeoutsWithDefaults(t *testing.T) {
	def := policy.DefaultOutboundTimeouts()
	zero := def
	zero.MinDataRate = 0 // zero turns the rate check off: kept
	if got := (policy.OutboundTimeouts{}).WithDefaults(); got != zero {
		t.Errorf("zero value with defaults = %+v\nwant %+v", got, zero)
	}
	in := policy.OutboundTimeouts{Greeting: time.Second, StartTLS: -time.Second, MinDataRate: -5, Auth: 3 * time.Second}
	got := in.WithDefaults()
	want := def
	want.Greeting, want.Auth, want.MinDataRate = time.Second, 3*time.Second, 0
	if got != want {
		t.Errorf("WithDefaults() = %+v\nwant %+v", got, want)
	}
}

func TestRouteTLSPolicy(t *testing.T) {
	for _, tc := range []struct {
		spec v1alpha1.TLSPolicy
		want policy.TLSPolicy
	}{
		{"", policy.TLSOpportunistic},
		{v1alpha1.TLSNone, policy.TLSNone},
		{v1alpha1.TLSOpportunistic, policy.TLSOpportunistic},
		{v1alpha1.TLSRequired, policy.TLSRequired},
		{v1alpha1.TLSVerify, policy.TLSVerify},
	} {
		r := v1alpha1.MailRoute{ObjectMeta: metav1.ObjectMeta{Name: "r", Namespace: "mail"},
			Spec: v1alpha1.MailRouteSpec{Domains: []string{"example.net"}, NextHops: []string{"smtp.example.net"}, TLS: tc.spec}}
		d, err := policy.CompileDelivery(nil, []v1alpha1.MailRoute{r}, nil, policy.CompileOptions{})
		if err != nil {
			t.Fatalf("spec.tls %q: %v", tc.spec, err)
		}
		if got := d.Route("example.net").TLS; got != tc.want {
			t.Errorf("spec.tls %q compiles to %q, want %q", tc.spec, got, tc.want)
		}
	}
	bad := v1alpha1.MailRoute{ObjectMeta: metav1.ObjectMeta{Name: "r", Namespace: "mail"},
		Spec: v1alpha1.MailRouteSpec{Domains: []string{"example.net"}, NextHops: []string{"smtp.example.net"}, TLS: "sometimes"}}
	if _, err := policy.CompileDelivery(nil, []v1alpha1.MailRoute{bad}, nil, policy.CompileOptions{}); err == nil ||
		!strings.Contains(err.Error(), "MailRoute mail/r: spec.tls") {
		t.Errorf("spec.tls sometimes: %v, want an error naming the object and field", err)
	}
	d, err := policy.CompileDelivery(nil, nil, nil, policy.CompileOptions{Relayhost: "smtp.provider.example:587"})
	if err != nil {
		t.Fatal(err)
	}
	if got := d.Route("anything.example").TLS; got != policy.TLSOpportunistic {
		t.Errorf("relayhost route TLS %q, want opportunistic", got)
	}
}

func TestMessagesPerConnection(t *testing.T) {
	if policy.DefaultPerConnection != 100 {
		t.Errorf("DefaultPerConnection %d, want the documented 100", policy.DefaultPerConnection)
	}
	if n := policy.DefaultDelivery().PerConnection; n != policy.DefaultPerConnection {
		t.Errorf("default messagesPerConnection %d, want %d", n, policy.DefaultPerConnection)
	}
	compile := func(n int32) (*policy.Delivery, error) {
		dp := v1alpha1.DeliveryPolicy{ObjectMeta: metav1.ObjectMeta{Name: "d", Namespace: "mail"},
			Spec: v1alpha1.DeliveryPolicySpec{MessagesPerConnection: &n}}
		return policy.CompileDelivery([]v1alpha1.DeliveryPolicy{dp}, nil, nil, policy.CompileOptions{})
	}
	if d, err := compile(1); err != nil || d.PerConnection != 1 {
		t.Errorf("messagesPerConnection 1: %v, %v", d, err)
	}
	if _, err := compile(0); err == nil || !strings.Contains(err.Error(), "spec.messagesPerConnection") {
		t.Errorf("messagesPerConnection 0: %v, want an error naming the field", err)
	}
}

func TestDANEAndMTASTSSwitches(t *testing.T) {
	on, off := true, false
	d := policy.DefaultDelivery()
	if !d.DANE || !d.MTASTS {
		t.Errorf("defaults: DANE %v, MTA-STS %v; want both on for MX delivery", d.DANE, d.MTASTS)
	}
	dp := v1alpha1.DeliveryPolicy{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "mail"},
		Spec: v1alpha1.DeliveryPolicySpec{DANE: &off, MTASTS: &off}}
	route := func(tls v1alpha1.TLSPolicy, dane, sts *bool) v1alpha1.MailRoute {
		return v1alpha1.MailRoute{ObjectMeta: metav1.ObjectMeta{Name: "r", Namespace: "mail"},
			Spec: v1alpha1.MailRouteSpec{Domains: []string{"example.net"}, NextHops: []string{"smtp.example.net"}, TLS: tls, DANE: dane, MTASTS: sts}}
	}
	d, err := policy.CompileDelivery([]v1alpha1.DeliveryPolicy{dp}, []v1alpha1.MailRoute{route("", nil, nil)}, nil, policy.CompileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if d.DANE || d.MTASTS {
		t.Error("spec.dane/mtaSTS false did not turn them off")
	}
	if r := d.Route("example.net"); r.DANE || r.MTASTS {
		t.Errorf("a route's defaults: DANE %v, MTA-STS %v; want off", r.DANE, r.MTASTS)
	}
	d, err = policy.CompileDelivery(nil, []v1alpha1.MailRoute{route(v1alpha1.TLSRequired, &on, &on)}, nil, policy.CompileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if r := d.Route("example.net"); !r.DANE || !r.MTASTS {
		t.Error("a route's dane/mtaSTS true did not turn them on")
	}
	for _, r := range []v1alpha1.MailRoute{route(v1alpha1.TLSNone, &on, nil), route(v1alpha1.TLSNone, nil, &on)} {
		if _, err := policy.CompileDelivery(nil, []v1alpha1.MailRoute{r}, nil, policy.CompileOptions{}); err == nil ||
			!strings.Contains(err.Error(), "MailRoute mail/r: spec.tls: none cannot go with") {
			t.Errorf("tls none with dane %v mtaSTS %v: %v", r.Spec.DANE != nil, r.Spec.MTASTS != nil, err)
		}
	}
	if _, err := policy.CompileDelivery(nil, []v1alpha1.MailRoute{route(v1alpha1.TLSNone, &off, &off)}, nil, policy.CompileOptions{}); err != nil {
		t.Errorf("tls none with both off: %v", err)
	}
}
