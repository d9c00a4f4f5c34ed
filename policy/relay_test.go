package policy_test

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/jetmail/jetmail/api/v1alpha1"
	"github.com/jetmail/jetmail/policy"
)

func rp(ns, name string, spec v1alpha1.RelayPolicySpec) v1alpha1.RelayPolicy {
	return v1alpha1.RelayPolicy{
		TypeMeta:   metav1.TypeMeta{APIVersion: "mail.jetmail.io/v1alpha1", Kind: "RelayPolicy"},
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       spec,
	}
}

func compile(t *testing.T, objs ...v1alpha1.RelayPolicy) *policy.Relay {
	t.Helper()
	r, err := policy.CompileRelay(objs, nil, policy.CompileOptions{})
	if err != nil {
		t.Fatalf("CompileRelay: %v", err)
	}
	return r
}

func ptr[T any](v T) *T { return &v }

func dur(d time.Duration) *metav1.Duration { return &metav1.Duration{Duration: d} }

func wantCode(t *testing.T, what string, err *smtp.SMTPError, code int, enhanced smtp.EnhancedCode) {
	t.Helper()
	if code == 0 {
		if err != nil {
			t.Fatalf("%s: %d %v %q; want accepted", what, err.Code, err.EnhancedCode, err.Message)
		}
		return
	}
	if err == nil {
		t.Fatalf("%s: accepted; want %d %v", what, code, enhanced)
	}
	if err.Code != code || err.EnhancedCode != enhanced {
		t.Fatalf("%s: %d %v %q; want %d %v", what, err.Code, err.EnhancedCode, err.Message, code, enhanced)
	}
}

func TestTheDefaultPolicyLetsOnlyLoopbackRelay(t *testing.T) {
	for _, r := range map[string]*policy.Relay{"Default()": policy.Default(), "CompileRelay(nil)": compile(t)} {
		for ip, want := range map[string]bool{
			"127.0.0.1":        true,
			"127.1.2.3":        true,
			"::1":              true,
			"::ffff:127.0.0.1": true,
			"10.0.0.1":         false,
			"192.0.2.1":        false,
			"::2":              false,
			"2001:db8::1":      false,
		} {
			if got := r.MayRelay(netip.MustParseAddr(ip), false); got != want {
				t.Errorf("default MayRelay(%s) = %v; want %v", ip, got, want)
			}
		}
		if !r.MayRelay(netip.MustParseAddr("10.0.0.1"), true) {
			t.Error("an authenticated client may not relay")
		}
		if r.Accepts("example.org") {
			t.Error("the default policy accepts mail for example.org")
		}
		if r.MaxMessageBytes != policy.DefaultMaxMessageBytes || r.MaxRecipients != policy.DefaultMaxRecipients ||
			r.CommandTimeout != policy.DefaultCommandTimeout || r.DataTimeout != policy.DefaultDataTimeout ||
			r.SessionTimeout != policy.DefaultSessionTimeout || r.MinDataRate != policy.DefaultMinDataRate ||
			r.DataRateGrace != policy.DefaultDataRateGrace || r.MaxConnections != policy.DefaultMaxConnections ||
			r.MaxConnectionsPerIP != policy.DefaultMaxConnectionsPerIP || r.MaxErrors != policy.DefaultMaxErrors ||
			r.MaxReceivedHeaders != policy.DefaultMaxReceivedHeaders || r.AllowInsecureAuth || r.HasUsers() {
			t.Errorf("default limits %+v are not the documented defaults", r)
		}
	}
}

func TestRelayNetworks(t *testing.T) {
	r := compile(t, rp("mail", "office", v1alpha1.RelayPolicySpec{
		RelayNetworks:            []string{"10.1.0.0/16", "2001:db8:1::/48", "192.0.2.7"},
		NormalizeLineEndingsFrom: []string{"198.51.100.0/24"},
	}))
	for ip, want := range map[string]bool{
		"10.1.2.3":           true,
		"::ffff:10.1.255.1":  true,
		"10.2.0.1":           false,
		"2001:db8:1:ffff::1": true,
		"2001:db8:2::1":      false,
		"192.0.2.7":          true,
		"192.0.2.8":          false,
		// Loopback is only a default: a policy with networks replaces it.
		"127.0.0.1": false,
	} {
		if got := r.MayRelay(netip.MustParseAddr(ip), false); got != want {
			t.Errorf("MayRelay(%s) = %v; want %v", ip, got, want)
		}
	}
	if !r.Normalize(netip.MustParseAddr("198.51.100.9")) || r.Normalize(netip.MustParseAddr("10.1.2.3")) {
		t.Error("Normalize does not follow spec.normalizeLineEndingsFrom")
	}
	if len(r.Sources) != 1 || r.Sources[0] != "RelayPolicy mail/office" {
		t.Errorf("Sources = %v", r.Sources)
	}
}

func TestAcceptedDomains(t *testing.T) {
	r := compile(t, rp("", "domains", v1alpha1.RelayPolicySpec{
		AcceptedDomains: []string{"Example.COM.", ".example.org", "*.example.net", "example.net"},
	}))
	for d, want := range map[string]bool{
		"example.com":       true,
		"EXAMPLE.com.":      true,
		"www.example.com":   false, // exact entry: no subdomains
		"example.org":       false, // ".example.org": subdomains only
		"a.example.org":     true,
		"a.b.example.org":   true,
		"badexample.org":    false,
		"example.org.evil":  false,
		"example.net":       true, // listed exactly as well
		"mx.example.net":    true,
		"victim.test":       false,
		"":                  false,
		"[127.0.0.1]":       false,
		"xexample.net":      false,
		"a.example.net.":    true,
		"example.com.evil":  false,
		"evil-example.com":  false,
		"a.example.comx":    false,
		"www.example.org.x": false,
	} {
		if got := r.Accepts(d); got != want {
			t.Errorf("Accepts(%q) = %v; want %v", d, got, want)
		}
	}
}

func TestCheckSender(t *testing.T) {
	r := compile(t, rp("mail", "bad", v1alpha1.RelayPolicySpec{
		RejectSenders: []string{"Spammer@Example.net", "@spam.example", "@Junk.Example"},
	}))
	for name, tc := range map[string]struct {
		from string
		code int
		enh  smtp.EnhancedCode
	}{
		"the null reverse path is accepted":                   {"", 0, smtp.EnhancedCode{}},
		"an ordinary sender is accepted":                      {"alice@example.net", 0, smtp.EnhancedCode{}},
		"a listed address is refused":                         {"spammer@example.net", 553, smtp.EnhancedCode{5, 7, 1}},
		"a listed address is refused whatever its case":       {"SPAMMER@EXAMPLE.NET", 553, smtp.EnhancedCode{5, 7, 1}},
		"a listed address with a trailing dot is refused":     {"spammer@example.net.", 553, smtp.EnhancedCode{5, 7, 1}},
		"another user at the listed address's domain is fine": {"ham@example.net", 0, smtp.EnhancedCode{}},
		"anyone at a listed domain is refused":                {"anyone@spam.example", 553, smtp.EnhancedCode{5, 7, 1}},
		"a listed domain matches whatever its case":           {"x@JUNK.example", 553, smtp.EnhancedCode{5, 7, 1}},
		"a subdomain of a listed domain is not refused":       {"x@sub.spam.example", 0, smtp.EnhancedCode{}},
		"a malformed sender is refused with 501 5.1.7":        {"no-at-sign", 501, smtp.EnhancedCode{5, 1, 7}},
	} {
		t.Run(name, func(t *testing.T) {
			wantCode(t, "CheckSender("+tc.from+")", r.CheckSender(tc.from, false), tc.code, tc.enh)
		})
	}
}

func TestCheckRecipient(t *testing.T) {
	r := compile(t, rp("mail", "site", v1alpha1.RelayPolicySpec{
		AcceptedDomains: []string{"example.org", ".lists.example.org"},
	}))
	denied := smtp.EnhancedCode{5, 7, 1}
	for name, tc := range map[string]struct {
		to       string
		mayRelay bool
		code     int
		enh      smtp.EnhancedCode
	}{
		"mail for an accepted domain is accepted from anyone":    {"bob@example.org", false, 0, smtp.EnhancedCode{}},
		"mail for a subdomain of a parent entry is accepted":     {"bob@dev.lists.example.org", false, 0, smtp.EnhancedCode{}},
		"mail for another domain is relay access denied":         {"bob@victim.test", false, 554, denied},
		"a percent hack at an accepted domain is denied":         {"bob%victim.test@example.org", false, 554, denied},
		"a bang path at an accepted domain is denied":            {"victim.test!bob@example.org", false, 554, denied},
		"an @ in the local part at an accepted domain is denied": {"bob@victim.test@example.org", false, 554, denied},
		"an address literal is denied to a non-relay client":     {"bob@[192.0.2.1]", false, 554, denied},
		"a syntax error is a 501, not a relay denial":            {"bob@", false, 501, smtp.EnhancedCode{5, 1, 3}},
		"a relay client may send to any domain":                  {"bob@victim.test", true, 0, smtp.EnhancedCode{}},
		"a relay client may use a percent hack":                  {"bob%victim.test@example.org", true, 0, smtp.EnhancedCode{}},
		"a relay client may send to an address literal":          {"bob@[IPv6:2001:db8::1]", true, 0, smtp.EnhancedCode{}},
		"a relay client still gets a syntax error":               {"bob@exa mple.org", true, 501, smtp.EnhancedCode{5, 1, 3}},
		"a relay client without SMTPUTF8 gets 553 for non-ASCII": {"jörg@victim.test", true, 553, smtp.EnhancedCode{5, 6, 7}},
	} {
		t.Run(name, func(t *testing.T) {
			wantCode(t, "CheckRecipient("+tc.to+")", r.CheckRecipient(tc.to, tc.mayRelay, false), tc.code, tc.enh)
		})
	}
}

func TestPoliciesAddUpAndSetLimits(t *testing.T) {
	r := compile(t,
		rp("mail", "a", v1alpha1.RelayPolicySpec{
			AcceptedDomains: []string{"a.example"},
			MaxMessageBytes: ptr(int64(25 << 20)),
			Timeouts:        &v1alpha1.InboundTimeouts{Command: dur(time.Minute), Data: dur(2 * time.Minute), MinDataRate: ptr(int64(4096))},
		}),
		rp("mail", "b", v1alpha1.RelayPolicySpec{
			AcceptedDomains: []string{"b.example"},
			MaxMessageBytes: ptr(int64(25 << 20)), // equal values do not conflict
			MaxRecipients:   ptr(int32(500)),
			Timeouts:        &v1alpha1.InboundTimeouts{Session: dur(time.Hour), DataRateGrace: dur(time.Second)},
			Limits: &v1alpha1.InboundLimits{MaxConnections: ptr(int32(7)), MaxConnectionsPerIP: ptr(int32(3)),
				MaxErrors: ptr(int32(5)), MaxReceivedHeaders: ptr(int32(30))},
		}),
	)
	if !r.Accepts("a.example") || !r.Accepts("b.example") {
		t.Error("accepted domains of two policies do not add up")
	}
	if r.MaxMessageBytes != 25<<20 || r.MaxRecipients != 500 || r.CommandTimeout != time.Minute ||
		r.DataTimeout != 2*time.Minute || r.SessionTimeout != time.Hour || r.DataRateGrace != time.Second ||
		r.MinDataRate != 4096 || r.MaxConnections != 7 || r.MaxConnectionsPerIP != 3 || r.MaxErrors != 5 ||
		r.MaxReceivedHeaders != 30 {
		t.Errorf("compiled limits %+v do not match the policies", r)
	}
	if strings.Join(r.Sources, ",") != "RelayPolicy mail/a,RelayPolicy mail/b" {
		t.Errorf("Sources = %v", r.Sources)
	}
}

func TestAnExplicitMinDataRateOfZeroIsHonouredOrRefused(t *testing.T) {
	r, err := policy.CompileRelay([]v1alpha1.RelayPolicy{rp("mail", "slow", v1alpha1.RelayPolicySpec{
		Timeouts: &v1alpha1.InboundTimeouts{MinDataRate: ptr(int64(0))},
	})}, nil, policy.CompileOptions{})
	if err != nil {
		return // refusing 0 is a consistent answer
	}
	if r.MinDataRate != 0 {
		t.Fatalf("minDataRate: 0 compiled to %d", r.MinDataRate)
	}
}

func TestCompileRelayErrorsNameTheObjectAndField(t *testing.T) {
	for name, tc := range map[string]struct {
		objs []v1alpha1.RelayPolicy
		want []string // substrings of the error
	}{
		"a relay network that is not a CIDR": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{RelayNetworks: []string{"10.0.0.0/8", "10.0.0/8"}})},
			[]string{"RelayPolicy mail/p", "spec.relayNetworks[1]", "10.0.0/8"}},
		"a relay network with host bits set": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{RelayNetworks: []string{"10.1.2.3/8"}})},
			[]string{"RelayPolicy mail/p", "spec.relayNetworks[0]", "host bits", "10.0.0.0/8"}},
		"a normalize network that is not a CIDR": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{NormalizeLineEndingsFrom: []string{"bogus"}})},
			[]string{"RelayPolicy mail/p", "spec.normalizeLineEndingsFrom[0]"}},
		"an accepted domain that is not a domain": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{AcceptedDomains: []string{"ok.example", "bad_domain"}})},
			[]string{"RelayPolicy mail/p", "spec.acceptedDomains[1]", "bad_domain"}},
		"a bare wildcard as accepted domain": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{AcceptedDomains: []string{"*"}})},
			[]string{"RelayPolicy mail/p", "spec.acceptedDomains[0]"}},
		"a rejectSenders entry without a domain": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{RejectSenders: []string{"spammer"}})},
			[]string{"RelayPolicy mail/p", "spec.rejectSenders[0]", "spammer"}},
		"a rejectSenders entry with two @": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{RejectSenders: []string{"a@b@example.net"}})},
			[]string{"RelayPolicy mail/p", "spec.rejectSenders[0]"}},
		"a rejectSenders entry with a bad domain": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{RejectSenders: []string{"@exa mple.net"}})},
			[]string{"RelayPolicy mail/p", "spec.rejectSenders[0]"}},
		"maxRecipients below the RFC minimum of 100": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{MaxRecipients: ptr(int32(99))})},
			[]string{"RelayPolicy mail/p", "spec.maxRecipients", "99"}},
		"maxMessageBytes below 1024": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{MaxMessageBytes: ptr(int64(1023))})},
			[]string{"RelayPolicy mail/p", "spec.maxMessageBytes", "1023"}},
		"a zero command timeout": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{Timeouts: &v1alpha1.InboundTimeouts{Command: dur(0)}})},
			[]string{"RelayPolicy mail/p", "spec.timeouts.command"}},
		"a negative data timeout": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{Timeouts: &v1alpha1.InboundTimeouts{Data: dur(-time.Second)}})},
			[]string{"RelayPolicy mail/p", "spec.timeouts.data"}},
		"a zero session timeout": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{Timeouts: &v1alpha1.InboundTimeouts{Session: dur(0)}})},
			[]string{"RelayPolicy mail/p", "spec.timeouts.session"}},
		"a negative data rate grace": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{Timeouts: &v1alpha1.InboundTimeouts{DataRateGrace: dur(-1)}})},
			[]string{"RelayPolicy mail/p", "spec.timeouts.dataRateGrace"}},
		"a negative minimum data rate": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{Timeouts: &v1alpha1.InboundTimeouts{MinDataRate: ptr(int64(-1))}})},
			[]string{"RelayPolicy mail/p", "spec.timeouts.minDataRate"}},
		"zero maxConnections": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{Limits: &v1alpha1.InboundLimits{MaxConnections: ptr(int32(0))}})},
			[]string{"RelayPolicy mail/p", "spec.limits.maxConnections"}},
		"negative maxErrors": {
			[]v1alpha1.RelayPolicy{rp("mail", "p", v1alpha1.RelayPolicySpec{Limits: &v1alpha1.InboundLimits{MaxErrors: ptr(int32(-5))}})},
			[]string{"RelayPolicy mail/p", "spec.limits.maxErrors"}},
		"an object without a namespace is named kind/name": {
			[]v1alpha1.RelayPolicy{rp("", "global", v1alpha1.RelayPolicySpec{MaxRecipients: ptr(int32(1))})},
			[]string{"RelayPolicy/global", "spec.maxRecipients"}},
		"two objects setting maxMessageBytes differently": {
			[]v1alpha1.RelayPolicy{
				rp("mail", "first", v1alpha1.RelayPolicySpec{MaxMessageBytes: ptr(int64(1 << 20))}),
				rp("mail", "second", v1alpha1.RelayPolicySpec{MaxMessageBytes: ptr(int64(2 << 20))}),
			},
			[]string{"RelayPolicy mail/first", "RelayPolicy mail/second", "spec.maxMessageBytes"}},
		"two objects setting the session timeout differently": {
			[]v1alpha1.RelayPolicy{
				rp("a", "x", v1alpha1.RelayPolicySpec{Timeouts: &v1alpha1.InboundTimeouts{Session: dur(time.Hour)}}),
				rp("b", "y", v1alpha1.RelayPolicySpec{Timeouts: &v1alpha1.InboundTimeouts{Session: dur(time.Minute)}}),
			},
			[]string{"RelayPolicy a/x", "RelayPolicy b/y", "spec.timeouts.session"}},
		"two objects setting maxErrors differently": {
			[]v1alpha1.RelayPolicy{
				rp("a", "x", v1alpha1.RelayPolicySpec{Limits: &v1alpha1.InboundLimits{MaxErrors: ptr(int32(3))}}),
				rp("a", "y", v1alpha1.RelayPolicySpec{Limits: &v1alpha1.InboundLimits{MaxErrors: ptr(int32(4))}}),
			},
			[]string{"RelayPolicy a/x", "RelayPolicy a/y", "spec.limits.maxErrors"}},
	} {
		t.Run(name, func(t *testing.T) {
			r, err := policy.CompileRelay(tc.objs, nil, policy.CompileOptions{})
			if err == nil {
				t.Fatalf("CompileRelay succeeded: %+v", r)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestLimitsAtTheirMinimumsCompile(t *testing.T) {
	r := compile(t, rp("mail", "min", v1alpha1.RelayPolicySpec{
		MaxMessageBytes: ptr(int64(1024)),
		MaxRecipients:   ptr(int32(100)),
		RelayNetworks:   []string{"0.0.0.0/0", "::/0"},
		Limits:          &v1alpha1.InboundLimits{MaxConnections: ptr(int32(1))},
	}))
	if r.MaxMessageBytes != 1024 || r.MaxRecipients != 100 || r.MaxConnections != 1 {
		t.Fatalf("minimum limits compiled to %+v", r)
	}
	if !r.MayRelay(netip.MustParseAddr("203.0.113.1"), false) {
		t.Fatal("0.0.0.0/0 does not cover every IPv4 client")
	}
}
