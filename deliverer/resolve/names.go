package resolve

// Domain names as written in addresses and routes: canonical forms,
// A-labels and address literals.

import (
	"net/netip"
	"strings"

	"golang.org/x/net/idna"

	"github.com/jetmail/jetmail/policy"
)

// canonicalName lower-cases a DNS name and strips its trailing dot; the
// root "." becomes "".
func canonicalName(s string) string {
	return strings.ToLower(strings.TrimSuffix(s, "."))
}

// normalizeDomain canonicalizes a domain, turns an internationalized one
// into its A-labels, and checks it with policy.ValidDomain, the same check
// the gateway applies to addresses.
func normalizeDomain(s string) (string, bool) {
	s = canonicalName(s)
	// An internationalised domain (SMTPUTF8 mail) is looked up by its
	// A-label form (RFC 5890): bücher.example is xn--bcher-kva.example.
	if strings.ContainsFunc(s, func(r rune) bool { return r >= 0x80 }) {
		a, err := idna.Lookup.ToASCII(s)
		if err != nil {
			return "", false
		}
		s = a
	}
	if !policy.ValidDomain(s) {
		return "", false
	}
	return s, true
}

// parseDomainLiteral parses an RFC 5321 §4.1.3 address literal.
func parseDomainLiteral(s string) (netip.Addr, bool) { return policy.ParseLiteral(s) }

// parseHostIP accepts a route host given as an IP: bare, in brackets, or as
// an address literal.
func parseHostIP(s string) (netip.Addr, bool) {
	if a, ok := parseDomainLiteral(s); ok {
		return a, true
	}
	s = strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, false
	}
	return a.Unmap(), true
}
