package policy_test

import (
	"net/netip"
	"testing"

	"github.com/jetmail/jetmail/api/v1alpha1"
)

// TestNmapOpenRelayChecklistIsRefused runs the sixteen MAIL FROM / RCPT TO
// pairs of nmap's smtp-open-relay.nse against the policy, from a client that
// may not relay. nmap's variables: domain is the target the relay would
// reach (victim.test), srvname is the name in our greeting (example.org, an
// accepted domain: the strongest case), ip is our own address (127.0.0.1).
//
// The policy never sees nmap's raw text: go-smtp (v0.25) parses the path
// first. It drops a source route ("@host:"), unquotes a quoted local part
// and keeps everything after the first "@" of an unquoted local part as the
// "domain". Forms that go-smtp itself refuses (a quoted local part with no
// domain, a bang path with no "@") are checked both raw and unquoted, so the
// policy refuses them whatever the parser in front of it does.
func TestNmapOpenRelayChecklistIsRefused(t *testing.T) {
	r := compile(t, rp("mail", "site", v1alpha1.RelayPolicySpec{
		AcceptedDomains: []string{"example.org"},
		RelayNetworks:   []string{"192.0.2.0/24"},
	}))
	client := netip.MustParseAddr("203.0.113.50")
	if r.MayRelay(client, false) {
		t.Fatal("the test client may relay; the checklist would prove nothing")
	}
	mayRelay := r.MayRelay(client, false)

	for name, tc := range map[string]struct {
		from string
		// rcpt is what nmap sends; seen are the strings that can reach the
		// policy for it.
		rcpt string
		seen []string
	}{
		"test 1: null sender to relaytest@domain": {
			"", "relaytest@victim.test", []string{"relaytest@victim.test"}},
		"test 2: sender at domain to relaytest@domain": {
			"antispam@victim.test", "relaytest@victim.test", []string{"relaytest@victim.test"}},
		"test 3: sender at our own name to relaytest@domain": {
			"antispam@example.org", "relaytest@victim.test", []string{"relaytest@victim.test"}},
		"test 4: sender at our address literal to relaytest@domain": {
			"antispam@[127.0.0.1]", "relaytest@victim.test", []string{"relaytest@victim.test"}},
		"test 5: percent hack at our address literal": {
			"antispam@[127.0.0.1]", "relaytest%victim.test@[127.0.0.1]", []string{"relaytest%victim.test@[127.0.0.1]"}},
		"test 6: percent hack at our own name": {
			"antispam@[127.0.0.1]", "relaytest%victim.test@example.org", []string{"relaytest%victim.test@example.org"}},
		"test 7: the whole address quoted": {
			"antispam@[127.0.0.1]", `"relaytest@victim.test"`, []string{`"relaytest@victim.test"`, "relaytest@victim.test"}},
		"test 8: a quoted percent hack without a domain": {
			"antispam@[127.0.0.1]", `"relaytest%victim.test"`, []string{`"relaytest%victim.test"`, "relaytest%victim.test"}},
		"test 9: a second @ and our address literal": {
			"antispam@[127.0.0.1]", "relaytest@victim.test@[127.0.0.1]", []string{"relaytest@victim.test@[127.0.0.1]"}},
		"test 10: a quoted local part with @ at our address literal": {
			"antispam@[127.0.0.1]", `"relaytest@victim.test"@[127.0.0.1]`, []string{"relaytest@victim.test@[127.0.0.1]"}},
		"test 11: a second @ and our own name": {
			"antispam@[127.0.0.1]", "relaytest@victim.test@example.org", []string{"relaytest@victim.test@example.org"}},
		"test 12: a source route through our address literal": {
			"antispam@[127.0.0.1]", "@[127.0.0.1]:relaytest@victim.test", []string{"relaytest@victim.test", "@[127.0.0.1]:relaytest@victim.test"}},
		"test 13: a source route through our own name": {
			"antispam@[127.0.0.1]", "@example.org:relaytest@victim.test", []string{"relaytest@victim.test", "@example.org:relaytest@victim.test"}},
		"test 14: a bang path without a domain": {
			"antispam@[127.0.0.1]", "victim.test!relaytest", []string{"victim.test!relaytest"}},
		"test 15: a bang path at our address literal": {
			"antispam@[127.0.0.1]", "victim.test!relaytest@[127.0.0.1]", []string{"victim.test!relaytest@[127.0.0.1]"}},
		"test 16: a bang path at our own name": {
			"antispam@[127.0.0.1]", "victim.test!relaytest@example.org", []string{"victim.test!relaytest@example.org"}},
	} {
		t.Run(name, func(t *testing.T) {
			// MAIL FROM is no obstacle in any test: refusal must come at RCPT.
			if err := r.CheckSender(tc.from, false); err != nil {
				t.Fatalf("MAIL FROM:<%s> refused (%d): the relay test must be decided at RCPT", tc.from, err.Code)
			}
			for _, s := range tc.seen {
				err := r.CheckRecipient(s, mayRelay, false)
				if err == nil {
					t.Fatalf("OPEN RELAY: RCPT TO:<%s> (policy saw %q) accepted from %s", tc.rcpt, s, client)
				}
				if err.Code < 500 || err.Code > 599 {
					t.Fatalf("RCPT TO:<%s> (policy saw %q) got %d; want a permanent 5xx refusal", tc.rcpt, s, err.Code)
				}
			}
		})
	}

	// The same policy does take mail for its own domain from that client.
	for _, ok := range []string{"user@example.org", "User@EXAMPLE.ORG", "user@example.org.", "postmaster@example.org"} {
		if err := r.CheckRecipient(ok, mayRelay, false); err != nil {
			t.Errorf("RCPT TO:<%s> refused with %d %v: local delivery must work", ok, err.Code, err.EnhancedCode)
		}
	}
}
